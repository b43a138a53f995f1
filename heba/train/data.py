"""What a run trains and tests on, from any reader: ``RunData`` = train set + named test sets.

Readers by layout family live in :mod:`heba.data` (``coop``: CoOp / Dassl split
files; ``folder``: ImageFolder trees; ``demo``: the generated shapes); this
module only picks one by ``cfg.source`` and turns its items into datasets with
the backbone's transforms. ``cfg.split="base2novel"`` trains on the base half
and tests base and new (``"novel"``) classes, each relabelled from 0 as the
published code does; ``"all"`` trains and tests on every class.

Also how the run reads them (:mod:`heba.data.pipeline`, :mod:`heba.data.testcrops`):
``train_loader`` is the run's one training loader (``loader.epoch(e)``: batches
on the device, normalised there), ``resolve_workers`` sizes it (``"auto"``),
``epoch_seeds`` gives an epoch's order and augmentation seeds, and
``eval_batches`` / ``eval_accuracy`` evaluate from test crops prepared once,
reading the device once per test set.

Example::

    >>> from heba.train.config import make_config
    >>> cfg = make_config("heba", model="tiny", source="demo", shots=1, batch_size=4)
    >>> loader = train_loader(build(cfg).train, cfg, "cpu")
    >>> images, labels = next(iter(loader.epoch(0))); tuple(images.shape)
    (4, 3, 32, 32)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
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
    """The datasets of ``cfg``; raises ``DataError`` / ``UsageError`` on bad input (nothing
    written)."""
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
    split = coop.build_split(name, root, 1, seed, "all", need_train=False)   # its test split
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


# --- loaders ---------------------------------------------------------------------------------

PIPELINES = ("fast", "published")


def resolve_workers(workers, device, world: int = 1) -> int:
    """Loader workers for ``--workers``: an integer >= 0, or ``"auto"``.

    ``"auto"``: 0 on a CPU device (the cores compute the model there); on a GPU
    this process's share of the cores (``cores // world``) less one for the
    main process, between 1 and 16.

    >>> import torch; resolve_workers("auto", torch.device("cpu")), resolve_workers(3, None)
    (0, 3)
    """
    if workers == "auto":
        if getattr(device, "type", device) != "cuda":
            return 0
        import os
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
        return max(1, min(16, cores // max(1, world) - 1))
    try:
        n = int(workers)
    except (TypeError, ValueError):
        n = -1
    if n < 0 or isinstance(workers, bool) or str(n) != str(workers).strip():
        raise UsageError(f"--workers must be >= 0 (an integer, or 'auto': 0 on a CPU, a "
                         f"share of the cores on a GPU), got {workers!r}")
    return n


def epoch_seeds(seed: int, epoch: int, rank: int = 0) -> tuple:
    """``(shuffle_seed, aug_seed)`` of an epoch: the sample order's and the augmentations'
    (the crop boxes and flips; the recipe also seeds its candidate draws with it)."""
    return seed * 7_919 + epoch, seed * 100_003 + epoch * 1_009 + rank


class TrainLoader:
    """One training loader for the whole run (persistent workers, prefetching).

    ``for images, labels in loader.epoch(e)`` gives the epoch's batches on
    ``device``, images normalised there (float32 ``[B, 3, S, S]``), in the
    order and with the crops :func:`epoch_seeds` fixes. An image data set (``.items``
    and a published-style ``.transform``) goes through :mod:`heba.data.pipeline`
    (``pipeline``: ``"fast"`` or ``"published"``); any other data set (the demo's
    tensors, a transform of another shape) is batched as it is, its random
    transforms drawn from the global generator (``workers=0``) or from
    per-epoch worker seeds, as before.
    """

    def __init__(self, ds, cfg, device, world: int = 1, rank: int = 0, workers=0,
                 pipeline: str = "fast", cache_bytes=None):
        from heba.data.pipeline import EpochSampler, TrainSpec, train_images
        if pipeline not in PIPELINES:
            raise UsageError(f"--pipeline must be one of {', '.join(PIPELINES)}, got "
                             f"{pipeline!r}")
        self.cfg, self.device, self.rank = cfg, torch.device(device), rank
        spec = TrainSpec.from_transform(getattr(ds, "transform", None)) \
            if hasattr(ds, "items") else None
        self.dataset, self.mean, self.std, self.note = ds, None, None, "data set batched as is"
        if spec is not None:
            self.dataset = train_images(ds.items, spec, pipeline, cache_bytes=cache_bytes)
            self.mean, self.std, self.note = spec.mean, spec.std, self.dataset.note
        drop = cfg.drop_last and len(ds) >= cfg.batch_size * world
        self.sampler = EpochSampler(len(ds), spec, getattr(self.dataset, "sizes", None), world,
                                    rank, drop, dist_seed=cfg.seed)
        self.workers = resolve_workers(workers, self.device, world)
        # The worker count the result depends on: only a data set batched as is draws its
        # random transforms in the workers (from per-worker seeds); the image pipelines draw
        # every box and flip in the main process, whatever the count (None).
        self.seeded_workers = self.workers if spec is None else None
        self.generator = torch.Generator()
        persistent = self.workers > 0 and spec is not None    # no RNG state in the workers
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=cfg.batch_size, sampler=self.sampler, drop_last=drop,
            num_workers=self.workers, persistent_workers=persistent,
            prefetch_factor=4 if self.workers else None, generator=self.generator,
            pin_memory=self.device.type == "cuda")

    def __len__(self):
        return len(self.loader)

    def epoch(self, epoch: int) -> "EpochBatches":
        """The batches of ``epoch`` (0-based): ``(images, labels)`` on the device; has a len."""
        return EpochBatches(self, epoch)

    def _iter_epoch(self, epoch: int):
        shuffle, aug = epoch_seeds(self.cfg.seed, epoch, self.rank)
        self.sampler.set_epoch(epoch, shuffle, aug)
        self.generator.manual_seed(shuffle)
        return _to_device(self.loader, self.device, self.mean, self.std)


class EpochBatches:
    """One epoch of a :class:`TrainLoader`: ``len()`` batches; iterating sets the epoch."""

    def __init__(self, loader: TrainLoader, epoch: int):
        self.loader, self.epoch = loader, epoch

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return self.loader._iter_epoch(self.epoch)


def train_loader(ds, cfg, device, world: int = 1, rank: int = 0, workers=0,
                 pipeline: str = "fast", cache_bytes=None) -> TrainLoader:
    """The run's :class:`TrainLoader` (build it once, in setup)."""
    return TrainLoader(ds, cfg, device, world, rank, workers, pipeline, cache_bytes)


