"""Image-classification datasets of the AdapterTune protocol, read from local roots.

What the published AdapterTune code reads (salimkhazem/adaptertune,
``src/datasets/torchvision_datasets.py`` and ``src/datasets/splits.py``), without
ever downloading:

* torchvision datasets under one ``root`` in torchvision's own layouts:
  CIFAR-10/100 (``cifar-10-batches-py``, ``cifar-100-python``), SVHN
  (``{train,test}_32x32.mat``), Oxford-IIIT Pets (``oxford-iiit-pet``, trainval / test,
  category labels), Food-101 (``food-101``), Flowers102 (``flowers-102``; training
  set = its train + val splits, test = test), FGVC-Aircraft
  (``fgvc-aircraft-2013b``, trainval / test, variant labels);
* folder layouts: Tiny-ImageNet (``tiny-imagenet-200/train/<wnid>/...``; its
  test set is ``val/images`` labelled by ``val/val_annotations.txt``) and
  ImageNet-R (``imagenet-r/<class>/...`` or ``imagenet-r/{train,test}/<class>/...``),
  and any ``ImageFolder`` root of the same shape;
* a validation set of ``int(n * val_split)`` training images drawn by the seed:
  ``perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()``,
  ``val = perm[:n_val]``, ``train = perm[n_val:]`` (:func:`split_indices`); an
  ImageNet-R / ImageFolder root without ``test/`` is split three ways from one
  permutation (test first, ``int(n * test_split)``; :func:`split_indices_threeway`);
* ImageNet normalisation; training transform ``RandomResizedCrop(img_size)`` +
  ``RandomHorizontalFlip()``; evaluation ``Resize(256)`` + ``CenterCrop(img_size)``.

The published code caches its split in ``<root>/splits/*.pkl``; here the split
is recomputed (a pure function of ``n``, ``val_split`` and the seed, the same
numbers), so nothing is written into a data root.

Example::

    >>> data = load_vision_dataset("CIFAR10", "/data", seed=0)      # doctest: +SKIP
    >>> len(data.train), len(data.val), len(data.test), data.classnames[:2]  # doctest: +SKIP
    (45000, 5000, 10000, ['airplane', 'automobile'])
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DATASETS", "VisionData", "load_vision_dataset",
           "split_indices", "split_indices_threeway", "build_transforms", "canonical_name",
           "TransformedSubset"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DATASETS = ("CIFAR10", "CIFAR100", "SVHN", "OxfordIIITPet", "Food101", "Flowers102",
            "FGVCAircraft", "TinyImageNet", "ImageNetR", "ImageFolder")
# The published configs/datasets/<file>.yaml names, and lower-case spellings.
_ALIASES = {"pets": "OxfordIIITPet", "flowers": "Flowers102", "fgvc": "FGVCAircraft",
            "imagenet_r": "ImageNetR", "imagenet-r": "ImageNetR", "tiny-imagenet": "TinyImageNet",
            "tiny_imagenet": "TinyImageNet", "food": "Food101", "folder": "ImageFolder"}
_ALIASES.update({n.lower(): n for n in DATASETS})


@dataclass
class VisionData:
    """The three splits of one dataset (each item ``(image, label)``) and its class names."""
    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    classnames: list

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


class TransformedSubset(Dataset):
    """``(transform(image), label)`` for ``base[i]``, ``i`` in ``indices`` (all if None)."""

    def __init__(self, base: Dataset, indices: Optional[Sequence[int]] = None,
                 transform: Optional[Callable] = None):
        self.base, self.transform = base, transform
        self.indices = list(range(len(base))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, label = self.base[self.indices[i]]
        return (self.transform(image) if self.transform else image), int(label)


def canonical_name(name: str) -> str:
    """``"cifar10"`` / ``"pets"`` / ``"CIFAR10"`` -> the published dataset name."""
    key = str(name).lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")
    return _ALIASES[key]


def split_indices(n: int, val_split: float = 0.1, seed: int = 42) -> tuple[list, list]:
    """``(train, val)`` indices of ``n`` images: the published split, ``int(n * val_split)`` val.

    One permutation ``torch.randperm(n)`` drawn from ``Generator().manual_seed(seed)``;
    its first ``int(n * val_split)`` entries are the validation set, the rest training.

    >>> train, val = split_indices(10, 0.2, seed=0)
    >>> len(train), len(val), sorted(train + val) == list(range(10))
    (8, 2, True)
    """
    _check_fraction("val_split", val_split)
    n_val = int(n * val_split)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[n_val:], perm[:n_val]


def split_indices_threeway(n: int, val_split: float = 0.1, test_split: float = 0.2,
                           seed: int = 42) -> tuple[list, list, list]:
    """``(train, val, test)`` from one permutation: ``int(n * test_split)`` test first,
    then ``int(rest * val_split)`` validation, the rest training (published ImageNet-R rule)."""
    _check_fraction("val_split", val_split)
    _check_fraction("test_split", test_split)
    n_test = int(n * test_split)
    n_val = int((n - n_test) * val_split)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    rest = perm[n_test:]
    return rest[n_val:], rest[:n_val], perm[:n_test]


def _check_fraction(name, value):
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1), got {value!r}")


def build_transforms(img_size: int = 224):
    """``(train, eval)`` transforms of the published code (PIL image -> normalised tensor)."""
    from torchvision import transforms as T
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = T.Compose([T.RandomResizedCrop(img_size), T.RandomHorizontalFlip(), *norm])
    evaluation = T.Compose([T.Resize(256), T.CenterCrop(img_size), *norm])
    return train, evaluation


# --- the readers: (train base, test base or None, class names) ------------------------------

def _tv():
    try:
        from torchvision import datasets
    except ImportError:
        raise ImportError("heba.data.vision needs torchvision: pip install 'heba[timm]'") from None
    return datasets


def _torchvision(name: str, root: str):
    from torch.utils.data import ConcatDataset
    D = _tv()
    if name in ("CIFAR10", "CIFAR100"):
        cls = getattr(D, name)
        train, test = cls(root, train=True, download=False), cls(root, train=False, download=False)
        return train, test, list(train.classes)
    if name == "SVHN":
        train, test = D.SVHN(root, split="train"), D.SVHN(root, split="test")
        return train, test, [str(d) for d in range(10)]
    if name == "OxfordIIITPet":
        kw = dict(target_types="category", download=False)
        train, test = D.OxfordIIITPet(root, "trainval", **kw), D.OxfordIIITPet(root, "test", **kw)
        return train, test, list(train.classes)
    if name == "Food101":
        train, test = D.Food101(root, "train"), D.Food101(root, "test")
        return train, test, list(train.classes)
    if name == "Flowers102":
        parts = [D.Flowers102(root, split) for split in ("train", "val")]
        test = D.Flowers102(root, "test")
        n = 1 + max(max(p._labels) for p in parts + [test])
        return ConcatDataset(parts), test, [str(i + 1) for i in range(n)]   # the 1-based ids
    if name == "FGVCAircraft":
        kw = dict(annotation_level="variant", download=False)
        train, test = D.FGVCAircraft(root, "trainval", **kw), D.FGVCAircraft(root, "test", **kw)
        return train, test, list(train.classes)
    raise AssertionError(name)


def _tiny_imagenet(root: str):
    D = _tv()
    base = os.path.join(root, "tiny-imagenet-200")
    train_dir = os.path.join(base, "train")
    if not os.path.isdir(train_dir):
        raise FileNotFoundError(f"TinyImageNet: no training folder {train_dir} (extract "
                                f"tiny-imagenet-200 under {root})")
    train = D.ImageFolder(train_dir)
    return train, _TinyVal(base, train.class_to_idx), list(train.classes)


class _TinyVal(Dataset):
    """Tiny-ImageNet ``val/images`` labelled by ``val/val_annotations.txt``, in the order the
    published code's class-organised ImageFolder reads them (class, then file name)."""

    def __init__(self, base: str, class_to_idx: dict):
        from torchvision.datasets.folder import default_loader
        images, ann = os.path.join(base, "val", "images"), os.path.join(base, "val",
                                                                        "val_annotations.txt")
        if not os.path.isdir(images) or not os.path.isfile(ann):
            raise FileNotFoundError(f"TinyImageNet: no val split under {os.path.dirname(ann)} "
                                    f"(expected images/ and val_annotations.txt)")
        samples, missing = [], []
        with open(ann, encoding="utf-8") as f:
            for line in f:
                parts = line.strip().split("\t")
                if len(parts) < 2:
                    continue
                if parts[1] not in class_to_idx:
                    raise FileNotFoundError(f"TinyImageNet: val class {parts[1]} has no training "
                                            f"folder")
                path = os.path.join(images, parts[0])
                (samples if os.path.isfile(path) else missing).append((path, parts[1]))
        if missing:
            raise FileNotFoundError(f"TinyImageNet: {len(missing)} val image(s) missing from "
                                    f"{images}, e.g. {os.path.basename(missing[0][0])}")
        samples.sort(key=lambda s: (s[1], os.path.basename(s[0])))
        self.samples = [(p, class_to_idx[c]) for p, c in samples]
        self.loader = default_loader

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return self.loader(path), label


