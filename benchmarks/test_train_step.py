"""One training step of adapters on a frozen CLIP ViT-B/16: baselines and heba's fast path.

    pytest benchmarks/test_train_step.py --benchmark-only --benchmark-json=benchmarks/results/train.json
    python -m benchmarks.train_report benchmarks/results/train.json

The step: 128 images 224x224 and 100 class prompts of 77 tokens (end-of-text
at 8..20 tokens, like "a photo of a {class}."), both towers of
``open_clip.create_model("ViT-B-16", pretrained=None)`` (random weights),
logits, label-smoothed cross-entropy (0.1), backward, SGD (momentum 0.9) on the
adapters; bf16. Methods: HeBA (adapters in all 12 blocks of both towers) and
AdapterTune r=16 (after every block of both towers). Contenders, same run,
same device:

* ``eager``: fp32 backbone under ``torch.autocast(bf16)``, reference adapters,
  full 77-token text tower, ``F.cross_entropy`` (what a plain training script does);
* ``compile``: ``torch.compile`` of that loss function (backward through AOTAutograd);
* ``heba``: heba's default: :func:`heba.clip.fast.prepare_frozen` (cast once),
  backend ``"auto"``, text truncated to a multiple of 8, prompts padded to a
  multiple of 8, the whole step a CUDA graph (:class:`heba.clip.fast.TrainStep`);
* ``heba-<backend>``: the same with one backend (reference / triton / cuda);
* ``heba-ckpt``: the default with every frozen block checkpointed.

The HeBA scale policy runs with ``slow_fast_ratio=1.0`` for every contender:
the compute is the same for any scale, and a per-call random host scale would
make torch.compile recompile and keeps CUDA graphs off (see ``TrainStep``).
``extra_info``: ms per step (CUDA events, median), images/s, peak memory of a
step (``torch.cuda.max_memory_allocated``, weights and optimizer included),
whether graphs were on, and the first-step loss's relative difference to the
eager baseline (a contender more than 2e-2 off is not timed). ``test_max_batch``
finds the largest batch that fits with and without checkpointing.
"""

from __future__ import annotations

import functools
import gc
import time

import pytest
pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")
import torch
import torch.nn.functional as F

from benchmarks.cases import DRY_RUN
from heba.backends import backend_status
from heba.clip import attach_adaptertune, attach_heba
from heba.clip.fast import TrainStep, checkpoint_frozen_blocks, find_max_batch, prepare_frozen
from heba.clip.wiring import ScalePolicy

DEVICE = "cpu" if DRY_RUN else "cuda"
DTYPE = torch.bfloat16
SMOOTHING = 0.1
if DRY_RUN:   # a tiny CLIP so the harness runs end to end on the CPU in seconds
    BATCH, PROMPTS, CONTEXT, IMAGE = 4, 10, 16, 32
    EOT_RANGE = (3, 7)
else:
    BATCH, PROMPTS, CONTEXT, IMAGE = 128, 100, 77, 224
    EOT_RANGE = (8, 20)
METHODS = ("heba", "adaptertune-r16")
IMPLS = ("eager", "compile", "heba", "heba-reference", "heba-triton", "heba-cuda", "heba-ckpt")


def make_model(method: str, backend: str):
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
        attach_heba(model, "both", policy=ScalePolicy(slow_fast_ratio=1.0), backend=backend)
    else:
        attach_adaptertune(model, "both", rank=16, every=1, backend=backend)
    return model


def make_batch(model):
    g = torch.Generator().manual_seed(1)
    vocab = model.vocab_size
    imgs = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g).to(DEVICE)
    texts = torch.zeros(PROMPTS, CONTEXT, dtype=torch.long)
    for i in range(PROMPTS):
        n = int(torch.randint(EOT_RANGE[0], EOT_RANGE[1] + 1, (1,), generator=g))
        texts[i, 0] = vocab - 2                                       # start of text
        texts[i, 1:n - 1] = torch.randint(1, vocab - 2, (n - 2,), generator=g)
        texts[i, n - 1] = vocab - 1                                   # end of text (largest id)
    labels = torch.randint(0, PROMPTS, (BATCH,), generator=g).to(DEVICE)
    return imgs, texts.to(DEVICE), labels


def plain_loss(model, imgs, texts, labels):
    """The baseline's loss: open_clip's own encoders, full context, F.cross_entropy."""
    with torch.autocast(DEVICE, dtype=DTYPE):
        img = model.encode_image(imgs, normalize=True)
        txt = model.encode_text(texts, normalize=True)
        logits = model.logit_scale.exp() * img.float() @ txt.float().t()
    return F.cross_entropy(logits, labels, label_smoothing=SMOOTHING)


