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

def _extension_built():
    st = backends.extension_status()
    return st.state in ("prebuilt", "loaded"), st.detail


CUDA_OPS = ("cuda_visual_fwd", "cuda_visual_bwd", "cuda_text_fwd", "cuda_text_bwd",
            "cuda_low_rank_fwd", "cuda_low_rank_bwd")
EXT_BUILT, EXT_WHY = _extension_built()
if not EXT_BUILT and torch.cuda.is_available():
    # Not built at install (e.g. an isolated `pip install .`): on a GPU machine the
    # backend compiles on first use, so do that here rather than skip its tests.
    from heba_kernels import _extension
    if _extension.status().state in ("jit-cached", "jit-buildable"):
        try:
            _extension.load()
        except Exception as err:                       # the reason becomes the skip's
            EXT_WHY = f"{type(err).__name__}: {err}"
        else:
            EXT_BUILT, EXT_WHY = _extension_built()

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
        assert ("cuda", op) in backends.registry.fns, backends.registry.errors.get(("cuda", op))


@requires_ext
def test_fake_implementations_on_meta_tensors():
    """The register_fake shapes/dtypes, checked without a GPU."""
    import heba_kernels.cuda_ops  # noqa: F401
    B, H, W, P, D, h = 2, 3, 5, 1, 24, 6
    N = P + H * W
    x = torch.empty(N, B, D, device="meta", dtype=torch.float32)  # seq-first
    p = {k: v.to("meta", torch.bfloat16) for k, v in visual_params(D).items()}
    out, u, g, z, mean, rstd = torch.ops.heba.cuda_visual_fwd(
        x, *p.values(), 0.5, torch.empty((), device="meta"), P, H, W, False, 1e-5, True)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert u.shape == g.shape == (B * N, h) and u.dtype == torch.bfloat16
    assert z.shape == (B * N, D) and mean.shape == rstd.shape == (B * N,)
    assert mean.dtype == torch.float32
    grads = torch.ops.heba.cuda_visual_bwd(out, x, p["down_weight"], p["mid_weight"],
                                           p["up_weight"], p["norm_weight"], u, g, z, mean, rstd,
                                           0.5, None, P, H, W, False, True)
    assert [t.shape for t in grads] == [x.shape] + [v.shape for v in p.values()]

    xt = torch.empty(3, 7, D, device="meta")
    tp = {k: v.to("meta") for k, v in text_params(D).items()}
    outs = torch.ops.heba.cuda_text_fwd(xt, *tp.values(), 0.5, None, 1e-5, True)
    assert outs[0].shape == xt.shape and outs[1].shape == (21, h) and outs[3].shape == (21, D)

    lp = {k: v.to("meta") for k, v in low_rank_params(D, 5).items()}
    assert torch.ops.heba.cuda_low_rank_fwd(xt, *lp.values(), 0.5).shape == xt.shape
    dl = torch.ops.heba.cuda_low_rank_bwd(xt, xt, *lp.values(), 0.5)
    assert [t.shape for t in dl] == [xt.shape] + [v.shape for v in lp.values()]


# The autograd/fake glue of cuda_ops.py, on the CPU: stand-in CPU kernels for the
# heba::cuda_* ops let the glue run end to end: values and gradients,
# torch.library.opcheck (fake vs real metadata, autograd registration, AOT
# dispatch) and torch.compile(fullgraph=True). The stand-ins check what they
# receive, so wrong glue is noticed even where the final numbers would hide it:
# x's layout, every dtype and shape, the scale argument (a float, or a 0-d
# float32 tensor on x's device whose value they use), and in the backward the
# saved tensors, which must equal the inputs and the intermediates (u, g, z,
# mean, rstd, recomputed independently with torch's conv2d) of a forward call.
# The backward's gradients come from the reference's autograd at the eps and
# scale the forward saw, so a dropped scale or eps changes them.

_FWD_LOG: dict = {}  # op -> recent forward calls: their inputs, eps and scale


def _log_fwd(op, tensors, eps, scale):
    entries = _FWD_LOG.setdefault(op, [])
    entries.append(dict(tensors=[None if t is None else t.detach().clone() for t in tensors],
                        eps=eps, scale=scale))
    del entries[:-16]


def _matching_fwd(op, tensors):
    """The logged forward call of ``op`` whose inputs equal ``tensors`` exactly."""
    for entry in reversed(_FWD_LOG.get(op, [])):
        if all((a is None and b is None) or (a is not None and b is not None and
                                             a.shape == b.shape and a.dtype == b.dtype and
                                             torch.equal(a, b))
               for a, b in zip(entry["tensors"], tensors)):
            return entry
    raise AssertionError(f"{op}: the backward received tensors that match no forward call's "
                         f"inputs (wrong saved tensors)")


def _rows(t):
    """The [rows, D] view of t's memory (rows in memory order)."""
    D = t.shape[-1]
    return t.reshape(-1, D) if t.is_contiguous() else t.transpose(0, 1).reshape(-1, D)


def _check_x_layout(op, x):
    assert x.stride(-1) == 1 and (x.is_contiguous() or (
        x.dim() >= 3 and x.transpose(0, 1).is_contiguous())), \
        f"{op}: x must come contiguous or transpose(0, 1)-contiguous, got strides {x.stride()}"


def _check_weights(op, named, wt, shapes):
    for (name, t), shape in zip(named.items(), shapes):
        assert t.dtype == wt, f"{op}: {name} has dtype {t.dtype}, the weights {wt}"
        assert tuple(t.shape) == shape, f"{op}: {name} has shape {tuple(t.shape)}, want {shape}"