def _to_device(batches, device, mean, std):
    from heba.data.pipeline import normalize_on_device
    for images, labels in batches:
        labels = labels.to(device, non_blocking=True)
        if mean is not None:
            yield normalize_on_device(images, mean, std, device), labels
        else:
            yield images.to(device, non_blocking=True), labels


# --- evaluation ------------------------------------------------------------------------------

def prepare_eval(ds, cache_dir=None, memory_bytes=None):
    """``ds`` with its test crops prepared once (:mod:`heba.data.testcrops`) when it is an
    image list with a deterministic transform; else ``ds`` itself."""
    from heba.data.pipeline import EvalSpec
    from heba.data.testcrops import prepare_crops
    spec = EvalSpec.from_transform(getattr(ds, "transform", None)) \
        if hasattr(ds, "items") else None
    if spec is None:
        return ds
    return prepare_crops(ds.items, spec, cache_dir, memory_bytes)


def eval_batches(ds, batch_size: int, device, workers=0, cache_dir=None):
    """``(images, labels)`` of a test set on ``device``, images normalised there.

    Prepared crops (:func:`prepare_eval`) are sliced in order, pinned and moved
    with ``non_blocking``; other data sets go through a DataLoader.
    """
    from heba.data.testcrops import PreparedCrops
    device = torch.device(device)
    ds = prepare_eval(ds, cache_dir)
    if not isinstance(ds, PreparedCrops):
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size,
                                             num_workers=resolve_workers(workers, device),
                                             pin_memory=device.type == "cuda")
        yield from _to_device(loader, device, None, None)
        return
    from heba.data.pipeline import normalize_on_device
    pin = device.type == "cuda"
    for a in range(0, len(ds), batch_size):
        images, labels = ds.images[a:a + batch_size], ds.labels[a:a + batch_size]
        if pin:
            images, labels = images.pin_memory(), labels.pin_memory()
        yield (normalize_on_device(images, ds.mean, ds.std, device),
               labels.to(device, non_blocking=True))


def eval_accuracy(predict, ds, device, batch_size: int = 128, workers=0,
                  cache_dir=None) -> float:
    """Top-1 accuracy % of ``predict(images [B, 3, S, S]) -> class ids [B]`` on ``ds``.

    The correct counts are summed on the device and read once, at the end.
    """
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    for images, labels in eval_batches(ds, batch_size, device, workers, cache_dir):
        correct += predict(images).eq(labels).sum()
        total += len(labels)
    return 100.0 * correct.item() / max(total, 1)
