"""The CUDA backend (heba_kernels._C + heba_kernels.cuda_ops).

CPU part: the extension, when built, loads and registers its ops (and their
fake implementations answer on meta tensors); asking for backend="cuda"
without the extension or with CPU tensors raises BackendUnavailableError with
a helpful message, while backend="auto" falls back to the reference. With the
extension built, stand-in CPU kernels for the ops (the reference underneath)
also run the Python glue of cuda_ops.py end to end on the CPU: autograd wiring,
fake implementations (opcheck) and torch.compile(fullgraph=True).

GPU part (skipped without a GPU or without the extension): every op against
the float64 reference, values and every gradient, for float32/float16/bfloat16
at small odd shapes and CLIP shapes, scale 0, rescale_param_grad=False,
sequence-first layouts, prefix 0/1/5, non-square grids, autocast,
torch.compile(fullgraph=True), and torch.library.opcheck on every op. Every
buffer the kernels write is NaN-filled first (HEBA_DEBUG_NAN_FILL=1), so a
forgotten tile fails loudly.
"""

from __future__ import annotations

import pytest
import torch

import heba
import heba.nn
from heba import backends, ops
from tests.helpers import (DTYPE_NAMES, TOL, assert_rel_close, check_against_reference,
                           forward_backward, low_rank_params, requires_gpu, text_params, tokens,
                           visual_params)

CUDA_OPS = ("cuda_visual_fwd", "cuda_visual_bwd", "cuda_text_fwd", "cuda_text_bwd",
            "cuda_low_rank_fwd", "cuda_low_rank_bwd")
EXT_BUILT, EXT_WHY = backends._cuda_ext_status()

requires_ext = pytest.mark.skipif(
    not EXT_BUILT, reason=f"the CUDA extension heba_kernels._C is not built here: {EXT_WHY}")


# ---------------------------------------------------------------------------
# CPU: registration, errors, fallback
# ---------------------------------------------------------------------------

@requires_ext
def test_extension_registers_its_ops():
    import heba_kernels._C  # noqa: F401
    for name in CUDA_OPS:
        assert hasattr(torch.ops.heba, name), f"torch.ops.heba.{name} is not registered"
        schema = str(getattr(torch.ops.heba, name).default._schema)
        assert schema.startswith(f"heba::{name}("), schema
    for op in backends.OPS:
        assert ("cuda", op) in backends._LOADED, backends._IMPORT_ERRORS.get(("cuda", op))


@requires_ext
def test_fake_implementations_on_meta_tensors():
    """The register_fake shapes/dtypes, checked without a GPU."""
    import heba_kernels.cuda_ops  # noqa: F401
    B, H, W, P, D, h = 2, 3, 5, 1, 24, 6
    N = P + H * W
    x = torch.empty(N, B, D, device="meta", dtype=torch.float32)  # seq-first
    p = {k: v.to("meta", torch.bfloat16) for k, v in visual_params(D).items()}
    out, u, g, z, mean, rstd = torch.ops.heba.cuda_visual_fwd(
        x, *p.values(), 0.5, P, H, W, False, 1e-5, True)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert u.shape == g.shape == (B * N, h) and u.dtype == torch.bfloat16
    assert z.shape == (B * N, D) and mean.shape == rstd.shape == (B * N,)
    assert mean.dtype == torch.float32
    grads = torch.ops.heba.cuda_visual_bwd(out, x, p["down_weight"], p["mid_weight"],
                                           p["up_weight"], p["norm_weight"], u, g, z, mean, rstd,
                                           0.5, P, H, W, False, True)
    assert [t.shape for t in grads] == [x.shape] + [v.shape for v in p.values()]

    xt = torch.empty(3, 7, D, device="meta")
    tp = {k: v.to("meta") for k, v in text_params(D).items()}
    outs = torch.ops.heba.cuda_text_fwd(xt, *tp.values(), 0.5, 1e-5, True)
    assert outs[0].shape == xt.shape and outs[1].shape == (21, h) and outs[3].shape == (21, D)

    lp = {k: v.to("meta") for k, v in low_rank_params(D, 5).items()}
    assert torch.ops.heba.cuda_low_rank_fwd(xt, *lp.values(), 0.5).shape == xt.shape
    dl = torch.ops.heba.cuda_low_rank_bwd(xt, xt, *lp.values(), 0.5)
    assert [t.shape for t in dl] == [xt.shape] + [v.shape for v in lp.values()]


