"""The reference backend against an independent float64 computation written another way.

The independent version uses explicit index shifts for the 3x3 stencil, matmuls
for the 1x1 convolutions, the erf formula for GELU and a hand-written
LayerNorm, so a shared mistake with the conv2d-based reference is unlikely.
"""

import math

import pytest
import torch

import heba.nn
from heba import ops
from tests.helpers import (TOL, assert_rel_close, forward_backward, low_rank_params, text_params,
                           tokens, visual_params)

torch.set_default_dtype(torch.float32)


def _gelu(v):
    return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))


def _layer_norm(z, w, b, eps):
    mu = z.mean(-1, keepdim=True)
    var = ((z - mu) ** 2).mean(-1, keepdim=True)
    return (z - mu) / torch.sqrt(var + eps) * w + b


def _stencil_by_shifts(u, H, W, k):
    """u: [B, H*W, h] tokens; k: [h, 3, 3]. Zero-padded 3x3 depthwise cross-correlation."""
    B, _, h = u.shape
    img = u.reshape(B, H, W, h)
    out = torch.zeros_like(img)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            shifted = torch.zeros_like(img)
            # shifted[i, j] = img[i + di, j + dj] where in range
            i0, i1 = max(0, -di), min(H, H - di)
            j0, j1 = max(0, -dj), min(W, W - dj)
            shifted[:, i0:i1, j0:j1] = img[:, i0 + di:i1 + di, j0 + dj:j1 + dj]
            out = out + shifted * k[:, di + 1, dj + 1]
    return out.reshape(B, H * W, h)


def independent_visual(x, p, scale, P, H, W, eps, batch_first=True):
    xb = x if batch_first else x.transpose(0, 1)
    t = xb[:, P:]
    u = t @ p["down_weight"].flatten(1).T
    v = _stencil_by_shifts(u, H, W, p["mid_weight"][:, 0])
    z = _gelu(v) @ p["up_weight"].flatten(1).T
    out = torch.cat([xb[:, :P], t + scale * _layer_norm(t + z, p["norm_weight"], p["norm_bias"],
                                                         eps)], 1)
    return out if batch_first else out.transpose(0, 1)


def independent_text(x, p, scale, eps):
    z = _gelu(x @ p["down_weight"].T) @ p["up_weight"].T
    return x + scale * _layer_norm(x + z, p["norm_weight"], p["norm_bias"], eps)


def independent_low_rank(x, p, alpha):
    u = x @ p["down_weight"].T + (p["down_bias"] if p["down_bias"] is not None else 0)
    z = _gelu(u) @ p["up_weight"].T + (p["up_bias"] if p["up_bias"] is not None else 0)
    return x + alpha * z


def _param_grad_rule(grads, scale):
    """docs/semantics.md: parameter gradients are the true gradient divided by scale."""
    return {k: (g if k == "x" else g / scale) for k, g in grads.items()}


VISUAL_CASES = [  # B, P, H, W, D, batch_first
    (2, 1, 4, 4, 16, True),
    (3, 0, 3, 5, 24, True),
    (1, 5, 1, 7, 8, False),
    (2, 2, 6, 2, 40, False),
]


@pytest.mark.parametrize("B,P,H,W,D,batch_first", VISUAL_CASES,
                         ids=[f"B{c[0]}-P{c[1]}-H{c[2]}-W{c[3]}-D{c[4]}-{'bf' if c[5] else 'sf'}"
                              for c in VISUAL_CASES])
