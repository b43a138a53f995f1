"""ImageFolder trees: ``root/<class>/<image>``, or ``root/train`` + ``root/test`` (or ``val``).

Class names are the folder names with ``_`` read as spaces, labels their
sorted order. Shots are drawn from ``train/`` (or from the single tree, whose
other images are then the test set) by Dassl's rule
(:func:`heba.data.sampling.fewshot` with ``random.Random(seed)``), and
base/new halves are :func:`heba.data.sampling.subsample_classes`, as for the
CoOp layouts (:mod:`heba.data.coop`). Also the torch ``Dataset`` every reader's
items are loaded through (:class:`ImageList`).
"""

from __future__ import annotations

import os
import random
from typing import Callable, Optional

from torch.utils.data import Dataset

from heba.data.coop import DataError, Split, listdir_nohidden
from heba.data.sampling import Item, fewshot, subsample_classes

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def scan_tree(root: str) -> dict:
    """``{class folder: [image paths, sorted]}`` of an ImageFolder tree; names starting
    with ``.`` are skipped (:func:`heba.data.coop.listdir_nohidden`)."""
    if not os.path.isdir(root):
        raise DataError(f"dataset directory {root} does not exist")
    classes = sorted(d for d in listdir_nohidden(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DataError(f"dataset directory {root} holds no class folders "
                        f"(expected {root}/<class>/<image>)")
    # dot names (macOS ``._*`` AppleDouble files) skipped, as the CoOp readers do
    tree = {c: sorted(os.path.join(root, c, f) for f in listdir_nohidden(os.path.join(root, c))
                      if f.lower().endswith(IMAGE_EXTS)) for c in classes}
    empty = [c for c, files in tree.items() if not files]
    if len(empty) == len(tree):
        raise DataError(f"dataset directory {root} holds no images "
                        f"(extensions {', '.join(IMAGE_EXTS)})")
    if empty:
        raise DataError(f"class folder(s) without images in {root}: {', '.join(empty[:5])}")
    return tree


def class_name(folder: str) -> str:
    return folder.replace("_", " ")


def folder_split(root: str, shots: int, seed: int, subsample: str = "all",
                 test_per_class: Optional[int] = None) -> Split:
    """The :class:`heba.data.coop.Split` of an ImageFolder tree (module docstring); val empty.

    Raises :class:`DataError` for a missing tree, empty classes, or a class with
    fewer images than ``shots`` (+ 1 test image for a single tree).
    """
    if shots < 1:
        raise DataError(f"shots must be >= 1, got {shots}")
    root = os.path.abspath(root)
    sub = {s: os.path.join(root, s) for s in ("train", "test", "val")}
    single = not (os.path.isdir(sub["train"]) and (os.path.isdir(sub["test"])
                                                   or os.path.isdir(sub["val"])))
    if single:
        train_tree = test_tree = scan_tree(root)
    else:
        train_tree = scan_tree(sub["train"])
        test_tree = scan_tree(sub["test"] if os.path.isdir(sub["test"]) else sub["val"])
        if sorted(train_tree) != sorted(test_tree):
            raise DataError(f"{root}: train/ and test/ hold different class folders")
    folders = sorted(train_tree)
    short = [f"{c} ({len(train_tree[c])})" for c in folders
             if len(train_tree[c]) < shots + int(single)]
    if short:
        need = f"{shots} shots" + (" + 1 test image" if single else "")
        raise DataError(f"{len(short)} class(es) have fewer images than {need}: "
                        f"{', '.join(short[:5])}")
    items = lambda tree: [Item(p, y, class_name(c)) for y, c in enumerate(folders)  # noqa: E731
                          for p in tree[c]]
    train = fewshot(items(train_tree), shots, random.Random(seed))
    chosen = {it.path for it in train} if single else set()
    test, count = [], {}
    for it in items(test_tree):
        if it.path in chosen:
            continue
        count[it.label] = count.get(it.label, 0) + 1
        if test_per_class is None or count[it.label] <= test_per_class:
            test.append(it)
    train, test = subsample_classes(train, test, subsample=subsample)
    names = {it.label: it.classname for it in train + test}
    return Split(train, [], test, [names[y] for y in range(len(names))])


class ImageList(Dataset):
    """``(transform(RGB PIL image), label)`` for a list of :class:`Item`."""

    def __init__(self, items: list, transform: Callable):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from heba.data.pipeline import read_rgb
        item = self.items[i]
        return self.transform(read_rgb(item.path)), item.label