def _scale_value(op, scale, scale_t, x):
    """The scale an op call means; checks the float/tensor convention."""
    assert isinstance(scale, float), f"{op}: scale must arrive as a float, got {type(scale)}"
    if scale_t is None:
        return scale
    assert scale_t.dim() == 0 and scale_t.dtype == torch.float32 and \
        scale_t.device == x.device, f"{op}: scale_t must be a 0-d float32 tensor on x's device"
    return float(scale_t.item())


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _ln_stats(y, eps, patch):
    mean = y.mean(-1)
    rstd = torch.rsqrt(y.var(-1, unbiased=False) + eps)
    return mean * patch, rstd * patch


def _visual_intermediates(x, dw, mw, uw, P, H, W, bf, eps):
    """u, g, z [rows, *] in x's row order and mean, rstd [rows] (0 on prefix rows)."""
    xb = x if bf else x.transpose(0, 1)                                # [B, N, D]
    B, N, D = xb.shape
    h = dw.shape[0]
    u = xb @ dw.view(h, D).t().to(x.dtype)                             # [B, N, h]
    img = u[:, P:].transpose(1, 2).reshape(B, h, H, W)
    v = torch.nn.functional.conv2d(img, mw.to(x.dtype), padding=1, groups=h)
    g = torch.zeros_like(u)
    g[:, P:] = torch.nn.functional.gelu(v.reshape(B, h, H * W).transpose(1, 2))
    z = g @ uw.view(D, h).t().to(x.dtype)
    patch = torch.ones(B, N, dtype=x.dtype)
    patch[:, :P] = 0
    mean, rstd = _ln_stats(xb + z, eps, patch)

    def rows(t):  # logical [B, N, C] -> x's memory row order
        t = t if bf else t.transpose(0, 1)                            # x's shape
        t = t if t.dim() == 3 else t.unsqueeze(-1)
        return (t if x.is_contiguous() else t.transpose(0, 1)).reshape(-1, t.shape[-1])
    wt, acc = dw.dtype, _acc(x)
    return (rows(u).to(wt), rows(g).to(wt), rows(z).to(wt), rows(mean).view(-1).to(acc),
            rows(rstd).view(-1).to(acc))


def _text_intermediates(x, dw, uw, eps):
    x2d = _rows(x)
    u = x2d @ dw.t().to(x.dtype)
    g = torch.nn.functional.gelu(u)
    z = g @ uw.t().to(x.dtype)
    mean, rstd = _ln_stats(x2d + z, eps, torch.ones(x2d.shape[0], dtype=x.dtype))
    return u.to(dw.dtype), g.to(dw.dtype), z.to(dw.dtype), mean.to(_acc(x)), rstd.to(_acc(x))


def _check_saved(op, saved, expected):
    for name, s, e in zip(("u", "g", "z", "mean", "rstd"), saved, expected):
        assert s.is_contiguous() and s.shape == e.shape and s.dtype == e.dtype, \
            f"{op}: saved {name} is {tuple(s.shape)} {s.dtype}, want {tuple(e.shape)} {e.dtype}"
        torch.testing.assert_close(s, e, rtol=1e-12, atol=1e-12, msg=f"{op}: saved {name}")


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


def _visual_shapes(x, dw, bf):
    h, D = dw.shape[0], x.shape[-1]
    return [(h, D, 1, 1), (h, 1, 3, 3), (D, h, 1, 1), (D,), (D,)]


def _stand_in_visual_fwd(x, dw, mw, uw, nw, nb, scale, scale_t, P, H, W, bf, eps, rescale):
    from heba_kernels import reference
    op = "cuda_visual_fwd"
    _check_x_layout(op, x)
    _check_weights(op, dict(dw=dw, mw=mw, uw=uw, nw=nw, nb=nb), dw.dtype,
                   _visual_shapes(x, dw, bf))
    s = _scale_value(op, scale, scale_t, x)
    assert P + H * W == (x.shape[1] if bf else x.shape[0]), f"{op}: grid does not match x"
    _log_fwd(op, (x, dw, mw, uw, nw), eps, s)
    out = reference.heba_visual(x, dw, mw, uw, nw, nb, scale=s, num_prefix_tokens=P,
                                grid=(H, W), batch_first=bf, eps=eps, rescale_param_grad=rescale)
    return (torch.empty_like(x).copy_(out),) + _visual_intermediates(x, dw, mw, uw, P, H, W, bf,
                                                                      eps)


def _stand_in_visual_bwd(grad, x, dw, mw, uw, nw, u, g, z, mean, rstd, scale, scale_t, P, H, W,
                         bf, rescale):
    from heba_kernels import reference
    op = "cuda_visual_bwd"
    assert grad.shape == x.shape and grad.dtype == x.dtype, f"{op}: grad_out must match x"
    s = _scale_value(op, scale, scale_t, x)
    fwd = _matching_fwd("cuda_visual_fwd", (x, dw, mw, uw, nw))
    assert s == fwd["scale"], f"{op}: scale {s} but the forward had {fwd['scale']}"
    _check_saved(op, (u, g, z, mean, rstd),
                 _visual_intermediates(x, dw, mw, uw, P, H, W, bf, fwd["eps"]))
    nb = torch.zeros_like(nw)

    def fn(x, dw, mw, uw, nw, nb):
        return reference.heba_visual(x, dw, mw, uw, nw, nb, scale=s, num_prefix_tokens=P,
                                     grid=(H, W), batch_first=bf, eps=fwd["eps"],
                                     rescale_param_grad=rescale)
    dx, *rest = _grads_by_autograd(fn, grad, [x, dw, mw, uw, nw, nb])
    return (torch.empty_like(x).copy_(dx), *rest)


