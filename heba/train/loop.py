"""What every recipe's training shares: the optimizer set, the epoch pass, the epoch loop, the sets.

A recipe (:mod:`heba.train.recipe` for CLIP, :mod:`heba.train.classify` for a
timm classifier) builds its model and step module, then calls these functions
in the same order: :func:`build_training` (optimizer, schedule, loss scaler,
what ``--resume`` restores, the CUDA-graph decision, DDP), :func:`open_folder`
(the plan's first writes), :func:`run_epochs` (the one epoch loop: train,
record, the recipe's evaluation, :func:`save_epoch`), and :func:`release`.

Every random draw of an epoch follows from ``(seed, epoch, rank)``
(:func:`epoch_seed`), so a resumed run is the uninterrupted one, bit for bit.
A non-finite loss (tracked on the device, read once per epoch) or adapter value
stops the run (:class:`Diverged`) before the epoch is recorded or saved; SIGINT /
SIGTERM stop it between steps (:func:`heba.train.run_folder.check_stop`).

Example::

    >>> epoch_seed(seed=1, epoch=2, rank=0)
    102021
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from heba.clip.wiring import count_parameters
from heba.train import data as run_data
from heba.train import optim
from heba.train import preflight
from heba.train import run_folder as rf
from heba.train.context import Run
from heba.train.graph import GraphedStep, graphs_reason
from heba.train.config import UsageError
from heba.train.runtime import barrier

BAR_EVERY = 10          # training steps between progress-bar updates (each reads the loss)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of an epoch's augmentations and draws (:func:`heba.train.data.epoch_seeds`)."""
    return run_data.epoch_seeds(seed, epoch, rank)[1]


def isatty(stream) -> bool:
    """Whether ``stream`` is a terminal (False for anything that cannot say)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@dataclass
class Training:
    """The trained state of a run and how it steps (:func:`build_training`)."""

    step: torch.nn.Module               # the recipe's step module (loss, metric)
    train_step: torch.nn.Module         # ``step``, DDP-wrapped on several ranks
    params: list
    opt: torch.optim.Optimizer
    sched: object
    scaler: torch.amp.GradScaler
    loader: Callable                    # epoch -> its batches (TrainLoader.epoch)
    start_epoch: int = 0
    graph_off: Optional[str] = None     # why the step is not a CUDA graph (None: it is)
    data_note: str = ""                 # how the training images are read (TrainLoader.note)
    workers: Optional[int] = None       # the worker count the result depends on (or None)
    graphed: Optional[GraphedStep] = None

    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]


def build_training(run: Run, model, step, params, ds, load_weights: Callable[[str], None],
                   bucket_view: bool = False) -> Training:
    """SGD (Dassl's) or AdamW (AdapterTune's) and the cosine (:mod:`heba.train.optim`), the
    fp16 loss scaler; under ``--resume`` the saved set's weights (``load_weights(path)``),
    optimizer, scheduler and slow-fast stream; the CUDA-graph decision; DDP on several ranks."""
    cfg, device = run.cfg, run.device
    batches = run_data.train_loader(ds, cfg, device, run.world, run.rank, run.opts.workers,
                                    run.opts.pipeline)     # one loader for the run
    opt = optim.build_optimizer(params, cfg)
    if cfg.schedule == "epoch":                # Dassl: CosineAnnealingLR(T_max=epochs)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, float(cfg.epochs))
    else:                                      # per step, AdapterTune's warm-up
        sched = optim.step_schedule(opt, cfg, len(batches))
    scaler = torch.amp.GradScaler(device.type, enabled=run.precision == "fp16"
                                  and device.type == "cuda")
    tr = Training(step, step, params, opt, sched, scaler, batches.epoch, data_note=batches.note,
                  workers=batches.seeded_workers)

    if run.plan.latest is not None:
        preflight.check_workers(run.plan.state, tr.workers, run.plan.latest.path)
        load_weights(run.plan.latest.file(rf.CKPT_NAME))
        tr.start_epoch = restore(tr, model, run.plan)
    tr.graph_off = graphs_reason(run.opts, device, run.world, run.precision, model, step, opt)
    if run.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        tr.train_step = DDP(step, device_ids=[device.index] if device.type == "cuda" else None,
                            gradient_as_bucket_view=bucket_view)
    return tr


def restore(tr: Training, model, plan) -> int:
    """The optimizer, scheduler, loss scaler and scale-policy RNG of the set resumed from;
    its epoch."""
    state = plan.state
    tr.opt.load_state_dict(state["optimizer"])
    tr.sched.load_state_dict(state["scheduler"])
    if state.get("scaler"):                    # {} where the fp16 loss scaler is off
        tr.scaler.load_state_dict(state["scaler"])
    policy = getattr(model, "heba_policy", None)
    if "scale_policy" in state and policy is not None:
        policy.load_state_dict(state["scale_policy"])     # the slow-fast stream goes on
    return plan.start_epoch


def open_folder(run: Run, splits: dict) -> None:
    """The first writes, after every check (rank 0): what the plan says happens to the
    folder, ``config.json`` and the exact images (``split_<sub>.json``); then all ranks meet."""
    if run.rank == 0:
        _prepare_folder(run, splits)
    barrier(run.world)


def _prepare_folder(run: Run, splits: dict) -> None:
    plan, out = run.plan, run.opts.output
    with rf.writing(out):
        os.makedirs(out, exist_ok=True)
    if not rf.locked(out):                   # a new folder: owned from its first write
        rf.lock(out)
        if rf.inspect(out).holds_run:
            raise UsageError(f"{out}: another process started a run there while this one "
                             f"was setting up; nothing was written")
    _check_splits(run, splits)
    if plan.mode == "overwrite":
        rf.clear(out)
    if plan.mode in ("resume", "finished"):
        rf.trim_metrics(run.metrics_path, plan.start_epoch)   # no epoch listed twice
    rf.remove_stale(out, keep=plan.start_epoch if plan.latest else None)
    if not os.path.exists(os.path.join(out, rf.CONFIG_NAME)):
        run.cfg.save(os.path.join(out, rf.CONFIG_NAME))
    for sub, split in splits.items():
        path = os.path.join(out, f"split_{sub}.json")
        if not os.path.exists(path):
            text = json.dumps(split.to_json()) + "\n"
            rf.atomic_write(path, lambda tmp, t=text: rf.write_text(tmp, t))


def _check_splits(run: Run, splits: dict) -> None:
    """A resumed run trains on the images it started with: each ``split_<sub>.json`` saved
    in the folder must list exactly the images drawn now (the data may have changed)."""
    if run.plan.mode not in ("resume", "finished"):
        return
    for sub, split in splits.items():
        path = os.path.join(run.opts.output, f"split_{sub}.json")
        if not os.path.exists(path):
            continue
        saved = rf.read_json(path)
        if saved != json.loads(json.dumps(split.to_json())):
            raise UsageError(f"--resume: the data changed since the run started: {path} "
                             f"lists other images than the split drawn now; restore the "
                             f"data, or start over with --overwrite")


def announce(run: Run, model, what: str, fast_notes: list) -> None:
    """The run's first two log lines: what trains on what, where; the fast path."""
    cfg = run.cfg
    trainable, total = count_parameters(model)
    run.say(f"heba-train: {cfg.method} ({cfg.recipe} recipe) on {cfg.model} "
            f"({cfg.pretrained}), {what}; {trainable:,} trainable of {total:,} "
            f"parameters; device {run.device}"
            + (f" x{run.world}" if run.world > 1 else "") + f", {run.precision}")
    run.say("fast path: " + "; ".join(fast_notes))
    if run.plan.note:
        run.say(run.plan.note)


