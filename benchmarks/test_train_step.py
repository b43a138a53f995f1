"""The published HeBA training step on a frozen CLIP ViT-B/16: the published code's eager step,
torch.compile of it, and heba's fast path (heba-train's step), in one run.

    pytest benchmarks/test_train_step.py --benchmark-only --benchmark-json=results/train.json
    python -m benchmarks.train_report results/train.json

The recipe (VLM-HeBA ``configs/trainers/HeBA/base2new.yaml``, ``trainers/heba.py``): batch
16 of 224x224 images, ~50 base classes (Caltech101 / Food101 / Flowers / UCF101 base
halves; one prompt each, 12..32 tokens like "a photo of a <class>, <description>"), the
published candidate set (the batch's classes + up to 5 negatives each: with 50 classes and
16 images nearly always every class), HeBA adapters in all 12 blocks of both towers with
the slow-fast scale on (0.025, x2.25 with probability 0.2, one draw per block and tower),
label smoothing 0.1, SGD momentum 0.9, weight decay 5e-4; bf16. Random weights
(``open_clip.create_model("ViT-B-16", pretrained=None)``); AdapterTune r=16 (image tower)
for comparison. Contenders:

* ``eager``: the published code's step, written out: fp32 backbone under
  ``torch.autocast(bf16)``, reference adapters, slow-fast drawn on the host per block
  (``ScalePolicy(draws="host")``), the candidate set built on the host (``torch.unique``,
  a per-class membership loop, ``randperm``, as published), the full 77-token text
  tower, ``F.cross_entropy``, ``optimizer.step()``;
* ``compile`` / ``compile-ro``: ``torch.compile`` of that loss function, modes
  ``default`` and ``reduce-overhead`` (backward through AOTAutograd), with the slow-fast
  scale drawn on the device (host draws would recompile at every step);
* ``heba``: heba-train's step: backbone cast once (:func:`heba.train.graph.prepare_frozen`),
  backend ``"auto"``, device-side slow-fast draws, the static candidate slots and
  prompt picks on the device (:mod:`heba.train.step`), the text tower cut at the bank's
  longest prompt, fused SGD, forward + backward one CUDA graph (:class:`GraphedStep`);
* ``heba-<backend>``: the same with one backend; ``heba-ckpt``: with every frozen block
  checkpointed;
* ``heba-compile`` / ``heba-compile-max``: ``torch.compile`` of heba's own step
  (:class:`AdapterStep` after ``prepare_frozen``, reference backend: what the compiler makes
  of the same math without heba's kernels), modes ``default`` and ``max-autotune``;
* ``heba-loader``: heba's step fed by heba-train's loader (:func:`heba.train.data.train_loader`,
  ``pipeline="fast"``, ``workers="auto"``) from a generated JPEG ImageFolder (500x375), so
  the time includes the crops, the transfer and the normalisation.

The published batch is 16; ``heba``, ``heba-<backend>`` and the compiled steps also run at
batch 128 and 256 (throughput). A dry run uses batches 4 / 6 / 8 for the three.

``extra_info``: ms per step (CUDA events, median), images/s, peak memory of a step
(``torch.cuda.max_memory_allocated``, weights and optimizer included), kernels and kernel
launch calls per step (torch profiler: GPU kernel records, and the host's
``cudaLaunchKernel`` / ``cudaGraphLaunch`` calls; GPU only), the launches and dispatches of
one step counted by the dispatch recorder on every device, the CPU included
(:mod:`benchmarks.launch_count`: ``launches`` = ATen ops that launch + heba's Triton
launches; a compiled step: what it dispatches under the recorder, where dynamo may run
frames eagerly, so the profiler's kernels per step are a compiled step's own count on a
GPU), whether graphs were on, and the
relative difference of a check loss (slow-fast off, every class a candidate, initial
weights) to the eager one: a contender more than 2e-2 off is not timed.
``test_max_batch`` finds the largest batch of heba's step with and without checkpointing.
A dry run (``HEBA_BENCH_DRY_RUN=1``) runs all of it on the CPU at tiny shapes.
"""

from __future__ import annotations

import functools
import gc
import inspect
import itertools
import time
from types import SimpleNamespace