def contender(method: str, impl: str):
    """``(step, loss, info)``: ``step()`` runs one training step, ``loss()`` a forward only."""
    backend = {"eager": "reference", "compile": "reference", "heba": "auto",
               "heba-ckpt": "auto"}.get(impl, impl.replace("heba-", ""))
    model = make_model(method, backend)
    imgs, texts, labels = make_batch(model)
    opt = torch.optim.SGD(model.heba_adapters.parameters(), lr=1e-3, momentum=0.9)
    if impl in ("eager", "compile"):
        # A dry run compiles with aot_eager (dynamo + AOTAutograd, no C++ build): the CPU
        # inductor build of a CLIP forward and backward takes minutes on two cores.
        compile_kw = dict(backend="aot_eager") if DRY_RUN else {}
        fn = plain_loss if impl == "eager" else torch.compile(plain_loss, **compile_kw)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = fn(model, imgs, texts, labels)
            loss.backward()
            opt.step()
            return loss.detach()
        return step, lambda: fn(model, imgs, texts, labels), dict(graphs=False, text_len=CONTEXT)
    prepare_frozen(model, DTYPE)
    if impl == "heba-ckpt":
        checkpoint_frozen_blocks(model)
    train = TrainStep(model, opt, dtype=DTYPE, label_smoothing=SMOOTHING)
    padded, valid, length = train.prepare(texts)
    info = dict(graphs=train.graphs, graphs_reason=train.graphs_reason, text_len=length,
                padded_prompts=padded.shape[0])
    return (lambda: train(imgs, texts, labels),
            lambda: train.loss(imgs, padded, labels, valid, length), info)


@functools.lru_cache(maxsize=None)
def reference_loss(method: str) -> float:
    """The eager baseline's loss on the initial weights (the correctness check)."""
    _, loss, _ = contender(method, "eager")
    with torch.no_grad():
        out = float(loss())
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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("method", METHODS)
def test_train_step(benchmark, method, impl):
    backend = impl.replace("heba-", "")
    if backend in ("triton", "cuda"):
        ok, why = backend_status(backend, DEVICE)
        if not ok:
            pytest.skip(f"backend {backend} unavailable: {why}")
    ref = reference_loss(method)
    try:
        step, loss, info = contender(method, impl)
        with torch.no_grad():
            first = float(loss())            # compiles torch.compile contenders
    except Exception as err:
        _free()
        if impl.startswith("heba"):                  # heba's own step must run
            raise
        # A baseline that cannot run (e.g. torch.compile failing) is recorded, not fatal.
        pytest.skip(f"{impl} failed to run: {type(err).__name__}: {str(err)[:300]}")
    rel = abs(first - ref) / abs(ref)
    assert rel < 2e-2, f"{method}/{impl}: first loss {first} vs eager {ref} (rel {rel:.2e})"

    for _ in range(0 if DRY_RUN else 6):     # warm-up: graph capture, autotuning, compile of bwd
        step()

    def synced():
        step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    ms = _bench_ms(step)
    benchmark.extra_info.update({
        "method": method, "impl": impl, "device": _device_name(), "dtype": "bf16",
        "batch": BATCH, "prompts": PROMPTS, "context": CONTEXT, "cuda_ms": ms,
        "images_per_s": BATCH / ms * 1e3, "peak_mem_bytes": _peak_bytes(step),
        "first_loss": first, "loss_rel_to_eager": rel, **info,
    })
    benchmark.pedantic(synced, rounds=1 if DRY_RUN else 10, iterations=1,
                       warmup_rounds=0 if DRY_RUN else 1)
    del step, loss
    if impl == "compile":
        torch._dynamo.reset()
    _free()


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("method", METHODS)
def test_max_batch(benchmark, method, ckpt):
    """The largest batch of heba's default step that fits, with and without checkpointing."""
    model = make_model(method, "auto")
    prepare_frozen(model, DTYPE)
    if ckpt:
        checkpoint_frozen_blocks(model)
    opt = torch.optim.SGD(model.heba_adapters.parameters(), lr=1e-3, momentum=0.9)
    # Graphs off: one graph per probed batch size would only add capture time and memory.
    train = TrainStep(model, opt, dtype=DTYPE, label_smoothing=SMOOTHING, cuda_graphs=False)
    _, texts, _ = make_batch(model)

    def run(b):
        imgs = torch.randn(b, 3, IMAGE, IMAGE, device=DEVICE)
        train(imgs, texts, torch.zeros(b, dtype=torch.long, device=DEVICE))
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    best = find_max_batch(run, start=BATCH, limit=8 if DRY_RUN else 1 << 14)
    benchmark.extra_info.update({"method": method, "impl": "heba-ckpt" if ckpt else "heba",
                                 "device": _device_name(), "max_batch": best})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    del model, opt, train
    _free()
