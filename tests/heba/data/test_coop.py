"""heba.data: the CoOp data sets give the published splits (CoOp datasets/*.py + Dassl).

Expectations are derived in this file, from what the fixture wrote, by the
published pipeline written out step by step: ``random.seed(seed)`` (Dassl's
``set_random_seed``), then per label in first-appearance order
``random.sample(items, shots)`` (whole class when short), val with
``min(shots, 4)`` from the same stream, then CoOp's ``subsample_classes``
(sorted labels of train, first ``ceil(n / 2)`` are base, relabelled).
"""

import json
import math
import os
import random

import pytest

from heba.data import coop, sampling
from heba.data.coop import DataError, build_split, check, write_split_json
from heba.data.sampling import Item
from tests import coop_fixtures as fx

SEEDS = (1, 2, 3)

# Where the published readers join split paths (CoOp datasets/<name>.py: read_split's
# path_prefix), written out here rather than taken from heba.data.coop.
PREFIX = {
    "oxford_pets": "oxford_pets/images", "dtd": "dtd/images", "eurosat": "eurosat/2750",
    "caltech101": "caltech-101/101_ObjectCategories", "oxford_flowers": "oxford_flowers/jpg",
    "stanford_cars": "stanford_cars", "sun397": "sun397/SUN397",
    "ucf101": "ucf101/UCF-101-midframes", "food101": "food-101/images",
}
# Five classes (odd: base 3, new 2); class 1 is short of 16 train and of 4 val images.
COUNTS = [(18, 5, 3), (9, 2, 2), (17, 4, 3), (20, 6, 2), (16, 7, 4)]


# --- the published pipeline, written out ------------------------------------------------

def dassl_fewshot(data, k):
    """generate_fewshot_dataset on triples, drawing from Python's global ``random``."""
    groups = {}
    for d in data:
        groups.setdefault(d[1], []).append(d)
    out = []
    for label in groups:  # dict order = order labels first appear
        g = groups[label]
        out += random.sample(g, k) if len(g) >= k else g
    return out


def coop_subsample(*splits, subsample):
    if subsample == "all":
        return splits
    labels = sorted({d[1] for d in splits[0]})
    m = math.ceil(len(labels) / 2)
    keep = labels[:m] if subsample == "base" else labels[m:]
    return tuple([(p, keep.index(y), c) for p, y, c in s if y in keep] for s in splits)


def published(train, val, test, shots, seed, subsample, imagenet=False):
    random.seed(seed)
    train = dassl_fewshot(train, shots)
    if imagenet:
        train, test = coop_subsample(train, test, subsample=subsample)
        return train, test, test
    val = dassl_fewshot(val, min(shots, 4))
    return coop_subsample(train, val, test, subsample=subsample)


def triples(items):
    return [(it.path, it.label, it.classname) for it in items]


def assert_split(split, train, val, test):
    assert triples(split.train) == list(train)
    assert triples(split.val) == list(val)
    assert triples(split.test) == list(test)


# --- pure sampling ------------------------------------------------------------------------

def test_fewshot_is_dassl_rule_on_python_random():
    labels = [3, 0, 3, 2, 1, 0] * 6 + [4]  # first appearance 3, 0, 2, 1, 4; label 4 short
    items = [Item(f"/x/{i}.jpg", y, f"c{y}") for i, y in enumerate(labels)]
    for seed in SEEDS:
        random.seed(seed)
        expected = []
        for y in (3, 0, 2, 1, 4):
            group = [it for it in items if it.label == y]
            expected += random.sample(group, 4) if len(group) >= 4 else group
        assert sampling.fewshot(items, 4, random.Random(seed)) == expected


def test_fewshot_short_class_keeps_order_and_draws_nothing():
    short = [Item(f"/s/{i}", 0, "s") for i in (5, 1, 3)]
    full = [Item(f"/f/{i}", 1, "f") for i in range(10)]
    out = sampling.fewshot(short + full, 4, random.Random(7))
    random.seed(7)
    assert out == short + random.sample(full, 4)
    with pytest.raises(ValueError, match="shots"):
        sampling.fewshot(full, 0, random.Random(0))


