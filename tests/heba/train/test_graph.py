"""heba.train.graph: the backbone cast once, the graphed step and why it is off, checkpointed
blocks, the largest batch."""

from __future__ import annotations

import contextlib

import pytest
pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")
import torch
import torch.nn.functional as F
from torch import nn

from heba.clip import attach_adaptertune, attach_heba
from heba.clip.wiring import ScalePolicy, remove_adapters
from heba.train.graph import (CheckpointedBlock, GraphedStep, checkpoint_frozen_blocks,
                              find_max_batch, policy_graphs_reason,
                              prepare_frozen, uncheckpoint_frozen_blocks)
from heba.train.prompts import PromptBank
from heba.train.step import AdapterStep, masked_cross_entropy
from heba.train import context as T
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


def clip_loss(model, imgs, txt, labels, label_smoothing=0.0):
    """The CLIP contrastive loss of a batch against the prompts ``txt``: the step the graph,
    the cast and the checkpointing must leave unchanged."""
    img = model.encode_image(imgs, normalize=True)
    tx = model.encode_text(txt, normalize=True)
    logits = model.logit_scale.exp().float() * img.float() @ tx.float().t()
    return masked_cross_entropy(logits, labels, None, label_smoothing)


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
        losses = []
        for s in range(3):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = clip_loss(model, *batch(seed=s), label_smoothing=0.1)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs.append(losses)
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


def test_graphs_off_on_cpu_and_for_host_scales():
    """Disabled or off the GPU, every call is eager; host-drawn slow-fast scales keep a step
    from being a graph (they would be replayed as captured)."""
    w = torch.randn(3, requires_grad=True)
    step = GraphedStep(lambda x: ((x * w).sum(),), [w], enabled=False)
    assert step.reason == "disabled"
    step(torch.randn(3))
    assert step.replays == 0 and w.grad is not None
    host = adapted("heba")
    host.heba_policy.draws = "host"
    assert "drawn on the host" in policy_graphs_reason(host.heba_policy)
    assert policy_graphs_reason(host.heba_policy, training=False) is None
    assert policy_graphs_reason(adapted("heba").heba_policy) is None


@pytest.mark.parametrize("method", ["heba", "adaptertune"])
def test_checkpointing_changes_nothing(method):
    """Outputs and adapter grads identical with and without checkpointing, with random
    slow-fast scales (the recomputation must replay the scales drawn in forward)."""
    model = adapted(method, slow_fast_ratio=0.5)
    originals = {n: m for n, m in model.named_modules()}
    imgs, txt, labels = batch()
    results = []
    for ckpt in (False, True):
        if ckpt:
            assert checkpoint_frozen_blocks(model) == 4
            assert isinstance(model.visual.transformer.resblocks[0], CheckpointedBlock)
        if method == "heba":
            model.heba_policy.load_state_dict({"seed": 11, "counters": [0, 0]})
        model.zero_grad(set_to_none=True)
        loss = clip_loss(model, imgs, txt, labels)
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
def test_find_max_batch_on_gpu_grows_with_checkpointing():
    model = adapted("adaptertune", slow_fast_ratio=1.0).cuda()
    prepare_frozen(model)
    opt = torch.optim.SGD(model.heba_adapters.parameters(), lr=0.1)
    _, txt, _ = batch()
    txt = txt.cuda()

    def run(b):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = clip_loss(model, torch.randn(b, 3, 32, 32, device="cuda"), txt,
                             torch.zeros(b, dtype=torch.long, device="cuda"))
        loss.backward()
        opt.step()
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


# --- graphs_reason, GraphedStep --------------------------------------------------------------

def _args(no_cuda_graphs=False):
    return T.RunOptions(cuda_graphs=not no_cuda_graphs)