def test_visual_matches_independent_float64(B, P, H, W, D, batch_first):
    scale, eps = 0.3, 1e-5
    p = visual_params(D, dtype=torch.float64, seed=B + D)
    shape = (B, P + H * W, D) if batch_first else (P + H * W, B, D)
    x = tokens(*shape, dtype=torch.float64, seed=H)
    grid = (H, W) if H != W else None

    def ours(xx, **pp):
        return ops.heba_visual(xx, **pp, scale=scale, num_prefix_tokens=P, grid=grid,
                               batch_first=batch_first, eps=eps, backend="reference")

    def theirs(xx, **pp):
        return independent_visual(xx, pp, scale, P, H, W, eps, batch_first)

    out, g, grads = forward_backward(ours, x, p)
    rout, _, rgrads = forward_backward(theirs, x, p, grad_out=g)
    assert_rel_close("out", out, rout, 1e-12)
    for k, rg in _param_grad_rule(rgrads, scale).items():
        assert_rel_close(f"grad {k}", grads[k], rg, 1e-12)


@pytest.mark.parametrize("shape", [(2, 7, 32), (5, 3, 3, 12)], ids=["B2-N7-D32", "4d-D12"])
def test_text_matches_independent_float64(shape):
    scale, eps = 0.7, 1e-5
    D = shape[-1]
    p = text_params(D, dtype=torch.float64, seed=D)
    x = tokens(*shape, dtype=torch.float64)
    out, g, grads = forward_backward(
        lambda xx, **pp: ops.heba_text(xx, **pp, scale=scale, eps=eps, backend="reference"), x, p)
    rout, _, rgrads = forward_backward(
        lambda xx, **pp: independent_text(xx, pp, scale, eps), x, p, grad_out=g)
    assert_rel_close("out", out, rout, 1e-12)
    for k, rg in _param_grad_rule(rgrads, scale).items():
        assert_rel_close(f"grad {k}", grads[k], rg, 1e-12)


@pytest.mark.parametrize("shape,rank,bias", [((2, 9, 24), 4, True), ((17, 24), 1, False),
                                             ((2, 3, 4, 40), 16, True)],
                         ids=["B2-N9-D24-r4", "M17-D24-r1-nobias", "4d-D40-r16"])
def test_low_rank_matches_independent_float64(shape, rank, bias):
    alpha = 0.8
    p = low_rank_params(shape[-1], rank, dtype=torch.float64, bias=bias)
    x = tokens(*shape, dtype=torch.float64)
    out, g, grads = forward_backward(
        lambda xx, **pp: ops.low_rank(xx, **pp, alpha=alpha, backend="reference"), x, p)
    rout, _, rgrads = forward_backward(
        lambda xx, **pp: independent_low_rank(xx, pp, alpha), x, p, grad_out=g)
    assert_rel_close("out", out, rout, 1e-12)
    for k, rg in rgrads.items():
        assert_rel_close(f"grad {k}", grads[k], rg, 1e-12)


@pytest.mark.parametrize("modality", ["visual", "text"])
def test_rescale_param_grad_false_gives_plain_gradients(modality):
    scale, D = 0.05, 16
    x = tokens(2, 1 + 9, D, dtype=torch.float64)
    if modality == "visual":
        p = visual_params(D, dtype=torch.float64)
        theirs = lambda xx, **pp: independent_visual(xx, pp, scale, 1, 3, 3, 1e-5)  # noqa: E731
        ours = lambda xx, **pp: ops.heba_visual(xx, **pp, scale=scale,  # noqa: E731
                                                rescale_param_grad=False)
    else:
        p = text_params(D, dtype=torch.float64)
        theirs = lambda xx, **pp: independent_text(xx, pp, scale, 1e-5)  # noqa: E731
        ours = lambda xx, **pp: ops.heba_text(xx, **pp, scale=scale,  # noqa: E731
                                              rescale_param_grad=False)
    _, g, grads = forward_backward(ours, x, p)
    _, _, rgrads = forward_backward(theirs, x, p, grad_out=g)
    for k, rg in rgrads.items():
        assert_rel_close(f"grad {k}", grads[k], rg, 1e-12)