def test_subsample_takes_labels_of_first_split_and_relabels():
    train = [Item(f"t{y}", y, f"c{y}") for y in (6, 2, 4, 8, 0)]  # n=5 -> base 0,2,4
    test = [Item(f"e{y}", y, f"c{y}") for y in (9, 8, 6, 4, 2, 0)]  # 9 is not in train
    base_tr, base_te = sampling.subsample_classes(train, test, subsample="base")
    new_tr, new_te = sampling.subsample_classes(train, test, subsample="new")
    assert [(i.path, i.label) for i in base_tr] == [("t2", 1), ("t4", 2), ("t0", 0)]
    assert [(i.path, i.label) for i in base_te] == [("e4", 2), ("e2", 1), ("e0", 0)]
    assert [(i.path, i.label, i.classname) for i in new_tr] == [("t6", 0, "c6"), ("t8", 1, "c8")]
    assert [(i.path, i.label) for i in new_te] == [("e8", 1), ("e6", 0)]
    assert sampling.subsample_classes(train, test) == (train, test)
    with pytest.raises(ValueError, match="subsample"):
        sampling.subsample_classes(train, subsample="novel")


# --- split-file data sets -----------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PREFIX))
def test_split_file_dataset_is_published_split(tmp_path, name):
    spec = fx.make_split_dataset(tmp_path, name, COUNTS, order_seed=len(name))
    prefix = os.path.join(str(tmp_path), PREFIX[name])
    raw = {k: [(os.path.join(prefix, p), y, c) for p, y, c in spec["split"][k]]
           for k in ("train", "val", "test")}
    names = {y: c for p, y, c in spec["split"]["test"]}
    for seed in SEEDS:
        for subsample in ("all", "base", "new"):
            split = build_split(name, str(tmp_path), 16, seed, subsample)
            assert_split(split, *published(raw["train"], raw["val"], raw["test"], 16, seed,
                                           subsample))
            keep = {"all": [0, 1, 2, 3, 4], "base": [0, 1, 2], "new": [3, 4]}[subsample]
            assert split.classnames == [names[y] for y in keep]
    # short class 1 keeps all 9 train and 2 val images; others give 16 and 4
    split = build_split(name, str(tmp_path), 16, 1)
    per_label = [sum(it.label == y for it in split.train) for y in range(5)]
    assert per_label == [16, 9, 16, 16, 16]
    assert [sum(it.label == y for it in split.val) for y in range(5)] == [4, 2, 4, 4, 4]
    assert len(split.test) == sum(c[2] for c in COUNTS)


def test_published_class_names_come_from_the_split_file(tmp_path):
    fx.make_split_dataset(tmp_path, "caltech101", COUNTS)
    fx.make_split_dataset(tmp_path, "eurosat", COUNTS)
    fx.make_split_dataset(tmp_path, "sun397", COUNTS)
    assert build_split("caltech101", str(tmp_path), 1, 1).classnames == [
        "face", "leopard", "motorbike", "accordion", "airplane"]
    assert build_split("eurosat", str(tmp_path), 1, 1, "new").classnames == [
        "Highway or Road", "Industrial Buildings"]
    assert build_split("sun397", str(tmp_path), 1, 1).classnames[2] == "indoor apse"


def test_stanford_cars_paths_join_on_the_dataset_folder(tmp_path):
    fx.make_split_dataset(tmp_path, "stanford_cars", COUNTS)
    split = build_split("stanford_cars", str(tmp_path), 2, 1)
    base = os.path.join(str(tmp_path), "stanford_cars")
    assert {os.path.relpath(os.path.dirname(it.path), base) for it in split.test} == {"cars_test"}
    assert {os.path.relpath(os.path.dirname(it.path), base) for it in split.train} == {"cars_train"}


def test_root_is_made_absolute_and_nothing_is_written(tmp_path, monkeypatch):
    fx.make_split_dataset(tmp_path / "data", "dtd", COUNTS)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    a = build_split("dtd", "data", 4, 2, "base")
    b = build_split("dtd", str(tmp_path / "data"), 4, 2, "base")
    assert a == b and all(os.path.isabs(it.path) for it in a.train + a.val + a.test)
    # no split_fewshot/ cache written: the draw is the same on every call
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


# --- FGVC Aircraft ------------------------------------------------------------------------