def _folders(name: str, root: str):
    """ImageNet-R (``<root>/imagenet-r``) or any ImageFolder root: train/ (+ test/) or classes."""
    D = _tv()
    base = os.path.join(root, "imagenet-r") if name == "ImageNetR" else root
    if not os.path.isdir(base):
        raise FileNotFoundError(f"{name}: no folder {base} (class folders, or train/ and test/ "
                                f"with class folders)")
    train_dir, test_dir = os.path.join(base, "train"), os.path.join(base, "test")
    train = D.ImageFolder(train_dir if os.path.isdir(train_dir) else base)
    test = D.ImageFolder(test_dir) if os.path.isdir(test_dir) else None
    if test is not None and test.classes != train.classes:
        raise FileNotFoundError(f"{name}: {test_dir} and the training folder hold different "
                                f"classes")
    return train, test, list(train.classes)


def load_vision_dataset(name: str, root: str, seed: int = 42, val_split: float = 0.1,
                        test_split: float = 0.2, img_size: int = 224,
                        transforms: Optional[tuple] = None) -> VisionData:
    """The published train / val / test splits of one dataset under ``root``.

    Args:
        name: one of :data:`DATASETS` (or a published config name: ``cifar10``, ``pets``, ...).
        root: the folder torchvision's layout sits in (``ImageFolder``: the image folder).
        seed: draws the validation split (the run's seed in the published code).
        val_split: fraction of the training set held out for validation (0.1).
        test_split: ImageNet-R / ImageFolder without ``test/``: fraction held out for test.
        img_size: crop size of the transforms.
        transforms: ``(train, eval)`` transforms instead of :func:`build_transforms`;
            ``(None, None)`` gives PIL images.

    Returns a :class:`VisionData`: ``train`` with the training transform, ``val``
    (a held-out part of the training set) and ``test`` with the evaluation one.
    A missing root or dataset is a one-line ``FileNotFoundError``.
    """
    name = canonical_name(name)
    _check_fraction("val_split", val_split)
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{name}: data root {root} does not exist")
    train_tf, eval_tf = build_transforms(img_size) if transforms is None else transforms
    train, test, classes = _read(name, root)
    if test is None:
        tr, va, te = split_indices_threeway(len(train), val_split, test_split, seed)
        test_set = TransformedSubset(train, te, eval_tf)
    else:
        tr, va = split_indices(len(train), val_split, seed)
        test_set = TransformedSubset(test, None, eval_tf)
    return VisionData(name, TransformedSubset(train, tr, train_tf),
                      TransformedSubset(train, va, eval_tf), test_set, classes)


def _read(name: str, root: str):
    if name == "TinyImageNet":
        return _tiny_imagenet(root)
    if name in ("ImageNetR", "ImageFolder"):
        return _folders(name, root)
    try:
        return _torchvision(name, root)
    except RuntimeError as err:            # torchvision: "Dataset not found or corrupted..."
        first = str(err).splitlines()[0].split(". You can use download=True")[0]
        raise FileNotFoundError(f"{name}: not found under {root} in torchvision's layout "
                                f"({first}; heba never downloads)") from None
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("scipy"):
            raise ImportError(f"{name} is stored as .mat files, which need scipy: pip install "
                              f"'heba[timm]' (or scipy)") from None
        raise