# The autograd/fake glue of cuda_ops.py, on the CPU: stand-in CPU kernels for the
# heba::cuda_* ops (the reference for the forward, the reference's autograd for
# the backward, intermediates of the real shapes) let the glue run end to end:
# values and gradients, torch.library.opcheck (fake vs real metadata, autograd
# registration, AOT dispatch) and torch.compile(fullgraph=True).

def _rows(t):
    D = t.shape[-1]
    return t.view(-1, D) if t.is_contiguous() else t.transpose(0, 1).reshape(-1, D)


def _intermediates(x, h, wt):
    rows, D = _rows(x).shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (torch.zeros(rows, h, dtype=wt), torch.zeros(rows, h, dtype=wt),
            torch.zeros(rows, D, dtype=wt), torch.zeros(rows, dtype=acc),
            torch.zeros(rows, dtype=acc))


def _grads_by_autograd(fn, grad_out, tensors):
    # The dispatcher switches autograd off inside an op's kernel; switch it
    # back on to differentiate the reference there.
    keys = (torch._C.DispatchKey.AutogradCPU, torch._C.DispatchKey.ADInplaceOrView)
    was = [torch._C._dispatch_tls_is_dispatch_key_excluded(k) for k in keys]
    for k in keys:
        torch._C._dispatch_tls_set_dispatch_key_excluded(k, False)
    try:
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in tensors]
            return list(torch.autograd.grad(fn(*leaves), leaves, grad_out))
    finally:
        for k, w in zip(keys, was):
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, w)


def _stand_in_visual_fwd(x, dw, mw, uw, nw, nb, scale, P, H, W, bf, eps, rescale):
    from heba_kernels import reference
    out = reference.heba_visual(x, dw, mw, uw, nw, nb, scale=scale, num_prefix_tokens=P,
                                grid=(H, W), batch_first=bf, eps=eps, rescale_param_grad=rescale)
    return (torch.empty_like(x).copy_(out),) + _intermediates(x, dw.shape[0], dw.dtype)


def _stand_in_visual_bwd(grad, x, dw, mw, uw, nw, u, g, z, mean, rstd, scale, P, H, W, bf,
                         rescale):
    from heba_kernels import reference
    nb = torch.zeros_like(nw)

    def fn(x, dw, mw, uw, nw, nb):
        return reference.heba_visual(x, dw, mw, uw, nw, nb, scale=scale, num_prefix_tokens=P,
                                     grid=(H, W), batch_first=bf, eps=1e-5,
                                     rescale_param_grad=rescale)
    dx, *rest = _grads_by_autograd(fn, grad, [x, dw, mw, uw, nw, nb])
    return (torch.empty_like(x).copy_(dx), *rest)


def _stand_in_text_fwd(x, dw, uw, nw, nb, scale, eps, rescale):
    from heba_kernels import reference
    out = reference.heba_text(x, dw, uw, nw, nb, scale=scale, eps=eps, rescale_param_grad=rescale)
    return (torch.empty_like(x).copy_(out),) + _intermediates(x, dw.shape[0], dw.dtype)


def _stand_in_text_bwd(grad, x, dw, uw, nw, u, g, z, mean, rstd, scale, rescale):
    from heba_kernels import reference
    nb = torch.zeros_like(nw)

    def fn(x, dw, uw, nw, nb):
        return reference.heba_text(x, dw, uw, nw, nb, scale=scale, eps=1e-5,
                                   rescale_param_grad=rescale)
    dx, *rest = _grads_by_autograd(fn, grad, [x, dw, uw, nw, nb])
    return (torch.empty_like(x).copy_(dx), *rest)


def _stand_in_low_rank_fwd(x, dw, db, uw, ub, alpha):
    from heba_kernels import reference
    return torch.empty_like(x).copy_(reference.low_rank(x, dw, db, uw, ub, alpha=alpha))


def _stand_in_low_rank_bwd(grad, x, dw, db, uw, ub, alpha):
    from heba_kernels import reference
    r, D = dw.shape
    db = torch.zeros(r, dtype=dw.dtype) if db is None else db
    ub = torch.zeros(D, dtype=dw.dtype) if ub is None else ub

    def fn(x, dw, db, uw, ub):
        return reference.low_rank(x, dw, db, uw, ub, alpha=alpha)
    dx, *rest = _grads_by_autograd(fn, grad, [x, dw, db, uw, ub])
    return (torch.empty_like(x).copy_(dx), *rest)


