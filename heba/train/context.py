"""The run context: what a recipe knows about where and how it runs, built once from the options.

:class:`RunOptions` are the command line's switches that do not change the result
(device, output folder, resume, fast-path switches; not saved with the run).
:func:`start` turns a configuration and its options into a :class:`Run`: the
process group and device, every preflight check (:func:`heba.train.preflight.validate`:
the options, the configuration, the backend, the output folder's :class:`Plan`),
the CPU threads and the precision. Both recipes (:mod:`heba.train.recipe`,
:mod:`heba.train.classify`) and checkpoint evaluation (:func:`runtime`) start here.

Example::

    >>> import tempfile
    >>> from heba.train.config import make_config
    >>> out = tempfile.mkdtemp() + "/run"       # proved writable, not created
    >>> run = start(make_config("heba", model="tiny", source="demo"),
    ...             RunOptions(output=out, device="cpu", threads=1))
    >>> run.rank, run.world, run.device.type, run.precision, run.plan.mode
    (0, 1, 'cpu', 'fp32', 'fresh')
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from heba.train import preflight
from heba.train import run_folder as rf
from heba.train.config import Config
from heba.train.runtime import resolve_precision, set_cpu_threads, setup_distributed


@dataclass
class RunOptions:
    """How a run executes (not saved with it; the result does not depend on it up to
    rounding, except ``workers``: each DataLoader worker draws its random augmentations from
    its own seed, so ``workers`` is saved in the run's ``train_state.pt`` and a resume must
    keep it)."""

    output: str = "runs/heba"
    overwrite: bool = False
    resume: bool = False
    device: str = "auto"
    backend: str = "auto"
    workers: object = "auto"        # an integer, or "auto" (heba.train.data.resolve_workers)
    pipeline: str = "fast"          # training images: "fast" | "published" (heba.data.pipeline)
    check_images: str = "fast"      # the image check: "fast" | "full" (heba.data.check)
    threads: Optional[int] = None
    allow_download: bool = False
    quiet: bool = False
    eval_every: int = 0
    eval_before: bool = True
    cuda_graphs: bool = True
    cast_once: bool = True
    checkpoint_blocks: int = 0
    demo_default: bool = False      # the bare demo's folder: replaces only a previous demo run


@dataclass
class Run:
    """One run's fixed facts: configuration, options, process, device, plan, precisions."""

    cfg: Config
    opts: RunOptions
    log: Callable
    rank: int
    world: int
    device: torch.device
    plan: preflight.Plan
    precision: str                  # the training autocast precision
    eval_precision: str             # the test-time one (``--eval-precision``)

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.opts.output, rf.METRICS_NAME)

    @property
    def ck_path(self) -> str:
        return os.path.join(self.opts.output, rf.CKPT_NAME)

    def say(self, *a) -> None:
        """Log on rank 0 only."""
        if self.rank == 0:
            self.log(*a)

    def record(self, obj: dict) -> None:
        """One line of ``metrics.jsonl`` (rank 0)."""
        if self.rank == 0:
            rf.append_record(self.metrics_path, obj)


def runtime(cfg: Config, opts: RunOptions):
    """``(device, precision)`` of a checkpoint's evaluation: the options, configuration and
    backend checked (:func:`heba.train.preflight.check_run`), the CPU threads set."""
    _, _, device = setup_distributed(opts.device)
    preflight.check_run(cfg, opts, device)
    return device, _threads_and_precision(cfg, opts, device)


def _threads_and_precision(cfg: Config, opts: RunOptions, device) -> str:
    if device.type == "cpu":
        set_cpu_threads(opts.threads)
    return resolve_precision(cfg.precision, device, cfg.gpu_precision)


def start(cfg: Config, opts: RunOptions, log: Callable = print) -> Run:
    """The :class:`Run` of ``cfg`` under ``opts``: every check that needs no data set and no
    model first (:func:`heba.train.preflight.validate`); nothing is written but the output
    folder's lock file (rank 0, an existing folder: the run owns it from here on)."""
    rank, world, device = setup_distributed(opts.device)
    plan = preflight.validate(cfg, opts, device, lock=rank == 0)
    precision = _threads_and_precision(cfg, opts, device)
    eval_precision = "fp32" if cfg.eval_precision == "fp32" else precision
    return Run(cfg, opts, log, rank, world, device, plan, precision, eval_precision)
