"""heba.data.vision on tiny fixture files written in the real torchvision / folder layouts.

The expected splits are the published rule written out here (salimkhazem/adaptertune
src/datasets/splits.py): one ``torch.randperm(n)`` from ``Generator().manual_seed(seed)``,
``int(n * val_split)`` validation indices first; three-way: test first. torchvision's
md5 checks are the only thing bypassed (fixture files cannot have the real checksums).
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision", reason="torchvision not installed")
from PIL import Image  # noqa: E402
from torchvision.transforms import functional as TF  # noqa: E402

from heba.data.vision import (  # noqa: E402
    IMAGENET_MEAN, IMAGENET_STD, load_vision_dataset, split_indices, split_indices_threeway,
)

RAW = (None, None)          # transforms=(None, None): PIL images back


@pytest.fixture
def no_md5(monkeypatch):
    """Fixture files cannot match the real archives' md5 sums: check existence only."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.flowers102 as flowers
    import torchvision.datasets.svhn as svhn

    def exists(fpath, md5=None):
        return os.path.isfile(fpath)
    for mod in (cifar, svhn, flowers):
        monkeypatch.setattr(mod, "check_integrity", exists)


def rng(seed=0):
    return np.random.default_rng(seed)


def write_image(path, seed, size=(8, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def published_split(n, val_split, seed):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(n * val_split)
    return perm[n_val:], perm[:n_val]


def labels(ds):
    return [ds[i][1] for i in range(len(ds))]


# --- the split rule ----------------------------------------------------------------------------

def test_splits_are_the_published_permutation():
    for n, frac, seed in [(20, 0.1, 0), (1234, 0.1, 42), (7, 0.3, 5)]:
        assert split_indices(n, frac, seed) == published_split(n, frac, seed)
    train, val = split_indices(50000, 0.1, 1)
    assert len(val) == 5000 and sorted(train + val) == list(range(50000))
    assert split_indices(100, 0.1, 1) != split_indices(100, 0.1, 2)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(3)).tolist()
    tr, va, te = split_indices_threeway(30, 0.1, 0.2, 3)
    assert te == perm[:6] and va == perm[6:8] and tr == perm[8:]
    with pytest.raises(ValueError, match="val_split must be a fraction"):
        split_indices(10, 1.5, 0)


# --- CIFAR-10 / CIFAR-100 (python pickles) ------------------------------------------------------

def write_cifar10(root, per_batch=4, n_test=5):
    base = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(base)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    arrays = {}
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else per_batch
        data = rng(k).integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)   # R, G, B planes
        lab = [int(x) for x in rng(100 + k).integers(0, 10, n)]
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump({"batch_label": name, "labels": lab, "data": data,
                         "filenames": [f"{name}_{i}.png" for i in range(n)]}, f, protocol=2)
        arrays[name] = (data, lab)
    with open(os.path.join(base, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch,
                     "num_vis": 3072}, f, protocol=2)
    return names, arrays