import pytest
pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.cases import DRY_RUN  # noqa: E402
from benchmarks.launch_count import count_launches  # noqa: E402
from heba.backends import backend_status  # noqa: E402
from heba.clip import attach_adaptertune, attach_heba  # noqa: E402
from heba.train.graph import (GraphedStep, checkpoint_frozen_blocks, find_max_batch,  # noqa: E402
                            prepare_frozen)
from heba.clip.wiring import ScalePolicy  # noqa: E402
from heba.train.prompts import PromptBank  # noqa: E402
from heba.train.step import AdapterStep, draw_step  # noqa: E402

DEVICE = "cpu" if DRY_RUN else "cuda"
DTYPE = torch.bfloat16
SMOOTHING, NEG, LR = 0.1, 5, 0.0075
if DRY_RUN:   # a tiny CLIP so the harness runs end to end on the CPU in seconds
    BATCH, CLASSES, CONTEXT, IMAGE = 4, 10, 16, 32
    EOT_RANGE = (3, 9)
else:
    BATCH, CLASSES, CONTEXT, IMAGE = 16, 50, 77, 224
    EOT_RANGE = (12, 32)
METHODS = ("heba", "adaptertune-r16")
IMPLS = ("eager", "compile", "compile-ro", "heba", "heba-reference", "heba-triton", "heba-cuda",
         "heba-ckpt", "heba-compile", "heba-compile-max", "heba-loader")
# batch name -> batch (a dry run: tiny); the published recipe's 16, then throughput
BATCHES = {"16": 4, "128": 6, "256": 8} if DRY_RUN else {"16": 16, "128": 128, "256": 256}
THROUGHPUT = ("heba", "heba-reference", "heba-triton", "heba-cuda", "heba-compile",
              "heba-compile-max")
CASES = [(impl, b) for impl in IMPLS for b in BATCHES if b == "16" or impl in THROUGHPUT]


def make_model(method: str, backend: str, host_draws: bool):
    import open_clip
    torch.manual_seed(0)
    if DRY_RUN:
        model = open_clip.CLIP(
            embed_dim=32,
            vision_cfg=dict(image_size=IMAGE, patch_size=8, width=64, layers=2, head_width=32),
            text_cfg=dict(context_length=CONTEXT, vocab_size=100, width=48, heads=2, layers=2))
    else:
        model = open_clip.create_model("ViT-B-16", pretrained=None)
    model = model.to(DEVICE).train()
    if method == "heba":
        policy = ScalePolicy(seed=1, draws="host" if host_draws else "device")
        attach_heba(model, "both", policy=policy, backend=backend)
    else:
        attach_adaptertune(model, "visual", rank=16, every=1, backend=backend)
    return model


def make_bank(model) -> PromptBank:
    """One prompt per class: sot, random words, eot (the largest id) at 12..32 tokens."""
    g = torch.Generator().manual_seed(1)
    vocab = model.vocab_size
    tokens = torch.zeros(CLASSES, CONTEXT, dtype=torch.long)
    for i in range(CLASSES):
        n = int(torch.randint(EOT_RANGE[0], EOT_RANGE[1] + 1, (1,), generator=g))
        tokens[i, 0] = vocab - 2
        tokens[i, 1:n - 1] = torch.randint(1, vocab - 2, (n - 2,), generator=g)
        tokens[i, n - 1] = vocab - 1
    return PromptBank([[str(c)] for c in range(CLASSES)], lambda texts: tokens, DEVICE)


def make_batches(n=4, batch=BATCH):
    """``n`` batches of random images and labels (a dry run: the same labels in each, so
    that torch.compile, which specialises on the candidate count, compiles once)."""
    g = torch.Generator().manual_seed(2)
    labels = [torch.randint(0, CLASSES, (batch,), generator=g) for _ in range(n)]
    if DRY_RUN:
        labels = [labels[0]] * n
    return [(torch.randn(batch, 3, IMAGE, IMAGE, generator=g).to(DEVICE), y.to(DEVICE))
            for y in labels]


