"""The Triton AdapterTune low-rank residual against the float64 reference (docs/semantics.md section 2).

CPU runs go through Triton's interpreter (TRITON_INTERPRET=1) and use small,
odd shapes; the CLIP shapes run on a GPU only.
"""

import os

import pytest
import torch
import triton
import triton.language as tl

import heba.nn
import heba_kernels._triton_common as _tc
from heba import ops
from tests.helpers import (DTYPE_NAMES, TOL, assert_rel_close, check_against_reference,
                           forward_backward, gpu_plans_in_interpreter, low_rank_params,
                           requires_gpu, requires_triton_cpu, tokens)

pytestmark = requires_triton_cpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _shape_id(shape):
    return "x".join(map(str, shape[:-1])) + f"-D{shape[-1]}" if len(shape) > 1 \
        else f"D{shape[-1]}"


def _check(shape, rank, dtype, alpha=0.7, bias=True, device=DEVICE, seed=0, **kw):
    D = shape[-1]
    x = tokens(*shape, device=device, dtype=dtype, seed=seed)
    p = low_rank_params(D, rank, device=device, dtype=dtype, seed=seed, bias=bias)
    return check_against_reference("low_rank", "triton", x, p, alpha=alpha, **kw)


# ----------------------------------------------------------------------------- CPU-sized shapes

