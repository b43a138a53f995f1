"""Image classification on a timm backbone: the published AdapterTune protocol on heba's engine.

What the published trainer does (salimkhazem/adaptertune ``src/train/trainer.py``,
``scripts/train.py``), and heba with it:

1. **Data.** A whole training set (not few shots) minus a seeded 10% validation
   split, and the test set (:func:`heba.data.vision.load_vision_dataset`: the
   published readers, split rule and transforms). The loader shuffles and keeps
   the last partial batch.
2. **Model.** The timm backbone with a new ``N``-class linear head, wired by
   ``cfg.method`` (:mod:`heba.train.backbones.timm`).
3. **Step.** ``logits = model(images)``, ``cross_entropy(label_smoothing)`` (0),
   backward, ``clip_grad_norm_(1.0)``, AdamW step, then the per-step cosine with
   warm-up (:mod:`heba.train.optim`).
4. **Evaluation.** Top-1 and top-5 (``k <= N`` only) and the loss on the
   validation split after every epoch; the test split once, after the last
   epoch, with the *last* epoch's model (the published ``best.pt`` is saved at
   the best validation top-1 but not what the test reports). The best
   validation epoch is kept in the summary.

:class:`ClassifyRecipe` is the sibling of the CLIP recipe
(:class:`heba.train.recipe.TrainRecipe`): the same stages, the same functions of
:mod:`heba.train.loop`. Its data and configuration are :mod:`heba.train.vision`'s,
its saved tensors :mod:`heba.train.trainable`'s, its metrics
:func:`heba.train.evaluate.evaluate_split`. A run folder
(:mod:`heba.train.run_folder`, checked first by :mod:`heba.train.preflight`) holds:
``config.json``; per saved epoch one set ``epoch_<N>/`` with
``adapters.safetensors`` (every trained tensor: the adapters in their published
names, ``head.*``, or the whole model for ``full``), ``adapters.json`` (config,
epoch, accuracy, class names) and ``train_state.pt`` (optimizer, scheduler,
epoch, best validation; ``--resume``), the finished run's adapters copied to the
top; ``metrics.jsonl``
(``train`` / ``eval`` records with ``top1`` / ``top5`` / ``loss``);
``metrics.png`` (loss, learning rate, top-1 / top-5 per epoch, :mod:`heba.train.plots`);
``summary.md`` and ``summary.json`` (the published summary's keys:
``best_val_acc``, ``best_epoch``, ``test_acc``, plus ``test_acc5``).

Example::

    >>> from heba.train.config import make_config
    >>> cfg = make_config("adaptertune", model="timm:vit_small_patch16_224",
    ...                   source="vision", dataset="cifar10", root="/data")
    >>> # ClassifyRecipe(cfg, RunOptions(output="runs/c10")).run()["accuracy"]
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from heba.train import backbones
from heba.train import loop
from heba.train import run_folder as rf
from heba.train.config import Config, UsageError, combination_warnings
from heba.train.context import RunOptions, start
from heba.train.evaluate import evaluate_checkpoint, evaluate_split
from heba.train.metrics import format_acc, topk_acc, topk_correct
from heba.train.graph import prepare_frozen
from heba.train.plots import RUN_PLOT, write_run_plot
from heba.train.runtime import PRECISIONS, autocast_ctx
from heba.train.trainable import load_trainable, load_trainable_file, trainable_state, \
    trainable_writers
from heba.train.vision import (DATASET_NAMES, build_data, classifier_config, is_classification,
                               set_transforms, topk)

__all__ = ["ClassifyStep", "ClassifyRecipe", "RunOptions", "topk_correct", "evaluate_split",
           "build_data", "is_classification", "evaluate_checkpoint", "trainable_state",
           "load_trainable", "DATASET_NAMES", "config_from_cli"]

config_from_cli = classifier_config


class ClassifyStep(nn.Module):
    """``forward(images [B,3,H,W], labels [B]) -> (mean loss, top-k hit counts [len(ks)])``."""

    def __init__(self, model: nn.Module, ks, label_smoothing: float = 0.0):
        super().__init__()
        self.model, self.ks, self.label_smoothing = model, tuple(ks), label_smoothing

    def forward(self, images, labels):
        logits = self.model(images).float()
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return loss, topk_correct(logits.detach(), labels, self.ks)


class ClassifyRecipe:
    """Image classification on a timm backbone (module docstring); same folder, resume."""

    def __init__(self, cfg: Config, opts: RunOptions, log=print):
        self.cfg, self.opts, self._log = cfg, opts, log
        self.model = self.tr = None

    # --- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        """Check everything that can fail on bad input, then build; nothing is written here."""
        cfg, opts = self.cfg, self.opts
        self.ctx = run = start(cfg, opts, self._log)
        if opts.checkpoint_blocks:
            raise UsageError("--checkpoint-blocks is for open_clip towers, not timm backbones")
        self.data = build_data(cfg)                # the data set first: cheapest to check
        self.ks = topk(self.data.num_classes)
        lib = backbones.library(cfg.model)
        torch.manual_seed(cfg.seed)                # published set_seed: the head's init
        bb = lib.load(cfg, opts.allow_download, num_classes=self.data.num_classes)
        set_transforms(self.data, bb.train_transform, bb.eval_transform)
        self.model = lib.attach(bb.model, cfg, opts.backend).to(run.device)
        self.fast_notes = self._fast_setup()
        step = ClassifyStep(self.model, self.ks, cfg.label_smoothing)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.tr = loop.build_training(
            run, self.model, step, params, self.data.train,
            lambda path: load_trainable_file(self.model, cfg.method, path))
        self.latest = run.plan.latest
        self.best = dict(best_val_acc=0.0, best_epoch=None)
        if run.plan.state is not None:
            self.best = dict(run.plan.state.get("best", self.best))
        self.fast_notes.append("CUDA graphs " + ("on" if self.tr.graph_off is None
                                                 else f"off ({self.tr.graph_off})"))

    def _fast_setup(self) -> list:
        precision = self.ctx.precision
        if precision != "fp32" and self.opts.cast_once and \
                getattr(self.model, "heba_adapters", None) is not None:
            prepare_frozen(self.model, PRECISIONS[precision])
            return [f"frozen backbone cast once to {precision}"]
        return [f"backbone kept in {'fp32' if precision == 'fp32' else 'fp32 + autocast'}"]

    # --- train ---------------------------------------------------------------------------

    def train(self) -> Optional[dict]:
        """Every epoch from the plan's start: train, validate; test after the last (rank 0)."""
        run, d, cfg = self.ctx, self.data, self.cfg
        loop.open_folder(run, getattr(d, "splits", {}))
        loop.announce(run, self.model, f"{d.name} ({cfg.root}): {d.num_classes} classes, "
                                       f"{len(d.train)} train / {len(d.val)} val / "
                                       f"{len(d.test)} test images", self.fast_notes)
        for line in combination_warnings(cfg):      # after every check: the run goes ahead
            run.say(f"warning: {line}")
        if run.plan.mode == "finished":
            return self._already_finished()
        self.model.train()
        test = loop.run_epochs(run, self.tr, self._forward, self.train_epoch, self._end_epoch,
                               self.save_checkpoint)
        if run.rank == 0 and test is not None:
            self._finish(test)
        return None if test is None else topk_acc(test)

    def _forward(self, images, labels):
        run, tr = self.ctx, self.tr
        with autocast_ctx(run.device, run.precision, cache=tr.graph_off is not None):
            loss, hits = tr.train_step(images, labels)
        return tr.scaler.scale(loss), loss, hits

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training set (published ``train_one_epoch``); the metrics record."""
        return loop.train_epoch(self.ctx, self.tr, epoch, lambda images, labels: (images, labels),
                                _Tally(self.ks, self.ctx.device))

    def _end_epoch(self, epoch: int, rec: dict):
        """Validate; the epoch's line; the test split after the last epoch."""
        run, cfg = self.ctx, self.cfg
        val = self._validate(epoch) if run.rank == 0 else None
        if not self.opts.quiet:
            run.say(f"epoch {epoch}/{cfg.epochs}: loss {rec['loss']:.3f}  "
                    f"lr {rec['lr']:.2e}  {rec['img_per_s']:.0f} img/s"
                    + (f"  val {format_acc(topk_acc(val))}" if val else ""))
        test = None
        if run.rank == 0 and epoch == cfg.epochs:
            test = self.evaluate()
            run.record(dict(event="eval", split="test", epoch=epoch, **test))
        return dict(val=val, test=test), test

    def _validate(self, epoch: int) -> Optional[dict]:
        if len(self.data.val) == 0:
            return None
        val = self.evaluate(self.data.val)
        self.ctx.record(dict(event="eval", split="val", epoch=epoch, **val))
        if val["top1"] > self.best["best_val_acc"]:          # published: strictly better
            self.best = dict(best_val_acc=val["top1"], best_epoch=epoch)
        return val

    # --- evaluate, save, finish ----------------------------------------------------------

    def evaluate(self, ds=None) -> dict:
        """``{"loss", "top1", "top5"}`` on the test split (or ``ds``)."""
        run = self.ctx
        return evaluate_split(self.model, self.data.test if ds is None else ds, run.device,
                              run.precision, self.ks, self.cfg.test_batch_size,
                              self.opts.workers, self.cfg.label_smoothing)

    def save_checkpoint(self, epoch: int, acc: Optional[dict]) -> None:
        """The trained tensors + config (safetensors + JSON) and the optimizer state."""
        writers = trainable_writers(self.model, self.cfg.method,
                                    dict(self.cfg.to_dict(), epoch=epoch, accuracy=acc,
                                         classnames=list(self.data.classnames)))
        self.latest = loop.save_epoch(self.ctx, self.tr, self.model, epoch, writers,
                                      best=self.best)

    def _already_finished(self):
        """A finished run resumed: its saved test accuracy; the final files if missing."""
        if self.ctx.rank != 0:
            return None
        test = (self.ctx.plan.saved.get("accuracy") or {}).get("test")
        if test is None:
            return None
        if not rf.is_published(self.opts.output, self.latest):
            self._finish(test)
        else:
            self.ctx.say(f"after training: test {format_acc(topk_acc(test))}")
            if not os.path.isfile(os.path.join(self.opts.output, RUN_PLOT)):
                write_run_plot(self.opts.output, self.ctx.say)   # a kill came before it
        return topk_acc(test)

    def _finish(self, test: dict) -> None:
        """``summary.json`` (the published summary's keys), the adapters and ``summary.md``."""
        from heba.clip.wiring import count_parameters
        run, c = self.ctx, self.cfg
        trainable, total = count_parameters(self.model)
        summary = dict(best_val_acc=self.best["best_val_acc"], best_epoch=self.best["best_epoch"],
                       test_acc=test["top1"], test_acc5=test.get("top5"), test_loss=test["loss"],
                       trainable_params=trainable, total_params=total)
        text = json.dumps(summary, indent=2) + "\n"
        rf.atomic_write(os.path.join(self.opts.output, "summary.json"),
                        lambda tmp: rf.write_text(tmp, text))
        rows = "".join(f"| test top-{k} | {test[f'top{k}']:.2f} |\n" for k in self.ks)
        if summary["best_epoch"] is not None:
            rows += f"| best val top-1 (epoch {summary['best_epoch']}) | " \
                    f"{summary['best_val_acc']:.2f} |\n"
        md = (f"# {c.recipe}: {c.method} on {c.model}, {self.data.name}, seed {c.seed}\n\n"
              f"{trainable:,} trainable of {total:,} parameters; test: the last epoch's model\n\n"
              f"| metric | % |\n|---|---|\n{rows}")
        rf.publish_final(self.opts.output, self.latest, md)   # adapters + JSON, summary.md
        run.say(f"after training: test {format_acc(topk_acc(test))}")
        run.say(f"checkpoint: {run.ck_path}; metrics: {run.metrics_path}")
        write_run_plot(self.opts.output, run.say)       # metrics.png (rank 0: _finish's caller)

    def cleanup(self) -> None:
        """Release the graphs and the model (the process group is the caller's)."""
        if self.tr is not None:
            loop.release(self.ctx, self.tr)

    def run(self) -> dict:
        """setup, train, cleanup; returns ``{"accuracy": ..., "output": ...}``."""
        self.setup()
        try:
            acc = self.train()
        finally:
            self.cleanup()
        return dict(accuracy=acc, output=self.opts.output)


class _Tally(loop.Tally):
    """The classifier's loss (weighted by batch size) and top-k hits."""

    def __init__(self, ks, device):
        self.ks = ks
        self.loss = torch.zeros((), device=device)
        self.hits = torch.zeros(len(ks), device=device)

    def add(self, outs, n: int) -> None:
        loss, hits = outs
        self.loss += loss.float() * n
        self.hits += hits

    def result(self, steps: int, seen: int) -> tuple:
        return (dict(loss=self.loss.item() / max(seen, 1)),
                {f"top{k}": 100.0 * h / max(seen, 1) for k, h in zip(self.ks,
                                                                     self.hits.tolist())})