def published_candidates(labels, n_classes):
    """VLM-HeBA ``CustomCLIP.forward`` (training): the candidate classes and the renumbered
    labels, on the host as published (``unique``, a membership test per class, ``randperm``)."""
    if n_classes <= labels.shape[0]:
        return torch.arange(n_classes, device=labels.device), labels
    pos, inverse = torch.unique(labels, return_inverse=True)
    is_neg = torch.tensor([c not in pos for c in range(n_classes)], device=labels.device)
    neg = torch.nonzero(is_neg).squeeze(1)
    n_neg = min(neg.shape[0], len(pos) * NEG)
    neg = neg[torch.randperm(neg.shape[0])[:n_neg].to(labels.device)]
    return torch.cat([pos, neg]), inverse


def published_loss(model, bank, imgs, labels, every_class=False):
    """The published step's loss: autocast over the fp32 model, full text context."""
    with torch.autocast(DEVICE, dtype=DTYPE):
        if every_class:
            classes = torch.arange(bank.n_classes, device=labels.device)
        else:
            classes, labels = published_candidates(labels, bank.n_classes)
        pick = torch.randint(0, bank.n_prompts, (classes.shape[0],)).to(labels.device)
        txt = model.encode_text(bank.tokens[classes, pick], normalize=True)
        img = model.encode_image(imgs, normalize=True)
        logits = model.logit_scale.exp() * img.float() @ txt.float().t()
    return F.cross_entropy(logits, labels, label_smoothing=SMOOTHING)


def _backend(impl):
    return {"eager": "reference", "compile": "reference", "compile-ro": "reference",
            "heba": "auto", "heba-ckpt": "auto", "heba-loader": "auto",
            "heba-compile": "reference", "heba-compile-max": "reference"
            }.get(impl, impl.replace("heba-", ""))


def _compiled(fn, impl):
    """``torch.compile(fn)`` for a ``heba-compile*`` contender, else ``fn``. A dry run uses
    dynamo's "eager" backend (see :func:`_published_contender`), without a mode."""
    if not impl.startswith("heba-compile"):
        return fn
    if DRY_RUN:
        return torch.compile(fn, backend="eager")
    return torch.compile(fn, mode="max-autotune" if impl == "heba-compile-max" else "default")


def contender(method: str, impl: str, batch: int = BATCH, tmp=None):
    """``(step, check, info)``: ``step()`` one training step on the next batch; ``check()``
    the loss with slow-fast off and every class a candidate (no gradient)."""
    model = make_model(method, _backend(impl), host_draws=impl == "eager")
    bank, batches = make_bank(model), make_batches(batch=batch)
    it = iter(range(1 << 62))
    policy = getattr(model, "heba_policy", None)
    if not impl.startswith("heba"):
        return _published_contender(model, bank, batches, impl, it, policy)
    prepare_frozen(model, DTYPE)
    if impl == "heba-ckpt":
        checkpoint_frozen_blocks(model)
    step = AdapterStep(model, bank, SMOOTHING, NEG)
    params = [p for p in model.heba_adapters.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=5e-4,
                          fused=DEVICE == "cuda" or None)

    def fn(*x):
        with torch.autocast(DEVICE, dtype=DTYPE, cache_enabled=DEVICE != "cuda"):
            return step(*x)
    fn = _compiled(fn, impl)
    # a compiled step is its own program (max-autotune captures CUDA graphs itself)
    graphed = GraphedStep(fn, params, enabled=DEVICE == "cuda" and "compile" not in impl)
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    feed = _loader_batches(tmp, batch) if impl == "heba-loader" else None

    def run(eager=False):
        """One step; ``eager``: forward and backward without the CUDA graph (to count what
        the step launches when it is not replayed)."""
        imgs, labels = next(feed) if feed else batches[next(it) % len(batches)]
        mask, pick = draw_step(labels, bank, NEG, "batch", gen)
        opt.zero_grad(set_to_none=True)
        if eager:
            loss = fn(imgs, labels, mask, pick)[0]
            loss.backward()
        else:
            loss = graphed(imgs, labels, mask, pick)[0]
        opt.step()
        return loss.detach()

    def check():
        imgs, labels = batches[0]
        every = torch.ones(CLASSES, dtype=torch.bool, device=DEVICE)
        return _no_slow_fast(policy, lambda: fn(imgs, labels, every,
                                                torch.zeros_like(labels[:1]).expand(CLASSES))[0])
    info = dict(graphs=graphed.reason is None and DEVICE == "cuda", text_len=step.text_len,
                graphed=graphed)
    return run, check, info


