"""heba.clip.fast: cast-once backbone, static-shape step (padding, text buckets), checkpointing."""

from __future__ import annotations

import copy

import pytest
pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")
import torch
import torch.nn.functional as F
from torch import nn

from heba.clip import attach_adaptertune, attach_heba, encode_text
from heba.clip.fast import (CheckpointedBlock, TrainStep, bucket_count, bucket_length,
                            checkpoint_frozen_blocks, encode_text_to, find_max_batch,
                            masked_cross_entropy, pad_prompts, prepare_frozen,
                            uncheckpoint_frozen_blocks)
from heba.clip.wiring import ScalePolicy, remove_adapters
from tests.clip_utils import images, randomize_adapters, texts, tiny_clip
from tests.helpers import assert_rel_close, requires_gpu


def adapted(method, seed=0, slow_fast_ratio=0.8, backend="reference"):
    model = tiny_clip(seed=seed).train()
    if method == "heba":
        attach_heba(model, policy=ScalePolicy(slow_fast_ratio=slow_fast_ratio, seed=3),
                    backend=backend)
    else:
        attach_adaptertune(model, "both", rank=4, backend=backend)
    return randomize_adapters(model)


def batch(n_img=4, lengths=(5, 9, 3, 7, 4), seed=0):
    g = torch.Generator().manual_seed(seed + 7)
    labels = torch.randint(0, len(lengths), (n_img,), generator=g)
    return images(n_img, seed=seed), texts(lengths, seed=seed), labels


def adapter_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.heba_adapters.named_parameters()}


# --- 1. cast once ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["heba", "adaptertune"])
def test_cast_once_matches_autocast_fp32_backbone(method):
    """Loss per SGD step: bf16 backbone cast once vs fp32 backbone under autocast (bf16 tol)."""
    runs = []
    for cast in (False, True):
        model = adapted(method, slow_fast_ratio=1.0)
        if cast:
            prepare_frozen(model, torch.bfloat16)
        opt = torch.optim.SGD(model.heba_adapters.parameters(), lr=0.5)
        step = TrainStep(model, opt, dtype=torch.bfloat16, label_smoothing=0.1)
        runs.append([step(*batch(seed=s)).item() for s in range(3)])
        for name, p in model.heba_adapters.named_parameters():
            assert p.dtype == torch.float32, f"adapter {name} is {p.dtype}"
    ref, fast = runs
    assert len(set(ref)) == 3, "the steps must change the loss for this test to mean anything"
    for i, (a, b) in enumerate(zip(ref, fast)):
        assert abs(a - b) / abs(a) < 2e-2, f"step {i}: cast-once loss {b} vs autocast {a}"


def test_prepare_frozen_dtypes():
    model = adapted("heba")
    n_trainable = sum(p.requires_grad for p in model.parameters())
    prepare_frozen(model, torch.bfloat16)
    assert sum(p.requires_grad for p in model.parameters()) == n_trainable
    adapter_ids = {id(p) for p in model.heba_adapters.parameters()}
    ln_ids = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm)
              for p in m.parameters(recurse=False)}
    for name, p in model.named_parameters():
        want = torch.float32 if (id(p) in adapter_ids | ln_ids or p.dim() == 0) \
            else torch.bfloat16
        assert p.dtype == want, f"{name}: {p.dtype}, expected {want}"
    assert model.visual.conv1.weight.dtype == torch.bfloat16
    assert model.logit_scale.dtype == torch.float32
    assert model.attn_mask.dtype == torch.bfloat16


def test_prepare_frozen_needs_adapters():
    with pytest.raises(ValueError, match="no heba adapters"):
        prepare_frozen(tiny_clip())


# --- 2. static shapes -----------------------------------------------------------------------

def test_masked_cross_entropy_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    for eps in (0.0, 0.1):
        assert_rel_close(f"eps={eps}", masked_cross_entropy(logits, labels, None, eps),
                         F.cross_entropy(logits, labels, label_smoothing=eps), 1e-6)
        padded = torch.cat([logits, 1e3 * torch.randn(6, 3, generator=g)], 1)
        valid = torch.tensor([True] * 5 + [False] * 3)
        assert_rel_close(f"padded eps={eps}", masked_cross_entropy(padded, labels, valid, eps),
                         F.cross_entropy(logits, labels, label_smoothing=eps), 1e-6)


