"""Baselines the benchmarks compare against, with the reference's exact semantics.

* ``published``: the reference run on seq-first ``[N, B, D]`` tokens, which is how
  the published HeBA code feeds its adapters (a transposed view, a prefix
  split, an NCHW copy, three convolutions, permutes back, a concatenation).
* ``channels_last``: the strongest eager form of the visual path we know:
  batch-first tokens viewed as a channels-last image, so that cuDNN runs the
  depthwise conv (in bf16 an NCHW depthwise conv takes PyTorch's slow native
  kernel). Checked against the reference in ``tests/benchmarks/test_baselines.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from heba_kernels.reference import _scaled_residual


def heba_visual_channels_last(x, down_weight, mid_weight, up_weight, norm_weight, norm_bias, *,
                              scale, num_prefix_tokens, grid, eps=1e-5, rescale_param_grad=True):
    """HeBA visual adapter on batch-first ``x`` ``[B, N, D]`` through channels-last convs."""
    H, W = grid
    P = num_prefix_tokens
    B, _, D = x.shape
    h = mid_weight.shape[0]
    prefix, t = x[:, :P], x[:, P:]                                  # [B, HW, D]
    cl = torch.channels_last
    wd, wm, wu = (w.contiguous(memory_format=cl) for w in (down_weight, mid_weight, up_weight))

    def adapter(t):
        img = t.reshape(B, H, W, D).permute(0, 3, 1, 2)            # NCHW shape, NHWC strides
        img = img.contiguous(memory_format=cl)                      # a no-op for contiguous x
        u = F.conv2d(img, wd)
        v = F.conv2d(u, wm, padding=1, groups=h)
        z = F.conv2d(F.gelu(v), wu)                                 # [B, D, H, W] channels-last
        z = z.permute(0, 2, 3, 1).reshape(B, H * W, D)
        return F.layer_norm(t + z, (D,), norm_weight, norm_bias, eps)

    out = _scaled_residual(t, adapter, scale, rescale_param_grad)
    return torch.cat([prefix.to(out.dtype), out], dim=1).to(x.dtype)