def _loader_batches(tmp, batch: int):
    """Endless ``(images, labels)`` from heba-train's loader over a generated JPEG
    ImageFolder (4 batches of 500x375 pictures, ``CLASSES`` labels), epoch after epoch."""
    from heba.data.folder import ImageList
    from heba.data.sampling import Item
    from heba.train.backbones.openclip import dassl_transforms
    from heba.train.data import train_loader
    from benchmarks.jpegs import write_jpegs
    paths = write_jpegs(str(tmp), 4 * batch, (500, 375))
    items = [Item(p, k % CLASSES, f"c{k % CLASSES}") for k, p in enumerate(paths)]
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    ds = ImageList(items, dassl_transforms(IMAGE, mean, std)[0])
    cfg = SimpleNamespace(batch_size=batch, drop_last=True, seed=1)
    loader = train_loader(ds, cfg, DEVICE, workers="auto", pipeline="fast")
    return itertools.chain.from_iterable(loader.epoch(e) for e in itertools.count())


def _published_contender(model, bank, batches, impl, it, policy):
    opt = torch.optim.SGD(model.heba_adapters.parameters(), lr=LR, momentum=0.9,
                          weight_decay=5e-4)
    # A dry run compiles with the "eager" backend (dynamo's tracing, graph breaks and
    # guards, no AOTAutograd / inductor build: those of a CLIP forward and backward take
    # minutes on two CPU cores).
    kw = dict(backend="eager") if DRY_RUN else {}
    if impl == "compile-ro":
        if DRY_RUN:
            pytest.skip("reduce-overhead is CUDA graphs: GPU only (a dry run would repeat "
                        "'compile')")
        kw["mode"] = "reduce-overhead"
    fn = published_loss if impl == "eager" else torch.compile(published_loss, **kw)

    def run():
        imgs, labels = batches[next(it) % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = fn(model, bank, imgs, labels)
        loss.backward()
        opt.step()
        return loss.detach()

    def check():
        imgs, labels = batches[0]
        return _no_slow_fast(policy, lambda: fn(model, bank, imgs, labels, True))
    return run, check, dict(graphs=False, text_len=CONTEXT)


def _no_slow_fast(policy, fn):
    """``fn()`` without gradient and with the slow-fast scale off (a deterministic loss)."""
    ratio = None if policy is None else policy.slow_fast_ratio
    if policy is not None:
        policy.slow_fast_ratio = 1.0
    try:
        with torch.no_grad():
            return float(fn())
    finally:
        if policy is not None:
            policy.slow_fast_ratio = ratio


@functools.lru_cache(maxsize=None)
def reference_loss(method: str, batch: int = BATCH) -> float:
    """The eager baseline's check loss on the initial weights."""
    _, check, _ = contender(method, "eager", batch)
    out = check()
    _free()
    return out


def _free():
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _bench_ms(fn) -> float:
    if DRY_RUN:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=200, rep=2000, return_mode="median"))


def _device_name():
    return "cpu" if DEVICE == "cpu" else torch.cuda.get_device_name()


def _peak_bytes(step) -> int:
    if DEVICE != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


_LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                 "cudaGraphLaunch", "cuGraphLaunch", "cudaLaunchCooperativeKernel")


def launches_per_step(step, n=3) -> dict:
    """``{"kernels_per_step", "launch_calls_per_step"}`` over ``n`` steps (torch profiler):
    GPU kernel records (a replayed graph's kernels each count), and host launch API calls
    (a graph replay is one). None on the CPU."""
    if DEVICE != "cuda":
        return dict(kernels_per_step=None, launch_calls_per_step=None)
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type == DeviceType.CUDA
                  and not e.name.startswith(("Memcpy", "Memset")))
    calls = sum(1 for e in events if e.name in _LAUNCH_CALLS)
    return dict(kernels_per_step=kernels / n, launch_calls_per_step=calls / n)


