"""heba.ops: the public functions' contract on the fused backends, against the reference.

* Weight gradients accumulate in float32 on every fused backend (CPU: the Triton
  interpreter; the CUDA backend on a GPU).
* The fused backends (triton, cuda) captured in a CUDA graph, forward and
  backward (GPU only). For each fused backend and each op (HeBA visual, HeBA text, low-rank), one
  training-style step (the op's forward, then ``torch.autograd.grad`` of every
  input and parameter for a given incoming gradient) is captured in a
  ``torch.cuda.CUDAGraph`` with static input buffers and, for the HeBA ops, the
  scale as a 0-d float32 tensor on the GPU. The graph is then replayed several
  times after new values are copied into every buffer -- tokens, weights, the
  incoming gradient and the scale -- and each replay's output and every
  gradient is compared with an eager call of the same backend (a float scale)
  and with the float64 reference, at docs/semantics.md's tolerance for the dtype. A kernel
  that bakes the scale in at capture, or reads a buffer the graph does not own,
  fails here.

  GPU only (CUDA graphs need one): every test skips without a GPU or without the
  backend, saying which.
"""

from __future__ import annotations

import pytest
import torch

from heba import backends, ops
from tests.helpers import (DTYPE_NAMES, TOL, assert_rel_close, forward_backward,
                           low_rank_params, requires_gpu, requires_triton_cpu, text_params,
                           tokens, visual_params)

FUSED = ("triton", "cuda")


def _backend_param(name):
    ok, why = backends.backend_status(name, "cuda") if torch.cuda.is_available() else (True, "")
    return pytest.param(name, id=name, marks=pytest.mark.skipif(
        not ok, reason=f"backend {name!r} is not available here: {why}"))


BACKEND_PARAMS = [_backend_param(b) for b in FUSED]

# (dtype, rescale_param_grad): both gradient rules in fp32, the rule in bf16
RULES = [pytest.param(torch.float32, True, id="fp32-rule"),
         pytest.param(torch.float32, False, id="fp32-plaingrad"),
         pytest.param(torch.bfloat16, True, id="bf16-rule")]

SCALES = (0.025, 0.05625, 0.0, -0.3)  # first used at capture; the rest by replays


def _step(op, x, params, grad_out, **kw):
    """out = op(x, **params, **kw) and the gradients of x and every parameter."""
    out = op(x, **params, **kw)
    leaves = [x] + [p for p in params.values() if p is not None]
    return out, torch.autograd.grad(out, leaves, grad_out)


def _capture(fn):
    """Warm ``fn`` up on a side stream (Triton compiles, cuBLAS picks its
    algorithms), then capture it; returns (graph, its static outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        static = fn()
    return graph, static


def _fresh(t, seed):
    """New random values of t's shape and dtype (never zeros)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(t.shape, generator=g, dtype=torch.float32).to(t)


def _static_leaf(t):
    return t.detach().clone().requires_grad_(True)


def _check_replays(op_name, backend, x, params, scale_kw, **kw):
    """Capture one step of ``heba.ops.<op_name>`` on ``backend``, replay it with new
    inputs (and new scales when ``scale_kw``), compare with eager and the reference."""
    op = getattr(ops, op_name)
    dtype = x.dtype
    sx = _static_leaf(x)
    sp = {k: None if v is None else _static_leaf(v) for k, v in params.items()}
    sgrad = _fresh(x, 99)
    scale_t = torch.tensor(SCALES[0], dtype=torch.float32, device=x.device)
    extra = dict(scale=scale_t) if scale_kw else {}

    graph, (s_out, s_grads) = _capture(
        lambda: _step(op, sx, sp, sgrad, **extra, **kw, backend=backend))
    names = ["x"] + [k for k, v in sp.items() if v is not None]
    for replay, scale in enumerate(SCALES[1:] if scale_kw else (None, None), start=1):
        with torch.no_grad():
            sx.copy_(_fresh(sx, 10 * replay))
            for k, p in sp.items():
                if p is not None:
                    p.copy_(params[k] + 0.1 * _fresh(p, 10 * replay + 1))
            sgrad.copy_(_fresh(sgrad, 10 * replay + 2))
            if scale_kw:
                scale_t.fill_(scale)
        graph.replay()
        torch.cuda.synchronize()
        got = {"out": s_out.clone(), **{n: g.clone() for n, g in zip(names, s_grads)}}

        fkw = dict(scale=float(scale_t.item())) if scale_kw else {}
        current = {k: None if v is None else v.detach() for k, v in sp.items()}
        e_out, _, e_grads = forward_backward(
            lambda xx, **pp: op(xx, **pp, **fkw, **kw, backend=backend), sx.detach(), current,
            grad_out=sgrad)
        r_out, _, r_grads = forward_backward(
            lambda xx, **pp: op(xx, **pp, **fkw, **kw, backend="reference"),
            sx.detach().double(), {k: None if v is None else v.double()
                                   for k, v in current.items()}, grad_out=sgrad.double())
        where = f"{backend} {op_name} replay {replay}" + (f" scale={scale}" if scale_kw else "")
        for name, want_e, want_r in [("out", e_out, r_out)] + [
                (n, e_grads[n], r_grads[n]) for n in names]:
            assert got[name].dtype == want_e.dtype, f"{where}: {name} dtype"
            assert_rel_close(f"{where}: {name} vs eager", got[name], want_e, TOL[dtype])
            assert_rel_close(f"{where}: {name} vs reference", got[name], want_r, TOL[dtype])