@pytest.fixture
def cpu_stand_ins():
    import heba_kernels.cuda_ops  # noqa: F401  (the glue under test)
    lib = torch.library.Library("heba", "IMPL")
    for name, fn in (("cuda_visual_fwd", _stand_in_visual_fwd),
                     ("cuda_visual_bwd", _stand_in_visual_bwd),
                     ("cuda_text_fwd", _stand_in_text_fwd), ("cuda_text_bwd", _stand_in_text_bwd),
                     ("cuda_low_rank_fwd", _stand_in_low_rank_fwd),
                     ("cuda_low_rank_bwd", _stand_in_low_rank_bwd)):
        lib.impl(name, fn, "CPU")
    yield
    lib._destroy()


def _leaf(a):
    return a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a


@requires_ext
@pytest.mark.parametrize("batch_first", [True, False], ids=["bnd", "seqfirst"])
def test_glue_on_cpu_stand_ins(cpu_stand_ins, batch_first):
    from heba_kernels import cuda_ops, reference
    d, D, P, H, W, B = torch.float64, 12, 1, 3, 2, 2
    N = P + H * W
    x = tokens(*((B, N, D) if batch_first else (N, B, D)), dtype=d)
    for scale, rescale in ((0.7, True), (0.0, True), (0.4, False)):
        vp = visual_params(D, dtype=d)
        kw = dict(scale=scale, num_prefix_tokens=P, grid=(H, W), batch_first=batch_first,
                  eps=1e-5, rescale_param_grad=rescale)
        out_c, _, g_c = forward_backward(
            lambda xx, **p: cuda_ops.heba_visual(xx, **p, **kw), x, vp)
        out_r, _, g_r = forward_backward(
            lambda xx, **p: reference.heba_visual(xx, **p, **kw), x, vp)
        assert_rel_close("visual out", out_c, out_r, 1e-12)
        for k in g_r:
            assert_rel_close(f"visual grad {k}", g_c[k], g_r[k], 1e-12)
    torch.library.opcheck(torch.ops.heba.cuda_visual_fwd.default,
                          tuple(_leaf(a) for a in (x, *visual_params(D, dtype=d).values(), 0.5, P,
                                                   H, W, batch_first, 1e-5, True)))

    tp = text_params(D, dtype=d)
    out_c, _, g_c = forward_backward(lambda xx, **p: cuda_ops.heba_text(
        xx, **p, scale=0.6, eps=1e-5, rescale_param_grad=True), x, tp)
    out_r, _, g_r = forward_backward(lambda xx, **p: reference.heba_text(
        xx, **p, scale=0.6, eps=1e-5, rescale_param_grad=True), x, tp)
    for k in g_r:
        assert_rel_close(f"text grad {k}", g_c[k], g_r[k], 1e-12)
    torch.library.opcheck(torch.ops.heba.cuda_text_fwd.default,
                          tuple(_leaf(a) for a in (x, *tp.values(), 0.5, 1e-5, False)))

    for bias in (True, False):
        lp = low_rank_params(D, 4, dtype=d, bias=bias)
        out_c, _, g_c = forward_backward(lambda xx, **p: cuda_ops.low_rank(xx, **p, alpha=0.8),
                                         x, lp)
        out_r, _, g_r = forward_backward(lambda xx, **p: reference.low_rank(xx, **p, alpha=0.8),
                                         x, lp)
        assert set(g_c) == set(g_r)
        for k in g_r:
            assert_rel_close(f"low_rank grad {k}", g_c[k], g_r[k], 1e-12)
        torch.library.opcheck(torch.ops.heba.cuda_low_rank_fwd.default,
                              tuple(_leaf(a) for a in (x, *lp.values(), 0.8)))