def test_graphs_reasons():
    cuda = torch.device("cuda", 0)
    heba = tiny_clip()
    attach_heba(heba, "visual", policy=ScalePolicy(slow_fast_ratio=0.8))
    at = tiny_clip()
    attach_adaptertune(at, "visual", rank=4)
    bank = PromptBank([["a"], ["b"]], lambda t: torch.zeros(len(t), 16, dtype=torch.long))
    step_at = AdapterStep(at, bank, 0.1)
    from heba.train.graph import graphs_reason as reason
    assert reason(_args(), cuda, 1, "bf16", at, step_at) is None
    assert reason(_args(no_cuda_graphs=True), cuda, 1, "bf16", at, step_at) == "--no-cuda-graphs"
    assert reason(_args(), torch.device("cpu"), 1, "bf16", at, step_at) == "not on a GPU"
    assert reason(_args(), cuda, 2, "bf16", at, step_at) == "DistributedDataParallel"
    assert "fp16 loss scaling" in reason(_args(), cuda, 1, "fp16", at, step_at)
    fused = type("FusedSGD", (), {"_step_supports_amp_scaling": True})()   # SGD(fused=True)
    assert reason(_args(), cuda, 1, "fp16", at, step_at, fused) is None
    # device-side slow-fast draws and static candidate slots: graphs on for the default runs
    assert reason(_args(), cuda, 1, "bf16", heba, AdapterStep(heba, bank, 0)) is None
    host = tiny_clip()
    attach_heba(host, "both", policy=ScalePolicy(slow_fast_ratio=0.8, draws="host"))
    assert "slow-fast" in reason(_args(), cuda, 1, "bf16", host, AdapterStep(host, bank, 0))
    host.heba_policy.slow_fast_ratio = 1.0
    assert reason(_args(), cuda, 1, "bf16", host, AdapterStep(host, bank, 0)) is None
    both = tiny_clip()
    attach_adaptertune(both, "both", rank=4)
    assert reason(_args(), cuda, 1, "bf16", both, AdapterStep(both, bank, 0)) is None


def test_graphed_step_eager_on_cpu():
    """Off the GPU GraphedStep is fn + backward: same outputs, same gradients."""
    torch.manual_seed(0)
    w = torch.randn(6, 3, requires_grad=True)
    x = torch.randn(4, 6)

    def fn(inp):
        y = (inp @ w).tanh()
        return y.square().sum(), y.mean()

    step = GraphedStep(fn, [w])
    loss, mean = step(x)
    assert not loss.requires_grad and step.replays == 0
    g = w.grad.clone()
    w.grad = None
    ref = fn(x)
    ref[0].backward()
    torch.testing.assert_close(loss, ref[0].detach())
    torch.testing.assert_close(mean, ref[1].detach())
    torch.testing.assert_close(g, w.grad)


@requires_gpu
def test_graphed_step_matches_eager_on_gpu():
    """Replayed graphs (two shapes, an LR schedule, zero_grad between steps) = eager steps."""
    runs = []
    for enabled in (False, True):
        model = tiny_clip().cuda().train()
        attach_adaptertune(model, "visual", rank=4)
        randomize_adapters(model)
        params = list(model.heba_adapters.parameters())
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))

        def fn(imgs, labels):
            feats = F.normalize(model.encode_image(imgs), dim=-1)
            logits = 10 * feats @ feats[:4].T
            return F.cross_entropy(logits, labels), logits.mean()

        step = GraphedStep(fn, params, enabled=enabled, warmup=1)
        losses = []
        for s in range(8):
            b = 6 if s % 3 else 5
            g = torch.Generator().manual_seed(s)
            imgs = torch.randn(b, 3, 32, 32, generator=g).cuda()
            labels = torch.randint(0, 4, (b,), generator=g).cuda()
            opt.zero_grad(set_to_none=True)
            loss, _ = step(imgs, labels)
            opt.step()
            sched.step()
            losses.append(loss.item())
        if enabled:
            assert step.reason is None and step.replays >= 4, (step.reason, step.replays)
        runs.append((losses, [p.detach().cpu() for p in params]))
    (l0, p0), (l1, p1) = runs
    assert l1 == pytest.approx(l0, rel=1e-4)
    for i, (a, b) in enumerate(zip(p0, p1)):
        assert_rel_close(f"param {i}", b, a, 1e-4)


# CUDA-graph captures are thread-local: with the default ("global") capture mode, any other
# thread's CUDA call that is unsafe during a capture (the DataLoader's pin-memory thread
# allocating pinned memory) aborts the capture (error 900). No GPU here: torch.cuda.graph and
# friends are replaced by recorders, and the captured step runs on the CPU.

@contextlib.contextmanager
def _recording_graph(calls):
    def graph(cuda_graph, **kwargs):
        calls.append(kwargs)
        return contextlib.nullcontext()
    mp = torch.cuda
    saved = (mp.graph, mp.CUDAGraph, mp.graph_pool_handle)
    mp.graph, mp.CUDAGraph, mp.graph_pool_handle = graph, object, lambda: "pool"
    try:
        yield
    finally:
        mp.graph, mp.CUDAGraph, mp.graph_pool_handle = saved


def test_graphed_step_captures_thread_local():
    w = torch.randn(3, requires_grad=True)
    graphed = GraphedStep(lambda x: ((x * w).sum(),), [w])
    calls = []
    with _recording_graph(calls):
        graphed._capture("key", [torch.randn(3)])
    assert calls == [{"pool": "pool", "capture_error_mode": "thread_local"}], calls
    assert w.grad is not None and "key" in graphed._graphs
