"""What a run trains and tests on, from any reader: ``RunData`` = train set + named test sets.

Readers by layout family live in :mod:`heba.data` (``coop``: CoOp / Dassl split
files; ``folder``: ImageFolder trees; ``demo``: the generated shapes); this
module only picks one by ``cfg.source`` and turns its items into datasets with
the backbone's transforms. ``cfg.split="base2novel"`` trains on the base half
and tests base and new (``"novel"``) classes, each relabelled from 0 as the
published code does; ``"all"`` trains and tests on every class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch.utils.data import Dataset

from heba.train.config import UsageError


@dataclass
class RunData:
    """``train_classes[label]`` of ``train``; ``evals[name] = (classnames, dataset)``;
    ``splits[subsample]``: the reader's :class:`heba.data.coop.Split` (none for the demo)."""

    train_classes: list
    train: Dataset
    evals: dict = field(default_factory=dict)
    splits: dict = field(default_factory=dict)


def build(cfg, train_tf=None, eval_tf=None) -> RunData:
    """The datasets of ``cfg``; raises ``DataError`` / ``UsageError`` on bad input (nothing written)."""
    if cfg.source == "demo":
        return _demo(cfg)
    halves = ("base", "new") if cfg.split == "base2novel" else ("all",)
    splits = {h: _split(cfg, h) for h in halves}
    from heba.data.folder import ImageList
    train = splits[halves[0]]
    names = {"base": "base", "new": "novel", "all": "all"}
    evals = {names[h]: (s.classnames, ImageList(s.test, eval_tf)) for h, s in splits.items()}
    return RunData(train.classnames, ImageList(train.train, train_tf), evals, splits)


def set_transforms(data: RunData, train_tf, eval_tf) -> None:
    """Give the image datasets of ``data`` the backbone's transforms (the demo's are tensors)."""
    if hasattr(data.train, "transform"):
        data.train.transform = train_tf
    for _, ds in data.evals.values():
        if hasattr(ds, "transform"):
            ds.transform = eval_tf


def _split(cfg, subsample):
    if cfg.source == "folder":
        from heba.data.folder import folder_split
        return folder_split(cfg.dataset, cfg.shots, cfg.seed, subsample, cfg.test_per_class)
    from heba.data import coop
    info = coop.DATASETS.get(cfg.dataset)
    if info is not None and info.test_only:
        raise UsageError(f"{cfg.dataset} is a test-only data set: use it as a target "
                         f"(heba-train domain-generalization), not to train on")
    split = coop.build_split(cfg.dataset, cfg.root, cfg.shots, cfg.seed, subsample)
    if cfg.test_per_class:
        split.test = _cap(split.test, cfg.test_per_class)
    return split


def _cap(items, k):
    count, out = {}, []
    for it in items:
        count[it.label] = count.get(it.label, 0) + 1
        if count[it.label] <= k:
            out.append(it)
    return out


def target(name: str, root: str, seed: int, eval_tf, test_per_class=None):
    """``(classnames, test dataset)`` of a transfer target: all its classes, its test split."""
    from heba.data import coop
    from heba.data.folder import ImageList
    split = coop.build_split(name, root, 1, seed, "all")
    test = _cap(split.test, test_per_class) if test_per_class else split.test
    return split.classnames, ImageList(test, eval_tf)


def _demo(cfg) -> RunData:
    from heba.data.demo import demo_splits
    classes, train, test = demo_splits(cfg.shots, cfg.seed, cfg.test_per_class)
    n = len(classes)
    if cfg.split == "all":
        return RunData(classes, train, {"all": (classes, test)})
    if n < 2:
        raise UsageError("base-to-novel needs at least 2 classes (or use --split all)")
    m = math.ceil(n / 2)
    base, new = list(range(m)), list(range(m, n))
    return RunData(classes[:m], train.subset(base),
                   {"base": (classes[:m], test.subset(base)),
                    "novel": (classes[m:], test.subset(new))})