@pytest.mark.parametrize("modality", ["visual", "text"])
def test_scale_zero_is_identity_with_finite_param_grads(modality):
    """At scale 0 the output is x, dx is g, and parameter grads are those of scale 1."""
    D = 16
    x = tokens(2, 1 + 16, D, dtype=torch.float64)
    p = (visual_params if modality == "visual" else text_params)(D, dtype=torch.float64)
    op = ops.heba_visual if modality == "visual" else ops.heba_text
    out0, g, grads0 = forward_backward(lambda xx, **pp: op(xx, **pp, scale=0.0), x, p)
    _, _, grads1 = forward_backward(lambda xx, **pp: op(xx, **pp, scale=1.0), x, p, grad_out=g)
    assert torch.equal(out0, x)
    assert torch.equal(grads0["x"], g)
    for k in p:
        assert torch.isfinite(grads0[k]).all()
        assert grads0[k].abs().sum() > 0, k
        assert_rel_close(f"grad {k}", grads0[k], grads1[k], 1e-12)


def test_batch_first_and_seq_first_agree():
    D = 24
    a = heba.nn.HeBAAdapter(D, batch_first=True).double()
    b = heba.nn.HeBAAdapter(D, batch_first=False).double()
    b.load_state_dict(a.state_dict())
    x = tokens(3, 1 + 25, D, dtype=torch.float64)
    xs = x.transpose(0, 1).contiguous().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    ya, yb = a(xb, scale=0.1), b(xs, scale=0.1)
    assert_rel_close("out", yb.transpose(0, 1), ya, 1e-14)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g.transpose(0, 1))
    assert_rel_close("grad x", xs.grad.transpose(0, 1), xb.grad, 1e-13)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert_rel_close(f"grad {n}", pb.grad, pa.grad, 1e-13)


@pytest.mark.parametrize("P", [1, 4])
def test_prefix_tokens_pass_through_untouched(P):
    D = 16
    a = heba.nn.HeBAAdapter(D, num_prefix_tokens=P, grid=(3, 4))
    nn_init_nonzero(a)
    x = tokens(2, P + 12, D).requires_grad_(True)
    y = a(x, scale=0.5)
    assert torch.equal(y[:, :P], x[:, :P])
    assert not torch.allclose(y[:, P:], x[:, P:])
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad[:, :P], g[:, :P])