@requires_ext
def test_glue_compiles_fullgraph_on_cpu_stand_ins(cpu_stand_ins):
    from heba_kernels import cuda_ops
    torch._dynamo.reset()
    D, d = 12, torch.float64
    vp, tp, lp = visual_params(D, dtype=d), text_params(D, dtype=d), low_rank_params(D, 4, dtype=d)

    def f(x, vp, tp, lp):
        y = cuda_ops.heba_visual(x, **vp, scale=0.3, num_prefix_tokens=1, grid=(3, 5),
                                 batch_first=True, eps=1e-5, rescale_param_grad=True)
        y = cuda_ops.heba_text(y, **tp, scale=0.2, eps=1e-5, rescale_param_grad=False)
        return cuda_ops.low_rank(y, **lp, alpha=0.5)

    x = tokens(2, 16, D, dtype=d)
    params = {**{f"v.{k}": v for k, v in vp.items()}, **{f"t.{k}": v for k, v in tp.items()},
              **{f"l.{k}": v for k, v in lp.items()}}

    def run(fn):
        def call(xx, **p):
            split = {pre: {k[2:]: v for k, v in p.items() if k.startswith(pre)} for pre in "vtl"}
            return fn(xx, split["v"], split["t"], split["l"])
        return forward_backward(call, x, params)

    out_e, _, g_e = run(f)
    out_c, _, g_c = run(torch.compile(f, fullgraph=True))
    torch.testing.assert_close(out_c, out_e)
    for k in g_e:
        torch.testing.assert_close(g_c[k], g_e[k])


@requires_ext
def test_prepare_x_layouts():
    """Only layouts whose rows are [rows, D] memory are used in place."""
    from heba_kernels import cuda_ops
    w = torch.empty(4, 16)
    x3 = tokens(3, 5, 16).transpose(0, 1)                    # [N, B, D] view of [B, N, D]
    assert cuda_ops._prepare_x(x3, w).data_ptr() == x3.data_ptr()
    x2 = tokens(16, 5).t()                                   # 2-D: transpose moves D itself
    p2 = cuda_ops._prepare_x(x2, w)
    assert p2.is_contiguous() and torch.equal(p2, x2)


def _visual_call(x, backend):
    return ops.heba_visual(x, **visual_params(x.shape[-1], device=x.device), scale=0.5,
                           backend=backend)


def test_cuda_backend_rejects_cpu_tensors():
    x = tokens(2, 1 + 3 * 3, 16)
    with pytest.raises(heba.BackendUnavailableError) as info:
        _visual_call(x, "cuda")
    msg = str(info.value)
    assert "backend='cuda'" in msg and "heba_visual" in msg
    assert ("cpu tensor" if EXT_BUILT else "pip install") in msg, msg
    for call in (lambda: ops.heba_text(x, **text_params(16), backend="cuda"),
                 lambda: ops.low_rank(x, **low_rank_params(16, 4), backend="cuda")):
        with pytest.raises(heba.BackendUnavailableError):
            call()


def test_cuda_backend_without_extension_says_how_to_build(monkeypatch):
    """Simulates an install without the extension, whatever this machine has."""
    why = ("the CUDA extension heba_kernels._C was not built or does not load (ImportError: "
           "simulated); reinstall on a machine with nvcc and a CUDA build of torch: "
           "`pip install --no-build-isolation .`")
    monkeypatch.setattr(backends, "_cuda_ext_status", lambda: (False, why))
    monkeypatch.setattr(backends, "_LOADED",
                        {k: v for k, v in backends._LOADED.items() if k[0] != "cuda"})
    x = tokens(2, 1 + 3 * 3, 16)
    with pytest.raises(heba.BackendUnavailableError, match="pip install --no-build-isolation"):
        _visual_call(x, "cuda")
    # auto still works, through the reference
    torch.testing.assert_close(_visual_call(x, "auto"), _visual_call(x, "reference"))


def test_auto_on_cpu_is_the_reference():
    x = tokens(2, 1 + 3 * 3, 16)
    torch.testing.assert_close(_visual_call(x, "auto"), _visual_call(x, "reference"))
    for op, params in (("heba_text", text_params(16)), ("low_rank", low_rank_params(16, 4))):
        fn = getattr(ops, op)
        torch.testing.assert_close(fn(x, **params, backend="auto"),
                                   fn(x, **params, backend="reference"))


# ---------------------------------------------------------------------------
# GPU: against the float64 reference
# ---------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _nan_fill(monkeypatch):
    monkeypatch.setenv("HEBA_DEBUG_NAN_FILL", "1")


def _visual_case(B, H, W, D, P, batch_first=True, scale=0.7, rescale=True, marks=()):
    tag = f"B{B}-H{H}-W{W}-D{D}-P{P}" + ("" if batch_first else "-seqfirst") + \
        (f"-s{scale}" if scale != 0.7 else "") + ("" if rescale else "-plaingrad")
    return pytest.param(B, H, W, D, P, batch_first, scale, rescale, id=tag, marks=marks)


