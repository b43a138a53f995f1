"""The fused residual sum + frozen LayerNorm against the reference (float64), values and
gradients of both outputs.

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


def _module():
    import heba_kernels.add_layer_norm as m
    return m


def _inputs(shape, dtype, seed=0, affine=True):
    g = torch.Generator().manual_seed(seed)
    D = shape[-1]
    # a residual stream with an offset and a spread per row, as a transformer's has
    x = (torch.randn(shape, generator=g) * 3 + torch.randn(shape[:-1] + (1,), generator=g) * 2)
    a = torch.randn(shape, generator=g)
    w = torch.rand(D, generator=g) + 0.5 if affine else None
    b = torch.randn(D, generator=g) if affine else None
    gs, gy = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    dev = lambda t, dt=dtype: None if t is None else t.to(DEVICE, dt)    # noqa: E731
    return dev(x), dev(a), dev(w, torch.float32), dev(b, torch.float32), dev(gs), dev(gy)


def _check(x, a, w, b, gs, gy, eps=1e-5):
    xx, aa = x.clone().requires_grad_(True), a.clone().requires_grad_(True)
    s, y = _module().add_layer_norm(xx, aa, w, b, eps)
    torch.autograd.backward([s, y], [gs, gy])
    x64, a64 = (t.detach().double().requires_grad_(True) for t in (x, a))
    d64 = lambda t: None if t is None else t.double()                     # noqa: E731
    s_ref, y_ref = reference.add_layer_norm(x64, a64, d64(w), d64(b), eps)
    torch.autograd.backward([s_ref, y_ref], [gs.double(), gy.double()])
    tol, name = TOL[x.dtype], DTYPE_NAMES[x.dtype]
    for t in (s, y, xx.grad, aa.grad):
        assert t.dtype == x.dtype and t.shape == x.shape
    assert_rel_close(f"{name} s", s, s_ref, tol)
    assert_rel_close(f"{name} y", y, y_ref, tol)
    assert_rel_close(f"{name} dx", xx.grad, x64.grad, tol)
    assert_rel_close(f"{name} da", aa.grad, a64.grad, tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_NAMES[d] for d in DTYPES])
@pytest.mark.parametrize("shape", [(3, 7, 48), (2, 5, 40), (11, 100), (1, 1, 8)],
                         ids=["tokens", "ragged-width", "rows-ragged", "one-row"])
def test_values_and_grads(shape, dtype, monkeypatch):
    m = _module()
    monkeypatch.setattr(m, "INTERPRETER_ELEMS", m.ROW_ELEMS)      # the GPU's programs
    _check(*_inputs(shape, dtype, seed=len(shape) + shape[-1]))


@pytest.mark.parametrize("affine", [False, True], ids=["no-affine", "affine"])
def test_no_weight_or_bias_and_large_eps(affine):
    """Without weight and bias the norm is plain; eps enters the variance (a low-spread row
    whose norm eps dominates)."""
    x, a, w, b, gs, gy = _inputs((4, 6, 40), torch.float32, seed=7, affine=affine)
    x[0] = 0.01 * x[0]
    a[0] = 0.01 * a[0]
    _check(x, a, w, b, gs, gy, eps=1e-2)


def test_strided_inputs_and_empty():
    x, a, w, b, gs, gy = _inputs((6, 40), torch.float32, seed=3)
    _check(x.t().contiguous().t(), a, w, b, gs, gy)                    # non-contiguous views
    m = _module()
    e = torch.empty(0, 16, device=DEVICE, requires_grad=True)
    s, y = m.add_layer_norm(e, e.detach().clone(), None, None, 1e-5)
    (s.sum() + y.sum()).backward()
    assert s.shape == y.shape == (0, 16) and e.grad.shape == (0, 16)


def test_one_launch_each_way(monkeypatch):
    m = _module()
    monkeypatch.setattr(m, "INTERPRETER_ELEMS", 1024)        # several programs on the CPU too
    x, a, w, b, gs, gy = _inputs((5, 7, 100), torch.bfloat16, seed=4)
    x.requires_grad_(True)
    with record_launches() as rec:
        s, y = m.add_layer_norm(x, a, w, b, 1e-5)
        torch.autograd.backward([s, y], [gs, gy])
    grid, block_r, block_d = m.add_layer_norm_plan(35, 100, x.device)
    assert (block_r, block_d) == (8, 128) and grid == (5,)
    assert rec == [("_add_layer_norm_fwd_kernel", grid), ("_add_layer_norm_bwd_kernel", grid)]
    assert m.add_layer_norm_plan(16 * 197, 768, torch.device("cuda")) == ((788,), 4, 1024)


def test_opcheck_and_fullgraph_compile():
    m = _module()
    x, a, w, b, gs, gy = _inputs((3, 50), torch.float32, seed=5)
    torch.library.opcheck(torch.ops.heba.triton_add_layer_norm_fwd,
                          (x.clone().requires_grad_(True), a.clone().requires_grad_(True), w, b,
                           1e-5))
    s, _, mean, rstd = torch.ops.heba.triton_add_layer_norm_fwd(x, a, w, b, 1e-5)
    torch.library.opcheck(torch.ops.heba.triton_add_layer_norm_bwd, (gs, gy, s, w, mean, rstd))
    torch._dynamo.reset()
    fn = lambda xx, aa: m.add_layer_norm(xx, aa, w, b, 1e-5)           # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    runs = []
    for f in (compiled, fn):
        xx, aa = x.clone().requires_grad_(True), a.clone().requires_grad_(True)
        s, y = f(xx, aa)
        torch.autograd.backward([s, y], [gs, gy])
        runs.append((s.detach(), y.detach(), xx.grad, aa.grad))
    for u, v in zip(*runs):
        assert torch.equal(u, v)


@pytest.mark.parametrize("case,match", [
    ("dtype", r"^add_layer_norm: x must be a float32, float16 or bfloat16 tensor, got "
              r"torch\.float64$"),
    ("a-shape", r"^add_layer_norm: a must match x in shape, dtype and device, got \(3, 8\)"),
    ("weight-shape", r"^add_layer_norm: weight must be a float tensor of shape \(16,\)"),
    ("trainable", r"^add_layer_norm: bias must be frozen \(requires_grad=False\)"),
])
def test_bad_input_is_one_line(case, match):
    m = _module()
    x = torch.randn(3, 16, device=DEVICE)
    a, w, b = torch.randn_like(x), torch.ones(16, device=DEVICE), torch.zeros(16, device=DEVICE)
    if case == "dtype":
        x, a = x.double(), a.double()
    elif case == "a-shape":
        a = torch.randn(3, 8, device=DEVICE)
    elif case == "weight-shape":
        w = torch.ones(8, device=DEVICE)
    else:
        b.requires_grad_(True)
    with pytest.raises((TypeError, ValueError), match=match) as info:
        m.add_layer_norm(x, a, w, b, 1e-5)
    assert "\n" not in str(info.value)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_NAMES[d] for d in DTYPES])
@pytest.mark.parametrize("D", [512, 768, 1280])
def test_clip_widths(D, dtype):
    """ViT-B/16's text and image residual streams at batch 16, and ViT-H/14's width."""
    _check(*_inputs((16, 197, D), dtype, seed=D))


def test_kernels_compile_for_sm90():
    """The interpreter never runs Triton's compiler: both kernels lowered to sm_90 cubins in
    every dtype at CLIP widths (scripts/triton_aot_check.py, no GPU needed), without spills."""
    lines = sm90_compile_lines("add_layer_norm")
    assert len(lines) == 24 and all(ln.startswith("ok ") and "spill 0 B" in ln
                                   for ln in lines), "\n".join(lines)
