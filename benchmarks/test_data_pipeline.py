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

End to end, ``heba-train`` itself (``test_heba_train_end_to_end``): the tiny CLIP on a
generated JPEG ImageFolder (500x375; 10 classes, 16 shots of the 5 base classes, 20 test
images per class, 5 epochs, batch 32, ``--workers 0 --device cpu``), ``--pipeline
published`` vs ``fast``, each run in a fresh process with a fresh test-crop cache. Timer:
wall clock of the whole run (startup included). ``extra_info``: ``train_img_per_s``
(heba-train's own per-epoch figures: samples over epoch seconds), ``run_img_per_s``
(training samples + evaluated test images over the whole run's wall clock), ``wall_s``;
a second run with ``--skip-zero-shot`` has one evaluation fewer (the difference of the
walls is one evaluation on crops prepared once, where the cores are quiet enough).

``extra_info``: ``img_per_s_per_core`` (measured), ``ms_per_img``.
``HEBA_BENCH_DRY_RUN=1`` runs 4 images per size and one 4-class end-to-end run of the fast
pipeline (the numbers then mean nothing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from benchmarks.cases import DRY_RUN
from benchmarks.jpegs import write_image_folder, write_jpegs
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
    out = {}
    for name, size in SIZES.items():
        paths = write_jpegs(str(tmp_path_factory.mktemp(name)), N, size)
        out[name] = [Item(p, k % 10, f"c{k % 10}") for k, p in enumerate(paths)]
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


# --- heba-train end to end ------------------------------------------------------------------

E2E = (dict(classes=4, shots=2, test=2, epochs=1, batch=4) if DRY_RUN else
       dict(classes=10, shots=16, test=20, epochs=5, batch=32))
E2E_VARIANTS = ("full",) if DRY_RUN else ("full", "skip-zero-shot")
E2E_PIPES = ("fast",) if DRY_RUN else ("published", "fast")     # a dry run: one process
_RUNS = iter(range(1 << 30))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp("folder")), E2E["classes"],
                              E2E["shots"], E2E["test"], (500, 375))


def heba_train_command(folder, pipe, out, skip_zero_shot=False) -> list:
    """The measured command: heba-train on ``folder``, tiny CLIP, CPU, no loader workers."""
    cmd = [sys.executable, "-m", "heba.cli", folder, "--model", "tiny", "--shots",
           str(E2E["shots"]), "--epochs", str(E2E["epochs"]), "--batch-size", str(E2E["batch"]),
           "--device", "cpu", "--workers", "0", "--pipeline", pipe, "--output", out]
    return cmd + (["--skip-zero-shot"] if skip_zero_shot else [])


def _run_heba_train(folder, pipe, root, skip_zero_shot=False) -> dict:
    """One heba-train run in a fresh process (fresh test-crop cache); its metrics and wall."""
    k = next(_RUNS)
    out, cache = os.path.join(root, f"run{k}"), os.path.join(root, f"cache{k}")
    env = dict(os.environ, OMP_NUM_THREADS="1", HEBA_CACHE_DIR=cache)
    t0 = time.perf_counter()
    proc = subprocess.run(heba_train_command(folder, pipe, out, skip_zero_shot), env=env,
                          capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        events = [json.loads(line) for line in f]
    train = [e for e in events if e["event"] == "train"]
    return dict(wall=wall, evals=sum(e["event"] == "eval" for e in events),
                train_samples=sum(e["img_per_s"] * e["seconds"] for e in train),
                train_seconds=sum(e["seconds"] for e in train), stdout=proc.stdout)


@pytest.mark.benchmark(timer=time.perf_counter, disable_gc=True)
@pytest.mark.parametrize("variant", E2E_VARIANTS)
@pytest.mark.parametrize("pipe", E2E_PIPES)
def test_heba_train_end_to_end(benchmark, image_folder, pipe, variant, tmp_path):
    """heba-train end to end on the CPU (module docstring): img/s of training and evaluation."""
    runs = []
    skip = variant == "skip-zero-shot"
    benchmark.pedantic(lambda: runs.append(_run_heba_train(image_folder, pipe, str(tmp_path),
                                                           skip)),
                       rounds=1, iterations=1)
    r = runs[-1]
    test_images = E2E["classes"] * E2E["test"]
    benchmark.extra_info.update(
        pipeline=pipe, variant=variant, measured=True, timer="wall clock, whole run",
        command=" ".join(["heba-train"] + heba_train_command("FOLDER", pipe, "OUT", skip)[3:]),
        wall_s=r["wall"], evaluations=r["evals"], test_images=test_images,
        train_samples=round(r["train_samples"]), train_seconds=r["train_seconds"],
        train_img_per_s=r["train_samples"] / r["train_seconds"],
        run_img_per_s=(r["train_samples"] + r["evals"] * test_images) / r["wall"],
        note=r["stdout"].splitlines()[1] if len(r["stdout"].splitlines()) > 1 else "")