VISUAL_CASES = [
    _visual_case(2, 3, 5, 24, 1),                       # non-square grid, h=6
    _visual_case(3, 4, 4, 40, 0, batch_first=False),    # no prefix, seq-first
    _visual_case(1, 2, 7, 36, 5),                       # 5 prefix tokens (registers)
    _visual_case(2, 1, 9, 52, 1, batch_first=False),    # 1 x W grid
    _visual_case(3, 6, 1, 20, 2),                       # H x 1 grid
    _visual_case(2, 5, 5, 100, 1, scale=0.0),           # scale 0: finite parameter grads
    _visual_case(2, 4, 3, 44, 1, scale=-0.4, rescale=False),
    _visual_case(1, 3, 3, 2052, 1),                     # D > 2048: 256-thread rows
    _visual_case(8, 14, 14, 768, 1),                    # CLIP ViT-B/16 A_attn
    _visual_case(4, 14, 14, 3072, 1),                   # CLIP ViT-B/16 A_mlp
]


@requires_gpu
@requires_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_NAMES[d] for d in DTYPES])
@pytest.mark.parametrize("B,H,W,D,P,batch_first,scale,rescale", VISUAL_CASES)
def test_visual_matches_reference(B, H, W, D, P, batch_first, scale, rescale, dtype):
    N = P + H * W
    x = tokens(*((B, N, D) if batch_first else (N, B, D)), device="cuda", dtype=dtype)
    params = visual_params(D, device="cuda", dtype=dtype)
    check_against_reference("heba_visual", "cuda", x, params, scale=scale, num_prefix_tokens=P,
                            grid=(H, W), batch_first=batch_first, rescale_param_grad=rescale)


TEXT_CASES = [
    pytest.param((3, 7, 24), 0.7, True, id="3x7-D24"),
    pytest.param((5, 2, 44), 0.0, True, id="5x2-D44-s0"),
    pytest.param((2, 9, 36), -0.3, False, id="2x9-D36-plaingrad"),
    pytest.param((4, 3, 5, 20), 0.5, True, id="4x3x5-D20"),
    pytest.param((64, 77, 512), 0.7, True, id="64x77-D512-CLIP"),
]


@requires_gpu
@requires_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_NAMES[d] for d in DTYPES])
@pytest.mark.parametrize("shape,scale,rescale", TEXT_CASES)
def test_text_matches_reference(shape, scale, rescale, dtype):
    x = tokens(*shape, device="cuda", dtype=dtype)
    params = text_params(shape[-1], device="cuda", dtype=dtype)
    check_against_reference("heba_text", "cuda", x, params, scale=scale,
                            rescale_param_grad=rescale)


LOW_RANK_CASES = [
    pytest.param((3, 7, 20), 5, True, 0.5, id="3x7-D20-r5"),        # D % 8 != 0: scalar loads
    pytest.param((2, 5, 72), 64, False, 1.0, id="2x5-D72-r64-nobias"),
    pytest.param((33, 40), 3, True, -0.7, id="33-D40-r3"),          # rows not a multiple of 32
    pytest.param((4, 130), 70, True, 1.0, id="4-D130-r70"),          # cuBLAS path
    pytest.param((32, 197, 768), 1, True, 1.0, id="32x197-D768-r1"),
    pytest.param((32, 197, 768), 16, True, 1.0, id="32x197-D768-r16"),
    pytest.param((32, 197, 768), 64, True, 1.0, id="32x197-D768-r64"),
    pytest.param((32, 197, 768), 128, True, 1.0, id="32x197-D768-r128"),
]


@requires_gpu
@requires_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_NAMES[d] for d in DTYPES])
@pytest.mark.parametrize("shape,rank,bias,alpha", LOW_RANK_CASES)
def test_low_rank_matches_reference(shape, rank, bias, alpha, dtype):
    x = tokens(*shape, device="cuda", dtype=dtype)
    params = low_rank_params(shape[-1], rank, device="cuda", dtype=dtype, bias=bias)
    check_against_reference("low_rank", "cuda", x, params, alpha=alpha)


@requires_gpu
@requires_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_NAMES[d] for d in DTYPES])
def test_low_rank_unaligned_input_uses_scalar_loads(dtype):
    """x starting off a 16-byte boundary (a view) must still be right."""
    base = tokens(5 * 64 + 1, device="cuda", dtype=dtype)
    x = base[1:].view(5, 64)  # off by one element: the kernel must not take the vector path
    assert x.data_ptr() % 16 != 0
    params = low_rank_params(64, 8, device="cuda", dtype=dtype)
    out = ops.low_rank(x, **params, alpha=1.0, backend="cuda")
    ref = ops.low_rank(x.double(), **{k: v.double() for k, v in params.items()}, alpha=1.0,
                       backend="reference")
    assert_rel_close("out", out, ref, TOL[dtype])


