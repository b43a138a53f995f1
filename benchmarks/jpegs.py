"""Generated JPEGs for the data benchmarks: random pictures with pixel noise (quality 90), about
a photo's file size, so that decoding costs what it costs on real data.

Example::

    >>> import tempfile
    >>> from benchmarks.jpegs import write_jpegs
    >>> len(write_jpegs(tempfile.mkdtemp(), 2, (64, 48)))
    2
"""

from __future__ import annotations

import os

import numpy as np


def write_jpegs(folder: str, n: int, size, seed: int = 0, start: int = 0) -> list:
    """Write ``n`` JPEGs of ``size = (w, h)`` into ``folder``; return their paths."""
    from PIL import Image
    w, h = size
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k in range(start, start + n):
        small = (rng.random((h // 4, w // 4, 3)) * 255).astype("uint8")
        big = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.int16)
        noisy = big + rng.integers(-12, 13, big.shape)     # photo-like detail: JPEG size
        path = os.path.join(folder, f"{k:04d}.jpg")
        Image.fromarray(noisy.clip(0, 255).astype("uint8")).save(path, quality=90)
        paths.append(path)
    return paths


def write_image_folder(root: str, classes: int, train_per_class: int, test_per_class: int,
                       size) -> str:
    """An ImageFolder ``root/{train,test}/class_<c>/NNNN.jpg`` of generated JPEGs; ``root``."""
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        for c in range(classes):
            write_jpegs(os.path.join(root, split, f"class_{c}"), per, size, seed=c + 100 * per)
    return root