def _stand_in_text_fwd(x, dw, uw, nw, nb, scale, scale_t, eps, rescale):
    from heba_kernels import reference
    op = "cuda_text_fwd"
    _check_x_layout(op, x)
    h, D = dw.shape
    _check_weights(op, dict(dw=dw, uw=uw, nw=nw, nb=nb), dw.dtype, [(h, x.shape[-1]), (D, h),
                                                                     (D,), (D,)])
    s = _scale_value(op, scale, scale_t, x)
    _log_fwd(op, (x, dw, uw, nw), eps, s)
    out = reference.heba_text(x, dw, uw, nw, nb, scale=s, eps=eps, rescale_param_grad=rescale)
    return (torch.empty_like(x).copy_(out),) + _text_intermediates(x, dw, uw, eps)


def _stand_in_text_bwd(grad, x, dw, uw, nw, u, g, z, mean, rstd, scale, scale_t, rescale):
    from heba_kernels import reference
    op = "cuda_text_bwd"
    assert grad.shape == x.shape and grad.dtype == x.dtype, f"{op}: grad_out must match x"
    s = _scale_value(op, scale, scale_t, x)
    fwd = _matching_fwd("cuda_text_fwd", (x, dw, uw, nw))
    assert s == fwd["scale"], f"{op}: scale {s} but the forward had {fwd['scale']}"
    _check_saved(op, (u, g, z, mean, rstd), _text_intermediates(x, dw, uw, fwd["eps"]))
    nb = torch.zeros_like(nw)

    def fn(x, dw, uw, nw, nb):
        return reference.heba_text(x, dw, uw, nw, nb, scale=s, eps=fwd["eps"],
                                   rescale_param_grad=rescale)
    dx, *rest = _grads_by_autograd(fn, grad, [x, dw, uw, nw, nb])
    return (torch.empty_like(x).copy_(dx), *rest)


def _check_low_rank_args(op, x, dw, db, uw, ub, alpha):
    _check_x_layout(op, x)
    r, D = dw.shape
    assert isinstance(alpha, float), f"{op}: alpha must arrive as a float"
    named = {k: v for k, v in dict(dw=dw, db=db, uw=uw, ub=ub).items() if v is not None}
    shapes = {"dw": (r, x.shape[-1]), "db": (r,), "uw": (D, r), "ub": (D,)}
    _check_weights(op, named, dw.dtype, [shapes[k] for k in named])


def _stand_in_low_rank_fwd(x, dw, db, uw, ub, alpha):
    from heba_kernels import reference
    _check_low_rank_args("cuda_low_rank_fwd", x, dw, db, uw, ub, alpha)
    _log_fwd("cuda_low_rank_fwd", (x, dw, db, uw, ub), None, alpha)
    return torch.empty_like(x).copy_(reference.low_rank(x, dw, db, uw, ub, alpha=alpha))


def _stand_in_low_rank_bwd(grad, x, dw, db, uw, ub, alpha):
    from heba_kernels import reference
    op = "cuda_low_rank_bwd"
    _check_low_rank_args(op, x, dw, db, uw, ub, alpha)
    assert grad.shape == x.shape and grad.dtype == x.dtype, f"{op}: grad_out must match x"
    fwd = _matching_fwd("cuda_low_rank_fwd", (x, dw, db, uw, ub))
    assert alpha == fwd["scale"], f"{op}: alpha {alpha} but the forward had {fwd['scale']}"
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
    _FWD_LOG.clear()
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


def _scale_forms(value):
    """The two forms of one scale: a float and a 0-d float32 tensor (value is
    float32-representable, so both mean exactly the same number)."""
    assert float(torch.tensor(value, dtype=torch.float32)) == value
    return (value, torch.tensor(value, dtype=torch.float32))


@requires_ext
@pytest.mark.parametrize("batch_first", [True, False], ids=["bnd", "seqfirst"])
def test_glue_on_cpu_stand_ins(cpu_stand_ins, batch_first):
    from heba_kernels import cuda_ops, reference
    d, D, P, H, W, B = torch.float64, 12, 1, 3, 2, 2
    N = P + H * W
    x = tokens(*((B, N, D) if batch_first else (N, B, D)), dtype=d)
    for scale, rescale, eps in ((0.625, True, 1e-5), (0.0, True, 1e-3), (0.375, False, 1e-2)):
        vp = visual_params(D, dtype=d)
        for s in _scale_forms(scale):
            kw = dict(num_prefix_tokens=P, grid=(H, W), batch_first=batch_first, eps=eps,
                      rescale_param_grad=rescale)
            out_c, _, g_c = forward_backward(
                lambda xx, **p: cuda_ops.heba_visual(xx, **p, scale=s, **kw), x, vp)
            out_r, _, g_r = forward_backward(
                lambda xx, **p: reference.heba_visual(xx, **p, scale=scale, **kw), x, vp)
            assert_rel_close("visual out", out_c, out_r, 1e-12)
            for k in g_r:
                assert_rel_close(f"visual grad {k}", g_c[k], g_r[k], 1e-12)
    for st in (None, torch.tensor(0.5)):
        torch.library.opcheck(torch.ops.heba.cuda_visual_fwd.default,
                              tuple(_leaf(a) for a in (x, *visual_params(D, dtype=d).values(),
                                                       0.5, st, P, H, W, batch_first, 1e-5,
                                                       True)))

    tp = text_params(D, dtype=d)
    for rescale in (True, False):
        for s in _scale_forms(0.75):
            kw = dict(eps=1e-4, rescale_param_grad=rescale)
            out_c, _, g_c = forward_backward(
                lambda xx, **p: cuda_ops.heba_text(xx, **p, scale=s, **kw), x, tp)
            out_r, _, g_r = forward_backward(
                lambda xx, **p: reference.heba_text(xx, **p, scale=0.75, **kw), x, tp)
            assert_rel_close("text out", out_c, out_r, 1e-12)
            for k in g_r:
                assert_rel_close(f"text grad {k}", g_c[k], g_r[k], 1e-12)
    for st in (None, torch.tensor(0.5)):
        torch.library.opcheck(torch.ops.heba.cuda_text_fwd.default,
                              tuple(_leaf(a) for a in (x, *tp.values(), 0.5, st, 1e-5, False)))

    for bias in (True, False):
        lp = low_rank_params(D, 4, dtype=d, bias=bias)
        out_c, _, g_c = forward_backward(lambda xx, **p: cuda_ops.low_rank(xx, **p, alpha=0.8),
                                         x, lp)
        out_r, _, g_r = forward_backward(lambda xx, **p: reference.low_rank(xx, **p, alpha=0.8),
                                         x, lp)
        assert_rel_close("low_rank out", out_c, out_r, 1e-12)
        assert set(g_c) == set(g_r)
        for k in g_r:
            assert_rel_close(f"low_rank grad {k}", g_c[k], g_r[k], 1e-12)
        torch.library.opcheck(torch.ops.heba.cuda_low_rank_fwd.default,
                              tuple(_leaf(a) for a in (x, *lp.values(), 0.8)))


