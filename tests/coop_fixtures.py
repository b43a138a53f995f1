"""Tiny data set trees in the layouts of CoOp's DATASETS.md, built on the fly.

Each builder writes ``<root>/<dataset folder>/...`` as the published readers
(CoOp ``datasets/*.py``) expect it: the split file ``split_zhou_<Name>.json`` in
the published shape (``{"train"|"val"|"test": [[relative path, label, class
name], ...]}``, paths relative to the reader's image folder), FGVC Aircraft's
``variants.txt`` and ``images_variant_*.txt``, ImageNet's ``classnames.txt``
and class folders, and the four test-only ImageNet variants.

The readers never open an image (Dassl only checks that the file exists), so
images are empty files unless ``images=True``, which writes tiny valid 8x8
pictures (coloured by label) for tests that train or evaluate.

Example:
    >>> spec = make_split_dataset(tmp_path, "oxford_pets", counts=[(3, 2, 2)] * 5)  # doctest: +SKIP
    >>> spec["split"]["train"][0]  # doctest: +SKIP
    ['american_bulldog_3.jpg', 1, 'american_bulldog']
"""

from __future__ import annotations

import json
import os
import random

# Class folders / names in each published layout: (folder part of the path, class name
# as the published split file writes it). Caltech and EuroSAT show the renames the
# published readers applied when they wrote the split files.
SPLIT_CLASSES = {
    "oxford_pets": [("Abyssinian", "abyssinian"), ("american_bulldog", "american_bulldog"),
                    ("Bengal", "bengal"), ("basset_hound", "basset_hound"),
                    ("Birman", "birman"), ("beagle", "beagle"), ("Bombay", "bombay")],
    "dtd": [(c, c) for c in ("banded", "blotchy", "braided", "bubbly", "bumpy", "chequered",
                             "cobwebbed")],
    "eurosat": [("AnnualCrop", "Annual Crop Land"), ("Forest", "Forest"),
                ("HerbaceousVegetation", "Herbaceous Vegetation Land"),
                ("Highway", "Highway or Road"), ("Industrial", "Industrial Buildings"),
                ("Pasture", "Pasture Land"), ("PermanentCrop", "Permanent Crop Land")],
    "caltech101": [("Faces", "face"), ("Leopards", "leopard"), ("Motorbikes", "motorbike"),
                   ("accordion", "accordion"), ("airplanes", "airplane"), ("anchor", "anchor"),
                   ("ant", "ant")],
    "oxford_flowers": [("", n) for n in ("pink primrose", "hard-leaved pocket orchid",
                                         "canterbury bells", "sweet pea", "english marigold",
                                         "tiger lily", "moon orchid")],
    "stanford_cars": [("", n) for n in ("2012 AM General Hummer SUV", "2012 Acura RL Sedan",
                                        "2012 Acura TL Sedan", "2007 Acura TL Type-S",
                                        "2012 Acura TSX Sedan", "2001 Acura Integra Type R",
                                        "2012 Acura ZDX Hatchback")],
    "sun397": [("a/abbey", "abbey"), ("a/airplane_cabin", "airplane_cabin"),
               ("a/apse/indoor", "indoor apse"), ("b/bedroom", "bedroom"),
               ("b/bazaar/outdoor", "outdoor bazaar"), ("c/campus", "campus"),
               ("c/castle", "castle")],
    "ucf101": [(c, c) for c in ("Apply_Eye_Makeup", "Apply_Lipstick", "Archery",
                                "Baby_Crawling", "Balance_Beam", "Band_Marching",
                                "Baseball_Pitch")],
    "food101": [(c, c) for c in ("apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio",
                                 "beef_tartare", "beet_salad", "beignets")],
}

SPLIT_FILES = {  # dataset -> (folder under root, image folder under it, split file)
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
}