CASES = [((2, 15, 72), 4), ((3, 11, 40), 1), ((1, 37, 100), 16), ((2, 3, 5, 24), 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("shape,rank", CASES, ids=[f"{_shape_id(s)}-r{r}" for s, r in CASES])
def test_matches_reference(shape, rank, dtype):
    _check(shape, rank, dtype)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="runs a GPU's launch plan in Triton's interpreter")
@pytest.mark.parametrize("rank", [16, 64])
def test_gpu_plan_in_the_interpreter(monkeypatch, rank):
    """The launch plan a GPU runs (its row blocks, tiles and split-K weight gradients),
    on 4 SMs, run by the interpreter in float32: against the reference."""
    gpu_plans_in_interpreter(monkeypatch, sms=4)
    x = tokens(4, 40, 768, seed=rank)
    check_against_reference("low_rank", "triton", x, low_rank_params(768, rank, seed=rank))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("shape", [(72,), (150, 40)], ids=_shape_id)
def test_leading_shapes(shape, dtype):
    """A single token and a 2-D batch with several token blocks (ragged last block)."""
    _check(shape, 16, dtype, seed=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
def test_without_biases(dtype):
    _check((2, 13, 72), 4, dtype, bias=False)


@pytest.mark.parametrize("alpha", [0.0, 2.5], ids=lambda a: f"alpha{a}")
def test_alpha(alpha):
    out, grads = _check((2, 13, 40), 4, torch.float32, alpha=alpha)
    if alpha == 0.0:
        for name in ("down_weight", "down_bias", "up_weight", "up_bias"):
            assert torch.count_nonzero(grads[name]) == 0, f"grad {name} not zero at alpha=0"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("rank", [1, 16], ids=lambda r: f"r{r}")
def test_zero_init_start(rank, dtype):
    """up = 0 (init="zero"): out == x, down grads exactly 0, up grads right and non-zero."""
    D = 72
    x = tokens(2, 13, D, device=DEVICE, dtype=dtype)
    p = low_rank_params(D, rank, device=DEVICE, dtype=dtype)
    p["up_weight"] = torch.zeros_like(p["up_weight"])
    p["up_bias"] = torch.zeros_like(p["up_bias"])
    out, grads = check_against_reference("low_rank", "triton", x, p, alpha=1.0)
    assert torch.equal(out, x), "the zero-initialised adapter is not the identity"
    for name in ("down_weight", "down_bias"):
        assert torch.count_nonzero(grads[name]) == 0, f"grad {name} is not exactly zero"
    for name in ("up_weight", "up_bias"):
        assert torch.count_nonzero(grads[name]) > 0, f"grad {name} vanished"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
def test_non_contiguous_transposed(dtype):
    """[N, B, D] view of a [B, N, D] tensor (the kernel gets one contiguous copy)."""
    x = tokens(3, 11, 72, device=DEVICE, dtype=dtype).transpose(0, 1)
    assert not x.is_contiguous()
    p = low_rank_params(72, 4, device=DEVICE, dtype=dtype)
    check_against_reference("low_rank", "triton", x, p, alpha=0.7)


def test_non_contiguous_row_stride():
    """Rows of a wider tensor: read in place through the row stride, no copy."""
    D = 40
    base = tokens(2, 9, 2 * D, device=DEVICE).requires_grad_(True)
    x = base[..., :D]
    assert x.reshape(-1, D).stride() == (2 * D, 1)
    p = low_rank_params(D, 4, device=DEVICE)
    g = tokens(2, 9, D, device=DEVICE, seed=7)
    out = ops.low_rank(x, **p, alpha=0.7, backend="triton")
    out.backward(g)
    base64 = base.detach().double().requires_grad_(True)
    ref = ops.low_rank(base64[..., :D], **{k: v.double() for k, v in p.items()}, alpha=0.7,
                       backend="reference")
    ref.backward(g.double())
    assert_rel_close("out", out, ref, TOL[torch.float32])
    assert_rel_close("grad x", base.grad, base64.grad, TOL[torch.float32])


def test_gradients_deterministic():
    """No atomic adds of values (the launches that sum partial slots count arrivals and sum
    in slot order, whoever arrives last): backward passes give bitwise identical gradients,
    two in the interpreter, ten on a GPU, where the programs arrive in any order."""
    x = tokens(2, 77, 72, device=DEVICE, dtype=torch.bfloat16)
    p = low_rank_params(72, 16, device=DEVICE, dtype=torch.bfloat16)

    def run(xx, **pp):
        return ops.low_rank(xx, **pp, alpha=0.7, backend="triton")

    _, _, g1 = forward_backward(run, x, p)
    for _ in range(9 if x.is_cuda else 1):
        _, _, g2 = forward_backward(run, x, p)
        for k in g1:
            assert torch.equal(g1[k], g2[k]), f"grad {k} differs between two identical runs"


def _compiled_vs_reference(backend_kw, device, dim=40, rank=4, shape=(2, 9),
                           dtype=torch.float32):
    torch.manual_seed(0)
    ref = heba.nn.LowRankAdapter(dim, rank, alpha=0.7, init="small",
                                 backend="reference").to(device, dtype)
    with torch.no_grad():      # trained, non-zero weights: every term matters
        for prm in ref.parameters():
            prm.copy_(torch.randn_like(prm) / prm.shape[-1] ** 0.5)
    tri = heba.nn.LowRankAdapter(dim, rank, alpha=0.7, backend="triton").to(device, dtype)
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
    out = compiled(xt)
    out.backward(g)
    x64 = x.double().requires_grad_(True)
    ref64 = ref.double()
    rout = ref64(x64)
    rout.backward(g.double())
    tol = TOL[dtype]
    assert_rel_close("out", out, rout, tol)
    assert_rel_close("grad x", xt.grad, x64.grad, tol)
    for (name, pt), (_, pr) in zip(tri.named_parameters(), ref64.named_parameters()):
        assert_rel_close(f"grad {name}", pt.grad, pr.grad, tol)
    return graphs


def test_compile_inductor():
    """The default (inductor) backend, forward and backward through AOTAutograd and the fakes."""
    _compiled_vs_reference({}, DEVICE)


def test_float64_accepted_computed_in_float32():
    """One rule for the three Triton ops: float64 in, float32 accuracy, float64 out."""
    _check((2, 9, 40), 8, torch.float64, tol=TOL[torch.float32])


@triton.jit
def _apply_gelu(X, Y, DY, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(X + offs, mask=offs < N, other=0.0)
    tl.store(Y + offs, _tc._gelu(v), mask=offs < N)
    tl.store(DY + offs, _tc._gelu_grad(v), mask=offs < N)


def test_gelu_is_exact_erf_form():
    """The GELU of the text and low-rank kernels (heba_kernels._triton_common) against
    torch's exact GELU to 2e-6; tanh's is off by up to 5e-4 (float32 in every dtype)."""
    v = torch.linspace(-6, 6, 1001, device=DEVICE)
    y, dy = torch.empty_like(v), torch.empty_like(v)
    _apply_gelu[(1,)](v, y, dy, v.numel(), BLOCK=1024)
    vr = v.double().requires_grad_(True)
    ref = torch.nn.functional.gelu(vr)
    ref.sum().backward()
    assert (y.double() - ref.detach()).abs().max() < 2e-6
    assert (dy.double() - vr.grad).abs().max() < 2e-6
    assert (torch.nn.functional.gelu(vr.detach(), approximate="tanh") - ref).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DTYPE_NAMES.get)
def test_rank_256_batch1(dtype):
    """The highest rank the configs cover (BLOCK_R 256: smaller blocks), one image's tokens."""
    _check((1, 5, 512), 256, dtype)


# ----------------------------------------------------------------------------- GPU

@requires_gpu
def test_compile_inductor_gpu():
    _compiled_vs_reference({}, "cuda", dim=768, rank=16, shape=(4, 197), dtype=torch.bfloat16)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("rank", [1, 4, 16, 64, 256], ids=lambda r: f"r{r}")
@pytest.mark.parametrize("dim", [512, 768, 1024, 2048], ids=lambda d: f"D{d}")
def test_gpu_widths_and_ranks(dim, rank, dtype):
    _check((4, 197, dim), rank, dtype, device="cuda")


@requires_gpu
@pytest.mark.parametrize("rank", [16, 64], ids=lambda r: f"r{r}")
def test_gpu_clip_vit_shape(rank):
    """ViT-B/16 tokens: 256 images x 197 tokens x 768, bfloat16."""
    _check((256, 197, 768), rank, torch.bfloat16, device="cuda")


@requires_gpu
@pytest.mark.parametrize("rank", [16, 256], ids=lambda r: f"r{r}")
def test_gpu_zero_init_clip_shape(rank):
    x = tokens(64, 197, 768, device="cuda", dtype=torch.bfloat16)
    p = low_rank_params(768, rank, device="cuda", dtype=torch.bfloat16)
    p["up_weight"] = torch.zeros_like(p["up_weight"])
    p["up_bias"] = torch.zeros_like(p["up_bias"])
    out, grads = check_against_reference("low_rank", "triton", x, p, alpha=1.0)
    assert torch.equal(out, x)
    assert torch.count_nonzero(grads["down_weight"]) == 0
    assert torch.count_nonzero(grads["down_bias"]) == 0


@requires_gpu
def test_gpu_autocast_clip_shape():
    _check((64, 197, 768), 64, torch.float32, device="cuda", autocast_dtype=torch.bfloat16)


@requires_gpu
def test_gpu_int64_offsets():
    """M * D > 2^31: rows past the int32 range are computed right (forward and dx)."""
    D = 768
    M = (2 ** 31) // D + 4096
    torch.manual_seed(0)
    x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    p = low_rank_params(D, 16, device="cuda", dtype=torch.bfloat16)
    out = ops.low_rank(x, **p, alpha=0.7, backend="triton")
    g = torch.zeros_like(out)
    g[-4096:] = tokens(4096, D, device="cuda", dtype=torch.bfloat16, seed=4)
    out.backward(g)
    tail = x.detach()[-4096:].double().requires_grad_(True)
    ref = ops.low_rank(tail, **{k: v.double() for k, v in p.items()}, alpha=0.7,
                       backend="reference")
    ref.backward(g[-4096:].double())
    assert_rel_close("out[-4096:]", out[-4096:], ref, TOL[torch.bfloat16])
    assert_rel_close("grad x[-4096:]", x.grad[-4096:], tail.grad, TOL[torch.bfloat16])
