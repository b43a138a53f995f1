"""The 15 data sets of CoOp's DATASETS.md, split as the published code splits them.

``build_split(name, root, shots, seed, subsample)`` gives, for a seed, the same
train, val and test images, labels and class names as the published pipeline
(VLM-HeBA's ``train.py`` with CoOp's ``datasets/*.py``, which VLM-HeBA ships
unchanged, on Dassl's ``DatasetBase``):

1. ``train.py`` calls Dassl's ``set_random_seed(seed)`` (``random.seed`` among
   others); nothing draws from Python's ``random`` before the data set is built
   (logger, env info, trainer ``__init__`` -> ``DataManager`` -> reader).
2. The reader reads the fixed split (``split_zhou_*.json``: ``[relative path,
   label, class name]`` triples joined onto the reader's image folder; FGVC
   Aircraft's text files; ImageNet's folders and ``classnames.txt``).
3. ``generate_fewshot_dataset`` draws ``shots`` train images per class, then
   ``min(shots, 4)`` val images per class from the same generator
   (ImageNet: train only; its val split is its test split).
4. ``subsample_classes`` keeps the base or new half, relabelled.

The four ImageNet variants are test-only: the published readers ignore shots
and subsampling and give the whole set; here ``train`` and ``val`` are empty
(Dassl fills ``train_x`` with the test set only to count the classes).

The published reader caches the few-shot draw in ``split_fewshot/shot_K-seed_S.pkl``;
the draw is deterministic, so reading the cache or not gives the same split.
It is neither read nor written here. The published ``train.py`` sets the seed
only when ``--seed`` is non-zero; seed 0 here means ``random.seed(0)``.

Example:
    >>> split = build_split("oxford_pets", "/data", 16, 1, "base")  # doctest: +SKIP
    >>> len(split.classnames), split.train[0].path  # doctest: +SKIP
    (19, '/data/oxford_pets/images/...jpg')
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Callable

from heba.data.sampling import SUBSAMPLES, Item, class_names, fewshot, subsample_classes

__all__ = ["DATASETS", "DataError", "DatasetInfo", "Split", "build_split", "check",
           "write_split_json"]

IMAGENET_CLASSES = 1000  # ImageNet-V2's reader walks folders 0..999


class DataError(ValueError):
    """A data set that cannot be read as its layout says; the message is one line."""


@dataclass(frozen=True)
class DatasetInfo:
    """Where one data set lives under the root and how the published code reads it.

    Attributes:
        name: heba's name (``--dataset``), the published config file's stem.
        folder: the data set's folder under the root (DATASETS.md).
        image_dir: the folder split paths are relative to, under ``folder``
            (``""``: ``folder`` itself, as for Stanford Cars).
        kind: the reader: ``split_json``, ``fgvc``, ``imagenet``, ``imagenetv2``
            or ``imagenet_folders`` (ImageNet-Sketch, -A, -R).
        split_file: the fixed split (``split_json``) under ``folder``.
        dassl_name: the published registry name (``DATASET.NAME``).
        source: the published reader, in CoOp (and VLM-HeBA).
        classes: the class count of the real data set (for reference only).
        ignored: entries of the image folder that are not classes.
    """

    name: str
    folder: str
    image_dir: str
    kind: str
    dassl_name: str
    classes: int
    split_file: str = ""
    ignored: tuple = ()

    @property
    def source(self) -> str:
        return f"datasets/{self.name}.py"

    @property
    def test_only(self) -> bool:
        return self.kind in ("imagenetv2", "imagenet_folders")


def _split_json(name, folder, image_dir, dassl_name, classes):
    return DatasetInfo(name, folder, image_dir, "split_json", dassl_name, classes,
                       split_file=f"split_zhou_{dassl_name}.json")


DATASETS: dict[str, DatasetInfo] = {d.name: d for d in [
    _split_json("oxford_pets", "oxford_pets", "images", "OxfordPets", 37),
    _split_json("eurosat", "eurosat", "2750", "EuroSAT", 10),
    _split_json("dtd", "dtd", "images", "DescribableTextures", 47),
    _split_json("caltech101", "caltech-101", "101_ObjectCategories", "Caltech101", 100),
    _split_json("oxford_flowers", "oxford_flowers", "jpg", "OxfordFlowers", 102),
    _split_json("stanford_cars", "stanford_cars", "", "StanfordCars", 196),
    _split_json("sun397", "sun397", "SUN397", "SUN397", 397),
    _split_json("ucf101", "ucf101", "UCF-101-midframes", "UCF101", 101),
    _split_json("food101", "food-101", "images", "Food101", 101),
    DatasetInfo("fgvc_aircraft", "fgvc_aircraft", "images", "fgvc", "FGVCAircraft", 100),
    DatasetInfo("imagenet", "imagenet", "images", "imagenet", "ImageNet", 1000),
    DatasetInfo("imagenetv2", "imagenetv2", "imagenetv2-matched-frequency-format-val",
                "imagenetv2", "ImageNetV2", 1000),
    DatasetInfo("imagenet_sketch", "imagenet-sketch", "images", "imagenet_folders",
                "ImageNetSketch", 1000),
    DatasetInfo("imagenet_a", "imagenet-adversarial", "imagenet-a", "imagenet_folders",
                "ImageNetA", 200, ignored=("README.txt",)),
    DatasetInfo("imagenet_r", "imagenet-rendition", "imagenet-r", "imagenet_folders",
                "ImageNetR", 200, ignored=("README.txt",)),
]}

FGVC_SPLITS = {"train": "images_variant_train.txt", "val": "images_variant_val.txt",
               "test": "images_variant_test.txt"}


@dataclass
class Split:
    """The images of one run: train, val and test items, and ``classnames[label]``."""

    train: list[Item]
    val: list[Item]
    test: list[Item]
    classnames: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """``{"train": [[abs path, label, classname], ...], "val": [...], "test": [...]}``."""
        return {k: [[it.path, it.label, it.classname] for it in getattr(self, k)]
                for k in ("train", "val", "test")}

    @classmethod
    def from_json(cls, obj: dict) -> "Split":
        """The inverse of ``to_json`` (class names from the items)."""
        parts = {k: [Item(str(p), int(y), str(c)) for p, y, c in obj[k]]
                 for k in ("train", "val", "test")}
        return cls(**parts, classnames=class_names(parts["train"], parts["val"], parts["test"]))


# ---------------------------------------------------------------------------
# Layout checks (cheap: files and folders exist, the split file parses)
# ---------------------------------------------------------------------------

def _info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def _dataset_dir(info: DatasetInfo, root: str) -> str:
    if not isinstance(root, str) or not root:
        raise DataError(f"root must be a folder path, got {root!r}")
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DataError(f"dataset root {root} does not exist")
    ddir = os.path.join(root, info.folder)
    if not os.path.isdir(ddir):
        raise DataError(f"{info.name}: {ddir} does not exist (CoOp's DATASETS.md puts it at "
                        f"<root>/{info.folder}/)")
    return ddir


def _need_file(info: DatasetInfo, path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise DataError(f"{info.name}: {what} {path} is missing")
    return path


def _need_dir(info: DatasetInfo, path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise DataError(f"{info.name}: {what} {path} is missing")
    return path


def _load_split_file(info: DatasetInfo, path: str) -> dict:
    """The parsed ``split_zhou_*.json``: ``{train|val|test: [(rel path, label, name)]}``."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{info.name}: split file {path} does not parse: "
                        f"{str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{info.name}: split file {path} is not an object with train, val, test")
    out = {}
    for key in ("train", "val", "test"):
        entries = obj.get(key)
        if not isinstance(entries, list):
            raise DataError(f"{info.name}: split file {path} has no list {key!r}")
        out[key] = [_triple(info, path, key, i, e) for i, e in enumerate(entries)]
    return out


