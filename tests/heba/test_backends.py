"""The fused backends' contract, one parametrized test per clause over every op x backend.

Every fused backend (``triton``, ``cuda``) of every op (HeBA visual, HeBA text,
low-rank) registers torch.library ops that pass ``opcheck``, computes autocast as a
dtype choice (against the reference under autocast), gives the same bits with a
0-d tensor scale as with the float, launches inside a guard for x's device, traces
in one graph under ``torch.compile`` (tensor scale included), and writes every
element of its fresh buffers (``HEBA_DEBUG_NAN_FILL=1``). The Triton backend runs
all of them in the interpreter on a CPU; the CUDA backend needs a GPU and says so.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import heba.nn
from heba import backends, ops
from tests.helpers import (LaunchRecorder, assert_tensor_scale_bitwise, check_against_reference,
                           forward_backward, low_rank_params, requires_gpu,
                           requires_triton_cpu, text_params, tokens, visual_params)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _backend(name):
    if name == "triton":
        return pytest.param(name, id=name, marks=requires_triton_cpu)
    ok, why = backends.backend_status(name, "cuda") if torch.cuda.is_available() else (True, "")
    return pytest.param(name, id=name, marks=[requires_gpu, pytest.mark.skipif(
        not ok, reason=f"backend {name!r} is not available here: {why}")])


BACKENDS = [_backend("triton"), _backend("cuda")]
OPS = ["heba_visual", "heba_text", "low_rank"]
SCALED = ["heba_visual", "heba_text"]       # the ops whose scale may be a tensor


def _case(op, dtype=torch.float32, seed=0):
    """``(x, params, kwargs)`` of a small odd-shaped call of ``op`` (ragged tiles)."""
    if op == "heba_visual":
        return (tokens(2, 1 + 3 * 4, 32, device=DEVICE, dtype=dtype, seed=seed),
                visual_params(32, device=DEVICE, dtype=dtype, seed=seed),
                dict(scale=0.5, grid=(3, 4)))
    if op == "heba_text":
        return (tokens(2, 9, 40, device=DEVICE, dtype=dtype, seed=seed),
                text_params(40, device=DEVICE, dtype=dtype, seed=seed), dict(scale=0.5))
    return (tokens(2, 9, 40, device=DEVICE, dtype=dtype, seed=seed),
            low_rank_params(40, 8, device=DEVICE, dtype=dtype, seed=seed), dict(alpha=0.5))


def _module(op, backend):
    torch.manual_seed(0)
    if op == "low_rank":
        return heba.nn.LowRankAdapter(40, 8, init="small", backend=backend).to(DEVICE)
    if op == "heba_text":
        return heba.nn.HeBAAdapter(40, modality="text", backend=backend).to(DEVICE)
    return heba.nn.HeBAAdapter(32, grid=(3, 4), backend=backend).to(DEVICE)


class _CustomOps(TorchDispatchMode):
    """The heba:: custom ops a forward + backward dispatches, with their arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "heba":
            self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, backend):
    """Every custom op an op's forward + backward dispatches passes torch.library.opcheck
    (schema, fake, autograd registration), the tensor scale's form included."""
    x, params, kw = _case(op)
    if op in SCALED:
        kw["scale"] = torch.tensor(0.5, device=DEVICE)
    with _CustomOps() as seen:
        forward_backward(lambda xx, **pp: getattr(ops, op)(xx, **pp, **kw, backend=backend),
                         x, params)
    assert len(seen.calls) == 2, [c[0] for c in seen.calls]       # forward and backward
    for func, args, kwargs in seen.calls:
        if func.name().endswith("_bwd"):       # a backward has no autograd of its own
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(func, args, kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_autocast(op, backend, dtype):
    """float32 x and weights under autocast: low-precision operands, float32 out and
    gradients in each input's dtype, at the autocast dtype's tolerance."""
    x, params, kw = _case(op, seed=9)
    check_against_reference(op, backend, x, params, autocast_dtype=dtype, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rescale", [True, False], ids=["rule", "plaingrad"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", SCALED)
def test_tensor_scale_bitwise_equal_to_float(op, backend, rescale, dtype):
    x, params, kw = _case(op, dtype, seed=5)
    kw.pop("scale")
    assert_tensor_scale_bitwise(op, backend, x, params, 0.6875, rescale_param_grad=rescale,
                                **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_every_launch_inside_device_guard(op, backend, monkeypatch):
    """Kernels launch on the current device: each launch must sit in a guard for x's.
    Triton: every launch recorded (the interpreter too); CUDA: x on a second GPU while
    the first is current gives the reference's results."""
    x, params, kw = _case(op)
    if backend == "cuda":
        if torch.cuda.device_count() < 2:
            pytest.skip("the CUDA backend's guard needs two CUDA GPUs to show")
        with torch.cuda.device(0):
            check_against_reference(op, backend, x.to("cuda:1"),
                                    {k: v.to("cuda:1") for k, v in params.items()}, **kw)
        return
    import heba_kernels.heba_text as ht
    import heba_kernels.heba_visual as hv
    import heba_kernels.low_rank as lr
    module = {"heba_visual": hv, "heba_text": ht, "low_rank": lr}[op]
    rec = LaunchRecorder(monkeypatch, [module])
    if op == "heba_visual":
        monkeypatch.setattr(hv, "SAVE_U_MIN_DIM", 10 ** 9)    # the recompute path too
    forward_backward(lambda xx, **pp: getattr(ops, op)(xx, **pp, **kw, backend=backend),
                     x, params)
    if op == "heba_text":        # the split-K backward too (h above FUSED_DW_MAX_H)
        monkeypatch.setattr(ht, "FUSED_DW_MAX_H", 8)
        forward_backward(lambda xx, **pp: getattr(ops, op)(xx, **pp, **kw, backend=backend),
                         x, params)
    if op == "heba_visual":      # the dv launch
        monkeypatch.setattr(hv, "DV_GEMM_MIN_DIM", 0)
        forward_backward(lambda xx, **pp: getattr(ops, op)(xx, **pp, **kw, backend=backend),
                         x, params)
    rec.assert_all_guarded(x.device)
    assert ("_atb_kernel", True) in rec.launches               # the weight gradients' sums


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_torch_compile_fullgraph(op, backend):
    """One graph through the custom ops' fakes (AOTAutograd), eager's bits, and with a
    tensor scale the compiled module reads its value at run time."""
    torch._dynamo.reset()
    a = _module(op, backend)
    compiled = torch.compile(a, fullgraph=True, backend="aot_eager")
    x, _, _ = _case(op, seed=3)
    s = torch.tensor(0.5, device=DEVICE)
    for value in ((0.5, 0.25) if op in SCALED else (None,)):
        kw = {} if value is None else dict(scale=s)
        if value is not None:
            s.fill_(value)
        runs = []
        for module in (compiled, a):
            xx = x.clone().requires_grad_(True)
            out = module(xx, **kw)
            out.backward(torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out))
            runs.append([out.detach(), xx.grad] + [p.grad for p in a.parameters()])
            for p in a.parameters():
                p.grad = None
        for c, e in zip(*runs):
            assert torch.equal(c, e)
        if value is not None:
            assert torch.equal(runs[1][0], a(x, scale=value).detach())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_torch_compile_fullgraph_float_that_changes(op, backend):
    """A Python float scale (alpha for low-rank) that changes between calls: after the
    recompile torch.compile makes it symbolic, and the argument checks must not break the
    graph (``fullgraph=True`` raises on a break); every call gives eager's bits."""
    torch._dynamo.reset()
    a = _module(op, backend)
    compiled = torch.compile(a, fullgraph=True, backend="aot_eager")
    x, _, _ = _case(op, seed=4)
    for value in (0.5, 0.25, 2.0):
        if op == "low_rank":
            a.alpha, kw = value, {}
        else:
            kw = dict(scale=value)
        with torch.no_grad():
            got, want = compiled(x, **kw), a(x, **kw)
        assert torch.equal(got, want), value
        assert not torch.equal(want, x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_nan_fill_every_buffer_written(op, backend, monkeypatch):
    """Under HEBA_DEBUG_NAN_FILL=1 every fresh output and scratch buffer starts as NaN: the
    output and every gradient still match the reference (no tile left unwritten)."""
    monkeypatch.setenv("HEBA_DEBUG_NAN_FILL", "1")
    x, params, kw = _case(op, torch.bfloat16, seed=4)
    check_against_reference(op, backend, x, params, **kw)