@requires_gpu
@requires_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast(dtype):
    x = tokens(2, 1 + 4 * 5, 48, device="cuda")                      # float32 activations
    check_against_reference("heba_visual", "cuda", x, visual_params(48, device="cuda"),
                            autocast_dtype=dtype, scale=0.6, num_prefix_tokens=1, grid=(4, 5))
    xs = tokens(21, 2, 48, device="cuda")                            # seq-first
    check_against_reference("heba_visual", "cuda", xs, visual_params(48, device="cuda"),
                            autocast_dtype=dtype, scale=0.6, num_prefix_tokens=1, grid=(4, 5),
                            batch_first=False)
    xt = tokens(3, 7, 40, device="cuda")
    check_against_reference("heba_text", "cuda", xt, text_params(40, device="cuda"),
                            autocast_dtype=dtype, scale=0.6)
    for rank in (8, 96):
        check_against_reference("low_rank", "cuda", xt, low_rank_params(40, rank, device="cuda"),
                                autocast_dtype=dtype, alpha=0.8)


@requires_gpu
@requires_ext
def test_backward_inside_autocast_of_float32_forward():
    """Forward outside autocast (float32 weights), backward inside it: the ops'
    internal GEMMs must stay float32 (the kernels read their results as such)."""
    D, P, H, W, B = 32, 1, 3, 4, 2
    cases = (("heba_visual", tokens(B, P + H * W, D, device="cuda"),
              visual_params(D, device="cuda"), dict(scale=0.7, num_prefix_tokens=P, grid=(H, W))),
             ("heba_text", tokens(3, 5, D, device="cuda"), text_params(D, device="cuda"),
              dict(scale=0.7)),
             ("low_rank", tokens(3, 5, D, device="cuda"), low_rank_params(D, 4, device="cuda"),
              dict(alpha=0.8)))
    for name, x, params, kw in cases:
        op = getattr(ops, name)
        xx = x.clone().requires_grad_(True)
        pp = {k: v.clone().requires_grad_(True) for k, v in params.items() if v is not None}
        out = op(xx, **pp, **kw, backend="cuda")
        grad = torch.randn_like(out)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out.backward(grad)
        _, _, rg = forward_backward(lambda a, **q: op(a, **q, **kw, backend="reference"),
                                    x.double(), {k: v.double() for k, v in pp.items()},
                                    grad_out=grad.double())
        assert_rel_close(f"{name} grad x", xx.grad, rg["x"], TOL[torch.float32])
        for k, v in pp.items():
            assert v.grad.dtype == torch.float32, (name, k, v.grad.dtype)
            assert_rel_close(f"{name} grad {k}", v.grad, rg[k], TOL[torch.float32])


@requires_gpu
@requires_ext
def test_transposed_memory_layouts():
    """[N, B, D] views of [B, N, D] memory (and the reverse) are used in place."""
    D, P, H, W, B = 32, 1, 3, 4, 3
    N = P + H * W
    params = visual_params(D, device="cuda")
    x_bnd = tokens(B, N, D, device="cuda")
    for x, batch_first in ((x_bnd.transpose(0, 1), False), (x_bnd.transpose(0, 1).contiguous()
                                                             .transpose(0, 1), True)):
        check_against_reference("heba_visual", "cuda", x, params, scale=0.7,
                                num_prefix_tokens=P, grid=(H, W), batch_first=batch_first)
    check_against_reference("heba_text", "cuda", x_bnd.transpose(0, 1),
                            text_params(D, device="cuda"), scale=0.7)
    check_against_reference("low_rank", "cuda", x_bnd.transpose(0, 1),
                            low_rank_params(D, 4, device="cuda"), alpha=1.0)
    # a layout the kernels cannot take in place is copied first
    check_against_reference("low_rank", "cuda", x_bnd[:, ::2], low_rank_params(D, 4, device="cuda"),
                            alpha=1.0)
    # 2-D x = y.t(): transpose(0, 1) is contiguous but moves D, so it must be copied too
    x_t = tokens(D, 7, device="cuda").t()
    check_against_reference("low_rank", "cuda", x_t, low_rank_params(D, 4, device="cuda"),
                            alpha=1.0)
    check_against_reference("heba_text", "cuda", x_t, text_params(D, device="cuda"), scale=0.7)


