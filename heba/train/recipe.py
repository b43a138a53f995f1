"""The CLIP recipe: setup, train, evaluate, save_checkpoint, cleanup (torchtune's shape).

:class:`TrainRecipe` runs one configuration (:class:`heba.train.config.Config`,
the knobs saved with the run) under :class:`~heba.train.context.RunOptions` (where
and how fast: device, output folder, resume, fast-path switches; not part of the
result). Its sibling for a timm classifier is :class:`heba.train.classify.ClassifyRecipe`;
both call the same functions of :mod:`heba.train.loop` in the same order.
One process, or one per GPU under ``torchrun`` (DistributedDataParallel over
the adapter parameters only). A run is a folder (:mod:`heba.train.run_folder`)::

    <output>/config.json            the configuration (and the recipe it came from)
    <output>/split_<sub>.json       the images it used (as ``heba-train split`` writes them)
    <output>/metrics.jsonl          one line per epoch and evaluation
    <output>/epoch_<N>/             the latest saved epoch, committed as one set: adapters
                                    (.safetensors + .json = config + epoch + accuracy),
                                    train_state.pt (optimizer, scheduler, RNG), manifest.json
    <output>/adapters.safetensors   the finished run's adapters (+ adapters.json)
    <output>/summary.md             the final accuracies
    <output>/metrics.png            loss, learning rate and accuracy per epoch (matplotlib)

Everything a run can fail on is checked before its first write
(:mod:`heba.train.preflight`: what ``--resume`` / ``--overwrite`` / the demo do
with an existing folder, unreadable images, bad values); a kill between any two
writes leaves a folder that ``--resume`` continues (tested by fault injection).

Every random draw of an epoch follows from ``(seed, epoch, rank)``, so a
resumed run is the uninterrupted one, bit for bit (tested).

Example::

    >>> from heba.train.config import make_config
    >>> cfg = make_config("heba", model="tiny", pretrained="builtin", source="demo",
    ...                   epochs=1, shots=1, templates=["a photo of a {}."])
    >>> # TrainRecipe(cfg, RunOptions(output="runs/x")).run()["accuracy"]
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from heba.clip import checkpoints as ckpt
from heba.train import backbones
from heba.train import data as run_data
from heba.train import loop
from heba.train import preflight
from heba.train import run_folder as rf
from heba.train.config import Config, UsageError, combination_warnings
from heba.train.context import RunOptions, start
from heba.train.evaluate import evaluate
from heba.train.graph import checkpoint_frozen_blocks, prepare_frozen
from heba.train.metrics import format_acc
from heba.train.plots import RUN_PLOT, write_run_plot
from heba.train.prompts import make_bank
from heba.train.runtime import PRECISIONS, autocast_ctx, barrier
from heba.train.step import AdapterStep, draw_step

__all__ = ["TrainRecipe", "RunOptions", "make_bank", "check_output"]

CKPT_NAME, CKPT_JSON, STATE_NAME, CONFIG_NAME = (rf.CKPT_NAME, rf.CKPT_JSON, rf.STATE_NAME,
                                                  rf.CONFIG_NAME)
ACC_ORDER = {"base": 0, "novel": 1, "hm": 2, "all": 3}


class TrainRecipe:
    """Few-shot adapter training on a frozen CLIP (module docstring)."""

    def __init__(self, cfg: Config, opts: RunOptions, log=print):
        self.cfg, self.opts, self._log = cfg, opts, log
        self.model = self.tr = None

    @property
    def device(self):
        return self.ctx.device

    @property
    def world(self):
        return self.ctx.world

    # --- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        """Check everything that can fail on bad input, then build; nothing is written here."""
        cfg, opts = self.cfg, self.opts
        self.ctx = run = start(cfg, opts, self._log)
        self.data = run_data.build(cfg)            # the data set first: cheapest to check
        preflight.check_images([self.data.train] + [ds for _, ds in self.data.evals.values()])
        bb = backbones.load(cfg, opts.allow_download)
        run_data.set_transforms(self.data, bb.train_transform, bb.eval_transform)
        self.tokenizer, self.eval_transform = bb.tokenizer, bb.eval_transform
        self.train_bank = make_bank(self.data.train_classes, cfg, bb.tokenizer, run.device)
        self.banks = {s: make_bank(names, cfg, bb.tokenizer, run.device)
                      for s, (names, _) in self.data.evals.items()}
        torch.manual_seed(cfg.seed)               # the same adapter init on every rank
        self.model = backbones.attach(bb.model, cfg, opts.backend).to(run.device)
        self.fast_notes = self._fast_setup()
        step = AdapterStep(self.model, self.train_bank, cfg.label_smoothing,
                           cfg.neg_per_class, cfg.candidates)
        params = [p for p in self.model.heba_adapters.parameters() if p.requires_grad]
        self.tr = loop.build_training(run, self.model, step, params, self.data.train,
                                      lambda path: ckpt.load_adapters(path, self.model),
                                      bucket_view=True)
        self.latest = run.plan.latest
        self.fast_notes.append("CUDA graphs " + ("on (forward + backward, one graph per "
                                                 "batch shape)" if self.tr.graph_off is None
                                                 else f"off ({self.tr.graph_off})"))

    def _fast_setup(self) -> list:
        """Cast the frozen backbone once and checkpoint frozen blocks, as the options ask."""
        notes, precision = [], self.ctx.precision
        fp32_eval = self.ctx.eval_precision == "fp32"    # an fp16 backbone cannot run fp32
        if precision != "fp32" and self.opts.cast_once and not fp32_eval:
            prepare_frozen(self.model, PRECISIONS[precision])
            notes.append(f"frozen backbone cast once to {precision}")
        else:
            why = "" if precision == "fp32" else (
                " (--eval-precision fp32)" if fp32_eval else " (--no-cast-once)")
            notes.append("backbone kept in fp32" + why)
        if self.opts.checkpoint_blocks:
            try:
                n = checkpoint_frozen_blocks(self.model, every=self.opts.checkpoint_blocks)
            except TypeError as err:               # not open_clip towers (an hf: CLIP)
                raise UsageError(f"--checkpoint-blocks: {err}") from None
            notes.append(f"{n} frozen blocks checkpointed")
        return notes

    # --- train ---------------------------------------------------------------------------

    def train(self) -> Optional[dict]:
        """Every epoch from the plan's start; returns the final accuracies (rank 0)."""
        run, d, cfg = self.ctx, self.data, self.cfg
        loop.open_folder(run, getattr(d, "splits", {}))
        src = {"demo": "built-in generated shapes", "folder": cfg.dataset,
               "coop": f"{cfg.dataset} ({cfg.root})"}[cfg.source]
        n_all = sum(len(names) for names, _ in d.evals.values())
        loop.announce(run, self.model, f"{src}: {n_all} classes, {len(d.train_classes)} "
                                       f"trained, {cfg.shots} shots", self.fast_notes)
        for line in combination_warnings(cfg):      # after every check: the run goes ahead
            run.say(f"warning: {line}")
        if run.plan.mode == "finished":
            return self._already_finished()
        self.acc_before = self._evaluate_before()
        self.model.train()
        self.gen = torch.Generator(device=run.device)
        acc = loop.run_epochs(run, self.tr, self._forward, self.train_epoch, self._end_epoch,
                              self.save_checkpoint)
        if run.rank == 0 and acc is not None:
            self._finish(acc)
        return acc

    def _evaluate_before(self) -> Optional[dict]:
        if self.tr.start_epoch != 0 or not self.opts.eval_before:
            return None
        acc = None
        if self.ctx.rank == 0:
            acc = self.evaluate()
            self.ctx.say(f"before training: {format_acc(acc)}")
            self.ctx.record(dict(event="eval", epoch=0, **acc))
        barrier(self.ctx.world)
        return acc

    def _forward(self, images, labels, mask, pick):
        run, tr = self.ctx, self.tr
        with autocast_ctx(run.device, run.precision, cache=tr.graph_off is not None):
            loss, acc = tr.train_step(images, labels, mask, pick)
        return tr.scaler.scale(loss), loss, acc

    def _inputs(self, images, labels):
        """The step's inputs: the batch, its candidate classes and each class's prompt."""
        cfg = self.cfg
        mask, pick = draw_step(labels, self.train_bank, cfg.neg_per_class, cfg.candidates,
                               self.gen)
        return images, labels, mask, pick

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training set; returns the epoch's metrics record."""
        self.gen.manual_seed(loop.epoch_seed(self.cfg.seed, epoch, self.ctx.rank))  # draws
        return loop.train_epoch(self.ctx, self.tr, epoch, self._inputs, _Tally(self.ctx.device))

    def _end_epoch(self, epoch: int, rec: dict):
        """The epoch's line; the test sets at the end (and every ``--eval-every``)."""
        run, cfg, opts = self.ctx, self.cfg, self.opts
        if not opts.quiet:
            run.say(f"epoch {epoch}/{cfg.epochs}: loss {rec['loss']:.3f}  "
                    f"lr {rec['lr']:.2e}  {rec['img_per_s']:.0f} img/s")
        last = epoch == cfg.epochs
        acc = None
        if run.rank == 0 and (last or (opts.eval_every and epoch % opts.eval_every == 0)):
            acc = self.evaluate()
            run.record(dict(event="eval", epoch=epoch, **acc))
            if not last:
                run.say(f"epoch {epoch} eval: {format_acc(acc)}")
        return acc, acc

    # --- evaluate, save, finish ----------------------------------------------------------

    def evaluate(self, evals: Optional[dict] = None, banks: Optional[dict] = None) -> dict:
        """``{split: accuracy %}`` (and HM) on the run's test sets, or on ``evals``."""
        run, cfg = self.ctx, self.cfg
        return evaluate(self.model, evals or self.data.evals, banks or self.banks, run.device,
                        run.eval_precision, cfg.test_batch_size, self.opts.workers,
                        cfg.novel_eval)

    def save_checkpoint(self, epoch: int, acc: Optional[dict]) -> None:
        """Commit epoch ``epoch`` as one set (:func:`heba.train.loop.save_epoch`): the
        adapters + their JSON (config, epoch, accuracy) and the optimizer state."""
        writers = ckpt.adapter_writers(self.model, dict(self.cfg.to_dict(), epoch=epoch,
                                                        accuracy=acc))
        self.latest = loop.save_epoch(self.ctx, self.tr, self.model, epoch, writers)

    def _already_finished(self):
        """A finished run resumed: its saved accuracy; the final files if a kill left them out."""
        run = self.ctx
        if run.rank != 0:
            return None                             # as train(): the accuracy is rank 0's
        acc = run.plan.saved.get("accuracy")
        if not rf.is_published(self.opts.output, self.latest):
            rf.publish_final(self.opts.output, self.latest, self._summary(acc or {}))
            run.say(f"{self.opts.output}: wrote the final adapters and summary.md")
        if not os.path.isfile(os.path.join(self.opts.output, RUN_PLOT)):
            write_run_plot(self.opts.output, run.say)   # a kill came before the figure
        if acc:
            acc = dict(sorted(acc.items(), key=lambda kv: ACC_ORDER.get(kv[0], 9)))
            run.say(f"after training:  {format_acc(acc)}")
        return acc

    def _summary(self, acc: dict) -> str:
        rows = "".join(f"| {k} | {v:.2f} |\n" for k, v in acc.items())
        return (f"# {self.cfg.recipe}: {self.cfg.method} on {self.cfg.model}, "
                f"{self.cfg.dataset or 'demo'}, seed {self.cfg.seed}\n\n| split | accuracy % |\n"
                f"|---|---|\n{rows}")

    def _finish(self, acc):
        """The last set is committed: publish its adapters and the summary at the top."""
        run = self.ctx
        rf.publish_final(self.opts.output, self.latest, self._summary(acc))
        # "before training:" was printed once, when it was measured (_evaluate_before)
        run.say(f"after training:  {format_acc(acc)}")
        run.say(f"adapters: {run.ck_path}; metrics: {run.metrics_path}")
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
    """The CLIP step's loss and candidate accuracy, summed per step."""

    postfix = True

    def __init__(self, device):
        self.loss = torch.zeros((), device=device)
        self.acc = torch.zeros((), device=device)

    def add(self, outs, n: int) -> None:
        loss, acc = outs
        self.loss += loss.float()
        self.acc += acc.float()

    def result(self, steps: int, seen: int) -> tuple:
        return dict(loss=self.loss.item() / max(steps, 1),
                    train_acc=100 * self.acc.item() / max(steps, 1)), {}


def check_output(cfg: Config, opts: RunOptions) -> None:
    """What the run would do with its folder is allowed (:func:`preflight.plan_output`)."""
    preflight.plan_output(cfg, opts)
