"""The benchmark baselines compute what the reference computes (values and gradients)."""

import pytest
import torch

from benchmarks.baselines import heba_visual_channels_last
from heba import ops
from tests.helpers import assert_rel_close, forward_backward, tokens, visual_params


@pytest.mark.parametrize("P,H,W", [(1, 4, 4), (0, 3, 5), (3, 2, 6)])
def test_channels_last_baseline_matches_reference(P, H, W):
    D = 24
    p = visual_params(D, dtype=torch.float64)
    x = tokens(2, P + H * W, D, dtype=torch.float64)
    kw = dict(scale=0.3, num_prefix_tokens=P, grid=(H, W))
    out, g, grads = forward_backward(lambda xx, **pp: heba_visual_channels_last(xx, **pp, **kw),
                                     x, p)
    rout, _, rgrads = forward_backward(
        lambda xx, **pp: ops.heba_visual(xx, **pp, **kw, backend="reference"), x, p, grad_out=g)
    assert_rel_close("out", out, rout, 1e-12)
    for k, rg in rgrads.items():
        assert_rel_close(f"grad {k}", grads[k], rg, 1e-12)