def write_cifar100(root, n=10, n_test=3):
    base = os.path.join(root, "cifar-100-python")
    os.makedirs(base)
    names = [f"fine{i}" for i in range(100)]
    for k, (name, m) in enumerate([("train", n), ("test", n_test)]):
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump({"data": rng(k).integers(0, 256, (m, 3072), dtype=np.uint8),
                         "fine_labels": [int(x) for x in rng(9 + k).integers(0, 100, m)],
                         "coarse_labels": [0] * m}, f, protocol=2)
    with open(os.path.join(base, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": ["c"]}, f, protocol=2)
    return names


def test_cifar10_reads_the_real_pickles_and_splits_by_the_seed(tmp_path, no_md5):
    names, arrays = write_cifar10(str(tmp_path))
    data = load_vision_dataset("cifar10", str(tmp_path), seed=3, transforms=RAW)
    assert data.name == "CIFAR10" and data.classnames == names and data.num_classes == 10
    train_data = np.concatenate([arrays[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = sum((arrays[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    exp_train, exp_val = published_split(20, 0.1, 3)
    assert (len(data.train), len(data.val), len(data.test)) == (18, 2, 5)
    for split, idx in ((data.train, exp_train), (data.val, exp_val)):
        for j, i in enumerate(idx):
            img, label = split[j]
            hwc = train_data[i].reshape(3, 32, 32).transpose(1, 2, 0)
            assert np.array_equal(np.asarray(img), hwc) and label == train_labels[i]
    assert labels(data.test) == arrays["test_batch"][1]


def test_transforms_are_the_published_ones(tmp_path, no_md5):
    write_cifar10(str(tmp_path))
    raw = load_vision_dataset("CIFAR10", str(tmp_path), seed=0, transforms=RAW)
    data = load_vision_dataset("CIFAR10", str(tmp_path), seed=0, img_size=24)
    img, label = raw.test[1]
    x, y = data.test[1]
    exp = TF.normalize(TF.to_tensor(TF.center_crop(TF.resize(img, 256), 24)), IMAGENET_MEAN,
                       IMAGENET_STD)
    assert y == label and torch.equal(x, exp)
    assert torch.equal(data.val[0][0], TF.normalize(TF.to_tensor(TF.center_crop(
        TF.resize(raw.val[0][0], 256), 24)), IMAGENET_MEAN, IMAGENET_STD))
    torch.manual_seed(0)
    t = data.train[0][0]
    assert t.shape == (3, 24, 24) and t.dtype == torch.float32
    names = [type(tf).__name__ for tf in data.train.transform.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]


def test_cifar100_fine_labels(tmp_path, no_md5):
    names = write_cifar100(str(tmp_path))
    data = load_vision_dataset("CIFAR100", str(tmp_path), seed=0, transforms=RAW)
    assert data.classnames == names and (len(data.train), len(data.val)) == (9, 1)


# --- SVHN and Flowers102 (.mat files) ---------------------------------------------------------

def test_svhn_mat_files_with_label_10_as_digit_0(tmp_path, no_md5):
    sio = pytest.importorskip("scipy.io")
    ys = {}
    for k, (split, n) in enumerate([("train", 10), ("test", 4)]):
        y = np.array([[10], [1], [5], [10], [3], [2], [7], [9], [4], [6]][:n], dtype=np.uint8)
        sio.savemat(os.path.join(tmp_path, f"{split}_32x32.mat"),
                    {"X": rng(k).integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": y})
        ys[split] = [int(v) % 10 for v in y[:, 0]]
    data = load_vision_dataset("SVHN", str(tmp_path), seed=1, transforms=RAW)
    assert data.classnames == [str(d) for d in range(10)]
    assert labels(data.test) == ys["test"]
    tr, va = published_split(10, 0.1, 1)
    assert labels(data.val) == [ys["train"][i] for i in va]
    assert labels(data.train) == [ys["train"][i] for i in tr]


def test_flowers102_trains_on_train_plus_val(tmp_path, no_md5):
    sio = pytest.importorskip("scipy.io")
    base = tmp_path / "flowers-102"
    for i in range(1, 13):
        write_image(str(base / "jpg" / f"image_{i:05d}.jpg"), i)
    lab = np.array([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3])
    sio.savemat(str(base / "imagelabels.mat"), {"labels": lab})
    sio.savemat(str(base / "setid.mat"), {"trnid": np.array([1, 2, 3, 4, 5]),
                                          "valid": np.array([6, 7, 8, 9, 10]),
                                          "tstid": np.array([11, 12])})
    data = load_vision_dataset("flowers", str(tmp_path), seed=0, transforms=RAW)
    assert data.classnames == ["1", "2", "3"]
    assert (len(data.train), len(data.val), len(data.test)) == (9, 1, 2)
    tr, va = published_split(10, 0.1, 0)
    assert labels(data.val) == [int(lab[i]) - 1 for i in va]
    assert labels(data.test) == [1, 2]


# --- the image-file torchvision layouts ----------------------------------------------------

def test_oxford_pets_trainval_and_test(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    # <image id> <class id, 1-based> <species> <breed id>, as in annotations/{trainval,test}.txt
    rows = {"trainval": [f"Abyssinian_{i} 1 1 1" for i in range(1, 9)]
            + ["great_pyrenees_1 2 2 1", "great_pyrenees_2 2 2 1"],
            "test": ["great_pyrenees_9 2 2 1", "Abyssinian_9 1 1 1"]}
    os.makedirs(base / "annotations")
    for split, lines in rows.items():
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
        for k, line in enumerate(lines):
            write_image(str(base / "images" / f"{line.split()[0]}.jpg"), k)
    data = load_vision_dataset("pets", str(tmp_path), seed=0, transforms=RAW)
    assert data.classnames == ["Abyssinian", "Great Pyrenees"]
    assert labels(data.test) == [1, 0] and (len(data.train), len(data.val)) == (9, 1)


def test_food101_json_meta(tmp_path):
    base = tmp_path / "food-101"
    meta = {"train": {"apple_pie": [f"apple_pie/{i}" for i in range(6)],
                      "sushi": [f"sushi/{i}" for i in range(4)]},
            "test": {"apple_pie": ["apple_pie/10"], "sushi": ["sushi/10", "sushi/11"]}}
    os.makedirs(base / "meta")
    for split, m in meta.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(m))
        for k, rel in enumerate(sum(m.values(), [])):
            write_image(str(base / "images" / f"{rel}.jpg"), k)
    data = load_vision_dataset("Food101", str(tmp_path), seed=0, transforms=RAW)
    assert data.classnames == ["apple_pie", "sushi"] and labels(data.test) == [0, 1, 1]
    assert len(data.train) + len(data.val) == 10 and len(data.val) == 1


def test_fgvc_aircraft_variants(tmp_path):
    base = tmp_path / "fgvc-aircraft-2013b" / "data"
    os.makedirs(base / "images")
    (base / "variants.txt").write_text("707-320\nA300B4\nF/A-18\n")
    train = [(f"{1000 + i}", ["707-320", "A300B4", "F/A-18"][i % 3]) for i in range(10)]
    test = [("2000", "F/A-18"), ("2001", "707-320")]
    for split, rows in (("trainval", train), ("test", test)):
        (base / f"images_variant_{split}.txt").write_text(
            "".join(f"{i} {v}\n" for i, v in rows))
        for k, (i, _) in enumerate(rows):
            write_image(str(base / "images" / f"{i}.jpg"), k)
    data = load_vision_dataset("fgvc", str(tmp_path), seed=2, transforms=RAW)
    assert data.classnames == ["707-320", "A300B4", "F/A-18"] and labels(data.test) == [2, 0]
    tr, va = published_split(10, 0.1, 2)
    assert labels(data.val) == [i % 3 for i in va]


# --- folder layouts ------------------------------------------------------------------------------

def test_tiny_imagenet_val_from_annotations(tmp_path):
    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819"]
    for c, w in enumerate(wnids):
        for i in range(5):
            write_image(str(base / "train" / w / "images" / f"{w}_{i}.JPEG"), 10 * c + i)
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
    ann = [("val_0.JPEG", wnids[1]), ("val_1.JPEG", wnids[0]), ("val_2.JPEG", wnids[1])]
    for k, (f, _) in enumerate(ann):
        write_image(str(base / "val" / "images" / f), k)
    (base / "val" / "val_annotations.txt").write_text(
        "".join(f"{f}\t{w}\t0\t0\t8\t8\n" for f, w in ann))
    data = load_vision_dataset("TinyImageNet", str(tmp_path), seed=0, transforms=RAW)
    assert data.classnames == wnids and (len(data.train), len(data.val)) == (9, 1)
    # the published code's class-organised ImageFolder order: class, then file name
    assert [os.path.basename(p) for p, _ in data.test.base.samples] == \
        ["val_1.JPEG", "val_0.JPEG", "val_2.JPEG"]
    assert labels(data.test) == [0, 1, 1]
    os.remove(base / "val" / "images" / "val_2.JPEG")
    with pytest.raises(FileNotFoundError, match="1 val image.*missing.*val_2.JPEG"):
        load_vision_dataset("TinyImageNet", str(tmp_path), transforms=RAW)


def test_imagenet_r_three_way_split_or_test_folder(tmp_path):
    classes = ["goldfish", "hammerhead", "tiger"]
    for c, name in enumerate(classes):
        for i in range(7):
            write_image(str(tmp_path / "imagenet-r" / name / f"{i}.jpg"), 10 * c + i)
    data = load_vision_dataset("imagenet_r", str(tmp_path), seed=4, transforms=RAW)
    perm = torch.randperm(21, generator=torch.Generator().manual_seed(4)).tolist()
    n_test = int(21 * 0.2)
    n_val = int((21 - n_test) * 0.1)
    assert data.test.indices == perm[:n_test] and data.val.indices == perm[n_test:n_test + n_val]
    assert data.train.indices == perm[n_test + n_val:] and data.classnames == classes
    # with train/ and test/ folders: test is test/, validation comes from train/
    for split, n in (("train", 6), ("test", 2)):
        for name in classes:
            for i in range(n):
                write_image(str(tmp_path / "r2" / split / name / f"{i}.jpg"), i)
    data = load_vision_dataset("ImageFolder", str(tmp_path / "r2"), seed=0, transforms=RAW)
    assert len(data.test) == 6 and (len(data.train), len(data.val)) == (17, 1)
    assert labels(data.test) == [0, 0, 1, 1, 2, 2]


# --- errors: one line --------------------------------------------------------------------------

def test_missing_roots_and_bad_names_are_one_line(tmp_path):
    cases = [
        (FileNotFoundError, "data root .* does not exist", ("CIFAR10", str(tmp_path / "nope"))),
        (FileNotFoundError, "CIFAR10: not found under .* heba never downloads",
         ("CIFAR10", str(tmp_path))),
        (FileNotFoundError, "OxfordIIITPet: not found", ("pets", str(tmp_path))),
        (FileNotFoundError, "TinyImageNet: no training folder", ("TinyImageNet", str(tmp_path))),
        (FileNotFoundError, "ImageNetR: no folder", ("ImageNetR", str(tmp_path))),
        (ValueError, "unknown dataset 'mnist'", ("mnist", str(tmp_path))),
    ]
    for exc, pattern, args in cases:
        with pytest.raises(exc, match=pattern) as info:
            load_vision_dataset(*args)
        assert "\n" not in str(info.value)
    assert os.listdir(tmp_path) == []                         # nothing written into the root