def _triple(info, path, key, i, entry) -> tuple[str, int, str]:
    ok = isinstance(entry, (list, tuple)) and len(entry) == 3
    if ok and isinstance(entry[0], str) and isinstance(entry[2], str):
        try:
            return entry[0], int(entry[1]), entry[2]  # read_split: int(label)
        except (TypeError, ValueError):
            pass
    raise DataError(f"{info.name}: split file {path}: {key}[{i}] is not "
                    f"[relative path, label, class name]: {json.dumps(entry)[:80]}")


def _read_classnames(info: DatasetInfo, ddir: str) -> dict[str, str]:
    """ImageNet's ``classnames.txt``: ``{folder: class name}`` in file order.

    Each line is ``<folder> <class name words>`` (``ImageNet.read_classnames``).
    """
    path = _need_file(info, os.path.join(ddir, "classnames.txt"), "class list")
    names: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            folder, *words = line.strip().split(" ")
            names[folder] = " ".join(words)
    return names


def check(name: str, root: str) -> None:
    """Raise DataError unless ``root`` holds ``name`` in CoOp's layout.

    Cheap: the folders and the split file or class list exist and the split
    file parses; single images are checked by ``build_split``.
    """
    info = _info(name)
    ddir = _dataset_dir(info, root)
    _need_dir(info, os.path.join(ddir, info.image_dir), "image folder")
    if info.kind == "split_json":
        split_path = _need_file(info, os.path.join(ddir, info.split_file), "split file")
        _load_split_file(info, split_path)
    elif info.kind == "fgvc":
        for fname in ("variants.txt", *FGVC_SPLITS.values()):
            _need_file(info, os.path.join(ddir, fname), "split file")
    else:
        _read_classnames(info, ddir)
        if info.kind == "imagenet":
            for sub in ("train", "val"):
                _need_dir(info, os.path.join(ddir, info.image_dir, sub), "image folder")