def test_fgvc_aircraft_labels_follow_variants_txt(tmp_path):
    variants = ["Tu-134", "F-16A/B", "Cessna 172", "737-200", "DC-10"]  # not sorted
    spec = fx.make_fgvc(tmp_path, COUNTS, variants=variants, order_seed=3)
    image = os.path.join(spec["dir"], "images")
    raw = {k: [(os.path.join(image, i + ".jpg"), variants.index(v), v) for i, v in rows]
           for k, rows in spec["lines"].items()}
    for seed in SEEDS:
        for subsample in ("all", "base", "new"):
            split = build_split("fgvc_aircraft", str(tmp_path), 16, seed, subsample)
            assert_split(split, *published(raw["train"], raw["val"], raw["test"], 16, seed,
                                           subsample))
    assert build_split("fgvc_aircraft", str(tmp_path), 1, 1, "base").classnames == variants[:3]


# --- ImageNet and its variants ------------------------------------------------------------

WNIDS = [w for w, _ in fx.imagenet_classnames()]


def listing(folder):
    """Dassl's listdir_nohidden: os.listdir order, dot names dropped (not sorted)."""
    return [f for f in os.listdir(folder) if not f.startswith(".")]


def test_imagenet_sorted_folders_listdir_order_val_is_test(tmp_path):
    present = [WNIDS[5], WNIDS[0], WNIDS[3], WNIDS[1], WNIDS[4]]  # written out of order
    fx.make_imagenet(tmp_path, present, [20, 3, 18, 17, 19], [3, 2, 3, 2, 3], shuffle_seed=1)
    names = dict(fx.imagenet_classnames())
    image = os.path.join(str(tmp_path), "imagenet", "images")
    raw = {}
    for sub in ("train", "val"):
        raw[sub] = [(os.path.join(image, sub, w, f), label, names[w])
                    for label, w in enumerate(sorted(present))
                    for f in listing(os.path.join(image, sub, w))]
    for seed in SEEDS:
        for subsample in ("all", "base", "new"):
            split = build_split("imagenet", str(tmp_path), 16, seed, subsample)
            assert_split(split, *published(raw["train"], None, raw["val"], 16, seed, subsample,
                                           imagenet=True))
    split = build_split("imagenet", str(tmp_path), 16, 1, "base")
    assert split.classnames == ["tench", "goldfish", "tiger shark"]
    assert split.val == split.test