@requires_gpu
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype,rescale", RULES)
@pytest.mark.parametrize("batch_first", [True, False], ids=["bnd", "seqfirst"])
def test_visual_graph_replays(backend, dtype, rescale, batch_first):
    B, P, H, W, D = 3, 1, 4, 5, 64                      # a non-square grid
    N = P + H * W
    x = tokens(*((B, N, D) if batch_first else (N, B, D)), device="cuda", dtype=dtype)
    _check_replays("heba_visual", backend, x, visual_params(D, device="cuda", dtype=dtype),
                   True, num_prefix_tokens=P, grid=(H, W), batch_first=batch_first,
                   rescale_param_grad=rescale)


@requires_gpu
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype,rescale", RULES)
def test_text_graph_replays(backend, dtype, rescale):
    x = tokens(4, 13, 96, device="cuda", dtype=dtype)
    _check_replays("heba_text", backend, x, text_params(96, device="cuda", dtype=dtype), True,
                   rescale_param_grad=rescale)


@requires_gpu
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                         ids=[DTYPE_NAMES[torch.float32], DTYPE_NAMES[torch.bfloat16]])
@pytest.mark.parametrize("rank", [8, 80], ids=["r8", "r80"])
def test_low_rank_graph_replays(backend, dtype, rank):
    """alpha is a constant of the adapter: replays change tokens, weights and gradient."""
    x = tokens(3, 50, 96, device="cuda", dtype=dtype)
    _check_replays("low_rank", backend, x,
                   low_rank_params(96, rank, device="cuda", dtype=dtype), False, alpha=0.7)


# ----------------------------------------------------------------------------- accumulation

_FUSED = [pytest.param("triton", id="triton", marks=requires_triton_cpu),
          pytest.param("cuda", id="cuda", marks=requires_gpu)]


def _device(backend):
    return "cuda" if backend == "cuda" or torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", _FUSED)
def test_weight_gradients_accumulate_in_float32(backend):
    """bfloat16 weights and tokens, 4096 tokens of positive terms: a weight gradient whose
    running sum over the token chunks were kept in bfloat16 (the sum rounded to 8 bits
    after every chunk: each added chunk loses up to half a bfloat16 ulp of the growing
    sum) misses the bfloat16 tolerance (relative error about 8e-2 against 2e-2 at this
    shape in the interpreter); float32 accumulation meets it."""
    dev, dt, D, r = _device(backend), torch.bfloat16, 16, 16
    g = torch.Generator().manual_seed(3)
    x = (0.5 + torch.rand(2, 2048, D, generator=g)).to(dev, dt)
    params = dict(down_weight=(0.1 + torch.rand(r, D, generator=g) / D).to(dev, dt),
                  down_bias=None,
                  up_weight=(torch.randn(D, r, generator=g) / r).to(dev, dt), up_bias=None)
    grad = (0.5 + torch.rand(x.shape, generator=g)).to(dev, dt)

    def run(xx, **pp):
        return ops.low_rank(xx, **pp, alpha=0.5, backend=backend)

    _, _, grads = forward_backward(run, x, params, grad_out=grad)
    p64 = {k: None if v is None else v.double() for k, v in params.items()}
    _, _, ref = forward_backward(lambda xx, **pp: ops.low_rank(xx, **pp, alpha=0.5,
                                                               backend="reference"),
                                 x.double(), p64, grad_out=grad.double())
    for k in ("up_weight", "down_weight"):
        assert_rel_close(f"grad {k}", grads[k], ref[k], TOL[dt])