def nn_init_nonzero(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


def test_non_contiguous_inputs_work():
    D = 16
    a = heba.nn.HeBAAdapter(D).double()
    base = tokens(2, 17, 2 * D, dtype=torch.float64)
    x = base[..., ::2]                      # stride 2 in the last dimension
    assert not x.is_contiguous()
    assert_rel_close("out", a(x, scale=0.2), a(x.contiguous(), scale=0.2), 1e-15)
    t = heba.nn.HeBAAdapter(D, modality="text").double()
    assert_rel_close("out", t(x, scale=0.2), t(x.contiguous(), scale=0.2), 1e-15)
    l = heba.nn.LowRankAdapter(D, 4, init="small").double()
    assert_rel_close("out", l(x), l(x.contiguous()), 1e-15)


def test_zero_init_low_rank_is_exactly_identity_at_start():
    l = heba.nn.LowRankAdapter(48, rank=8)
    x = tokens(3, 11, 48).requires_grad_(True)
    y = l(x)
    assert torch.equal(y, x)
    y.backward(torch.randn_like(y))
    assert torch.count_nonzero(l.down.weight.grad) == 0    # nothing flows through a zero `up`
    assert torch.count_nonzero(l.down.bias.grad) == 0
    assert torch.count_nonzero(l.up.weight.grad) > 0
    assert torch.count_nonzero(l.up.bias.grad) > 0


def test_inits():
    torch.manual_seed(0)
    a = heba.nn.HeBAAdapter(768, modality="visual")
    # kaiming normal, fan_out of a [768, 192, 1, 1] conv = 768, relu gain sqrt(2)
    std = a.up.weight.std().item()
    assert abs(std - math.sqrt(2.0 / 768)) < 0.05 * math.sqrt(2.0 / 768)
    assert torch.equal(a.norm.weight, torch.ones(768)) and torch.equal(a.norm.bias, torch.zeros(768))
    z = heba.nn.HeBAAdapter(64, modality="text", init="zero")
    assert torch.count_nonzero(z.up.weight) == 0 and torch.count_nonzero(z.down.weight) > 0
    t = heba.nn.HeBAAdapter(512, modality="text")
    assert abs(t.up.weight.std().item() - math.sqrt(2.0 / 512)) < 0.05 * math.sqrt(2.0 / 512)
    l = heba.nn.LowRankAdapter(768, 64)
    bound = math.sqrt(6.0 / (768 + 64))
    assert l.down.weight.abs().max() <= bound and l.down.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(l.down.bias) == 0 and torch.count_nonzero(l.up.weight) == 0
    s = heba.nn.LowRankAdapter(768, 64, init="small")
    assert 0.5e-4 < s.up.weight.std().item() < 2e-4


def test_eps_is_used():
    D = 8
    x = tokens(1, 1 + 4, D, dtype=torch.float64) * 1e-3    # tiny variance: eps dominates
    outs = []
    for eps in (1e-5, 1e-1):
        a = heba.nn.HeBAAdapter(D, eps=eps).double()
        torch.manual_seed(0)
        a.load_state_dict({k: torch.randn_like(v) for k, v in a.state_dict().items()})
        outs.append(a(x))
    ref = independent_visual(x, {"down_weight": a.down.weight, "mid_weight": a.mid.weight,
                                 "up_weight": a.up.weight, "norm_weight": a.norm.weight,
                                 "norm_bias": a.norm.bias}, 1.0, 1, 2, 2, 1e-1)
    assert_rel_close("out eps=0.1", outs[1], ref, 1e-12)
    assert not torch.allclose(outs[0], outs[1])


EXPECTED_KEYS = {
    "visual": {"down.weight": (192, 768, 1, 1), "mid.weight": (192, 1, 3, 3),
               "up.weight": (768, 192, 1, 1), "norm.weight": (768,), "norm.bias": (768,)},
    "text": {"down.weight": (128, 512), "up.weight": (512, 128), "norm.weight": (512,),
             "norm.bias": (512,)},
}


@pytest.mark.parametrize("modality", ["visual", "text"])
def test_state_dict_keys_shapes_and_round_trip(modality, tmp_path):
    dim = 768 if modality == "visual" else 512
    a = heba.nn.HeBAAdapter(dim, modality=modality)
    sd = a.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == EXPECTED_KEYS[modality]
    # a checkpoint as the published code would write it loads strictly, on every backend
    published = {k: torch.randn(s) for k, s in EXPECTED_KEYS[modality].items()}
    torch.save(published, tmp_path / "a.pt")
    for backend in ("reference", "auto", "triton", "cuda"):
        b = heba.nn.HeBAAdapter(dim, modality=modality, backend=backend)
        b.load_state_dict(torch.load(tmp_path / "a.pt"), strict=True)
        for k, v in b.state_dict().items():
            assert torch.equal(v, published[k]), k


def test_low_rank_state_dict_round_trip():
    l = heba.nn.LowRankAdapter(768, 16, init="small")
    sd = l.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "down.weight": (16, 768), "down.bias": (16,), "up.weight": (768, 16), "up.bias": (768,)}
    m = heba.nn.LowRankAdapter(768, 16)
    m.load_state_dict(sd, strict=True)
    x = tokens(2, 5, 768)
    assert torch.equal(m(x), l(x))
    nb = heba.nn.LowRankAdapter(32, 4, bias=False)
    assert set(nb.state_dict()) == {"down.weight", "up.weight"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_reference_within_spec_tolerance(dtype):
    """The reference itself in low precision stays within SPEC tolerance of float64."""
    D = 32
    p = visual_params(D)
    x = tokens(2, 1 + 16, D)
    y = ops.heba_visual(x.to(dtype), **{k: v.to(dtype) for k, v in p.items()}, scale=0.5)
    assert y.dtype == dtype
    r = ops.heba_visual(x.double(), **{k: v.double() for k, v in p.items()}, scale=0.5)
    assert_rel_close("out", y, r, TOL[dtype])


def test_autocast_returns_x_dtype_within_bf16_tolerance():
    D = 32
    a = heba.nn.HeBAAdapter(D)
    nn_init_nonzero(a)
    x = tokens(2, 1 + 16, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = a(x, scale=0.5)
        yb = a(x.bfloat16(), scale=0.5)
    assert y.dtype == torch.float32 and yb.dtype == torch.bfloat16
    ref = a.double()(x.double(), scale=0.5)
    assert_rel_close("out fp32 x", y, ref, TOL[torch.bfloat16])
    assert_rel_close("out bf16 x", yb, ref, TOL[torch.bfloat16])


def test_torch_compile_fullgraph_reference():
    D = 16
    a = heba.nn.HeBAAdapter(D, backend="reference")
    l = heba.nn.LowRankAdapter(D, 4, init="small", backend="reference")
    t = heba.nn.HeBAAdapter(D, modality="text", backend="reference")

    def f(x):
        return l(t(a(x, scale=0.3), scale=0.2))

    x = tokens(2, 17, D)
    cf = torch.compile(f, fullgraph=True, backend="eager")
    assert_rel_close("out", cf(x), f(x), 1e-6)


@pytest.mark.parametrize("rescale", [True, False], ids=["rescale", "plain"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("modality", ["visual", "text"])
def test_tensor_scale_bitwise_equal_to_float(modality, dtype, rescale):
    """A 0-d tensor scale gives bitwise the float scale's output and gradients."""
    from tests.helpers import assert_tensor_scale_bitwise
    if modality == "visual":
        x, p, kw = tokens(2, 1 + 3 * 4, 24, dtype=dtype), visual_params(24, dtype=dtype), \
            dict(grid=(3, 4))
    else:
        x, p, kw = tokens(2, 5, 24, dtype=dtype), text_params(24, dtype=dtype), {}
    assert_tensor_scale_bitwise(f"heba_{modality}", "reference", x, p, 0.6875,
                                rescale_param_grad=rescale, **kw)


def test_tensor_scale_no_grad_and_compiles_fullgraph():
    """No gradient flows into a tensor scale; torch.compile traces it in one graph and the
    compiled module reads the tensor's current value on every call."""
    torch._dynamo.reset()
    a = heba.nn.HeBAAdapter(16, modality="visual")
    x = tokens(2, 1 + 3 * 3, 16)
    s = torch.tensor(0.5, requires_grad=True)
    a(x.requires_grad_(True), scale=s).sum().backward()
    assert s.grad is None and x.grad is not None
    compiled = torch.compile(a, fullgraph=True, backend="eager")
    s = torch.tensor(0.5)
    with torch.no_grad():
        first = compiled(x, scale=s)
        s.fill_(0.25)
        second = compiled(x, scale=s)
        assert torch.equal(first, a(x, scale=0.5)) and torch.equal(second, a(x, scale=0.25))


@pytest.mark.parametrize("modality", ["visual", "text"])
def test_compile_fullgraph_with_a_changing_float_scale(modality):
    """A float scale that changes between calls (slow-fast) becomes symbolic under
    torch.compile after the first recompile; validation must not break the graph."""
    torch._dynamo.reset()
    a = heba.nn.HeBAAdapter(16, modality=modality, backend="reference")
    compiled = torch.compile(a, fullgraph=True, backend="eager")
    x = torch.randn(2, 1 + 3 * 3, 16)
    for scale in (0.025, 0.05625, 0.0125):
        torch.testing.assert_close(compiled(x, scale=scale), a(x, scale=scale))
    torch._dynamo.reset()