@requires_gpu
@requires_ext
def test_bad_input_raises_python_exception():
    x = tokens(2, 10, 16, device="cuda")
    p = visual_params(16, device="cuda")
    with pytest.raises(RuntimeError, match="tokens per image"):
        torch.ops.heba.cuda_visual_fwd(x, *p.values(), 0.5, 1, 3, 4, True, 1e-5, True)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        torch.ops.heba.cuda_low_rank_fwd(x, *(v.cpu() for v in low_rank_params(16, 4).values()),
                                         1.0)


@requires_gpu
@requires_ext
def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vis = heba.nn.HeBAAdapter(64, modality="visual", backend="cuda")
            self.txt = heba.nn.HeBAAdapter(64, modality="text", backend="cuda")
            self.lr = heba.nn.LowRankAdapter(64, 8, init="small", backend="cuda")

        def forward(self, x):
            return self.lr(self.txt(self.vis(x, scale=0.3), scale=0.2))

    torch.manual_seed(0)
    model = Block().cuda()
    x = tokens(2, 1 + 7 * 7, 64, device="cuda")
    compiled = torch.compile(model, fullgraph=True)

    def grads(fn):
        out, _, g = forward_backward(lambda xx: fn(xx), x, {})
        return out, g["x"], [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    out_e, dx_e, gp_e = grads(model)
    model.zero_grad()
    out_c, dx_c, gp_c = grads(compiled)
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx_c, dx_e, rtol=1e-4, atol=1e-5)
    for a, b in zip(gp_c, gp_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@requires_gpu
@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck(dtype):
    import heba_kernels.cuda_ops  # noqa: F401
    D, P, H, W, B = 24, 1, 3, 4, 2
    N = P + H * W

    def leaf(t):
        return t.detach().clone().requires_grad_(t.is_floating_point())

    x = tokens(B, N, D, device="cuda", dtype=dtype)
    vp = visual_params(D, device="cuda", dtype=dtype)
    args = (x, *vp.values(), 0.5, P, H, W, True, 1e-5, True)
    torch.library.opcheck(torch.ops.heba.cuda_visual_fwd.default,
                          tuple(leaf(a) if isinstance(a, torch.Tensor) else a for a in args))
    out, u, g, z, mean, rstd = torch.ops.heba.cuda_visual_fwd(*args)
    torch.library.opcheck(torch.ops.heba.cuda_visual_bwd.default,
                          (torch.randn_like(out), x, vp["down_weight"], vp["mid_weight"],
                           vp["up_weight"], vp["norm_weight"], u, g, z, mean, rstd, 0.5, P, H, W,
                           True, True))

    tp = text_params(D, device="cuda", dtype=dtype)
    targs = (x, *tp.values(), 0.5, 1e-5, False)
    torch.library.opcheck(torch.ops.heba.cuda_text_fwd.default,
                          tuple(leaf(a) if isinstance(a, torch.Tensor) else a for a in targs))
    out, u, g, z, mean, rstd = torch.ops.heba.cuda_text_fwd(*targs)
    torch.library.opcheck(torch.ops.heba.cuda_text_bwd.default,
                          (torch.randn_like(out), x, tp["down_weight"], tp["up_weight"],
                           tp["norm_weight"], u, g, z, mean, rstd, 0.5, False))

    for rank, bias in ((6, True), (80, False)):
        lp = low_rank_params(D, rank, device="cuda", dtype=dtype, bias=bias)
        largs = (x, *lp.values(), 0.7)
        torch.library.opcheck(torch.ops.heba.cuda_low_rank_fwd.default,
                              tuple(leaf(a) if isinstance(a, torch.Tensor) else a for a in largs))
        torch.library.opcheck(torch.ops.heba.cuda_low_rank_bwd.default,
                              (torch.randn_like(x), *largs))


# ---------------------------------------------------------------------------
# CPU: pure-Python replicas of the kernels' index math (csrc/kernels.h TokenMap,
# heba_visual.cu), checked against torch's conv2d and its autograd. They run
# without a GPU; keep them in step with the kernels.
# ---------------------------------------------------------------------------

def _token_map(B, N, bn):
    row = (lambda b, n: b * N + n) if bn else (lambda b, n: n * B + b)
    token_of = (lambda r: r % N) if bn else (lambda r: r // B)
    batch_of = (lambda r: r // N) if bn else (lambda r: r % B)
    return row, token_of, batch_of


def _chunks(positions):  # visual_stencil_bwd_chunks
    n = min(max(-(-positions // 64), 1), 256)
    return n, (-(-positions // n) if positions > 0 else 1)


@pytest.mark.parametrize("B,H,W,P,bn", [(2, 3, 5, 1, True), (3, 4, 4, 0, False),
                                        (1, 2, 7, 5, True), (2, 1, 9, 1, False),
                                        (3, 6, 1, 2, True), (2, 90, 3, 1, False)])
def test_stencil_index_math_replica(B, H, W, P, bn):
    N, C = P + H * W, 3
    row, token_of, batch_of = _token_map(B, N, bn)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(B * N, C, generator=g, dtype=torch.float64)      # rows in memory order
    wm = torch.randn(C, 9, generator=g, dtype=torch.float64)
    dg = torch.randn(B * N, C, generator=g, dtype=torch.float64)
    for r in range(B * N):                                            # the map is a bijection
        assert row(batch_of(r), token_of(r)) == r

    # _visual_stencil_fwd_kernel: v[r, c] (before GELU), 0 on prefix rows
    v = torch.zeros(B * N, C, dtype=torch.float64)
    for r in range(B * N):
        n = token_of(r)
        if n < P:
            continue
        b, p = batch_of(r), n - P
        i, j = p // W, p % W
        for ki in range(3):
            for kj in range(3):
                ii, jj = i + ki - 1, j + kj - 1
                if 0 <= ii < H and 0 <= jj < W:
                    v[r] += wm[:, ki * 3 + kj] * u[row(b, P + ii * W + jj)]

    # torch: the same tokens as an NCHW image
    idx = torch.tensor([[row(b, P + q) for q in range(H * W)] for b in range(B)])
    img = u[idx].permute(0, 2, 1).reshape(B, C, H, W).requires_grad_(True)
    w4 = wm.view(C, 1, 3, 3).clone().requires_grad_(True)
    ref = torch.nn.functional.conv2d(img, w4, padding=1, groups=C)
    torch.testing.assert_close(v[idx], ref.reshape(B, C, H * W).permute(0, 2, 1))

    # backward: dv = dg on the patch rows (gelu' left out), dWm by position chunks,
    # du by the adjoint stencil (ii = i - (ki - 1))
    dv = dg
    npos = B * H * W
    nchunks, chunk = _chunks(npos)
    assert nchunks <= 65535 and nchunks * chunk >= npos
    part = torch.zeros(nchunks, C, 9, dtype=torch.float64)
    for y in range(nchunks):
        for q in range(y * chunk, min(y * chunk + chunk, npos)):
            b, p = q // (H * W), q % (H * W)
            i, j = p // W, p % W
            r = row(b, P + p)
            for k in range(9):
                ii, jj = i + k // 3 - 1, j + k % 3 - 1
                if 0 <= ii < H and 0 <= jj < W:
                    part[y, :, k] += dv[r] * u[row(b, P + ii * W + jj)]
    du = torch.zeros(B * N, C, dtype=torch.float64)
    for r in range(B * N):
        n = token_of(r)
        if n < P:
            continue
        b, p = batch_of(r), n - P
        i, j = p // W, p % W
        for ki in range(3):
            for kj in range(3):
                ii, jj = i - (ki - 1), j - (kj - 1)
                if 0 <= ii < H and 0 <= jj < W:
                    du[r] += wm[:, ki * 3 + kj] * dv[row(b, P + ii * W + jj)]
    gimg = dg[idx].permute(0, 2, 1).reshape(B, C, H, W)
    ref.backward(gimg)
    torch.testing.assert_close(part.sum(0).view(C, 1, 3, 3), w4.grad)
    torch.testing.assert_close(du[idx], img.grad.reshape(B, C, H * W).permute(0, 2, 1))
    assert (du[[r for r in range(B * N) if token_of(r) < P]] == 0).all()


def test_stencil_bwd_chunks_cover_every_position():
    for npos in list(range(0, 300)) + [16383, 16384, 16385, 8 * 196, 1 << 20, (1 << 31) + 7]:
        n, chunk = _chunks(npos)
        assert 1 <= n <= 256 and chunk >= 1 and n * chunk >= npos   # gridDim.y = n