@requires_ext
def test_stand_ins_notice_wrong_saved_tensors(cpu_stand_ins):
    """The stand-ins themselves fail on a wrong intermediate or a wrong scale."""
    from heba_kernels import cuda_ops
    D, P, H, W, d = 12, 1, 3, 2, torch.float64
    x = tokens(2, P + H * W, D, dtype=d)
    vp = visual_params(D, dtype=d)
    out, u, g, z, mean, rstd = torch.ops.heba.cuda_visual_fwd(x, *vp.values(), 0.5, None, P, H,
                                                              W, True, 1e-5, True)
    wv = (vp["down_weight"], vp["mid_weight"], vp["up_weight"], vp["norm_weight"])
    ok = (torch.randn_like(out), x, *wv, u, g, z, mean, rstd)
    torch.ops.heba.cuda_visual_bwd(*ok, 0.5, None, P, H, W, True, True)
    with pytest.raises(AssertionError, match="saved z"):
        torch.ops.heba.cuda_visual_bwd(*ok[:8], z + 1e-3, mean, rstd, 0.5, None, P, H, W, True,
                                       True)
    with pytest.raises(AssertionError, match="scale"):
        torch.ops.heba.cuda_visual_bwd(*ok, 0.0, torch.tensor(0.25), P, H, W, True, True)
    with pytest.raises(AssertionError, match="match no forward"):
        torch.ops.heba.cuda_visual_bwd(ok[0], out, *ok[2:], 0.5, None, P, H, W, True, True)
    assert cuda_ops._scale_args(0.25) == (0.25, None)


@requires_ext
def test_glue_compiles_fullgraph_on_cpu_stand_ins(cpu_stand_ins):
    from heba_kernels import cuda_ops
    torch._dynamo.reset()
    D, d = 12, torch.float64
    vp, tp, lp = visual_params(D, dtype=d), text_params(D, dtype=d), low_rank_params(D, 4, dtype=d)

    def f(x, s, vp, tp, lp):
        y = cuda_ops.heba_visual(x, **vp, scale=s, num_prefix_tokens=1, grid=(3, 5),
                                 batch_first=True, eps=1e-5, rescale_param_grad=True)
        y = cuda_ops.heba_text(y, **tp, scale=s, eps=1e-5, rescale_param_grad=False)
        return cuda_ops.low_rank(y, **lp, alpha=0.5)

    x = tokens(2, 16, D, dtype=d)
    params = {**{f"v.{k}": v for k, v in vp.items()}, **{f"t.{k}": v for k, v in tp.items()},
              **{f"l.{k}": v for k, v in lp.items()}}

    def run(fn, s):
        def call(xx, **p):
            split = {pre: {k[2:]: v for k, v in p.items() if k.startswith(pre)} for pre in "vtl"}
            return fn(xx, s, split["v"], split["t"], split["l"])
        return forward_backward(call, x, params)

    out_e, _, g_e = run(f, 0.375)
    compiled = torch.compile(f, fullgraph=True)
    for s in (0.375, torch.tensor(0.375), torch.tensor(0.375)):  # float, tensor, a new tensor
        out_c, _, g_c = run(compiled, s)
        torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
        for k in g_e:
            torch.testing.assert_close(g_c[k], g_e[k], rtol=0, atol=0)


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
    monkeypatch.setattr(backends.registry, "cuda_state", lambda: (False, why))
    monkeypatch.setattr(backends.registry, "fns",
                        {k: v for k, v in backends.registry.fns.items() if k[0] != "cuda"})
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
        torch.ops.heba.cuda_visual_fwd(x, *p.values(), 0.5, None, 1, 3, 4, True, 1e-5, True)
    with pytest.raises(RuntimeError, match="scale_t must be a 0-d float32"):
        torch.ops.heba.cuda_visual_fwd(x, *p.values(), 0.5, torch.ones(1, device="cuda"), 0, 2,
                                       5, True, 1e-5, True)
    with pytest.raises(RuntimeError, match="scale_t must be a CUDA tensor"):
        torch.ops.heba.cuda_text_fwd(x, *text_params(16, device="cuda").values(), 0.5,
                                     torch.tensor(0.5), 1e-5, True)
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


# ---------------------------------------------------------------------------
# GPU: a tensor scale equals the float scale bitwise
# ---------------------------------------------------------------------------

