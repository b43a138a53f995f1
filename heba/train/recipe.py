"""The training recipe: setup, train, evaluate, save_checkpoint, cleanup (torchtune's shape).

:class:`TrainRecipe` runs one configuration (:class:`heba.train.config.Config`,
the knobs saved with the run) under :class:`RunOptions` (where and how fast:
device, output folder, resume, fast-path switches; not part of the result).
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

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from heba.clip import checkpoints as ckpt
from heba.clip.wiring import count_parameters
from heba.train import backbones
from heba.train import data as run_data
from heba.train import optim
from heba.train import preflight
from heba.train import run_folder as rf
from heba.train.config import Config, UsageError
from heba.train.evaluate import evaluate, format_acc
from heba.train.graph import GraphedStep, checkpoint_frozen_blocks, graphs_reason, prepare_frozen
from heba.train.prompts import PromptBank, class_prompts, read_descriptions
from heba.train.runtime import (PRECISIONS, autocast_ctx, barrier, resolve_precision,
                                set_cpu_threads, setup_distributed)
from heba.train.step import AdapterStep, draw_step

CKPT_NAME, CKPT_JSON, STATE_NAME, CONFIG_NAME = (rf.CKPT_NAME, rf.CKPT_JSON, rf.STATE_NAME,
                                                  rf.CONFIG_NAME)
check_same = preflight.check_same
ACC_ORDER = {"base": 0, "novel": 1, "hm": 2, "all": 3}
BAR_EVERY = 10          # training steps between progress-bar updates (each reads the loss)


@dataclass
class RunOptions:
    """How a run executes (not saved with it; the result does not depend on it up to rounding)."""

    output: str = "runs/heba"
    overwrite: bool = False
    resume: bool = False
    device: str = "auto"
    backend: str = "auto"
    workers: int = 0
    threads: Optional[int] = None
    allow_download: bool = False
    quiet: bool = False
    eval_every: int = 0
    eval_before: bool = True
    cuda_graphs: bool = True
    cast_once: bool = True
    checkpoint_blocks: int = 0
    demo_default: bool = False      # the bare demo's folder: replaces only a previous demo run


def make_bank(classnames, cfg: Config, tokenizer, device, dataset: Optional[str] = None):
    """The :class:`PromptBank` of ``classnames`` as ``cfg`` prompts them."""
    desc = read_descriptions(cfg.descriptions, dataset or cfg.dataset) if cfg.descriptions \
        else None
    prompts = class_prompts(classnames, desc, cfg.ctx_init, cfg.templates)
    return PromptBank(prompts, tokenizer, device=device)


class TrainRecipe:
    """Few-shot adapter training on a frozen backbone (module docstring)."""

    def __init__(self, cfg: Config, opts: RunOptions, log=print):
        self.cfg, self.opts, self._log = cfg, opts, log
        self.model = None

    def log(self, *a):
        if self.rank == 0:
            self._log(*a)

    # --- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        """Check everything that can fail on bad input, then build; nothing is written here."""
        cfg, opts = self.cfg, self.opts
        self.rank, self.world, self.device = setup_distributed(opts.device)
        self.plan = preflight.validate(cfg, opts, self.device)
        if self.device.type == "cpu":
            set_cpu_threads(opts.threads)
        self.precision = resolve_precision(cfg.precision, self.device, cfg.gpu_precision)
        self.eval_precision = "fp32" if cfg.eval_precision == "fp32" else self.precision
        self.ck_path = os.path.join(opts.output, CKPT_NAME)
        self.latest = self.plan.latest
        self.data = run_data.build(cfg)            # the data set first: cheapest to check
        preflight.check_images([self.data.train] + [ds for _, ds in self.data.evals.values()])
        bb = backbones.load(cfg, opts.allow_download)
        run_data.set_transforms(self.data, bb.train_transform, bb.eval_transform)
        self.tokenizer, self.eval_transform = bb.tokenizer, bb.eval_transform
        self.train_bank = make_bank(self.data.train_classes, cfg, bb.tokenizer, self.device)
        self.banks = {s: make_bank(names, cfg, bb.tokenizer, self.device)
                      for s, (names, _) in self.data.evals.items()}
        torch.manual_seed(cfg.seed)               # the same adapter init on every rank
        self.model = backbones.attach(bb.model, cfg, opts.backend).to(self.device)
        self.fast_notes = self._fast_setup()
        self.step = AdapterStep(self.model, self.train_bank, cfg.label_smoothing,
                                cfg.neg_per_class, cfg.candidates)
        self.params = [p for p in self.model.heba_adapters.parameters() if p.requires_grad]
        self._build_optimizer()
        self.start_epoch = 0 if self.latest is None else self._load_state(self.plan)
        self.graph_off = graphs_reason(self.opts, self.device, self.world, self.precision,
                                       self.model, self.step, self.opt)
        self.fast_notes.append("CUDA graphs " + ("on (forward + backward, one graph per "
                                                 "batch shape)" if self.graph_off is None
                                                 else f"off ({self.graph_off})"))
        self.train_step = self.step
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.train_step = DDP(self.step, device_ids=[self.device.index]
                                  if self.device.type == "cuda" else None,
                                  gradient_as_bucket_view=True)

    def _fast_setup(self) -> list:
        """Cast the frozen backbone once and checkpoint frozen blocks, as the options ask."""
        notes = []
        fp32_eval = self.eval_precision == "fp32"        # an fp16 backbone cannot run fp32
        if self.precision != "fp32" and self.opts.cast_once and not fp32_eval:
            prepare_frozen(self.model, PRECISIONS[self.precision])
            notes.append(f"frozen backbone cast once to {self.precision}")
        else:
            why = "" if self.precision == "fp32" else (
                " (--eval-precision fp32)" if fp32_eval else " (--no-cast-once)")
            notes.append("backbone kept in fp32" + why)
        if self.opts.checkpoint_blocks:
            try:
                n = checkpoint_frozen_blocks(self.model, every=self.opts.checkpoint_blocks)
            except TypeError as err:               # not open_clip towers (an hf: CLIP)
                raise UsageError(f"--checkpoint-blocks: {err}") from None
            notes.append(f"{n} frozen blocks checkpointed")
        return notes

    def _build_optimizer(self):
        """SGD (Dassl's: momentum, weight decay, no dampening / Nesterov) or AdamW
        (AdapterTune's), and the cosine (:mod:`heba.train.optim`)."""
        cfg = self.cfg
        self.opt = optim.build_optimizer(self.params, cfg)
        self.loader_len = len(self._loader(0))
        if cfg.schedule == "epoch":                # Dassl: CosineAnnealingLR(T_max=epochs)
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt,
                                                                    float(cfg.epochs))
        else:                                      # per step, AdapterTune's warm-up
            self.sched = optim.step_schedule(self.opt, cfg, self.loader_len)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16"
                                           and self.device.type == "cuda")

    def _loader(self, epoch):
        """The epoch's batches: shuffled by (seed, epoch); the last partial one dropped as Dassl."""
        cfg, ds = self.cfg, self.data.train
        drop = cfg.drop_last and len(ds) >= cfg.batch_size * self.world
        kw = dict(batch_size=cfg.batch_size, num_workers=self.opts.workers, drop_last=drop,
                  pin_memory=self.device.type == "cuda")
        if self.world > 1:
            from torch.utils.data.distributed import DistributedSampler
            sampler = DistributedSampler(ds, num_replicas=self.world, rank=self.rank,
                                         shuffle=True, seed=cfg.seed, drop_last=drop)
            sampler.set_epoch(epoch)
            return torch.utils.data.DataLoader(ds, sampler=sampler, **kw)
        g = torch.Generator().manual_seed(cfg.seed * 7_919 + epoch)
        return torch.utils.data.DataLoader(ds, shuffle=True, generator=g, **kw)

    def _load_state(self, plan) -> int:
        """The adapters, optimizer, scheduler and scale-policy RNG of the set resumed from."""
        ckpt.load_adapters(plan.latest.file(CKPT_NAME), self.model)
        state = plan.state
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        policy = getattr(self.model, "heba_policy", None)
        if "scale_policy" in state and policy is not None:
            policy.load_state_dict(state["scale_policy"])     # the slow-fast stream goes on
        return plan.start_epoch

    # --- train ---------------------------------------------------------------------------

    def train(self) -> Optional[dict]:
        """Every epoch from ``start_epoch``; returns the final accuracies (rank 0)."""
        cfg, opts = self.cfg, self.opts
        self.metrics_path = os.path.join(opts.output, rf.METRICS_NAME)
        if self.rank == 0:
            self._prepare_folder()
        barrier(self.world)
        self._announce()
        if self.plan.note:
            self.log(self.plan.note)
        if self.plan.mode == "finished":
            return self._already_finished()
        self.acc_before = None
        if self.start_epoch == 0 and opts.eval_before:
            if self.rank == 0:
                self.acc_before = self.evaluate()
                self.log(f"before training: {format_acc(self.acc_before)}")
                self.record(dict(event="eval", epoch=0, **self.acc_before))
            barrier(self.world)
        self.model.train()
        self.gen = torch.Generator(device=self.device)
        self.graphed = GraphedStep(self._forward, self.params, enabled=self.graph_off is None)
        acc = None
        for epoch in range(self.start_epoch, cfg.epochs):
            rec = self.train_epoch(epoch)
            self.record(rec)
            if not opts.quiet:
                self.log(f"epoch {epoch + 1}/{cfg.epochs}: loss {rec['loss']:.3f}  "
                         f"lr {rec['lr']:.2e}  {rec['img_per_s']:.0f} img/s")
            last = epoch + 1 == cfg.epochs
            acc = None
            if self.rank == 0 and (last or (opts.eval_every
                                            and (epoch + 1) % opts.eval_every == 0)):
                acc = self.evaluate()
                self.record(dict(event="eval", epoch=epoch + 1, **acc))
                if not last:
                    self.log(f"epoch {epoch + 1} eval: {format_acc(acc)}")
            if self.rank == 0:
                self.save_checkpoint(epoch + 1, acc)
            barrier(self.world)
        if self.rank == 0 and acc is not None:
            self._finish(acc)
        return acc

    def _prepare_folder(self):
        """The first writes, after every check: what the plan says happens to the folder."""
        plan, out = self.plan, self.opts.output
        os.makedirs(out, exist_ok=True)
        if plan.mode == "overwrite":
            rf.clear(out)
        if plan.mode in ("resume", "finished"):
            rf.trim_metrics(self.metrics_path, plan.start_epoch)   # no epoch listed twice
        rf.remove_stale(out, keep=plan.start_epoch if plan.latest else None)
        if not os.path.exists(os.path.join(out, CONFIG_NAME)):
            self.cfg.save(os.path.join(out, CONFIG_NAME))
        for sub, split in getattr(self.data, "splits", {}).items():   # the exact images
            path = os.path.join(out, f"split_{sub}.json")
            if not os.path.exists(path):
                text = json.dumps(split.to_json()) + "\n"
                rf.atomic_write(path, lambda tmp, t=text: rf.write_text(tmp, t))

    def _already_finished(self):
        """A finished run resumed: its saved accuracy; the final files if a kill left them out."""
        if self.rank != 0:
            return None                             # as train(): the accuracy is rank 0's
        acc = self.plan.saved.get("accuracy")
        if not rf.is_published(self.opts.output, self.latest):
            rf.publish_final(self.opts.output, self.latest, self._summary(acc or {}))
            self.log(f"{self.opts.output}: wrote the final adapters and summary.md")
        if acc:
            acc = dict(sorted(acc.items(), key=lambda kv: ACC_ORDER.get(kv[0], 9)))
            self.log(f"after training:  {format_acc(acc)}")
        return acc

    def _announce(self):
        cfg, d = self.cfg, self.data
        trainable, total = count_parameters(self.model)
        src = {"demo": "built-in generated shapes", "folder": cfg.dataset,
               "coop": f"{cfg.dataset} ({cfg.root})"}[cfg.source]
        n_all = sum(len(names) for names, _ in d.evals.values())
        self.log(f"heba-train: {cfg.method} ({cfg.recipe} recipe) on {cfg.model} "
                 f"({cfg.pretrained}), {src}: {n_all} classes, {len(d.train_classes)} "
                 f"trained, {cfg.shots} shots; {trainable:,} trainable of {total:,} "
                 f"parameters; device {self.device}"
                 + (f" x{self.world}" if self.world > 1 else "") + f", {self.precision}")
        self.log("fast path: " + "; ".join(self.fast_notes))

    def _forward(self, images, labels, mask, pick):
        with autocast_ctx(self.device, self.precision, cache=self.graph_off is not None):
            loss, acc = self.train_step(images, labels, mask, pick)
        return self.scaler.scale(loss), loss, acc

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training set; returns the epoch's metrics record."""
        from tqdm import tqdm
        cfg, seed = self.cfg, self.cfg.seed * 100_003 + epoch * 1_009 + self.rank
        torch.manual_seed(seed)                   # augmentations (global RNG)
        self.gen.manual_seed(seed)                # candidates and prompts
        loader = self._loader(epoch)
        # A bar only on a terminal: in a log file its carriage returns are noise (the
        # per-epoch line says the same).
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=self.rank != 0 or self.opts.quiet or not _isatty(sys.stderr),
                   file=sys.stderr, dynamic_ncols=True)
        t0, seen, n = time.time(), 0, 0
        # Summed on the device; read by the host every BAR_EVERY steps, not every step.
        loss_sum = torch.zeros((), device=self.device)
        acc_sum = torch.zeros((), device=self.device)
        for images, labels in bar:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            mask, pick = draw_step(labels, self.train_bank, cfg.neg_per_class, cfg.candidates,
                                   self.gen)
            self.opt.zero_grad(set_to_none=True)
            _, loss, acc = self.graphed(images, labels, mask, pick)
            optim.clip_gradients(self.params, cfg.grad_clip, self.scaler, self.opt)
            self.scaler.step(self.opt)
            self.scaler.update()
            if cfg.schedule == "step":
                self.sched.step()
            n, seen = n + 1, seen + len(labels)
            loss_sum += loss.float()
            acc_sum += acc.float()
            if not bar.disable and (n % BAR_EVERY == 0 or n == len(loader)):
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{self.lr():.2e}")
        bar.close()
        lr = self.lr()
        if cfg.schedule == "epoch":               # Dassl: update_lr() after the last batch
            self.sched.step()
        dt = time.time() - t0
        rec = dict(event="train", epoch=epoch + 1, step=(epoch + 1) * len(loader),
                   loss=loss_sum.item() / max(n, 1), train_acc=100 * acc_sum.item() / max(n, 1),
                   lr=lr, img_per_s=seen * self.world / max(dt, 1e-9), seconds=dt,
                   graph_replays=self.graphed.replays)
        if self.device.type == "cuda":
            rec["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return rec

    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    # --- evaluate, save, finish ----------------------------------------------------------

    def evaluate(self, evals: Optional[dict] = None, banks: Optional[dict] = None) -> dict:
        """``{split: accuracy %}`` (and HM) on the run's test sets, or on ``evals``."""
        return evaluate(self.model, evals or self.data.evals, banks or self.banks, self.device,
                        self.eval_precision, self.cfg.test_batch_size, self.opts.workers,
                        self.cfg.novel_eval)

    def record(self, obj: dict) -> None:
        if self.rank == 0:
            rf.append_record(self.metrics_path, obj)

    def save_checkpoint(self, epoch: int, acc: Optional[dict]) -> None:
        """Commit epoch ``epoch`` as one set (:func:`heba.clip.checkpoints.write_set`):
        the adapters + their JSON (config, epoch, accuracy) and the optimizer state."""
        state = dict(optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(),
                     epoch=epoch)
        policy = getattr(self.model, "heba_policy", None)
        if policy is not None:
            state["scale_policy"] = policy.state_dict()
        files = ckpt.adapter_writers(self.model, dict(self.cfg.to_dict(), epoch=epoch,
                                                      accuracy=acc))
        files[STATE_NAME] = lambda path: torch.save(state, path)
        self.latest = rf.write_set(self.opts.output, epoch, files)

    def _summary(self, acc: dict) -> str:
        rows = "".join(f"| {k} | {v:.2f} |\n" for k, v in acc.items())
        return (f"# {self.cfg.recipe}: {self.cfg.method} on {self.cfg.model}, "
                f"{self.cfg.dataset or 'demo'}, seed {self.cfg.seed}\n\n| split | accuracy % |\n"
                f"|---|---|\n{rows}")

    def _finish(self, acc):
        """The last set is committed: publish its adapters and the summary at the top."""
        rf.publish_final(self.opts.output, self.latest, self._summary(acc))
        if self.acc_before is not None:
            self.log(f"before training: {format_acc(self.acc_before)}")
        self.log(f"after training:  {format_acc(acc)}")
        self.log(f"adapters: {self.ck_path}; metrics: {self.metrics_path}")

    def cleanup(self) -> None:
        """Release the graphs and the model (the process group is the caller's)."""
        self.graphed = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def run(self) -> dict:
        """setup, train, cleanup; returns ``{"accuracy": ..., "output": ...}``."""
        self.setup()
        try:
            acc = self.train()
        finally:
            self.cleanup()
        return dict(accuracy=acc, output=self.opts.output)


def check_output(cfg: Config, opts: RunOptions) -> None:
    """What the run would do with its folder is allowed (:func:`preflight.plan_output`)."""
    preflight.plan_output(cfg, opts)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False

