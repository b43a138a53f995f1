"""The Triton HeBA text adapter against the float64 reference (docs/semantics.md section 1).

CPU runs go through Triton's interpreter (TRITON_INTERPRET=1) and use small,
odd shapes; the CLIP shapes run on a GPU only.
"""

import os

import pytest
import torch

import heba.nn
from heba import ops
from heba_kernels import runtime
from heba_kernels.heba_text import FUSED_DW_MAX_H, text_plan
from tests.helpers import (DTYPE_NAMES, TOL, assert_rel_close, check_against_reference,
                           forward_backward, gpu_plans_in_interpreter, requires_gpu,
                           requires_triton_cpu, sm90_compile_lines, text_params,
                           tokens)

pytestmark = requires_triton_cpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _id(shape, dtype, extra=""):
    return "-".join(f"{k}{v}" for k, v in zip("BNK", shape[:-1])) + f"-D{shape[-1]}" \
        + (f"-{extra}" if extra else "") + f"-{DTYPE_NAMES[dtype]}"


def _check(shape, dtype, reduction=4, scale=0.3, rescale_param_grad=True, eps=1e-5,
           offset=0.0, device=DEVICE, seed=0, **kw):
    D = shape[-1]
    x = tokens(*shape, device=device, dtype=dtype, seed=seed) + offset
    p = text_params(D, reduction, device=device, dtype=dtype, seed=seed)
    return check_against_reference("heba_text", "triton", x, p, scale=scale, eps=eps,
                                   rescale_param_grad=rescale_param_grad, **kw)


# ----------------------------------------------------------------------------- CPU-sized shapes