@requires_gpu
@requires_ext
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64],
                         ids=[DTYPE_NAMES[d] for d in DTYPES + [torch.float64]])
@pytest.mark.parametrize("rescale", [True, False], ids=["rule", "plaingrad"])
def test_tensor_scale_equals_float_scale_bitwise(dtype, rescale):
    """scale as a 0-d float32 CUDA tensor (read by the kernels) gives bitwise the
    float path's output and gradients (0.625 is exact in float32 and float64)."""
    from heba_kernels import cuda_ops
    D, P, H, W, B = 40, 1, 3, 5, 2
    cases = (
        ("visual", cuda_ops.heba_visual, tokens(B, P + H * W, D, device="cuda", dtype=dtype),
         visual_params(D, device="cuda", dtype=dtype),
         dict(num_prefix_tokens=P, grid=(H, W), batch_first=True, eps=1e-5)),
        ("visual-seqfirst", cuda_ops.heba_visual,
         tokens(P + H * W, B, D, device="cuda", dtype=dtype),
         visual_params(D, device="cuda", dtype=dtype),
         dict(num_prefix_tokens=P, grid=(H, W), batch_first=False, eps=1e-5)),
        ("text", cuda_ops.heba_text, tokens(3, 7, D, device="cuda", dtype=dtype),
         text_params(D, device="cuda", dtype=dtype), dict(eps=1e-5)),
    )
    for name, fn, x, params, kw in cases:
        runs = [forward_backward(lambda xx, **p: fn(xx, **p, scale=s, rescale_param_grad=rescale,
                                                    **kw), x, params)
                for s in (0.625, torch.tensor(0.625, device="cuda"))]
        (out_f, _, g_f), (out_t, _, g_t) = runs
        assert torch.equal(out_f, out_t), f"{name}: out differs between float and tensor scale"
        for k in g_f:
            assert torch.equal(g_f[k], g_t[k]), f"{name}: grad {k} differs"


# ---------------------------------------------------------------------------
# CPU: the kernels' index math through the compiled extension. csrc/stencil.h
# holds the row maps, the stencil's taps, its adjoint and the dWm chunking that
# the kernels call; the host probe heba::_cuda_stencil_host runs those same
# functions on float64 CPU tensors, checked here against torch's conv2d and its
# autograd.
# ---------------------------------------------------------------------------

def _logical_to_memory_rows(B, N, bn):
    """rows[b, n]: the memory row of token n of image b (batch-major or token-major)."""
    b, n = torch.meshgrid(torch.arange(B), torch.arange(N), indexing="ij")
    return b * N + n if bn else n * B + b


@requires_ext
@pytest.mark.parametrize("B,H,W,P,bn", [(2, 3, 5, 1, True), (3, 4, 4, 0, False),
                                        (1, 2, 7, 5, True), (2, 1, 9, 1, False),
                                        (3, 6, 1, 2, True), (2, 90, 3, 1, False),
                                        (1, 64, 80, 1, True)])
def test_stencil_index_math_of_the_extension(B, H, W, P, bn):
    """Forward stencil, adjoint and chunked dWm sums of csrc/stencil.h vs conv2d."""
    import heba_kernels._C  # noqa: F401
    N, C = P + H * W, 3
    g = torch.Generator().manual_seed(0)
    u = torch.randn(B * N, C, generator=g, dtype=torch.float64)      # rows in memory order
    wm = torch.randn(C, 9, generator=g, dtype=torch.float64)
    dv = torch.randn(B * N, C, generator=g, dtype=torch.float64)
    v, part, du = torch.ops.heba._cuda_stencil_host(u, wm, dv, B, N, P, H, W, bn)

    rows = _logical_to_memory_rows(B, N, bn)                          # [B, N]
    patch = rows[:, P:]                                               # [B, H*W]
    img = u[patch].permute(0, 2, 1).reshape(B, C, H, W).requires_grad_(True)
    w4 = wm.view(C, 1, 3, 3).clone().requires_grad_(True)
    ref = torch.nn.functional.conv2d(img, w4, padding=1, groups=C)
    torch.testing.assert_close(v[patch], ref.reshape(B, C, H * W).permute(0, 2, 1))
    ref.backward(dv[patch].permute(0, 2, 1).reshape(B, C, H, W))
    nchunks, chunk = torch.ops.heba._cuda_stencil_chunks(B * H * W)
    assert part.shape == (nchunks, C, 9)
    torch.testing.assert_close(part.sum(0).view(C, 1, 3, 3), w4.grad)
    torch.testing.assert_close(du[patch], img.grad.reshape(B, C, H * W).permute(0, 2, 1))
    prefix = rows[:, :P].reshape(-1)
    assert (v[prefix] == 0).all() and (du[prefix] == 0).all()


@requires_ext
def test_stencil_bwd_chunks_of_the_extension():
    """visual_stencil_bwd_chunks: 1..256 chunks (gridDim.y) of >= 1 position covering all."""
    import heba_kernels._C  # noqa: F401
    for npos in list(range(0, 300)) + [16383, 16384, 16385, 8 * 196, 1 << 20, (1 << 31) + 7]:
        n, chunk = torch.ops.heba._cuda_stencil_chunks(npos)
        assert 1 <= n <= 256 and chunk >= 1 and n * chunk >= npos, (npos, n, chunk)
        assert (n - 1) * chunk < max(npos, 1), (npos, n, chunk)   # no empty trailing chunk


# ---------------------------------------------------------------------------
# CPU, no extension needed: the glue against the C++ schemas, read from the sources
# ---------------------------------------------------------------------------

