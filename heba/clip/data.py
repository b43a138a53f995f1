"""Few-shot classification data: ImageFolder trees, k-shot sampling, base/novel splits.

A data set is a folder of class folders (``root/<class>/<image>``), or one with
``train/`` and ``test/`` (or ``val/``) sub-trees. Class names are the folder
names with ``_`` read as spaces, in sorted order. Shots are sampled per class
by seed (from ``train/``, or from the single tree, whose other images are then
the test set). The base-to-novel protocol (CoOp / CoCoOp, HeBA) trains on the
first ``ceil(n / 2)`` classes and tests base and novel classes separately.
"""

from __future__ import annotations

import math
import os
import random
from typing import Callable, Optional

import torch
from torch.utils.data import Dataset

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit status 2."""


def scan_tree(root: str) -> dict:
    """``{class folder: [image paths, sorted]}`` of an ImageFolder tree."""
    if not os.path.isdir(root):
        raise UsageError(f"dataset directory {root} does not exist")
    classes = sorted(d for d in os.listdir(root)
                     if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise UsageError(f"dataset directory {root} holds no class folders "
                         f"(expected {root}/<class>/<image>)")
    tree = {}
    for c in classes:
        d = os.path.join(root, c)
        tree[c] = sorted(os.path.join(d, f) for f in os.listdir(d)
                         if f.lower().endswith(IMAGE_EXTS))
    empty = [c for c, files in tree.items() if not files]
    if len(empty) == len(tree):
        raise UsageError(f"dataset directory {root} holds no images "
                         f"(extensions {', '.join(IMAGE_EXTS)})")
    if empty:
        raise UsageError(f"class folder(s) without images in {root}: {', '.join(empty[:5])}")
    return tree


def class_name(folder: str) -> str:
    return folder.replace("_", " ")


def sample_shots(items: list, k: int, seed: int, cls: str) -> list:
    """``k`` items of one class, by seed; the same for a class whatever the other classes."""
    rng = random.Random(f"{seed}:{cls}")
    return sorted(rng.sample(list(items), k))


def base_novel(n_classes: int) -> tuple[list, list]:
    """Class indices of the base (first ``ceil(n/2)``) and novel halves."""
    m = math.ceil(n_classes / 2)
    return list(range(m)), list(range(m, n_classes))


def folder_splits(root: str, shots: int, seed: int, test_per_class: Optional[int] = None):
    """``(classes, train [(path, label)], test [(path, label)])`` of a folder data set."""
    sub = {s: os.path.join(root, s) for s in ("train", "test", "val")}
    if os.path.isdir(sub["train"]) and (os.path.isdir(sub["test"]) or os.path.isdir(sub["val"])):
        train_tree = scan_tree(sub["train"])
        test_tree = scan_tree(sub["test"] if os.path.isdir(sub["test"]) else sub["val"])
        if sorted(train_tree) != sorted(test_tree):
            raise UsageError(f"{root}: train/ and test/ hold different class folders")
        split_single = False
    else:
        train_tree = test_tree = scan_tree(root)
        split_single = True
    folders = sorted(train_tree)
    short = [f"{c} ({len(train_tree[c])})" for c in folders
             if len(train_tree[c]) < shots + (1 if split_single else 0)]
    if short:
        need = f"{shots} shots" + (" + 1 test image" if split_single else "")
        raise UsageError(f"{len(short)} class(es) have fewer images than {need}: "
                         f"{', '.join(short[:5])}")
    train, test = [], []
    for label, c in enumerate(folders):
        chosen = sample_shots(train_tree[c], shots, seed, c)
        train += [(p, label) for p in chosen]
        rest = [p for p in test_tree[c] if not (split_single and p in set(chosen))]
        if test_per_class:
            rest = rest[:test_per_class]
        test += [(p, label) for p in rest]
    return [class_name(c) for c in folders], train, test


class ImageList(Dataset):
    """``(transform(PIL image), label)`` for a list of ``(path, label)``."""

    def __init__(self, items: list, transform: Callable):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.items[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


class Relabel(Dataset):
    """Keep the items of ``keep`` classes and number them 0..len(keep)-1."""

    def __init__(self, dataset, labels: list, keep: list):
        where = {c: i for i, c in enumerate(keep)}
        self.dataset = dataset
        self.index = [(i, where[y]) for i, y in enumerate(labels) if y in where]

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        j, y = self.index[i]
        return self.dataset[j][0], y


class TensorImages(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def builtin_splits(shots: int, seed: int, test_per_class: int = 40, pool_per_class: int = 48,
                   classes: Optional[list] = None):
    """The built-in demo data: ``(classes, train TensorImages, test TensorImages, labels...)``.

    A fixed pool of ``pool_per_class`` generated images per class (``"shifted"``
    style) from which ``shots`` are sampled by ``seed``, and a separate fixed
    test set.
    """
    from heba.clip import synthetic
    classes = classes or synthetic.all_classes()
    if shots > pool_per_class:
        raise UsageError(f"the built-in data set has {pool_per_class} training images per "
                         f"class, fewer than --shots {shots}")
    n = len(classes)
    pool_ids = synthetic.balanced_ids(n, pool_per_class)
    pool = synthetic.render(pool_ids, classes, seed=1234, style="shifted")
    g = torch.Generator().manual_seed(seed)
    pick = torch.cat([c * pool_per_class + torch.randperm(pool_per_class, generator=g)[:shots]
                      for c in range(n)])
    test_ids = synthetic.balanced_ids(n, test_per_class)
    test = synthetic.render(test_ids, classes, seed=98765, style="shifted")
    return classes, TensorImages(pool[pick], pool_ids[pick]), TensorImages(test, test_ids)
