"""heba.ops: the public functions' contract on every fused backend, against the reference."""

import pytest
import torch

from heba import ops
from tests.helpers import TOL, assert_rel_close, forward_backward, requires_gpu

_FUSED = [pytest.param("triton", id="triton"),
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