_SRC = __import__("pathlib").Path(__file__).resolve().parents[2]
# Call-site spellings of a schema argument (the same value under another name).
_ALIASES = {"xin": "x", "grid[0]": "grid_h", "grid[1]": "grid_w", "ctx.alpha": "alpha"}
_CASTS = {"float": "float", "int": "int", "bool": "bool"}


def _cpp_schemas():
    """``{name: FunctionSchema}`` of every ``m.def`` in csrc/ops.cpp."""
    import re
    src = (_SRC / "csrc" / "ops.cpp").read_text()
    block = src[src.index("TORCH_LIBRARY_FRAGMENT(heba, m)"):]
    out = {}
    for d in re.findall(r'm\.def\(\s*((?:"[^"]*"\s*)+)', block):
        schema = torch._C.parse_schema("heba::" + "".join(re.findall(r'"([^"]*)"', d)))
        out[schema.name.split("::")[1]] = schema
    return out


def _glue_tree():
    import ast
    return ast.parse((_SRC / "heba_kernels" / "cuda_ops.py").read_text())


def _call_args(call, fn, tree):
    """``[(name, cast)]`` of an ``_ops.<op>(...)`` call: names as the schema spells them,
    ``*_scale_args(s)`` as ``(scale, scale_t)``, ``*rest`` from the tuple in ``ctx.args``."""
    import ast
    out = []
    for a in call.args:
        if isinstance(a, ast.Starred) and isinstance(a.value, ast.Call):
            assert ast.unparse(a.value.func) == "_scale_args", ast.unparse(a)
            out += [("scale", "float"), ("scale_t", None)]
        elif isinstance(a, ast.Starred):        # scale, *rest = ctx.args
            setup = next(f for f in tree.body if isinstance(f, ast.FunctionDef)
                         and f.name == fn.name.replace("_backward", "_setup_context"))
            tup = next(s.value for s in ast.walk(setup) if isinstance(s, ast.Assign)
                       and ast.unparse(s.targets[0]) == "ctx.args")
            out += [(ast.unparse(e), None) for e in tup.elts[1:]]
        elif isinstance(a, ast.Call) and ast.unparse(a.func) in _CASTS:
            out.append((ast.unparse(a.args[0]), _CASTS[ast.unparse(a.func)]))
        else:
            out.append((ast.unparse(a), None))
    return [(_ALIASES.get(n, n), c) for n, c in out]


def test_glue_calls_match_the_cpp_schemas():
    """Every ``_ops.cuda_*`` call of heba_kernels/cuda_ops.py passes the arguments of
    csrc/ops.cpp's schema in its order, by name, a cast where it casts matching the
    schema's type; every fake has the schema's parameters; every setup context unpacks
    the forward's inputs in the schema's order."""
    import ast
    schemas, tree = _cpp_schemas(), _glue_tree()
    assert set(CUDA_OPS) <= set(schemas), sorted(schemas)
    seen = set()
    for fn in (f for f in tree.body if isinstance(f, ast.FunctionDef)):
        for call in (c for c in ast.walk(fn) if isinstance(c, ast.Call)
                     and ast.unparse(c.func).startswith("_ops.")):
            name = ast.unparse(call.func)[len("_ops."):]
            args = schemas[name].arguments
            got = _call_args(call, fn, tree)
            assert [n for n, _ in got] == [a.name for a in args], (name, got)
            for (n, cast), a in zip(got, args):
                assert cast is None or str(a.type) == cast, (name, n, cast, str(a.type))
            seen.add(name)
        for dec in fn.decorator_list:
            if isinstance(dec, ast.Call) and ast.unparse(dec.func).endswith("register_fake"):
                name = dec.args[0].value.split("::")[1]
                assert [p.arg for p in fn.args.args] == \
                    [a.name for a in schemas[name].arguments], name
                seen.add(name + " fake")
        if fn.name.endswith("_setup_context"):
            unpack = next(s for s in fn.body if isinstance(s, ast.Assign)
                          and ast.unparse(s.value) == "inputs")
            names = [ast.unparse(e).lstrip("_") for e in unpack.targets[0].elts]
            op = next(n for n in schemas if n.startswith("cuda_" + fn.name[1:-len(
                "_setup_context")]) and n.endswith("_fwd"))
            assert names == [a.name for a in schemas[op].arguments], (op, names)
            seen.add(op + " setup")
    assert {n for n in CUDA_OPS} <= seen and len(seen) == 3 * len(CUDA_OPS) - 3, sorted(seen)


def test_on_first_use_build_flags_are_setup_pys():
    """The compile flags of the on-first-use build (heba_kernels/_extension.py) are the ones
    setup.py builds with: setup.py takes them from there, by name, per compiler."""
    from heba_kernels import _extension
    src = (_SRC / "setup.py").read_text()
    assert '"cxx": list(EXT.CXX_FLAGS)' in src and '"nvcc": list(EXT.NVCC_FLAGS)' in src
    assert "EXT.DEFAULT_ARCH_LIST" in src and "EXT.source_files(CSRC)" in src
    jit = (_SRC / "heba_kernels" / "_extension.py").read_text()
    assert "extra_cflags=CXX_FLAGS" in jit and "extra_cuda_cflags=NVCC_FLAGS" in jit
    assert "-O3" in _extension.CXX_FLAGS and "-O3" in _extension.NVCC_FLAGS


def test_scale_reaches_the_schema_as_float_and_tensor():
    """heba.ops hands every fused backend a runtime.Scale: the glue turns it (and a plain
    float or 0-d tensor) into the schema's ``(float scale, Tensor? scale_t)``."""
    if not EXT_BUILT:
        pytest.skip(f"importing heba_kernels.cuda_ops builds the extension: {EXT_WHY}")
    from heba_kernels import cuda_ops
    from heba_kernels.runtime import Scale
    t = torch.tensor(0.25)
    assert cuda_ops._scale_args(Scale(0.5, None)) == (0.5, None)
    assert cuda_ops._scale_args(0.5) == (0.5, None)
    for s in (Scale(0.0, t), t):
        value, tensor = cuda_ops._scale_args(s)
        assert value == 0.0 and tensor is t


