"""Data pipeline on the CPU: img/s per core of each pipeline, collate and transfer, the image check.

Run (CPU; one process; the numbers are per core: each timing is the process's
CPU time, all its threads, with torch and the decoders on one thread)::

    OMP_NUM_THREADS=1 python -m pytest benchmarks/test_data_pipeline.py \
        --benchmark-json=data.json

(``benchmarks/conftest.py`` skips the CUDA benchmarks without a GPU; this module
runs on the CPU and says so with ``CPU_BENCHMARK``; ``--noconftest`` runs it
whatever the hook does.)

JPEGs (quality 90, random pictures with pixel noise, about a photo's file
size) are written on the fly at 500x375 and 1024x768. Contenders, each over
the same images at CLIP's 224:

* train ``today``: PIL decode + RandomResizedCrop bicubic + flip + ToTensor +
  Normalize per sample (the published transforms, float out);
* train ``published``: the same PIL ops from drawn boxes, uint8 out;
* train ``fast``: the set decoded once (its cost in ``decode_once_ms``, not
  in the per-sample time), per sample the uint8 crop + resize + flip;
* test ``today``: decode + Resize + CenterCrop + ToTensor + Normalize per
  image and evaluation; test ``prepared``: the crops read back from
  :mod:`heba.data.testcrops` (the one decode in ``prepare_ms``);
* check ``fast`` / ``full`` (:mod:`heba.data.check`);
* collate of a batch of 128 as float32 vs uint8, and normalising it (on the
  CPU here; pinned transfer only where CUDA is).

``extra_info``: ``img_per_s_per_core`` (measured), ``ms_per_img``.
``HEBA_BENCH_DRY_RUN=1`` runs 4 images per size (the numbers then mean nothing).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from benchmarks.cases import DRY_RUN
from heba.data import check, pipeline as P, testcrops
from heba.data.folder import ImageList
from heba.data.sampling import Item
from heba.train.backbones.openclip import dassl_transforms

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIZES = {"500x375": (500, 375), "1024x768": (1024, 768)}
N = 4 if DRY_RUN else 32
ROUNDS = 1 if DRY_RUN else 3
CPU = pytest.mark.benchmark(timer=time.process_time, disable_gc=True)
CPU_BENCHMARK = True        # runs without CUDA (read by benchmarks/conftest.py)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """``{size name: [Item]}`` of N JPEGs each."""
    from PIL import Image
    out = {}
    for name, (w, h) in SIZES.items():
        d = tmp_path_factory.mktemp(name)
        rng = np.random.default_rng(0)
        items = []
        for k in range(N):
            small = (rng.random((h // 4, w // 4, 3)) * 255).astype("uint8")
            big = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.int16)
            noisy = big + rng.integers(-12, 13, big.shape)     # photo-like detail: JPEG size
            img = Image.fromarray(noisy.clip(0, 255).astype("uint8"))
            path = str(d / f"{k:03d}.jpg")
            img.save(path, quality=90)
            items.append(Item(path, k % 10, f"c{k % 10}"))
        out[name] = items
    return out


def _per_core(benchmark, n):
    """Record img/s per core from the benchmark's mean CPU time for ``n`` images."""
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(img_per_s_per_core=n / mean, ms_per_img=1e3 * mean / n,
                                images=n, measured=True)


def _tickets(ds, spec, epoch=0):
    s = P.EpochSampler(len(ds), spec, ds.sizes)
    s.set_epoch(epoch, 7 + epoch, 11 + epoch)
    return list(s)


@CPU
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pipe", ["today", "published", "fast"])
def test_train_pipeline(benchmark, images, size, pipe):
    items = images[size]
    train_tf = dassl_transforms(224, MEAN, STD)[0]
    spec = P.TrainSpec.from_transform(train_tf)
    if pipe == "today":
        ds = ImageList(items, train_tf)
        benchmark.pedantic(lambda: [ds[i] for i in range(len(ds))], rounds=ROUNDS,
                           iterations=1, warmup_rounds=1)
    else:
        t0 = time.process_time()
        ds = P.train_images(items, spec, pipe, threads=1)
        once = time.process_time() - t0
        tickets = _tickets(ds, spec)
        benchmark.pedantic(lambda: [ds[t] for t in tickets], rounds=ROUNDS, iterations=1,
                           warmup_rounds=1)
        benchmark.extra_info.update(setup_ms_per_img=1e3 * once / len(items), note=ds.note)
    _per_core(benchmark, len(items))


@CPU
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pipe", ["today", "prepared"])
def test_eval_pipeline(benchmark, images, size, pipe, tmp_path):
    items = images[size]
    eval_tf = dassl_transforms(224, MEAN, STD)[1]
    if pipe == "today":
        ds = ImageList(items, eval_tf)
        benchmark.pedantic(lambda: [ds[i] for i in range(len(ds))], rounds=ROUNDS,
                           iterations=1, warmup_rounds=1)
    else:
        testcrops.clear_memory()
        t0 = time.process_time()
        crops = testcrops.prepare_crops(items, P.EvalSpec.from_transform(eval_tf),
                                        cache_dir=str(tmp_path), threads=1)
        once = time.process_time() - t0
        benchmark.pedantic(lambda: P.normalize_on_device(crops.images, crops.mean, crops.std),
                           rounds=ROUNDS, iterations=1, warmup_rounds=1)
        benchmark.extra_info.update(prepare_ms_per_img=1e3 * once / len(items))
        testcrops.clear_memory()
    _per_core(benchmark, len(items))


@CPU
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", check.MODES)
def test_image_check(benchmark, images, size, mode):
    paths = [it.path for it in images[size]]

    def run():
        check.forget_checked()                      # every file checked anew
        check.check_images(paths, mode, threads=1)

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    _per_core(benchmark, len(paths))


@CPU
@pytest.mark.parametrize("what", ["collate-float32", "collate-uint8", "normalise-uint8"])
def test_collate_and_transfer(benchmark, what):
    """Host work of a batch of 128: collate (+ pin and copy where CUDA is); normalising
    the uint8 batch runs on the device in training (timed here on the CPU)."""
    from torch.utils.data import default_collate
    b = 16 if DRY_RUN else 128
    g = torch.Generator().manual_seed(0)
    u8 = [(torch.randint(0, 256, (3, 224, 224), generator=g, dtype=torch.uint8), 1)
          for _ in range(b)]
    samples = [(x.float().div(255), y) for x, y in u8] if what.endswith("float32") else u8
    cuda = torch.cuda.is_available()
    batch = default_collate(u8)[0]

    def run():
        if what == "normalise-uint8":
            return P.normalize_on_device(batch, MEAN, STD, "cuda" if cuda else "cpu")
        x, _ = default_collate(samples)
        if cuda:
            x = x.pin_memory().to("cuda", non_blocking=True)
            torch.cuda.synchronize()
        return x

    benchmark.pedantic(run, rounds=5 * ROUNDS, iterations=1, warmup_rounds=1)
    _per_core(benchmark, b)
    benchmark.extra_info.update(batch=b, transfer="pinned, to cuda" if cuda else "none (no CUDA)")