@pytest.mark.parametrize("method", ["heba", "adaptertune"])
def test_padding_changes_neither_loss_nor_grads(method):
    model = adapted(method, slow_fast_ratio=1.0)
    step = TrainStep(model, torch.optim.SGD(model.heba_adapters.parameters(), lr=0.1),
                     dtype=torch.float32, label_smoothing=0.1, prompt_multiple=8)
    imgs, txt, labels = batch()
    results = []
    for pad in (False, True):
        model.zero_grad(set_to_none=True)
        if pad:
            padded, valid, length = step.prepare(txt)
            assert padded.shape[0] == 8 and int(valid.sum()) == 5
        else:
            padded, valid, length = txt, None, txt.shape[1]
        loss = step.loss(imgs, padded, labels, valid, length)
        loss.backward()
        results.append((loss.detach(), adapter_grads(model)))
    (l0, g0), (l1, g1) = results
    assert_rel_close("loss", l1, l0, 1e-6)
    # (the last visual block's MLP adapter cannot reach the pooled class token: zero grad)
    zero = {n for n, g in g0.items() if not g.abs().sum() > 0}
    assert all(n.startswith("visual_adapter.2.mlp_conv.") for n in zero), zero
    for name in g0:
        assert_rel_close(f"grad {name}", g1[name], g0[name], 1e-5)


def test_bucketed_text_length_gives_identical_features():
    model = adapted("heba", slow_fast_ratio=1.0).eval()
    txt = texts((5, 9, 3), context_length=16)
    assert bucket_length(txt, 8) == 16 and bucket_length(txt[[0, 2]], 8) == 8
    assert bucket_length(txt[[2]], 4) == 4 and bucket_length(txt, 32) == 16
    with torch.no_grad():
        full = model.encode_text(txt)
        exact = encode_text(model, txt)
        for length in (9, 12, 16):
            assert_rel_close(f"length {length}", encode_text_to(model, txt, length), full, 1e-5)
        assert_rel_close("wiring.encode_text", exact, full, 1e-5)
        # too short a context must change the features: the check above can fail
        assert (encode_text_to(model, txt, 8) - full).abs().max() > 1e-3


def test_bucket_count_and_pad():
    assert [bucket_count(n, 8) for n in (1, 8, 9, 100)] == [8, 8, 16, 104]
    assert bucket_count(70, 8, (64, 128)) == 128 and bucket_count(200, 8, (64, 128)) == 200
    txt = texts((5, 9, 3))
    padded, valid = pad_prompts(txt, 8)
    assert padded.shape == (8, 16) and valid.tolist() == [True] * 3 + [False] * 5
    assert torch.equal(padded[:3], txt) and bucket_length(padded, 1) == bucket_length(txt, 1)
    with pytest.raises(ValueError):
        pad_prompts(txt, 2)


def test_train_step_matches_a_plain_loop():
    """TrainStep (padding, truncation, smoothing) updates the adapters like a plain loop."""
    def plain_loss(model, imgs, txt, labels):
        img = model.encode_image(imgs, normalize=True)
        tx = model.encode_text(txt, normalize=True)
        logits = model.logit_scale.exp() * img @ tx.t()
        return F.cross_entropy(logits, labels, label_smoothing=0.1)

    a = adapted("adaptertune")
    b = copy.deepcopy(a)
    opt_a = torch.optim.SGD(a.heba_adapters.parameters(), lr=0.5, momentum=0.9)
    opt_b = torch.optim.SGD(b.heba_adapters.parameters(), lr=0.5, momentum=0.9)
    step = TrainStep(b, opt_b, dtype=torch.float32, label_smoothing=0.1)
    for s, lengths in enumerate([(5, 9, 3, 7, 4), (6, 3, 8), (5, 9, 3, 7, 4)]):
        imgs, txt, labels = batch(lengths=lengths, seed=s)
        opt_a.zero_grad()
        la = plain_loss(a, imgs, txt, labels)
        la.backward()
        opt_a.step()
        lb = step(imgs, txt, labels)
        assert_rel_close(f"loss step {s}", lb, la.detach(), 1e-5)
    for (name, pa), pb in zip(a.heba_adapters.named_parameters(), b.heba_adapters.parameters()):
        assert_rel_close(name, pb, pa, 1e-5)
    assert step.peak_memory_bytes is None


def test_graphs_off_on_cpu_and_for_random_scales():
    model = adapted("heba")
    opt = torch.optim.SGD(model.heba_adapters.parameters(), lr=0.1)
    assert TrainStep(model, opt).graphs_reason == "not a CUDA model"
    assert TrainStep(model, opt, cuda_graphs=False).graphs_reason == "cuda_graphs=False"
    assert not TrainStep(model, opt).graphs


# --- 3. checkpointing and the largest batch -------------------------------------------------