class Tally:
    """An epoch's running sums, on the device (read by the host once, at the end).

    ``add(outs, n)`` takes the step's outputs after its loss (``outs[1:]``) and the batch
    size; ``result(steps, seen)`` gives the record's leading and trailing fields."""

    postfix = False             # update the progress bar with the loss every BAR_EVERY steps

    def add(self, outs, n: int) -> None:
        raise NotImplementedError

    def result(self, steps: int, seen: int) -> tuple:
        raise NotImplementedError


def train_epoch(run: Run, tr: Training, epoch: int, inputs: Callable, tally: Tally) -> dict:
    """One pass over the training set; returns the epoch's metrics record.

    ``inputs(images, labels)``: the step's inputs for a batch (already on the device)."""
    cfg = run.cfg
    torch.manual_seed(epoch_seed(cfg.seed, epoch, run.rank))    # augmentations (global RNG)
    loader = tr.loader(epoch)
    bar = _progress(run, loader, epoch)
    t0, seen, n = time.time(), 0, 0
    first_bad = torch.zeros((), dtype=torch.long, device=run.device)   # 0: every loss finite
    for images, labels in bar:
        rf.check_stop()                         # SIGINT / SIGTERM: stop between steps
        images = images.to(run.device, non_blocking=True)
        labels = labels.to(run.device, non_blocking=True)
        step_inputs = inputs(images, labels)
        tr.opt.zero_grad(set_to_none=True)
        outs = tr.graphed(*step_inputs)
        _optimizer_step(cfg, tr)
        n, seen = n + 1, seen + len(labels)
        first_bad = _first_bad(first_bad, outs[1], n)
        tally.add(outs[1:], len(labels))
        if tally.postfix and not bar.disable and (n % BAR_EVERY == 0 or n == len(loader)):
            bar.set_postfix(loss=f"{outs[1].item():.3f}", lr=f"{tr.lr():.2e}")
    bar.close()
    lr = tr.lr()
    if cfg.schedule == "epoch":               # Dassl: update_lr() after the last batch
        tr.sched.step()
    dt = time.time() - t0
    check_finite(run, tr, epoch + 1, first_bad)
    front, back = tally.result(n, seen)
    rec = dict(event="train", epoch=epoch + 1, step=(epoch + 1) * len(loader), **front,
               lr=lr, img_per_s=seen * run.world / max(dt, 1e-9), seconds=dt,
               graph_replays=tr.graphed.replays, **back)
    if run.device.type == "cuda":
        rec["peak_memory_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    return rec


class Diverged(RuntimeError):
    """Training produced a non-finite loss or adapter value; nothing was saved from it."""


def _first_bad(first_bad: torch.Tensor, loss: torch.Tensor, step: int) -> torch.Tensor:
    """The first step (1-based) of the epoch with a non-finite loss, kept on the device (no
    host sync per step): ``step`` if ``loss`` is not finite and none was before."""
    bad = ~torch.isfinite(loss.detach()).all()
    return torch.where((first_bad == 0) & bad, torch.full_like(first_bad, step), first_bad)


def check_finite(run: Run, tr: Training, epoch: int, first_bad: torch.Tensor) -> None:
    """Raise :class:`Diverged` (naming the epoch, the step and the last saved epoch) when a
    loss of ``epoch`` or an adapter value is not finite. One host read; on several ranks
    the verdict is shared, so every rank stops."""
    finite = torch.stack([torch.isfinite(p.detach()).all() for p in tr.params]).all()
    flags = torch.stack([first_bad.float(), (~finite).float()])
    if run.world > 1:
        import torch.distributed as dist
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    step, params_bad = int(flags[0].item()), bool(flags[1].item())
    if not step and not params_bad:
        return
    where = (f"epoch {epoch} step {step}: the loss is not finite" if step else
             f"epoch {epoch}: an adapter value is not finite")
    saved = rf.set_epochs(run.opts.output)
    last = (f"the last good saved epoch is {saved[0]} ({rf.epoch_dir(run.opts.output, saved[0])})"
            if saved else "no epoch was saved")
    raise Diverged(f"training diverged at {where}; nothing is saved from it, {last}; "
                   f"lower --lr (or check the data) and start over with --overwrite")


def _progress(run: Run, loader, epoch: int):
    """A bar only on a terminal: in a log file its carriage returns are noise (the per-epoch
    line says the same)."""
    from tqdm import tqdm
    return tqdm(loader, desc=f"epoch {epoch + 1}/{run.cfg.epochs}", leave=False,
                disable=run.rank != 0 or run.opts.quiet or not isatty(sys.stderr),
                file=sys.stderr, dynamic_ncols=True)


def _optimizer_step(cfg, tr: Training) -> None:
    optim.clip_gradients(tr.params, cfg.grad_clip, tr.scaler, tr.opt)
    tr.scaler.step(tr.opt)
    tr.scaler.update()
    if cfg.schedule == "step":
        tr.sched.step()


def run_epochs(run: Run, tr: Training, forward: Callable, train_epoch: Callable[[int], dict],
               end_epoch: Callable, save: Callable):
    """The epoch loop, from ``tr.start_epoch``: ``train_epoch(epoch)`` -> record ->
    ``end_epoch(epoch + 1, record) -> (saved accuracy, result)`` (the recipe's evaluation
    and log line) -> ``save(epoch + 1, saved accuracy)`` on rank 0 -> all ranks meet.
    ``forward(*inputs)`` is the step :class:`GraphedStep` captures. Returns the last result."""
    tr.graphed = GraphedStep(forward, tr.params, enabled=tr.graph_off is None)
    result = None
    for epoch in range(tr.start_epoch, run.cfg.epochs):
        rf.check_stop()
        rec = train_epoch(epoch)
        run.record(rec)
        saved, result = end_epoch(epoch + 1, rec)
        if run.rank == 0:
            save(epoch + 1, saved)
        barrier(run.world)
    return result


def save_epoch(run: Run, tr: Training, model, epoch: int, writers: dict, **more):
    """Commit epoch ``epoch`` as one set (:func:`heba.train.run_folder.write_set`): the
    recipe's ``writers`` (the trained tensors + their JSON) and ``train_state.pt``
    (optimizer, scheduler, epoch, ``more``, the slow-fast stream). Returns the set."""
    if not all(bool(torch.isfinite(p.detach()).all()) for p in tr.params):
        raise Diverged(f"epoch {epoch}: an adapter value is not finite; nothing is saved")
    state = dict(optimizer=tr.opt.state_dict(), scheduler=tr.sched.state_dict(),
                 scaler=tr.scaler.state_dict(), epoch=epoch,
                 workers=tr.workers, **more)
    policy = getattr(model, "heba_policy", None)
    if policy is not None:
        state["scale_policy"] = policy.state_dict()
    files = dict(writers)
    files[rf.STATE_NAME] = lambda path: _save_torch(state, path)
    return rf.write_set(run.opts.output, epoch, files)


def _save_torch(obj, path: str) -> None:
    """``torch.save`` through memory, then one plain write: a full disk is an ``OSError``
    naming the cause (torch's own file writer reports "unexpected pos")."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with open(path, "wb") as f:
        f.write(buf.getbuffer())


def release(run: Run, tr: Optional[Training]) -> None:
    """Drop the captured graphs and the cached GPU memory (the process group is the caller's)."""
    if tr is not None:
        tr.graphed = None
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    rf.unlock(run.opts.output)
