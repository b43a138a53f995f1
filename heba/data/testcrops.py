"""Test images decoded once per process: the deterministic test crops as uint8, reused.

The test transform (Resize bicubic + CenterCrop, then ToTensor + Normalize)
is deterministic, so every evaluation of a run, of every seed of a protocol
and of every transfer target sees the same crops. :func:`prepare_crops` runs
the PIL part (:class:`heba.data.pipeline.EvalSpec`, bit for bit today's
image) once per image and keeps ``uint8 [N, 3, S, S]``:

* in memory, while all prepared sets together stay under ``memory_bytes``
  (default :func:`default_memory_bytes`), keyed by :func:`crops_key`;
* past that, in a file ``<cache_dir>/<key>.npy`` (default
  ``$HEBA_CACHE_DIR`` or ``~/.cache/heba/test_crops``), read back as a memory
  map by later evaluations and later processes.

The key is a SHA-256 of every image's absolute path, size and mtime and of the
transform, so a changed image or transform prepares anew. ``STATS`` counts
the decodes and the reuses (the tests read it).

Example::

    >>> from heba.data.pipeline import EvalSpec
    >>> # crops = prepare_crops(items, EvalSpec.from_transform(eval_tf)); crops.images.shape
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
from torch.utils.data import Dataset

from heba.data.pipeline import EvalSpec, default_threads, pil_to_uint8, read_rgb

STATS = {"decoded": 0, "memory_hits": 0, "file_hits": 0}
_MEMORY: "OrderedDict[str, torch.Tensor]" = OrderedDict()


class PreparedCrops(Dataset):
    """``(images[i] uint8 [3, S, S], labels[i])``; ``mean`` / ``std`` for the device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, where: str):
        self.images, self.labels, self.mean, self.std, self.where = images, labels, mean, std, where

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def default_memory_bytes() -> int:
    """The memory all prepared test sets may hold together: an eighth of RAM, at most 4 GiB."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 4 << 30
    return int(min(4 << 30, ram // 8))


def default_cache_dir() -> str:
    return os.environ.get("HEBA_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "heba", "test_crops")


def crops_key(paths, spec: EvalSpec) -> str:
    """SHA-256 (hex) of the transform and of every image's path, size and mtime."""
    h = hashlib.sha256(spec.key().encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"\0{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def prepare_crops(items: list, spec: EvalSpec, cache_dir: Optional[str] = None,
                  memory_bytes: Optional[int] = None,
                  threads: Optional[int] = None) -> PreparedCrops:
    """The test crops of ``items`` (``.path``, ``.label``), prepared at most once (module doc)."""
    paths = [it.path for it in items]
    labels = torch.tensor([it.label for it in items], dtype=torch.long)
    key = crops_key(paths, spec)
    cap = default_memory_bytes() if memory_bytes is None else memory_bytes
    if key in _MEMORY:
        STATS["memory_hits"] += 1
        _MEMORY.move_to_end(key)
        return PreparedCrops(_MEMORY[key], labels, spec.mean, spec.std, "memory")
    file = os.path.join(cache_dir or default_cache_dir(), key + ".npy")
    if os.path.isfile(file):
        images = _read_file(file, len(paths))
        if images is not None:
            STATS["file_hits"] += 1
            return PreparedCrops(images, labels, spec.mean, spec.std, file)
    images = _decode(paths, spec, threads)
    if images.numel() <= cap:
        _remember(key, images, cap)
        return PreparedCrops(images, labels, spec.mean, spec.std, "memory")
    _write_file(file, images)
    return PreparedCrops(_read_file(file, len(paths)), labels, spec.mean, spec.std, file)


def _decode(paths, spec: EvalSpec, threads) -> torch.Tensor:
    def one(p):
        return pil_to_uint8(spec.pil(read_rgb(p)))

    with ThreadPoolExecutor(threads or default_threads()) as pool:
        crops = list(pool.map(one, paths))
    STATS["decoded"] += len(paths)
    return torch.stack(crops) if crops else torch.empty(0, 3, 1, 1, dtype=torch.uint8)


def _remember(key: str, images: torch.Tensor, cap: int) -> None:
    _MEMORY[key] = images
    while sum(t.numel() for t in _MEMORY.values()) > cap and len(_MEMORY) > 1:
        _MEMORY.popitem(last=False)                 # the least recently used set


def _write_file(file: str, images: torch.Tensor) -> None:
    import numpy as np
    os.makedirs(os.path.dirname(file), exist_ok=True)
    tmp = f"{file}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, images.numpy())
    os.replace(tmp, file)                           # whole or absent: never half a cache


def _read_file(file: str, n: int) -> Optional[torch.Tensor]:
    import numpy as np
    try:
        arr = np.load(file, mmap_mode="r")
    except (OSError, ValueError):
        return None                                 # unreadable: prepared again, rewritten
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[0] != n:
        return None
    import warnings
    with warnings.catch_warnings():                 # read-only map: nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def clear_memory() -> None:
    """Forget the sets held in memory (files stay)."""
    _MEMORY.clear()