@pytest.mark.parametrize("method", ["heba", "adaptertune"])
def test_checkpointing_changes_nothing(method):
    """Outputs and adapter grads identical with and without checkpointing, with random
    slow-fast scales (the recomputation must replay the scales drawn in forward)."""
    model = adapted(method, slow_fast_ratio=0.5)
    originals = {n: m for n, m in model.named_modules()}
    imgs, txt, labels = batch()
    step = TrainStep(model, torch.optim.SGD(model.heba_adapters.parameters(), lr=0.1),
                     dtype=torch.float32)
    results = []
    for ckpt in (False, True):
        if ckpt:
            assert checkpoint_frozen_blocks(model) == 4
            assert isinstance(model.visual.transformer.resblocks[0], CheckpointedBlock)
        if method == "heba":
            model.heba_policy.load_state_dict({"seed": 11, "counters": [0, 0]})
        model.zero_grad(set_to_none=True)
        loss = step.loss(imgs, txt, labels)
        loss.backward()
        results.append((loss.detach(), adapter_grads(model)))
    assert uncheckpoint_frozen_blocks(model) == 4
    assert {n: m for n, m in model.named_modules()} == originals
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1), f"loss {l1} vs {l0}"
    for name in g0:
        assert torch.equal(g0[name], g1[name]), f"grad {name} differs"
    remove_adapters(model)


def test_checkpoint_every_and_errors():
    model = adapted("heba")
    assert checkpoint_frozen_blocks(model, every=2) == 2
    assert not isinstance(model.transformer.resblocks[0], CheckpointedBlock)
    assert isinstance(model.transformer.resblocks[1], CheckpointedBlock)
    with pytest.raises(ValueError, match="already"):
        checkpoint_frozen_blocks(model, every=2)
    with pytest.raises(ValueError, match="positive"):
        checkpoint_frozen_blocks(model, every=0)
    assert model.transformer.get_cast_dtype() == torch.float32   # attributes pass through


@pytest.mark.parametrize("limit", [1, 5, 16, 37, 300])
def test_find_max_batch_bisects(limit):
    tried = []

    def run(b):
        tried.append(b)
        if b > limit:
            raise torch.cuda.OutOfMemoryError("fake OOM")

    assert find_max_batch(run, start=16, limit=1024) == limit
    assert len(tried) <= 2 * 11
    assert find_max_batch(lambda b: None, start=16, limit=100) == 100


def test_find_max_batch_propagates_other_errors():
    def run(b):
        raise RuntimeError("not an OOM")
    with pytest.raises(RuntimeError, match="not an OOM"):
        find_max_batch(run)


# --- GPU: graphs replay the eager step ------------------------------------------------------

@requires_gpu
@pytest.mark.parametrize("method", ["heba", "adaptertune"])
def test_cuda_graphs_match_eager(method):
    runs = []
    for graphs in (False, True):
        model = adapted(method, slow_fast_ratio=1.0).cuda()
        prepare_frozen(model)
        opt = torch.optim.SGD(model.heba_adapters.parameters(), lr=0.5, momentum=0.9)
        step = TrainStep(model, opt, label_smoothing=0.1, cuda_graphs=graphs, warmup=1)
        assert step.graphs == graphs, step.graphs_reason
        losses = []
        for s in range(6):
            lengths = (5, 9, 3, 7, 4) if s % 2 == 0 else (6, 3, 8)
            losses.append(step(*batch(lengths=lengths, seed=s)).item())
            assert step.peak_memory_bytes > 0
        if graphs:
            assert len(step._graphs) == 2 and step.graphs_reason is None
        runs.append((losses, [p.detach().float().cpu() for p in model.heba_adapters.parameters()]))
    (l0, p0), (l1, p1) = runs
    for i, (a, b) in enumerate(zip(l0, l1)):
        assert abs(a - b) <= 1e-2 * abs(a), f"step {i}: graphed {b} vs eager {a}"
    for i, (a, b) in enumerate(zip(p0, p1)):
        assert_rel_close(f"param {i}", b, a, 2e-2)


@requires_gpu
def test_find_max_batch_on_gpu_grows_with_checkpointing():
    model = adapted("adaptertune", slow_fast_ratio=1.0).cuda()
    prepare_frozen(model)
    step = TrainStep(model, torch.optim.SGD(model.heba_adapters.parameters(), lr=0.1),
                     cuda_graphs=False)
    _, txt, _ = batch()

    def run(b):
        step(torch.randn(b, 3, 32, 32, device="cuda"), txt, torch.zeros(b, dtype=torch.long))
        torch.cuda.synchronize()

    # Cap this process at what is allocated now plus 256 MiB so the search ends quickly.
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + 2 ** 28) / total)
    try:
        plain = find_max_batch(run, start=256, limit=1 << 20)
        checkpoint_frozen_blocks(model)
        ckpt = find_max_batch(run, start=256, limit=1 << 20)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert 0 < plain < ckpt < 1 << 20, (plain, ckpt)