# ---------------------------------------------------------------------------
# CPU, extension built: heba::_cuda_launch_plan (host only), the launches an op
# call makes, against the rules csrc/README.md and csrc/launch_dims.h document,
# recomputed here.
# ---------------------------------------------------------------------------

def _cdiv(a, b):
    return -(-a // b)


def _elementwise(n, sms):
    """csrc/launch_dims.h elementwise_dims: 256 threads, up to 32 blocks per SM."""
    return (max(1, min(_cdiv(n, 256), 32 * sms)), 1, 1), (256, 1, 1)


def _ln(rows, D, blocks):
    return (blocks, 1, 1), (256 if D >= 2048 else 128, 1, 1)


def _casts(n, a, b):
    return [("cast", None, None)] if a != b else []


def _ln_blocks(rows, sms):
    return max(1, min(rows, 2 * sms))


def _ln_bwd_launches(rows, D, sms):
    """The kernel alone: gamma read in the weights' dtype, its partial sums its own."""
    return [("_residual_ln_bwd_kernel", *_ln(rows, D, _ln_blocks(rows, sms)))]


def _ln_fwd_launches(rows, D):
    return [("_residual_ln_fwd_kernel", *_ln(rows, D, min(rows, 1 << 20)))]


def _reduce(*columns):
    """The one reduction of every partial-sum buffer: 32 columns x 8 slot lanes a block."""
    return ("_reduce_partials_kernel", (_cdiv(sum(columns), 32), 1, 1), (32, 8, 1))


def _gemm(m, n, k):
    return ("gemm", (m, n, k), None)


def _expected_visual(bwd, B, N, D, h, H, W, xt, wt, sms):
    rows = B * N
    if not bwd:
        return (_casts(rows * D, xt, wt) + [_gemm(rows, h, D),
                ("_visual_stencil_kernel", *_elementwise(rows * h, sms)), _gemm(rows, D, h)]
                + _ln_fwd_launches(rows, D))
    nchunks, _ = torch.ops.heba._cuda_stencil_chunks(B * H * W)
    return (_ln_bwd_launches(rows, D, sms) + [_gemm(D, h, rows), _gemm(rows, h, D),
            ("_visual_stencil_bwd_kernel_dv", (_cdiv(h, 32), nchunks, 1), (32, 8, 1)),
            ("_visual_stencil_kernel[mirror]", *_elementwise(rows * h, sms))]
            + _casts(rows * D, xt, wt)
            + [_gemm(h, D, rows), _gemm(rows, D, h),
               ("_scaled_add_kernel", *_elementwise(rows * D, sms)), _reduce(D, D, 9 * h)])


def _expected_text(bwd, rows, D, h, xt, wt, sms):
    if not bwd:
        return (_casts(rows * D, xt, wt) + [_gemm(rows, h, D), ("gelu", None, None),
                _gemm(rows, D, h)] + _ln_fwd_launches(rows, D))
    return (_ln_bwd_launches(rows, D, sms) + [_gemm(D, h, rows), _gemm(rows, h, D),
            ("gelu_backward", None, None)] + _casts(rows * D, xt, wt)
            + [_gemm(h, D, rows), _gemm(rows, D, h),
               ("_scaled_add_kernel", *_elementwise(rows * D, sms)), _reduce(D, D)])


def _expected_low_rank(bwd, M, D, R, xt, wt, sms, bias):
    if not bwd and R <= 64 and xt != torch.float64:
        return [("_low_rank_fwd_kernel", (_cdiv(M, 32), 1, 1), (256, 1, 1))]
    head = _casts(M * D, xt, wt) + [_gemm(M, R, D)]
    if not bwd:
        return head + [("gelu", None, None), _gemm(M, D, R), ("add", None, None)]
    # alpha in the GEMMs (no scaled copy of grad); the bias gradients two GEMVs on ones
    sums = [("fill", None, None), _gemm(D, 1, M), _gemm(R, 1, M)] if bias else []
    return (head + _casts(M * D, xt, wt) + [
        _gemm(M, R, D), ("_low_rank_bwd_kernel_gelu", *_elementwise(M * R, sms)),
        _gemm(D, R, M), _gemm(R, D, M)] + sums + [_gemm(M, D, R), ("add", None, None)])


def _plan(op, bwd, shape, hidden, xt, wt, P=0, grid=(), bias=False, sms=132):
    """[(kernel, grid or (m, n, k) for a GEMM or None, block or None)], and the raw answer."""
    names, dtypes, f = torch.ops.heba._cuda_launch_plan(op, bwd, list(shape), hidden, xt, wt, P,
                                                        list(grid), bias, sms)
    assert len(f) == 13 * len(names) and len(dtypes) == len(names)
    out = []
    for i, name in enumerate(names):
        v = f[13 * i:13 * i + 13]
        if name == "gemm":
            out.append((name, tuple(v[6:9]), None))
        elif name.startswith("_"):
            out.append((name, tuple(v[0:3]), tuple(v[3:6])))
        else:
            assert v[0:9] == [0] * 9, (name, v)      # ATen's own grid
            out.append((name, None, None))
    return out, (names, dtypes, f)


DT = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "f64": torch.float64}
PAIRS = [("bf16", "bf16"), ("f32", "bf16"), ("f32", "f32"), ("f64", "f64")]


