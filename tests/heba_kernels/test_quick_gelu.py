"""The fused QuickGELU against the reference (float64), values and gradients.

Runs in Triton's interpreter on a CPU (``TRITON_INTERPRET=1``) or on a GPU; every fresh
buffer starts as NaN (conftest), so an element a kernel skips fails the test.
"""

import pytest
import torch

from heba_kernels import reference
from heba_kernels.runtime import record_launches
from tests.helpers import (TOL, DTYPE_NAMES, assert_rel_close, requires_gpu,
                           requires_triton_cpu, sm90_compile_lines)

pytestmark = requires_triton_cpu
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _quick_gelu():
    from heba_kernels.quick_gelu import quick_gelu
    return quick_gelu


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # spread over the sigmoid's whole range, negative tail included
    x = (torch.randn(shape, generator=g) * 4 + 0.5).to(DEVICE, dtype)
    grad = torch.randn(shape, generator=g).to(DEVICE, dtype)
    return x, grad


def _check(x, grad):
    quick_gelu = _quick_gelu()
    xx = x.clone().requires_grad_(True)
    y = quick_gelu(xx)
    y.backward(grad)
    x64 = x.detach().double().requires_grad_(True)
    ref = reference.quick_gelu(x64)
    ref.backward(grad.double())
    tol = TOL[x.dtype]
    name = DTYPE_NAMES[x.dtype]
    assert y.dtype == x.dtype and xx.grad.dtype == x.dtype
    assert_rel_close(f"{name} y", y, ref, tol)
    assert_rel_close(f"{name} dx", xx.grad, x64.grad, tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_NAMES[d] for d in DTYPES])
@pytest.mark.parametrize("shape", [(3, 7, 40), (2, 1029), (5,)],
                         ids=["tokens", "two-programs-ragged", "tiny"])
def test_values_and_grads(shape, dtype, monkeypatch):
    import heba_kernels.quick_gelu as qg
    monkeypatch.setattr(qg, "INTERPRETER_BLOCK", qg.QUICK_GELU_BLOCK)   # the GPU's programs
    _check(*_inputs(shape, dtype, seed=len(shape)))


def test_strided_input_and_empty():
    x, grad = _inputs((6, 40), torch.float32, seed=3)
    _check(x.t(), grad.t())                           # a transposed view: copied first
    quick_gelu = _quick_gelu()
    empty = torch.empty(0, 16, device=DEVICE, requires_grad=True)
    out = quick_gelu(empty)
    out.sum().backward()
    assert out.shape == (0, 16) and empty.grad.shape == (0, 16)


def test_one_launch_each_way(monkeypatch):
    import heba_kernels.quick_gelu as qg
    monkeypatch.setattr(qg, "INTERPRETER_BLOCK", 1024)    # several programs on the CPU too
    x, grad = _inputs((4, 700), torch.bfloat16, seed=4)
    x.requires_grad_(True)
    with record_launches() as rec:
        out = qg.quick_gelu(x)
        out.backward(grad)
    grid, _ = qg.quick_gelu_plan(2800, x.device)
    assert rec == [("_quick_gelu_fwd_kernel", grid), ("_quick_gelu_bwd_kernel", grid)], rec
    assert grid == (3,) and qg.quick_gelu_plan(2800, torch.device("cuda")) == ((3,), 1024)
    assert_rel_close("y, 3 programs", out, reference.quick_gelu(x.detach().double()),
                     TOL[torch.bfloat16])


def test_opcheck_and_fullgraph_compile():
    quick_gelu = _quick_gelu()
    x, grad = _inputs((3, 50), torch.float32, seed=5)
    torch.library.opcheck(torch.ops.heba.triton_quick_gelu_fwd, (x.clone().requires_grad_(True),))
    torch.library.opcheck(torch.ops.heba.triton_quick_gelu_bwd, (grad, x))
    torch._dynamo.reset()
    compiled = torch.compile(quick_gelu, fullgraph=True, backend="aot_eager")
    runs = []
    for f in (compiled, quick_gelu):
        xx = x.clone().requires_grad_(True)
        out = f(xx)
        out.backward(grad)
        runs.append((out.detach(), xx.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [torch.float64, torch.int32])
def test_bad_dtype_is_one_line(bad):
    x = torch.ones(3, dtype=bad, device=DEVICE)
    with pytest.raises(TypeError, match=r"^quick_gelu: x must be a float32, float16 or "
                                        r"bfloat16 tensor, got torch\.(float64|int32)$"):
        _quick_gelu()(x)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_NAMES[d] for d in DTYPES])
def test_clip_mlp_width(dtype):
    """A ViT-B/16 MLP's hidden activation at batch 16: 16 x 197 x 3072 elements."""
    _check(*_inputs((16, 197, 3072), dtype, seed=6))


def test_kernels_compile_for_sm90():
    """The interpreter never runs Triton's compiler: both kernels lowered to sm_90 cubins in
    every dtype (scripts/triton_aot_check.py, no GPU needed), without spills."""
    lines = sm90_compile_lines("quick_gelu")
    assert len(lines) == 6 and all(ln.startswith("ok ") and "spill 0 B" in ln
                                   for ln in lines), "\n".join(lines)