def step_launches(step) -> dict:
    """The dispatch recorder over one real step (every device): ``launches``, ``dispatches``,
    ``triton_launches``, ``host_reads`` and, for a step that replays a CUDA graph, the same
    step run eagerly (``launches_eager``)."""
    c = count_launches(step)
    out = dict(launches=c["launches"], dispatches=c["dispatches"], triton_launches=c["triton"],
               aten_launches=c["aten_kernels"], host_reads=c["host_reads"],
               top_ops=dict(c["by_op"].most_common(8)))
    eager = count_launches(lambda: step(eager=True)) \
        if "eager" in inspect.signature(step).parameters else c
    out["launches_eager"] = eager["launches"]
    return out


@pytest.mark.parametrize("impl,batch", CASES, ids=[f"{i}-b{b}" for i, b in CASES])
@pytest.mark.parametrize("method", METHODS)
def test_train_step(benchmark, method, impl, batch, tmp_path):
    backend = _backend(impl)
    if impl.startswith("heba-") and backend in ("triton", "cuda"):
        ok, why = backend_status(backend, DEVICE)
        if not ok:
            pytest.skip(f"backend {backend} unavailable: {why}")
    size = BATCHES[batch]
    ref = reference_loss(method, size)
    try:
        step, check, info = contender(method, impl, size, tmp_path)
        first = check()                      # compiles torch.compile contenders
    except Exception as err:
        _free()
        if impl.startswith("heba") and "compile" not in impl:   # heba's own step must run
            raise
        # A baseline that cannot run (e.g. torch.compile failing) is recorded, not fatal.
        pytest.skip(f"{impl} failed to run: {type(err).__name__}: {str(err)[:300]}")
    rel = abs(first - ref) / abs(ref)
    assert rel < 2e-2, f"{method}/{impl}: check loss {first} vs eager {ref} (rel {rel:.2e})"
    for _ in range(2 if DRY_RUN else 8):     # warm-up: graph capture, autotuning, compiles
        step()
    graphed = info.pop("graphed", None)
    if graphed is not None and DEVICE == "cuda" and "compile" not in impl:
        assert graphed.reason is None and graphed.replays > 0, graphed.reason
    info["graphs"] = bool(graphed is not None and graphed.replays > 0)

    def synced():
        step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    ms = _bench_ms(step)
    benchmark.extra_info.update({
        "method": method, "impl": impl, "device": _device_name(), "dtype": "bf16",
        "batch": size, "batch_name": batch, "classes": CLASSES, "context": CONTEXT,
        "cuda_ms": ms, "images_per_s": size / ms * 1e3, "peak_mem_bytes": _peak_bytes(step),
        "check_loss": first, "loss_rel_to_eager": rel, **launches_per_step(step), **info,
    })
    benchmark.pedantic(synced, rounds=1 if DRY_RUN else 10, iterations=1,
                       warmup_rounds=0 if DRY_RUN else 1)
    benchmark.extra_info.update(step_launches(step))
    del step, check, graphed
    if "compile" in impl:
        torch._dynamo.reset()
    _free()


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("method", METHODS)
def test_max_batch(benchmark, method, ckpt):
    """The largest batch of heba's step that fits, with and without checkpointing."""
    model = make_model(method, "auto", host_draws=False)
    prepare_frozen(model, DTYPE)
    if ckpt:
        checkpoint_frozen_blocks(model)
    bank = make_bank(model)
    step = AdapterStep(model, bank, SMOOTHING, NEG)
    params = [p for p in model.heba_adapters.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9)

    def run(b):     # eager: one graph per probed batch size would only add capture time
        imgs = torch.randn(b, 3, IMAGE, IMAGE, device=DEVICE)
        labels = torch.randint(0, CLASSES, (b,), device=DEVICE)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=DTYPE):
            loss = step(imgs, labels, *draw_step(labels, bank, NEG, "batch", None))[0]
        loss.backward()
        opt.step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    best = find_max_batch(run, start=BATCH, limit=8 if DRY_RUN else 1 << 14)
    benchmark.extra_info.update({"method": method, "impl": "heba-ckpt" if ckpt else "heba",
                                 "device": _device_name(), "max_batch": best})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    del model, opt, step
    _free()
