"""heba's training engine (the application side; :mod:`heba.nn` never imports it).

Each part by its name:

* :mod:`heba.train.config`     recipes as data (``heba``: the published HeBA settings),
  the :class:`~heba.train.config.Config` saved beside every checkpoint.
* :mod:`heba.train.recipe`     :class:`~heba.train.recipe.TrainRecipe`: setup, train,
  evaluate, save_checkpoint, cleanup; resume and DistributedDataParallel.
* :mod:`heba.train.step`       one step: candidate classes, one prompt each, the loss.
* :mod:`heba.train.prompts`    class prompts from the published description files.
* :mod:`heba.train.evaluate`   accuracy, base / novel / HM; evaluating a checkpoint.
* :mod:`heba.train.protocols`  base-to-novel over seeds, cross-dataset, domain generalization.
* :mod:`heba.train.data`       a run's train and test sets from the readers in :mod:`heba.data`.
* :mod:`heba.train.backbones`  one module per model library (open_clip, timm, hf).
* :mod:`heba.train.classify`   image classification on timm (the AdapterTune protocol).
* :mod:`heba.train.optim`      SGD / AdamW, the per-step cosine with warm-up, clipping.
* :mod:`heba.train.runtime`    devices, DDP, threads, precision.

The command line is :mod:`heba.cli` (``heba-train``).
"""
