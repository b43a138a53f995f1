"""Test crops prepared once: today's eval transform bit for bit, decoded once across evaluations."""

from __future__ import annotations

import os

import pytest
import torch

from heba.data import testcrops as TC
from heba.data.pipeline import EvalSpec, normalize_on_device
from heba.data.folder import ImageList
from heba.train.backbones.openclip import dassl_transforms

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(autouse=True)
def fresh_memory():
    TC.clear_memory()
    yield
    TC.clear_memory()


def _spec(size=40):
    return EvalSpec.from_transform(dassl_transforms(size, MEAN, STD)[1])


def test_crops_are_todays_eval_transform(image_items, tmp_path):
    eval_tf = dassl_transforms(40, MEAN, STD)[1]
    crops = TC.prepare_crops(image_items, _spec(), cache_dir=str(tmp_path / "c"))
    ref = ImageList(image_items, eval_tf)
    for i in range(len(ref)):
        x, y = ref[i]
        got = normalize_on_device(crops.images[i][None], crops.mean, crops.std)[0]
        assert crops[i][1] == y
        assert (got - x).abs().max() < 1e-5, f"image {i}: {(got - x).abs().max():.2e}"


def test_three_seeds_decode_each_image_once(image_items, tmp_path):
    before = dict(TC.STATS)
    for _ in range(6):                    # three seeds, before and after training
        crops = TC.prepare_crops(image_items, _spec(), cache_dir=str(tmp_path / "c"))
        assert crops.where == "memory"
    assert TC.STATS["decoded"] - before["decoded"] == len(image_items)
    assert TC.STATS["memory_hits"] - before["memory_hits"] == 5
    assert not os.path.exists(tmp_path / "c")          # fitted in memory: no file
    TC.prepare_crops(image_items, _spec(32), cache_dir=str(tmp_path / "c"))
    assert TC.STATS["decoded"] - before["decoded"] == 2 * len(image_items)   # new transform


def test_over_the_memory_cap_a_cache_file_is_reused(image_items, tmp_path):
    cache = str(tmp_path / "cache")
    before = dict(TC.STATS)
    a = TC.prepare_crops(image_items, _spec(), cache_dir=cache, memory_bytes=100)
    assert a.where.startswith(cache) and a.where.endswith(".npy")
    b = TC.prepare_crops(image_items, _spec(), cache_dir=cache, memory_bytes=100)
    assert b.where == a.where and torch.equal(a.images, b.images)
    assert TC.STATS["decoded"] - before["decoded"] == len(image_items)
    assert TC.STATS["file_hits"] - before["file_hits"] == 1
    st = os.stat(image_items[0].path)                   # a changed image: prepared anew
    os.utime(image_items[0].path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    c = TC.prepare_crops(image_items, _spec(), cache_dir=cache, memory_bytes=100)
    assert c.where != a.where
    assert TC.STATS["decoded"] - before["decoded"] == 2 * len(image_items)


def test_a_damaged_cache_file_is_prepared_again(image_items, tmp_path):
    cache = str(tmp_path / "cache")
    a = TC.prepare_crops(image_items, _spec(), cache_dir=cache, memory_bytes=100)
    ref = a.images.clone()
    with open(a.where, "wb") as f:
        f.write(b"garbage")
    b = TC.prepare_crops(image_items, _spec(), cache_dir=cache, memory_bytes=100)
    assert torch.equal(b.images, ref)