@pytest.fixture(scope="module")
def v2_root(tmp_path_factory):
    """One ImageNet-V2 tree (1000 folders) shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("v2")
    return root, fx.make_imagenetv2(root, per_class=1, shuffle_seed=4)


def test_imagenetv2_labels_are_folder_numbers_names_by_line(v2_root):
    root, spec = v2_root
    split = build_split("imagenetv2", str(root), 16, 1)
    assert split.train == [] and split.val == [] and len(split.test) == 1000
    with open(os.path.join(spec["dir"], "classnames.txt")) as f:
        by_line = [line.rstrip("\n").split(" ", 1)[1] for line in f]
    assert split.classnames == by_line != sorted(by_line)
    it = split.test[17]
    assert (it.label, os.path.dirname(it.path)) == (17, os.path.join(spec["image_dir"], "17"))


@pytest.mark.parametrize("name", ["imagenet_sketch", "imagenet_a", "imagenet_r"])
def test_imagenet_variants_sorted_folders_readme_skipped(tmp_path, name):
    rng = random.Random(name)
    wnids = rng.sample(WNIDS, 200 if name != "imagenet_sketch" else 30)  # A and R: 200 classes
    spec = fx.make_imagenet_variant(tmp_path, name, wnids, per_class=2,
                                    readme=name != "imagenet_sketch")
    names = dict(fx.imagenet_classnames())
    split = build_split(name, str(tmp_path), 16, 2)
    expected = [(os.path.join(spec["image_dir"], w, f), label, names[w])
                for label, w in enumerate(sorted(wnids))
                for f in listing(os.path.join(spec["image_dir"], w))]
    assert_split(split, [], [], expected)
    assert split.classnames == [names[w] for w in sorted(wnids)]


# --- output --------------------------------------------------------------------------------

def test_to_json_shape_and_atomic_write(tmp_path):
    fx.make_split_dataset(tmp_path, "oxford_pets", COUNTS)
    split = build_split("oxford_pets", str(tmp_path), 2, 3, "new")
    out = tmp_path / "out" / "split.json"
    write_split_json(split, str(out))
    obj = json.loads(out.read_text())
    assert sorted(obj) == ["test", "train", "val"]
    assert obj["train"] == [[it.path, it.label, it.classname] for it in split.train]
    assert all(os.path.isabs(p) and isinstance(y, int) for p, y, _ in obj["test"])
    assert os.listdir(out.parent) == ["split.json"]  # no temporary left behind
    assert coop.Split.from_json(obj) == split


def test_fixture_images_are_valid_pictures(tmp_path):
    from PIL import Image
    fx.make_imagenet_variant(tmp_path, "imagenet_r", WNIDS[:2], per_class=2, images=True)
    for it in build_split("imagenet_r", str(tmp_path), 1, 1).test:
        with Image.open(it.path) as im:
            assert im.size == (8, 8)


# --- bad input ----------------------------------------------------------------------------

def _pets(root):
    return fx.make_split_dataset(root, "oxford_pets", COUNTS)


def _rewrite_split(root, text):
    spec = _pets(root)
    with open(spec["split_path"], "w") as f:
        f.write(text)


def _drop_image(root):
    spec = _pets(root)
    os.remove(os.path.join(spec["image_dir"], spec["split"]["test"][0][0]))


def _drop(path):
    def setup(root):
        if path.startswith("imagenet/"):
            fx.make_imagenet(root, WNIDS[:2], [2, 2], [1, 1])
        elif path.startswith("fgvc"):
            fx.make_fgvc(root, COUNTS)
        else:
            fx.make_imagenetv2(root)
        target = os.path.join(str(root), path)
        os.remove(target) if os.path.isfile(target) else os.rename(target, target + ".gone")
    return setup


def _imagenet_stray_folder(root):
    fx.make_imagenet(root, WNIDS[:2], [2, 2], [1, 1])
    fx.write_image(os.path.join(str(root), "imagenet", "images", "val", "n99999999", "a.JPEG"))


def _fgvc_unknown_variant(root):
    spec = fx.make_fgvc(root, COUNTS)
    with open(os.path.join(spec["dir"], "images_variant_val.txt"), "a") as f:
        f.write("1234567 Spitfire\n")


BAD = [  # (id, setup(root), name, kwargs, words in the message, check() catches it too)
    ("unknown-name", _pets, "pets", {}, ["unknown dataset 'pets'", "oxford_pets", "imagenet_r"],
     True),
    ("no-root", None, "dtd", {"root": "/nonexistent/heba-data"}, ["does not exist"], True),
    ("no-dataset-folder", _pets, "dtd", {}, ["dtd", "does not exist"], True),
    ("no-split-file", lambda r: os.remove(_pets(r)["split_path"]), "oxford_pets", {},
     ["split file", "split_zhou_OxfordPets.json", "missing"], True),
    ("split-not-json", lambda r: _rewrite_split(r, '{"train": [,]}'), "oxford_pets", {},
     ["does not parse"], True),
    ("split-bad-entry", lambda r: _rewrite_split(r, json.dumps(
        {"train": [["a.jpg", "x", "cat"]], "val": [], "test": []})), "oxford_pets", {},
     ["train[0]", "[relative path, label, class name]"], True),
    ("split-no-test", lambda r: _rewrite_split(r, '{"train": [], "val": []}'), "oxford_pets", {},
     ["'test'"], True),
    ("image-missing", _drop_image, "oxford_pets", {}, ["1 image(s) named in the split"], False),
    ("no-classnames", _drop("imagenet/classnames.txt"), "imagenet", {},
     ["class list", "classnames.txt"], True),
    ("no-imagenet-val", _drop("imagenet/images/val"), "imagenet", {}, ["image folder"], True),
    ("folder-not-in-classnames", _imagenet_stray_folder, "imagenet", {},
     ["n99999999", "not in classnames.txt"], False),
    ("no-variants", _drop("fgvc_aircraft/variants.txt"), "fgvc_aircraft", {}, ["variants.txt"],
     True),
    ("unknown-variant", _fgvc_unknown_variant, "fgvc_aircraft", {}, ["'Spitfire'"], False),
    ("v2-folder-missing", _drop("imagenetv2/imagenetv2-matched-frequency-format-val/999"),
     "imagenetv2", {}, ["class folder", "999"], False),
    ("shots-0", _pets, "oxford_pets", {"shots": 0}, ["shots must be", "got 0"], False),
    ("shots-negative", _pets, "oxford_pets", {"shots": -3}, ["shots must be"], False),
    ("subsample-bad", _pets, "oxford_pets", {"subsample": "novel"}, ["subsample must be"], False),
    ("test-only-subsample", lambda r: fx.make_imagenet_variant(r, "imagenet_a", WNIDS[:3]),
     "imagenet_a", {"subsample": "base"}, ["test-only", "'all'"], False),
    ("seed-negative", _pets, "oxford_pets", {"seed": -1}, ["seed must be"], False),
    ("train-list-empty", lambda r: fx.make_split_dataset(r, "oxford_pets", [(0, 2, 3)] * 3),
     "oxford_pets", {}, ["split file", "split_zhou_OxfordPets.json", "lists no training image",
                         "train list is empty"], False),
    ("class-without-train", lambda r: fx.make_split_dataset(
        r, "oxford_pets", [(3, 2, 3), (0, 2, 3), (3, 0, 2)]), "oxford_pets",
     {"subsample": "base"}, ["split_zhou_OxfordPets.json", "no training image of 1 class(es)",
                             "1 '"], False),
    ("fgvc-train-list-empty", lambda r: fx.make_fgvc(r, [(0, 2, 3)] * 2), "fgvc_aircraft", {},
     ["images_variant_train.txt", "train list is empty"], False),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_line_data_error(tmp_path, case):
    _, setup, name, kwargs, words, caught_by_check = case
    if setup:
        setup(tmp_path)
    args = {"root": str(tmp_path), "shots": 4, "seed": 1, "subsample": "all", **kwargs}
    with pytest.raises(DataError) as err:
        build_split(name, **args)
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    if caught_by_check:
        with pytest.raises(DataError) as err2:
            check(name, args["root"])
        msg = str(err2.value)
        assert "\n" not in msg and all(w in msg for w in words), msg
    elif not {"shots", "seed", "subsample"} & set(kwargs):
        check(name, args["root"])  # cheap check passes; the full read catches it


def test_transfer_target_needs_no_train_list(tmp_path):
    """A transfer target is read for its test split: an empty train list is allowed there."""
    fx.make_split_dataset(tmp_path, "oxford_pets", [(0, 2, 3)] * 3)
    split = build_split("oxford_pets", str(tmp_path), 1, 1, need_train=False)
    assert split.train == [] and len(split.test) == 9


@pytest.mark.parametrize("build, name", [
    (lambda r: fx.make_split_dataset(r, "ucf101", COUNTS), "ucf101"),
    (lambda r: fx.make_fgvc(r, COUNTS), "fgvc_aircraft"),
    (lambda r: fx.make_imagenet(r, WNIDS[:2], [2, 2], [1, 1]), "imagenet"),
    (lambda r: fx.make_imagenet_variant(r, "imagenet_sketch", WNIDS[:2]), "imagenet_sketch"),
], ids=["split-file", "fgvc", "imagenet", "imagenet-folders"])
def test_check_passes_on_good_layouts(tmp_path, build, name):
    build(tmp_path)
    assert check(name, str(tmp_path)) is None


def test_registry_names_and_published_readers():
    assert sorted(coop.DATASETS) == sorted([
        "oxford_pets", "eurosat", "dtd", "caltech101", "oxford_flowers", "stanford_cars",
        "sun397", "ucf101", "food101", "fgvc_aircraft", "imagenet", "imagenetv2",
        "imagenet_sketch", "imagenet_a", "imagenet_r"])
    test_only = {n for n, d in coop.DATASETS.items() if d.test_only}
    assert test_only == {"imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"}


def test_every_dataset_builds_from_one_root(tmp_path, v2_root):
    for name in coop.DATASETS:
        if name != "imagenetv2":
            fx.make_dataset(tmp_path, name)
    # DATASETS.md suggests symbolic links to data sets kept elsewhere
    os.symlink(v2_root[1]["dir"], tmp_path / "imagenetv2")
    sizes = {}
    for name, info in coop.DATASETS.items():
        check(name, str(tmp_path))
        split = build_split(name, str(tmp_path), 2, 1, "all")
        sizes[name] = (len(split.train), len(split.val), len(split.test), len(split.classnames))
    few = (2 + 2 + 2 + 2 + 2, 2 + 1 + 2 + 1 + 2, 10, 5)  # short classes keep what they have
    assert {n: s for n, s in sizes.items() if n in PREFIX or n == "fgvc_aircraft"} == {
        n: few for n in [*PREFIX, "fgvc_aircraft"]}
    assert sizes["imagenet"] == (10, 10, 10, 5)
    assert sizes["imagenetv2"] == (0, 0, 1000, 1000)
    assert sizes["imagenet_sketch"] == (0, 0, 10, 5)
    assert sizes["imagenet_a"] == sizes["imagenet_r"] == (0, 0, 200, 200)
