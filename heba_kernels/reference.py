"""The reference backend: docs/semantics.md written literally in plain PyTorch.

This is the ground truth of every test and the fallback on every device. It is
written for clarity, not speed: it runs the visual path the way the published
HeBA code does (tokens to an NCHW image, three convolutions, back to tokens).

Math (per grid token ``t``, visual; ``conv1x1`` is a per-token matmul)::

    u = down(t)              # [h]      h = dim // reduction
    v = dwconv3x3(u)         # [h]      per channel over the H x W grid, zero padding 1
    a = LayerNorm(t + up(gelu(v)))
    out = t + scale * a

The text path drops the stencil: ``a = LayerNorm(t + up(gelu(down(t))))``.
The low-rank residual: ``out = x + alpha * up(gelu(down(x)))`` (linear layers
with bias).

Gradient rule (``rescale_param_grad=True``): the gradient of ``x`` is the true
gradient of ``out``; the parameters' gradients are computed as if ``scale``
were 1. Two tiny autograd functions implement it without ever dividing by
``scale``, so ``scale = 0`` is fine::

    t_in = GradScale(t, scale)       # forward: t          backward: g * scale
    out  = t + ScaleValue(a(t_in), scale)  # forward: scale*a  backward: g
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["heba_visual", "heba_text", "low_rank", "quick_gelu", "add_layer_norm"]


class _GradScale(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx, t, scale):
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class _ScaleValue(torch.autograd.Function):
    """Multiplies by ``scale`` forward; passes the gradient through unchanged."""

    @staticmethod
    def forward(ctx, a, scale):
        return a * scale

    @staticmethod
    def backward(ctx, g):
        return g, None


def _scaled_residual(t, adapter, scale, rescale_param_grad):
    """``t + scale * adapter(t)`` with docs/semantics.md's gradient rule applied if asked."""
    if rescale_param_grad:
        return t + _ScaleValue.apply(adapter(_GradScale.apply(t, scale)), scale)
    return t + scale * adapter(t)


def heba_visual(x, down_weight, mid_weight, up_weight, norm_weight, norm_bias, *,
                scale, num_prefix_tokens, grid, batch_first, eps, rescale_param_grad):
    """HeBA visual adapter. ``x``: ``[B, N, D]`` (``[N, B, D]`` if not batch_first)."""
    H, W = grid
    P = num_prefix_tokens
    xb = x if batch_first else x.transpose(0, 1)                  # [B, N, D]
    B, _, D = xb.shape
    prefix, t = xb[:, :P], xb[:, P:]                               # [B, P, D], [B, HW, D]
    h = mid_weight.shape[0]

    def adapter(t):
        img = t.transpose(1, 2).reshape(B, D, H, W)               # NCHW
        u = F.conv2d(img, down_weight)                            # [B, h, H, W]
        v = F.conv2d(u, mid_weight, padding=1, groups=h)          # [B, h, H, W]
        z = F.conv2d(F.gelu(v), up_weight)                        # [B, D, H, W]
        z = z.reshape(B, D, H * W).transpose(1, 2)                # [B, HW, D]
        return F.layer_norm(t + z, (D,), norm_weight, norm_bias, eps)

    out = _scaled_residual(t, adapter, scale, rescale_param_grad)
    out = torch.cat([prefix.to(out.dtype), out], dim=1).to(x.dtype)
    return out if batch_first else out.transpose(0, 1)


def heba_text(x, down_weight, up_weight, norm_weight, norm_bias, *,
              scale, eps, rescale_param_grad):
    """HeBA text adapter, token-wise over ``x``: ``[..., D]``."""
    D = x.shape[-1]

    def adapter(t):
        z = F.linear(F.gelu(F.linear(t, down_weight)), up_weight)
        return F.layer_norm(t + z, (D,), norm_weight, norm_bias, eps)

    return _scaled_residual(x, adapter, scale, rescale_param_grad).to(x.dtype)


def low_rank(x, down_weight, down_bias, up_weight, up_bias, *, alpha):
    """AdapterTune low-rank residual over ``x``: ``[..., D]``."""
    z = F.linear(F.gelu(F.linear(x, down_weight, down_bias)), up_weight, up_bias)
    return (x + alpha * z).to(x.dtype)


def quick_gelu(x):
    """``x * sigmoid(1.702 x)``: the activation of OpenAI's CLIP weights (open_clip's
    ``QuickGELU``) in the frozen backbone's MLPs, which :mod:`heba_kernels.quick_gelu`
    fuses."""
    return x * torch.sigmoid(1.702 * x)


def add_layer_norm(x, a, weight, bias, eps):
    """``(s, y)``: the residual sum ``s = x + a`` and ``y = LayerNorm(s)`` computed in float32
    and returned in ``s``'s dtype (open_clip's LayerNorm): the attention's output joining a
    frozen block's residual stream and the MLP's norm reading it, which
    :mod:`heba_kernels.add_layer_norm` fuses."""
    s = x + a
    y = F.layer_norm(s.float(), s.shape[-1:], None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps).to(s.dtype)
    return s, y