def write_image(path: str, label: int = 0, images: bool = False) -> None:
    """An empty file, or with ``images`` a valid 8x8 picture (format from the extension)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not images:
        open(path, "wb").close()
        return
    from PIL import Image
    colour = ((53 * label) % 256, (97 * label + 80) % 256, (151 * label + 160) % 256)
    fmt = "PNG" if path.lower().endswith(".png") else "JPEG"
    Image.new("RGB", (8, 8), colour).save(path, format=fmt)


def _rel_path(name: str, folder: str, split: str, label: int, n: int) -> str:
    """The relative path of image ``n`` of class ``label``, named as the real data set names it."""
    if name == "oxford_pets":
        return f"{folder}_{n}.jpg"
    if name == "oxford_flowers":
        return f"image_{n:05d}.jpg"
    if name == "stanford_cars":
        return f"cars_{'test' if split == 'test' else 'train'}/{n:05d}.jpg"
    if name == "sun397":
        return f"{folder}/sun_{n:08x}.jpg"
    if name == "ucf101":
        return f"{folder}/v_{folder.replace('_', '')}_g{n:02d}_c01.jpg"
    if name == "caltech101":
        return f"{folder}/image_{n:04d}.jpg"
    return f"{folder}/{folder}_{n}.jpg"


def make_split_dataset(root, name: str, counts: list[tuple[int, int, int]], *,
                       order_seed: int = 0, images: bool = False) -> dict:
    """Write data set ``name`` with a ``split_zhou_*.json`` split file under ``root``.

    Args:
        root: the data root (CoOp's ``$DATA``).
        name: one of ``SPLIT_FILES``.
        counts: per class ``(train, val, test)`` image counts; up to 7 classes.
        order_seed: each split's entries are shuffled with it, so labels first
            appear out of order, as in published split files built by shuffling.
        images: write valid pictures instead of empty files.

    Returns:
        ``{"dir": data set folder, "image_dir": folder paths are relative to,
        "split_path": ..., "split": the JSON written}``.
    """
    folder, image_sub, split_file = SPLIT_FILES[name]
    ddir = os.path.join(str(root), folder)
    image_dir = os.path.join(ddir, image_sub) if image_sub else ddir
    classes = SPLIT_CLASSES[name][:len(counts)]
    split, n = {"train": [], "val": [], "test": []}, 0
    for label, ((cfolder, cname), per_split) in enumerate(zip(classes, counts)):
        for key, k in zip(("train", "val", "test"), per_split):
            for _ in range(k):
                n += 1
                rel = _rel_path(name, cfolder, key, label, n)
                split[key].append([rel, label, cname])
                write_image(os.path.join(image_dir, rel), label, images)
    order = random.Random(order_seed)
    for key in split:
        order.shuffle(split[key])
    split_path = os.path.join(ddir, split_file)
    with open(split_path, "w") as f:
        json.dump(split, f, indent=4)  # Dassl's write_json indents by 4
    return {"dir": ddir, "image_dir": image_dir, "split_path": split_path, "split": split}


FGVC_VARIANTS = ["707-320", "727-200", "737-200", "A300B4", "Cessna 172", "DC-10",
                 "F-16A/B", "Falcon 2000", "Tu-134"]


def make_fgvc(root, counts: list[tuple[int, int, int]], *, variants=None,
              order_seed: int = 0, images: bool = False) -> dict:
    """Write ``fgvc_aircraft/`` as the official archive's ``data/`` folder.

    ``variants.txt`` lists the variants (label = line number, not sorted order);
    ``images_variant_<split>.txt`` lines are ``<7-digit id> <variant name>``;
    images are ``images/<id>.jpg``.
    Returns ``{"dir", "variants", "lines": {split: [(id, variant)]}}``.
    """
    variants = list(variants or FGVC_VARIANTS)[:len(counts)]
    ddir = os.path.join(str(root), "fgvc_aircraft")
    os.makedirs(ddir, exist_ok=True)
    with open(os.path.join(ddir, "variants.txt"), "w") as f:
        f.write("".join(v + "\n" for v in variants))
    lines, n = {"train": [], "val": [], "test": []}, 1000000
    for label, (variant, per_split) in enumerate(zip(variants, counts)):
        for key, k in zip(lines, per_split):
            for _ in range(k):
                n += 1
                lines[key].append((f"{n:07d}", variant))
                write_image(os.path.join(ddir, "images", f"{n:07d}.jpg"), label, images)
    order = random.Random(order_seed)
    for key, rows in lines.items():
        order.shuffle(rows)
        with open(os.path.join(ddir, f"images_variant_{key}.txt"), "w") as f:
            f.write("".join(f"{i} {v}\n" for i, v in rows))
    return {"dir": ddir, "variants": variants, "lines": lines}


_REAL_FIRST = [("n01440764", "tench"), ("n01443537", "goldfish"),
               ("n01484850", "great white shark"), ("n01491361", "tiger shark"),
               ("n01494475", "hammerhead shark"), ("n01496331", "electric ray")]


def imagenet_classnames(count: int = 1000) -> list[tuple[str, str]]:
    """``count`` (wnid, class name) pairs in sorted wnid order, like CoOp's classnames.txt."""
    rows = list(_REAL_FIRST[:count])
    for i in range(len(rows), count):
        rows.append((f"n{1500000 + 7919 * i:08d}", f"class {i} of imagenet"))
    return rows


def write_classnames(ddir: str, rows, *, shuffle_seed=None) -> str:
    """``<ddir>/classnames.txt``: ``<wnid> <name words>`` per line (optionally shuffled)."""
    rows = list(rows)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    os.makedirs(ddir, exist_ok=True)
    path = os.path.join(ddir, "classnames.txt")
    with open(path, "w") as f:
        f.write("".join(f"{w} {c}\n" for w, c in rows))
    return path


def make_imagenet(root, wnids: list[str], train_per_class: list[int], val_per_class: list[int],
                  *, classnames=None, shuffle_seed=None, images: bool = False) -> dict:
    """Write ``imagenet/`` : ``classnames.txt`` and ``images/{train,val}/<wnid>/<image>``.

    Also drops a hidden file in one class folder (Dassl's listdir_nohidden skips it).
    """
    ddir = os.path.join(str(root), "imagenet")
    write_classnames(ddir, classnames or imagenet_classnames(), shuffle_seed=shuffle_seed)
    n = 0
    for sub, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label, (wnid, k) in enumerate(zip(wnids, per_class)):
            for j in range(k):
                n += 1
                fname = (f"{wnid}_{n}.JPEG" if sub == "train"
                         else f"ILSVRC2012_val_{n:08d}.JPEG")
                write_image(os.path.join(ddir, "images", sub, wnid, fname), label, images)
    write_image(os.path.join(ddir, "images", "train", wnids[0], ".DS_Store"))
    return {"dir": ddir}


def make_imagenetv2(root, per_class: int = 1, *, shuffle_seed=None, images: bool = False) -> dict:
    """Write ``imagenetv2/`` : ``classnames.txt`` and folders ``0``..``999`` of images.

    ``shuffle_seed`` shuffles the lines of classnames.txt (folder ``i`` takes line ``i``).
    """
    ddir = os.path.join(str(root), "imagenetv2")
    write_classnames(ddir, imagenet_classnames(), shuffle_seed=shuffle_seed)
    image_dir = os.path.join(ddir, "imagenetv2-matched-frequency-format-val")
    for label in range(1000):
        for j in range(per_class):
            write_image(os.path.join(image_dir, str(label), f"{label:04x}{j:02d}.jpeg"),
                        label, images)
    return {"dir": ddir, "image_dir": image_dir}


VARIANT_DIRS = {  # dataset -> (folder under root, image folder)
    "imagenet_sketch": ("imagenet-sketch", "images"),
    "imagenet_a": ("imagenet-adversarial", "imagenet-a"),
    "imagenet_r": ("imagenet-rendition", "imagenet-r"),
}


def make_imagenet_variant(root, name: str, wnids: list[str], per_class: int = 2, *,
                          readme: bool = True, images: bool = False) -> dict:
    """Write ImageNet-Sketch / -A / -R: ``classnames.txt`` (all 1000) and ``<wnid>/`` folders.

    -A and -R hold 200 classes and ship a ``README.txt`` beside the class folders.
    """
    folder, sub = VARIANT_DIRS[name]
    ddir = os.path.join(str(root), folder)
    write_classnames(ddir, imagenet_classnames())
    image_dir = os.path.join(ddir, sub)
    for label, wnid in enumerate(wnids):
        for j in range(per_class):
            write_image(os.path.join(image_dir, wnid, f"{j}.{'png' if j % 2 else 'jpg'}"),
                        label, images)
    if readme:
        os.makedirs(image_dir, exist_ok=True)
        with open(os.path.join(image_dir, "README.txt"), "w") as f:
            f.write("class folders are wnids\n")
    return {"dir": ddir, "image_dir": image_dir}


SMALL_COUNTS = [(4, 2, 2), (3, 1, 2), (4, 2, 2), (2, 1, 2), (4, 2, 2)]  # 5 classes, some short


def make_dataset(root, name: str, *, images: bool = False) -> dict:
    """Any of the 15 data sets, small, in its published layout (for protocol tests).

    Split-file sets and FGVC Aircraft get 5 classes (``SMALL_COUNTS``); ImageNet
    5 of its 1000 classes; ImageNet-V2 all 1000 folders, one image each;
    ImageNet-Sketch 5 classes; -A and -R their 200 classes, one image each.
    """
    wnids = [w for w, _ in imagenet_classnames()]
    if name in SPLIT_FILES:
        return make_split_dataset(root, name, SMALL_COUNTS, images=images)
    if name == "fgvc_aircraft":
        return make_fgvc(root, SMALL_COUNTS, images=images)
    if name == "imagenet":
        return make_imagenet(root, wnids[:5], [4, 3, 4, 2, 4], [2, 2, 2, 2, 2], images=images)
    if name == "imagenetv2":
        return make_imagenetv2(root, 1, images=images)
    if name == "imagenet_sketch":
        return make_imagenet_variant(root, name, wnids[:5], 2, readme=False, images=images)
    if name in ("imagenet_a", "imagenet_r"):
        return make_imagenet_variant(root, name, wnids[::5], 1, images=images)
    raise KeyError(name)