SMALL = [(2, 15, 72), (3, 11, 40), (1, 37, 100), (2, 3, 5, 24)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("shape", SMALL, ids=lambda s: _id(s, torch.float32)[:-5])
def test_matches_reference(shape, dtype):
    _check(shape, dtype)


@pytest.mark.skipif(not INTERPRET, reason="runs a GPU's launch plan in Triton's interpreter")
@pytest.mark.parametrize("shape", [(4, 40, 512), (2, 20, 2048)], ids=["D512", "D2048"])
def test_gpu_plan_in_the_interpreter(monkeypatch, shape):
    """The launch plan a GPU runs (its row blocks and tiles; at D512 the dx kernel summing
    every parameter gradient, at D2048 the wide hidden and split-K weight gradients), on
    4 SMs, run by the interpreter in float32: against the reference."""
    gpu_plans_in_interpreter(monkeypatch, sms=4)
    M, D = shape[0] * shape[1], shape[-1]
    bwd = text_plan(M, D, D // 4, torch.float32, 4, True, True)
    assert (bwd[0].step == "du") == (max(16, 1 << (D // 4 - 1).bit_length()) <= FUSED_DW_MAX_H)
    _check(shape, torch.float32, device="cpu", seed=D)


@pytest.mark.parametrize("reduction", [1, 3, 8], ids=lambda r: f"red{r}")
def test_hidden_widths(reduction):
    """h = D / reduction: 72 (padded to 128), 24, 9 (padded to 16)."""
    _check((2, 9, 72), torch.float32, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
def test_many_token_blocks(dtype):
    """Several programs, a ragged last block, several LayerNorm-partial rows."""
    _check((2, 77, 40), dtype, seed=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
def test_scale_zero(dtype):
    """scale = 0: out = x, dx = g, parameter gradients as if scale were 1 (finite, non-zero)."""
    out, grads = _check((2, 13, 72), dtype, scale=0.0)
    for name in ("down_weight", "up_weight", "norm_weight", "norm_bias"):
        assert grads[name].abs().sum() > 0, f"grad {name} vanished at scale=0"


@pytest.mark.parametrize("scale", [0.025, 2.25], ids=lambda s: f"scale{s}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
def test_plain_gradients(dtype, scale):
    """rescale_param_grad=False: plain autograd gradients (parameter grads times scale)."""
    _check((2, 13, 72), dtype, scale=scale, rescale_param_grad=False)


def test_eps_and_offset_rows():
    """Rows with a large mean (variance by chunk merging, not E[y^2] - E[y]^2) and another eps."""
    _check((2, 13, 100), torch.float32, eps=1e-3, offset=20.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
def test_non_contiguous_transposed(dtype):
    """[N, B, D] view of a [B, N, D] tensor (the kernel gets one contiguous copy)."""
    x = tokens(3, 11, 72, device=DEVICE, dtype=dtype).transpose(0, 1)
    assert not x.is_contiguous()
    p = text_params(72, device=DEVICE, dtype=dtype)
    check_against_reference("heba_text", "triton", x, p, scale=0.3, eps=1e-5,
                            rescale_param_grad=True)


def test_non_contiguous_row_stride():
    """Rows of a wider tensor: read in place through the row stride, no copy."""
    D = 40
    base = tokens(2, 9, 2 * D, device=DEVICE).requires_grad_(True)
    x = base[..., D:]
    assert x.reshape(-1, D).stride() == (2 * D, 1)
    p = text_params(D, device=DEVICE)
    kw = dict(scale=0.3, eps=1e-5, rescale_param_grad=True)
    g = tokens(2, 9, D, device=DEVICE, seed=7)
    out = ops.heba_text(x, **p, **kw, backend="triton")
    out.backward(g)
    base64 = base.detach().double().requires_grad_(True)
    ref = ops.heba_text(base64[..., D:], **{k: v.double() for k, v in p.items()}, **kw,
                        backend="reference")
    ref.backward(g.double())
    assert_rel_close("out", out, ref, TOL[torch.float32])
    assert_rel_close("grad x", base.grad, base64.grad, TOL[torch.float32])


def test_gradients_deterministic():
    """No atomic adds of values (the launches that sum partial slots count arrivals and sum
    in slot order, whoever arrives last): backward passes give bitwise identical gradients,
    two in the interpreter, ten on a GPU, where the programs arrive in any order."""
    x = tokens(2, 77, 72, device=DEVICE, dtype=torch.bfloat16)
    p = text_params(72, device=DEVICE, dtype=torch.bfloat16)

    def run(xx, **pp):
        return ops.heba_text(xx, **pp, scale=0.3, backend="triton")

    _, _, g1 = forward_backward(run, x, p)
    for _ in range(9 if x.is_cuda else 1):
        _, _, g2 = forward_backward(run, x, p)
        for k in g1:
            assert torch.equal(g1[k], g2[k]), f"grad {k} differs between two identical runs"


def _compiled_vs_reference(backend_kw, device, dim=40, shape=(2, 9), dtype=torch.float32):
    torch.manual_seed(0)
    ref = heba.nn.HeBAAdapter(dim, modality="text", backend="reference").to(device, dtype)
    with torch.no_grad():
        ref.norm.weight.add_(0.5 * torch.randn_like(ref.norm.weight))
        ref.norm.bias.add_(0.5 * torch.randn_like(ref.norm.bias))
    tri = heba.nn.HeBAAdapter(dim, modality="text", backend="triton").to(device, dtype)
    tri.load_state_dict(ref.state_dict())
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    backend_kw = {"backend": record} if backend_kw is None else backend_kw
    compiled = torch.compile(tri, fullgraph=True, **backend_kw)
    x = tokens(*shape, dim, device=device, dtype=dtype)
    g = tokens(*shape, dim, device=device, dtype=dtype, seed=9)
    xt = x.clone().requires_grad_(True)
    out = compiled(xt, scale=0.3)
    out.backward(g)
    x64 = x.double().requires_grad_(True)
    ref64 = ref.double()
    rout = ref64(x64, scale=0.3)
    rout.backward(g.double())
    tol = TOL[dtype]
    assert_rel_close("out", out, rout, tol)
    assert_rel_close("grad x", xt.grad, x64.grad, tol)
    for (name, pt), (_, pr) in zip(tri.named_parameters(), ref64.named_parameters()):
        assert_rel_close(f"grad {name}", pt.grad, pr.grad, tol)
    return graphs


def test_compile_fullgraph_no_graph_break():
    """torch.compile(fullgraph=True) traces the module in one graph that calls the custom op."""
    graphs = _compiled_vs_reference(None, DEVICE)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert any("triton_text_fwd" in t for t in targets), targets


def test_compile_inductor():
    """The default (inductor) backend, forward and backward through AOTAutograd and the fakes."""
    _compiled_vs_reference({}, DEVICE)


def test_float64_accepted_computed_in_float32():
    """One rule for the three Triton ops: float64 in, float32 accuracy, float64 out."""
    _check((2, 9, 40), torch.float64, tol=TOL[torch.float32])


@pytest.mark.parametrize("eps,dtype", [(1e-2, torch.float32), (1e-6, torch.float32),
                                       (1e-2, torch.bfloat16)],
                         ids=["1e-2-fp32", "1e-6-fp32", "1e-2-bf16"])
def test_eps_with_low_variance_rows(eps, dtype):
    """Rows of variance ~1e-4: a kernel that ignores eps or hard-codes 1e-5 fails."""
    x = (0.01 * tokens(2, 9, 40, device=DEVICE, seed=8)).to(dtype)
    p = text_params(40, device=DEVICE, seed=8)
    p["up_weight"] = p["up_weight"] * 0.01
    check_against_reference("heba_text", "triton", x, {k: v.to(dtype) for k, v in p.items()},
                            scale=0.7, eps=eps, rescale_param_grad=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DTYPE_NAMES.get)
def test_widest_register_block_batch1(dtype):
    """h = 512, the widest BLOCK_H of the register kernels (the CLIP text MLP adapter's
    h = 2048 / 4), forward and split-K backward; at D = 40: the block sizes depend on h
    only, and three D chunks (a ragged one) cost a tenth of the CLIP width's."""
    x = tokens(1, 5, 40, device=DEVICE, dtype=dtype)
    check_against_reference("heba_text", "triton", x, _params(40, 512, dtype), scale=0.025,
                            eps=1e-5, rescale_param_grad=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
def test_wide_hidden_backward_kernel(monkeypatch, dtype):
    """The backward for h > WIDE_H (the text MLP adapter of ViT-L and up, h >= 768) at a
    tiny size: threshold and h chunk lowered to 16, so h = 18 runs in two chunks (one
    ragged), two token blocks (a ragged one); the plain-gradient and tensor-scale paths."""
    import heba_kernels.heba_text as ht
    from tests.helpers import assert_tensor_scale_bitwise
    monkeypatch.setattr(ht, "WIDE_H", 16)
    monkeypatch.setattr(ht, "FUSED_DW_MAX_H", 8)
    monkeypatch.setattr(ht, "_WIDE_BLOCK_HC", 16)
    launched = []
    real = ht._heba_text_bwd_kernel_dx

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kw):
                launched.append(kw["WIDE"])
                return real[grid](*args, **kw)
            return run
    monkeypatch.setattr(ht, "_heba_text_bwd_kernel_dx", Spy())
    _check((2, 19, 72), dtype, scale=0.3, seed=5)
    _check((1, 9, 72), dtype, scale=0.025, rescale_param_grad=False, seed=6)
    assert launched and all(launched), "the wide variant did not run"
    x = tokens(1, 9, 72, device=DEVICE, dtype=dtype, seed=7)
    assert_tensor_scale_bitwise("heba_text", "triton", x,
                                text_params(72, device=DEVICE, dtype=dtype, seed=7), 0.6875)


# ----------------------------------------------------------------------------- the backward by h

FUSED = ["_heba_text_bwd_kernel_du", "_heba_text_bwd_kernel_dx_dw"]   # dx sums its slots
SPLIT_K = ["_heba_text_bwd_kernel_dx", "_atb_kernel"]   # dW pair, every sum in it


def _params(D, h, dtype=torch.float32, seed=0):
    """Fresh text weights with a bottleneck of any ``h`` (not only ``D / reduction``)."""
    g = torch.Generator().manual_seed(seed)
    p = dict(down_weight=torch.randn(h, D, generator=g) / D ** 0.5,
             up_weight=torch.randn(D, h, generator=g) / h ** 0.5,
             norm_weight=1.0 + 0.5 * torch.randn(D, generator=g),
             norm_bias=0.5 * torch.randn(D, generator=g))
    return {k: v.to(DEVICE, dtype) for k, v in p.items()}


def _backward_kernels(x, p, autocast_dtype=None, **kw):
    """Checks the op against the reference; returns the kernels its backward launched."""
    with runtime.record_launches() as rec:
        check_against_reference("heba_text", "triton", x, p, autocast_dtype=autocast_dtype,
                                **dict(dict(scale=0.3, eps=1e-5, rescale_param_grad=True), **kw))
    assert rec[0][0] == "_heba_text_fwd_kernel", rec
    return [name for name, _ in rec[1:]]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("h", [10, 24, 48], ids=lambda h: f"h{h}")
def test_fused_dw_backward(h, dtype):
    """h <= FUSED_DW_MAX_H: the dx kernel recomputes dy and sums dW_u, dW_d, dw and db.
    74 tokens: five row blocks of 16 over two row programs (a ragged last block); D = 72:
    three column chunks of 32 (a ragged one); non-power-of-two h padded to 16, 32, 64."""
    x = tokens(2, 37, 72, device=DEVICE, dtype=dtype, seed=h)
    assert _backward_kernels(x, _params(72, h, dtype, seed=h)) == FUSED


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
def test_fused_dw_plain_gradients_and_tensor_scale(dtype):
    """Plain gradients (parameter gradients times scale) on the fused path, and the scale
    as a 0-d tensor read by the kernels: bitwise the float scale's results, both rules."""
    from tests.helpers import assert_tensor_scale_bitwise
    x = tokens(3, 11, 40, device=DEVICE, dtype=dtype, seed=2)
    p = _params(40, 24, dtype, seed=2)
    assert _backward_kernels(x, p, scale=2.25, rescale_param_grad=False) == FUSED
    for rescale in (True, False):
        assert_tensor_scale_bitwise("heba_text", "triton", x, p, 0.6875, eps=1e-5,
                                    rescale_param_grad=rescale)


def test_fused_dw_autocast():
    """float32 tokens and weights under bfloat16 autocast: operands rounded to bfloat16 in
    the kernels, a and du kept in bfloat16, the gradients float32."""
    x = tokens(2, 19, 40, device=DEVICE, seed=4)
    assert _backward_kernels(x, _params(40, 10, seed=4),
                             autocast_dtype=torch.bfloat16) == FUSED


@pytest.mark.parametrize("h,dtype", [(128, torch.float32), (128, torch.bfloat16),
                                     (129, torch.float32)],
                         ids=["h128-fp32", "h128-bf16", "h129-fp32"])
def test_fused_dw_threshold(h, dtype):
    """h = FUSED_DW_MAX_H takes the fused backward at its widest tile; one more column
    (padded to 256) takes the split-K one. 19 tokens at D = 40."""
    from heba_kernels.heba_text import FUSED_DW_MAX_H
    assert FUSED_DW_MAX_H == 128
    x = tokens(1, 19, 40, device=DEVICE, dtype=dtype, seed=h)
    got = _backward_kernels(x, _params(40, h, dtype, seed=h), scale=0.7)
    assert got == (FUSED if h <= FUSED_DW_MAX_H else SPLIT_K), got


@pytest.mark.parametrize("gpu", [False, True], ids=["interpreter", "gpu"])
def test_plan_picks_fused_dw_up_to_threshold(gpu):
    """text_plan (what the launchers launch and the roofline models): the fused backward
    for every h up to FUSED_DW_MAX_H (ViT-B/16 text h = 128), split-K above (ViT-L/14
    h = 192); the fused dx kernel's programs: one wave on 132 SMs, the last of each D
    chunk's summing its slots (no reduction launch after it)."""
    from heba_kernels.heba_text import FUSED_DW_MAX_H, text_plan
    sms = 132 if gpu else 1
    for D, h in [(40, 1), (40, 10), (512, 128), (768, 192), (1024, 255), (64, 256),
                 (64, 257), (1024, 512), (2048, 768)]:
        for dt in (torch.bfloat16, torch.float32):
            plan = text_plan(512 * 77, D, h, dt, sms, gpu, backward=True)
            assert [st.kernel for st in plan] == (FUSED if h <= FUSED_DW_MAX_H else SPLIT_K)
            if h > FUSED_DW_MAX_H:
                continue
            n_s, n_d = plan[1].grid
            assert n_d * plan[1].meta["BLOCK_D"] >= D > (n_d - 1) * plan[1].meta["BLOCK_D"]
            assert plan[1].meta["BLOCK_H"] >= h and (n_s * n_d <= sms or n_s == 1 or not gpu)
            assert len(plan) == 2


@pytest.mark.slow
def test_fused_backward_compiles_for_sm90():
    """The interpreter never runs Triton's compiler: the fused backward's dx kernel, whose
    last program per D chunk sums the chunk's slots (an arrival counter, loads past L1),
    lowered to sm_90 cubins at every dtype (no GPU needed)."""
    lines = sm90_compile_lines("heba_text bwd dx_dw")
    assert lines and all(ln.startswith("ok") for ln in lines), lines


# ----------------------------------------------------------------------------- GPU

@requires_gpu
def test_compile_inductor_gpu():
    _compiled_vs_reference({}, "cuda", dim=512, shape=(4, 77), dtype=torch.bfloat16)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("dim", [512, 768, 1024, 2048], ids=lambda d: f"D{d}")
def test_gpu_widths(dim, dtype):
    _check((4, 77, dim), dtype, device="cuda")


@requires_gpu
@pytest.mark.parametrize("rescale", [True, False], ids=["rescaled", "plain"])
def test_gpu_clip_text_shape(rescale):
    """CLIP text tower: 512 prompts x 77 tokens x 512, bfloat16, HeBA's training scale."""
    _check((512, 77, 512), torch.bfloat16, device="cuda", scale=0.025,
           rescale_param_grad=rescale)


@requires_gpu
def test_gpu_clip_text_shape_fp32():
    """An fp32 copy of the CLIP text case: tight enough (1e-4) to see the GELU form."""
    _check((64, 77, 512), torch.float32, device="cuda", scale=0.025)


@requires_gpu
def test_gpu_clip_text_mlp_shape_autocast():
    """The MLP adapter width (4 * 512) under bfloat16 autocast."""
    _check((64, 77, 2048), torch.float32, device="cuda", autocast_dtype=torch.bfloat16)


@requires_gpu
def test_gpu_int64_offsets():
    """M * D > 2^31: rows past the int32 range are computed right (forward and dx)."""
    D = 512
    M = (2 ** 31) // D + 4096
    torch.manual_seed(0)
    x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    p = text_params(D, device="cuda", dtype=torch.bfloat16)
    out = ops.heba_text(x, **p, scale=0.3, backend="triton")
    g = torch.zeros_like(out)
    g[-4096:] = tokens(4096, D, device="cuda", dtype=torch.bfloat16, seed=4)
    out.backward(g)
    tail = x.detach()[-4096:].double().requires_grad_(True)
    ref = ops.heba_text(tail, **{k: v.double() for k, v in p.items()}, scale=0.3,
                        backend="reference")
    ref.backward(g[-4096:].double())
    assert_rel_close("out[-4096:]", out[-4096:], ref, TOL[torch.bfloat16])
    assert_rel_close("grad x[-4096:]", x.grad[-4096:], tail.grad, TOL[torch.bfloat16])