# ---------------------------------------------------------------------------
# Readers: (train, val, test) items before few-shot sampling
# ---------------------------------------------------------------------------

def _read_split_json(info: DatasetInfo, ddir: str):
    """``OxfordPets.read_split``: paths joined onto the image folder, label and name as written."""
    split = _load_split_file(info, _need_file(info, os.path.join(ddir, info.split_file),
                                              "split file"))
    prefix = os.path.join(ddir, info.image_dir) if info.image_dir else ddir
    return tuple([Item(os.path.join(prefix, p), y, c) for p, y, c in split[k]]
                 for k in ("train", "val", "test"))


def _read_fgvc(info: DatasetInfo, ddir: str):
    """``FGVCAircraft.read_data``: labels in ``variants.txt`` order, ``images/<id>.jpg``."""
    with open(_need_file(info, os.path.join(ddir, "variants.txt"), "class list"),
              encoding="utf-8") as f:
        label_of = {line.strip(): i for i, line in enumerate(f)}
    out = []
    for fname in FGVC_SPLITS.values():
        items = []
        with open(_need_file(info, os.path.join(ddir, fname), "split file"), encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                image_id, *words = line.strip().split(" ")
                variant = " ".join(words)
                if variant not in label_of:
                    raise DataError(f"{info.name}: {fname} line {n} names variant {variant!r}, "
                                    f"which variants.txt does not list")
                path = os.path.join(ddir, info.image_dir, image_id + ".jpg")
                items.append(Item(path, label_of[variant], variant))
        out.append(items)
    return tuple(out)


def listdir_nohidden(path: str) -> list[str]:
    """Dassl's ``listdir_nohidden``: ``os.listdir`` order (not sorted), dot names dropped
    (macOS ``._*`` AppleDouble files, ``.DS_Store``); every reader lists folders by it."""
    return [f for f in os.listdir(path) if not f.startswith(".")]


def _class_folder(info, names, folder, image_dir, label) -> list[Item]:
    if folder not in names:
        raise DataError(f"{info.name}: folder {folder} in {image_dir} is not in classnames.txt")
    class_dir = os.path.join(image_dir, folder)
    # listing order kept: it decides which images random.sample picks, as published
    return [Item(os.path.join(class_dir, f), label, names[folder])
            for f in listdir_nohidden(class_dir)]


def _read_imagenet(info: DatasetInfo, ddir: str):
    """``ImageNet.read_data`` on ``images/train`` and ``images/val`` (val is also the test set).

    Labels follow the sorted sub-folders (``os.scandir``, hidden ones included)
    of each tree; names come from ``classnames.txt``.
    """
    names = _read_classnames(info, ddir)
    out = []
    for sub in ("train", "val"):
        image_dir = _need_dir(info, os.path.join(ddir, info.image_dir, sub), "image folder")
        folders = sorted(e.name for e in os.scandir(image_dir) if e.is_dir())
        out.append([it for label, folder in enumerate(folders)
                    for it in _class_folder(info, names, folder, image_dir, label)])
    return out[0], out[1], out[1]


def _read_imagenetv2(info: DatasetInfo, ddir: str):
    """``ImageNetV2.read_data``: folder ``str(label)`` for labels 0..999, names by line order."""
    names = _read_classnames(info, ddir)
    if len(names) < IMAGENET_CLASSES:
        raise DataError(f"{info.name}: classnames.txt lists {len(names)} classes, "
                        f"expected {IMAGENET_CLASSES} (a copy of imagenet/classnames.txt)")
    image_dir = _need_dir(info, os.path.join(ddir, info.image_dir), "image folder")
    folders = list(names)
    test = []
    for label in range(IMAGENET_CLASSES):
        class_dir = _need_dir(info, os.path.join(image_dir, str(label)), "class folder")
        name = names[folders[label]]
        test += [Item(os.path.join(class_dir, f), label, name)
                 for f in listdir_nohidden(class_dir)]
    return [], [], test


def _read_imagenet_folders(info: DatasetInfo, ddir: str):
    """ImageNet-Sketch / -A / -R ``read_data``: labels by sorted folder, names from classnames.txt.

    -A and -R hold 200 of the 1000 classes, so their labels are 0..199 over the
    folders present; ``README.txt`` is skipped.
    """
    names = _read_classnames(info, ddir)
    image_dir = _need_dir(info, os.path.join(ddir, info.image_dir), "image folder")
    folders = sorted(f for f in listdir_nohidden(image_dir) if f not in info.ignored)
    for folder in folders:
        _need_dir(info, os.path.join(image_dir, folder), "class folder")
    test = [it for label, folder in enumerate(folders)
            for it in _class_folder(info, names, folder, image_dir, label)]
    return [], [], test


READERS: dict[str, Callable] = {
    "split_json": _read_split_json,
    "fgvc": _read_fgvc,
    "imagenet": _read_imagenet,
    "imagenetv2": _read_imagenetv2,
    "imagenet_folders": _read_imagenet_folders,
}


# ---------------------------------------------------------------------------
# The split of one run
# ---------------------------------------------------------------------------

def _check_args(info: DatasetInfo, shots, seed, subsample) -> None:
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise DataError(f"shots must be an integer >= 1, got {shots!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DataError(f"seed must be an integer >= 0, got {seed!r}")
    if subsample not in SUBSAMPLES:
        raise DataError(f"subsample must be one of {', '.join(SUBSAMPLES)}, got {subsample!r}")
    if info.test_only and subsample != "all":
        raise DataError(f"{info.name} is a test-only data set (all its classes); "
                        f"subsample must be 'all', got {subsample!r}")


def _check_images(info: DatasetInfo, *splits: list[Item]) -> None:
    """Every image exists as a file (Dassl's ``Datum`` asserts it for every item)."""
    seen: set[str] = set()
    missing = []
    for split in splits:
        for it in split:
            if it.path not in seen:
                seen.add(it.path)
                if not os.path.isfile(it.path):
                    missing.append(it.path)
    if missing:
        raise DataError(f"{info.name}: {len(missing)} image(s) named in the split are missing "
                        f"or not files, first: {missing[0]}")


def train_source(info: DatasetInfo, ddir: str) -> str:
    """The file (or folder) the training images of data set ``info`` are listed in."""
    if info.kind == "split_json":
        return f"split file {os.path.join(ddir, info.split_file)}"
    if info.kind == "fgvc":
        return f"split file {os.path.join(ddir, FGVC_SPLITS['train'])}"
    return f"image folder {os.path.join(ddir, info.image_dir, 'train')}"


def _check_train(info: DatasetInfo, ddir: str, train, val, test) -> None:
    """Every class of val / test has a training image, so no draw leaves a class without one
    (the draw keeps every class of the train list); named here, before a model loads."""
    if info.test_only:
        return
    if not train:
        raise DataError(f"{info.name}: {train_source(info, ddir)} lists no training image "
                        f"(its train list is empty): nothing to train on")
    have = {it.label for it in train}
    lack = sorted({(it.label, it.classname) for it in val + test if it.label not in have})
    if lack:
        names = ", ".join(f"{y} {c!r}" for y, c in lack[:5])
        raise DataError(f"{info.name}: {train_source(info, ddir)} lists no training image of "
                        f"{len(lack)} class(es) that val / test hold: {names}; the few-shot "
                        f"draw would leave them without one")


def build_split(name: str, root: str, shots: int, seed: int, subsample: str = "all",
                need_train: bool = True) -> Split:
    """The published split of data set ``name`` under ``root`` for ``shots`` and ``seed``.

    Args:
        name: one of ``DATASETS``.
        root: the folder holding the data set folders (CoOp's ``$DATA``).
        shots: train images per class (val: ``min(shots, 4)``); ignored by the
            test-only ImageNet variants, as published.
        seed: the run's seed (the published ``--seed``).
        subsample: ``all``, ``base`` or ``new`` (``DATASET.SUBSAMPLE_CLASSES``).
        need_train: refuse a train list that is empty or lacks a class of val /
            test (default True; False for a transfer target, whose test split alone
            is used).

    Returns:
        ``Split`` with absolute paths (``abspath(expanduser(root))`` joined, links
        kept) and ``classnames[label]`` after relabelling.

    Raises:
        DataError: unknown name, bad arguments, a missing folder, split file,
            class list or image, an empty train list or a class without a
            training image, before anything is sampled.
    """
    info = _info(name)
    _check_args(info, shots, seed, subsample)
    ddir = _dataset_dir(info, root)
    train, val, test = READERS[info.kind](info, ddir)
    _check_images(info, train, val, test)
    if need_train:
        _check_train(info, ddir, train, val, test)
    if not info.test_only:
        rng = random.Random(seed)  # = Dassl's random.seed(seed) at the start of train.py
        train = fewshot(train, shots, rng)
        if info.kind == "imagenet":  # few-shot train only; val is the test set
            train, test = subsample_classes(train, test, subsample=subsample)
            val = test
        else:
            val = fewshot(val, min(shots, 4), rng)
            train, val, test = subsample_classes(train, val, test, subsample=subsample)
    try:
        names = class_names(train, val, test)
    except ValueError as e:
        raise DataError(f"{info.name}: {e}") from None
    return Split(train, val, test, names)


def write_split_json(split: Split, path: str) -> None:
    """Write ``split.to_json()`` to ``path`` atomically (a temporary file, then rename)."""
    path = os.path.abspath(os.path.expanduser(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(split.to_json(), f)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
