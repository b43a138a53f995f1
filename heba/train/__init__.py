"""heba's training engine (the application side; :mod:`heba.nn` never imports it).

Each part by its name:

* :mod:`heba.train.config`     recipes as data (``heba``: the published HeBA settings),
  the :class:`~heba.train.config.Config` saved beside every checkpoint.
* :mod:`heba.train.context`    the run context: options, device, precision, the plan.
* :mod:`heba.train.loop`       what both recipes share: optimizer, resume, the epoch loop.
* :mod:`heba.train.recipe`     :class:`~heba.train.recipe.TrainRecipe`, the CLIP recipe:
  setup, train, evaluate, save_checkpoint, cleanup.
* :mod:`heba.train.step`       one step: candidate classes, one prompt each, the loss.
* :mod:`heba.train.graph`      the backbone cast once, CUDA graphs, checkpointed blocks.
* :mod:`heba.train.prompts`    class prompts from the published description files.
* :mod:`heba.train.evaluate`   accuracy, base / novel / HM, top-k; evaluating a checkpoint.
* :mod:`heba.train.metrics`    harmonic mean, top-k hits, the one-line form.
* :mod:`heba.train.protocols`  base-to-novel over seeds, cross-dataset, domain generalization.
* :mod:`heba.train.data`       a run's train and test sets from the readers in :mod:`heba.data`.
* :mod:`heba.train.backbones`  one module per model library (open_clip, timm, hf).
* :mod:`heba.train.classify`   the classification recipe on timm (the AdapterTune protocol);
  :mod:`heba.train.vision` its data and configuration, :mod:`heba.train.trainable` its
  saved tensors.
* :mod:`heba.train.run_folder` a run's files, atomic writes, checkpoint sets.
* :mod:`heba.train.optim`      SGD / AdamW, the per-step cosine with warm-up, clipping.
* :mod:`heba.train.runtime`    devices, DDP, threads, precision.

The command line is :mod:`heba.cli` (``heba-train``).
"""
