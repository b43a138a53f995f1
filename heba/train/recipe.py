"""The training recipe: setup, train, evaluate, save_checkpoint, cleanup (torchtune's shape).

:class:`TrainRecipe` runs one configuration (:class:`heba.train.config.Config`,
the knobs saved with the run) under :class:`RunOptions` (where and how fast:
device, output folder, resume, fast-path switches; not part of the result).
One process, or one per GPU under ``torchrun`` (DistributedDataParallel over
the adapter parameters only). A run is a folder::

    <output>/config.json            the configuration (and the recipe it came from)
    <output>/split_<sub>.json       the images it used (as ``heba-train split`` writes them)
    <output>/adapters.safetensors   the adapters; adapters.json = config + epoch + accuracy
    <output>/train_state.pt         optimizer, scheduler, epoch, scale-policy RNG (--resume)
    <output>/metrics.jsonl          one line per epoch and evaluation
    <output>/summary.md             the final accuracies

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
from heba.clip.fast import (GraphedStep, checkpoint_frozen_blocks, policy_graphs_reason,
                            prepare_frozen)
from heba.clip.wiring import count_parameters
from heba.train import backbones
from heba.train import data as run_data
from heba.train import optim
from heba.train.config import RESUME_FIELDS, Config, UsageError
from heba.train.evaluate import evaluate, format_acc
from heba.train.prompts import PromptBank, class_prompts, read_descriptions
from heba.train.runtime import (PRECISIONS, autocast_ctx, barrier, resolve_precision,
                                set_cpu_threads, setup_distributed)
from heba.train.step import AdapterStep, draw_step

CKPT_NAME = "adapters.safetensors"
STATE_NAME = "train_state.pt"
CONFIG_NAME = "config.json"
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
        if self.device.type == "cpu":
            set_cpu_threads(opts.threads)
        self.precision = resolve_precision(cfg.precision, self.device, cfg.gpu_precision)
        self.eval_precision = "fp32" if cfg.eval_precision == "fp32" else self.precision
        self._check_output()
        if opts.checkpoint_blocks < 0:
            raise UsageError(f"--checkpoint-blocks must be >= 0 (0: off), "
                             f"got {opts.checkpoint_blocks}")
        self.data = run_data.build(cfg)            # the data set first: cheapest to check
        bb = backbones.load(cfg, opts.allow_download)
        run_data.set_transforms(self.data, bb.train_transform, bb.eval_transform)
        self.tokenizer, self.eval_transform = bb.tokenizer, bb.eval_transform
        self.train_bank = make_bank(self.data.train_classes, cfg, bb.tokenizer, self.device)
        self.banks = {s: make_bank(names, cfg, bb.tokenizer, self.device)
                      for s, (names, _) in self.data.evals.items()}
        saved = self._saved_config()
        torch.manual_seed(cfg.seed)               # the same adapter init on every rank
        self.model = backbones.attach(bb.model, cfg, opts.backend).to(self.device)
        self.fast_notes = self._fast_setup()
        self.step = AdapterStep(self.model, self.train_bank, cfg.label_smoothing,
                                cfg.neg_per_class, cfg.candidates)
        self.params = [p for p in self.model.heba_adapters.parameters() if p.requires_grad]
        self._build_optimizer()
        self.start_epoch = 0 if saved is None else self._load_state(saved)
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

    def _check_output(self):
        check_output(self.opts)
        self.ck_path = os.path.join(self.opts.output, CKPT_NAME)
        self.state_path = os.path.join(self.opts.output, STATE_NAME)

    def _saved_config(self):
        if not self.opts.resume:
            return None
        saved = ckpt.read_config(self.ck_path)
        check_same(saved, self.cfg.to_dict(), RESUME_FIELDS, self.ck_path)
        return saved

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

    def _load_state(self, saved) -> int:
        ckpt.load_adapters(self.ck_path, self.model)
        state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        if state.get("epoch") != saved.get("epoch"):
            raise UsageError(f"{self.opts.output}: {STATE_NAME} (epoch {state.get('epoch')}) "
                             f"and {CKPT_NAME} (epoch {saved.get('epoch')}) disagree")
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        policy = getattr(self.model, "heba_policy", None)
        if "scale_policy" in state and policy is not None:
            policy.load_state_dict(state["scale_policy"])     # the slow-fast stream goes on
        return state["epoch"]

    # --- train ---------------------------------------------------------------------------

    def train(self) -> Optional[dict]:
        """Every epoch from ``start_epoch``; returns the final accuracies (rank 0)."""
        cfg, opts = self.cfg, self.opts
        os.makedirs(opts.output, exist_ok=True)
        self.metrics_path = os.path.join(opts.output, "metrics.jsonl")
        if self.rank == 0 and not opts.resume and os.path.exists(self.metrics_path):
            os.unlink(self.metrics_path)           # --overwrite: a fresh log
        if self.rank == 0:
            cfg.save(os.path.join(opts.output, CONFIG_NAME))
            from heba.data.coop import write_split_json
            for sub, split in self.data.splits.items():     # the exact images of this run
                write_split_json(split, os.path.join(opts.output, f"split_{sub}.json"))
        self._announce()
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
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=self.rank != 0 or self.opts.quiet, file=sys.stderr,
                   dynamic_ncols=True)
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
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(obj) + "\n")

    def save_checkpoint(self, epoch: int, acc: Optional[dict]) -> None:
        """Adapters + config (safetensors + JSON) and the optimizer state, each atomically."""
        state = dict(optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(),
                     epoch=epoch)
        policy = getattr(self.model, "heba_policy", None)
        if policy is not None:
            state["scale_policy"] = policy.state_dict()
        ckpt.atomic_torch_save(state, self.state_path)
        ckpt.save_adapters(self.ck_path, self.model, dict(self.cfg.to_dict(), epoch=epoch,
                                                          accuracy=acc))

    def _finish(self, acc):
        if self.acc_before is not None:
            self.log(f"before training: {format_acc(self.acc_before)}")
        self.log(f"after training:  {format_acc(acc)}")
        rows = "".join(f"| {k} | {v:.2f} |\n" for k, v in acc.items())
        text = (f"# {self.cfg.recipe}: {self.cfg.method} on {self.cfg.model}, "
                f"{self.cfg.dataset or 'demo'}, seed {self.cfg.seed}\n\n| split | accuracy % |\n"
                f"|---|---|\n{rows}")
        ckpt.atomic_write(os.path.join(self.opts.output, "summary.md"),
                          lambda tmp: open(tmp, "w").write(text))
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


def check_output(opts: RunOptions) -> None:
    """The run folder may be written: no checkpoint there, or --resume / --overwrite."""
    out = opts.output
    has = os.path.exists(ckpt._config_path(os.path.join(out, CKPT_NAME)))
    if has and not (opts.resume or opts.overwrite):
        raise UsageError(f"{out} already holds a checkpoint: pass --resume to continue it "
                         f"or --overwrite to start over")
    if opts.resume and not has:
        raise UsageError(f"--resume: {out} holds no checkpoint ({CKPT_NAME} + json)")


def graphs_reason(opts, device, world, precision, model, step,
                  optimizer=None) -> Optional[str]:
    """Why the training step cannot be a CUDA graph here (None when it can)."""
    if not opts.cuda_graphs:
        return "--no-cuda-graphs"
    if device.type != "cuda":
        return "not on a GPU"
    if world > 1:
        # torch can capture DDP's NCCL all-reduce (NCCL >= 2.9.6) only with DDP built on a
        # side stream, >= 11 eager DDP steps before the capture and
        # TORCH_NCCL_ASYNC_ERROR_HANDLING=0 set before init_process_group (torch's CUDA
        # graphs notes, "Usage with DistributedDataParallel"); not verified on a multi-GPU
        # machine yet, so DDP steps stay eager.
        return "DistributedDataParallel"
    if precision == "fp16" and not getattr(optimizer, "_step_supports_amp_scaling", False):
        # GradScaler.step reads found_inf on the host unless the optimizer unscales and
        # skips by itself (fused SGD / Adam: _step_supports_amp_scaling)
        return "fp16 loss scaling with an optimizer that is not fused"
    # The candidate slots, the prompt picks and the slow-fast scales are device-side with
    # static shapes (heba.train.step, ScalePolicy): only host-drawn scales stop a graph.
    return policy_graphs_reason(getattr(model, "heba_policy", None))


def check_same(saved: dict, cfg: dict, fields, path):
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {cfg.get(k)!r}" for k in fields
            if saved.get(k) != cfg.get(k)]
    if diff:
        raise UsageError(f"checkpoint {path} is from another configuration ({'; '.join(diff)})")

