"""Figures of a run and of a protocol, from what they wrote (matplotlib, optional).

:func:`write_run_plot` draws a run folder's ``metrics.jsonl`` into
``<run>/metrics.png``: the training loss, the learning rate and the test
accuracy per epoch (every accuracy the run records: base / novel / HM for a
base-to-novel run, ``all`` for a CLIP run on every class, validation and test
top-1 / top-5 for a classifier; epoch 0 is the accuracy before training).
:func:`write_protocol_plot` draws a protocol's table (``<folder>/<name>.json``:
per seed and mean +- std) into ``<folder>/<name>.png``: one group per column, a
bar for the mean with its standard deviation and a dot per seed.

matplotlib is optional (``pip install 'heba[plots]'``): without it both
functions say so in one line and return ``None``. They use matplotlib's
object API (no pyplot), so they change no global state.

    from heba.train.plots import write_run_plot
    write_run_plot("runs/demo")          # -> "runs/demo/metrics.png"
"""

from __future__ import annotations

import json
import os
from typing import Optional

RUN_PLOT = "metrics.png"
MISSING = "plots skipped: matplotlib is not installed (pip install 'heba[plots]')"


def _figure(ncols: int, width: float = 4.2, height: float = 3.2):
    """A matplotlib Figure with ``ncols`` axes, or None when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None, None
    fig = Figure(figsize=(width * ncols, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig, path: str) -> str:
    tmp = path + ".tmp.png"
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path


def read_metrics(run_dir: str) -> tuple[dict, dict]:
    """``(train, evals)`` per epoch from ``<run_dir>/metrics.jsonl``: ``train[epoch]`` the
    last train record of that epoch, ``evals[epoch]`` its accuracies ``{name: %}``."""
    train, evals = {}, {}
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("event") == "train" and "epoch" in rec:
                train[rec["epoch"]] = rec
            elif rec.get("event") == "eval" and "epoch" in rec:
                evals.setdefault(rec["epoch"], {}).update(_accuracies(rec))
    return train, evals


def _accuracies(rec: dict) -> dict:
    """An eval record's accuracies ``{name: %}``; a classifier's split names them
    (``val top1``, ``test top1``) and its loss is not an accuracy."""
    split = rec.get("split")
    return {(f"{split} {k}" if split else k): v for k, v in rec.items()
            if k not in ("event", "epoch", "loss") and isinstance(v, (int, float))
            and not isinstance(v, bool)}


def write_run_plot(run_dir: str, log=print) -> Optional[str]:
    """``<run_dir>/metrics.png``: loss, learning rate and accuracy per epoch; its path,
    or None (one line logged) without matplotlib or without records to draw."""
    train, evals = read_metrics(run_dir)
    if not train and not evals:
        log(f"plots skipped: {run_dir}/metrics.jsonl holds no epoch records")
        return None
    fig, axes = _figure(3)
    if fig is None:
        log(MISSING)
        return None
    ax_loss, ax_lr, ax_acc = axes
    epochs = sorted(train)
    ax_loss.plot(epochs, [train[e].get("loss") for e in epochs], marker="o")
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="loss")
    ax_lr.plot(epochs, [train[e].get("lr") for e in epochs], marker="o", color="tab:orange")
    ax_lr.set(title="learning rate", xlabel="epoch", ylabel="lr")
    names = sorted({k for acc in evals.values() for k in acc}, key=_order)
    for name in names:
        xs = [e for e in sorted(evals) if name in evals[e]]
        ax_acc.plot(xs, [evals[e][name] for e in xs], marker="o", label=name)
    ax_acc.set(title="test accuracy (epoch 0: before training)", xlabel="epoch",
               ylabel="accuracy %")
    if names:
        ax_acc.legend()
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    return _save(fig, os.path.join(run_dir, RUN_PLOT))


def _order(name: str):
    known = ("base", "novel", "hm", "all", "top1", "top5", "val top1", "val top5", "test top1",
             "test top5")
    return (known.index(name) if name in known else len(known), name)


def write_protocol_plot(result_json: str, log=print) -> Optional[str]:
    """``<name>.png`` beside a protocol's ``<name>.json``: per-seed and mean +- std
    per column; its path, or None (one line logged) without matplotlib."""
    with open(result_json) as f:
        result = json.load(f)
    per_seed, mean, std = result["per_seed"], result["mean"], result["std"]
    cols = sorted(mean, key=_order)
    fig, axes = _figure(1, width=max(4.0, 1.1 * len(cols) + 2))
    if fig is None:
        log(MISSING)
        return None
    ax = axes[0]
    xs = range(len(cols))
    ax.bar(xs, [mean[c] for c in cols], yerr=[std[c] for c in cols], capsize=4,
           color="lightsteelblue", label="mean +- std")
    for seed, row in per_seed.items():
        ax.scatter(list(xs), [row[c] for c in cols], zorder=3, s=18, label=f"seed {seed}")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(cols, rotation=30 if len(cols) > 4 else 0)
    ax.set(ylabel="accuracy %", title=f"{result.get('protocol', '')} "
           f"{result.get('dataset') or result.get('source') or ''}".strip())
    ax.legend(fontsize="small")
    return _save(fig, os.path.splitext(result_json)[0] + ".png")