@requires_ext
@pytest.mark.parametrize("xt,wt", PAIRS, ids=[f"x{a}-w{b}" for a, b in PAIRS])
@pytest.mark.parametrize("bwd", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("B,N,D,P,H,W,sms", [(2, 17, 40, 1, 4, 4, 3), (3, 46, 2048, 1, 5, 9, 132),
                                             (256, 197, 768, 1, 14, 14, 132),
                                             (5, 13, 24, 4, 3, 3, 1)],
                         ids=["B2-N17-D40-sms3", "B3-N46-D2048", "B256-N197-D768",
                              "B5-N13-D24-P4-sms1"])
def test_launch_plan_of_heba_ops(B, N, D, P, H, W, sms, bwd, xt, wt):
    """The visual and text ops' launches: order, grids and GEMM shapes as ops.cpp makes them."""
    import heba_kernels._C  # noqa: F401
    xt, wt, h = DT[xt], DT[wt], max(1, D // 4)
    got, _ = _plan("heba_visual", bwd, (B, N, D), h, xt, wt, P, (H, W), sms=sms)
    assert got == _expected_visual(bwd, B, N, D, h, H, W, xt, wt, sms)
    got, _ = _plan("heba_text", bwd, (B, N, D), h, xt, wt, sms=sms)
    assert got == _expected_text(bwd, B * N, D, h, xt, wt, sms)


@requires_ext
@pytest.mark.parametrize("xt,wt", PAIRS, ids=[f"x{a}-w{b}" for a, b in PAIRS])
@pytest.mark.parametrize("bwd", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("M,D,R", [(2 * 9, 32, 16), (7, 33, 64), (100, 768, 65), (3, 5, 1)])
def test_launch_plan_of_low_rank(M, D, R, bwd, xt, wt):
    import heba_kernels._C  # noqa: F401
    xt, wt = DT[xt], DT[wt]
    for sms, bias in ((132, True), (5, False)):
        got, (_, _, f) = _plan("low_rank", bwd, (M, D), R, xt, wt, bias=bias, sms=sms)
        assert got == _expected_low_rank(bwd, M, D, R, xt, wt, sms, bias)
        if not bwd and got[0][0] == "gemm":          # a bias is one more [R] read
            nobias = _plan("low_rank", bwd, (M, D), R, xt, wt, bias=not bias, sms=sms)[1][2]
            assert (f[10] - nobias[10]) * (1 if bias else -1) == R * wt.itemsize


@requires_ext
def test_launch_plan_bytes_and_flops():
    """GEMM bytes and FLOPs from m, n, k; the stencil backward's chunks are
    _cuda_stencil_chunks'; every launch moves bytes; heba kernels in the weights' dtype."""
    import heba_kernels._C  # noqa: F401
    B, N, D, h, H, W = 3, 26, 48, 12, 5, 5
    for bwd in (False, True):
        got, (names, dtypes, f) = _plan("heba_visual", bwd, (B, N, D), h, torch.float32,
                                        torch.bfloat16, 1, (H, W), sms=7)
        for i, name in enumerate(names):
            v = f[13 * i:13 * i + 13]
            assert v[11] > 0, name                    # everything writes something
            if name == "gemm":
                m, n, k = v[6:9]
                assert dtypes[i] == "BFloat16" and v[12] == 2 * m * n * k and v[9] == m * n
                assert v[10] in ((m * k + k * n) * 2, (m * k + k * n + m * n) * 2)
                assert v[11] == m * n * 2
            elif name.startswith("_"):
                assert dtypes[i] == "BFloat16"
        if bwd:
            nchunks, _ = torch.ops.heba._cuda_stencil_chunks(B * H * W)
            dv = names.index("_visual_stencil_bwd_kernel_dv")
            assert f[13 * dv + 1] == nchunks
            assert f[13 * dv + 11] == (B * H * W * h + nchunks * h * 9) * 4   # dv, dWm part
            # the one reduction reads every partial slot (float32) and writes the three
            # gradients in bf16; the LayerNorm kernel wrote its slots
            blocks = _ln_blocks(B * N, 7)
            assert names[-1] == "_reduce_partials_kernel"
            assert f[13 * (len(names) - 1) + 10] == (2 * blocks * D + nchunks * h * 9) * 4
            assert f[13 * (len(names) - 1) + 11] == (2 * D + 9 * h) * 2
            ln = names.index("_residual_ln_bwd_kernel")
            assert f[13 * ln + 11] == B * N * D * 2 + 2 * blocks * D * 4


@requires_ext
@pytest.mark.parametrize("kwargs,match", [
    (dict(op="conv"), "op must be heba_visual, heba_text or low_rank, got conv"),
    (dict(x_shape=[2, 0, 8]), "x_shape must list positive sizes"),
    (dict(grid=[3, 3]), "expected num_prefix_tokens \\+ H\\*W = 1 \\+ 3\\*3"),
    (dict(sms=0), "sms must be a positive SM count, got 0"),
    (dict(x_dtype=torch.bfloat16, w_dtype=torch.float32), "unsupported dtypes"),
    (dict(hidden=0), "hidden must be >= 1, got 0"),
])
def test_launch_plan_bad_input_is_one_line(kwargs, match):
    import heba_kernels._C  # noqa: F401
    args = dict(op="heba_visual", backward=False, x_shape=[2, 17, 8], hidden=2,
                x_dtype=torch.float32, w_dtype=torch.float32, num_prefix_tokens=1, grid=[4, 4],
                bias=False, sms=132)
    args.update(kwargs)
    with pytest.raises(RuntimeError, match=match) as info:
        torch.ops.heba._cuda_launch_plan(**args)
    assert "heba::_cuda_launch_plan" in str(info.value).splitlines()[0]
