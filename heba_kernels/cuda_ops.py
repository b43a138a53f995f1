"""The CUDA backend: the C++/CUDA ops of ``heba_kernels._C`` behind the reference signatures.

Importing this module loads the compiled extension (prebuilt, or compiled on
first use: :mod:`heba_kernels._extension`), which registers the ops
``torch.ops.heba.cuda_{visual,text,low_rank}_{fwd,bwd}`` (CUDA only). This
module adds what torch needs around them: their fake (meta) implementations,
so that torch.compile traces them without a graph break, and their autograd
formulas (``torch.library.register_autograd``), which call the ``*_bwd`` ops.
The math of every kernel, forward and backward, is in ``csrc/README.md``.

Layout: a token tensor is used in place when it is contiguous or when
``x.transpose(0, 1)`` is (a ``[N, B, D]`` view of ``[B, N, D]`` memory or the
reverse); other layouts are made contiguous first. Outputs keep x's layout.

Scale: the HeBA ops take ``scale`` as a Python float or as a 0-d float32
tensor on x's device; the ops' schemas carry both (``float scale, Tensor?
scale_t``) and the kernels read ``scale_t`` from device memory when it is
given, so a captured CUDA graph replays with the value the tensor holds then.
Both give bitwise the same results for the same float32 number.

Dtypes: the projections run in the weights' dtype with float32 accumulation;
everything else is computed in float32 and returned in x's dtype. Under
autocast (weights in the autocast dtype, x possibly float32) x is used as is
when it is float32 and cast to float32 otherwise.

Example::

    >>> import torch
    >>> from heba_kernels import cuda_ops
    >>> x = torch.randn(2, 1 + 7 * 7, 64, device="cuda")
    >>> w = dict(down_weight=torch.randn(16, 64, 1, 1, device="cuda"),
    ...          mid_weight=torch.randn(16, 1, 3, 3, device="cuda"),
    ...          up_weight=torch.randn(64, 16, 1, 1, device="cuda"),
    ...          norm_weight=torch.ones(64, device="cuda"),
    ...          norm_bias=torch.zeros(64, device="cuda"))
    >>> cuda_ops.heba_visual(x, **w, scale=0.025, num_prefix_tokens=1, grid=(7, 7),
    ...                      batch_first=True, eps=1e-5, rescale_param_grad=True).shape
    torch.Size([2, 50, 64])
"""

from __future__ import annotations

import math

import torch

from heba_kernels import _extension
from heba_kernels.runtime import Scale

_extension.load()  # registers torch.ops.heba.cuda_* (prebuilt, JIT-cached or compiled now)

__all__ = ["heba_visual", "heba_text", "low_rank"]

_ops = torch.ops.heba


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scale_args(scale):
    """``(float scale, scale_t)`` for the ops from the :class:`~heba_kernels.runtime.Scale`
    that :mod:`heba.ops` hands over (or a float / 0-d tensor): ``(0.0, tensor)`` for a
    tensor (the kernels read it and ignore the float), ``(value, None)`` otherwise."""
    s = Scale.of(scale)
    return float(s.value), s.tensor


def _prepare_x(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x as the kernels take it: a supported dtype pair with the weights, a usable layout."""
    if x.dtype != weight.dtype and x.dtype != torch.float32:
        x = x.float()  # autocast with an unusual x dtype: compute from float32
    # The transposed layout only for 3-D and up: in 2-D, transpose(0, 1) moves
    # the D axis too (x = y.t() has stride(-1) != 1), which the kernels cannot take.
    if not (x.is_contiguous() or (x.dim() >= 3 and x.transpose(0, 1).is_contiguous())):
        x = x.contiguous()
    return x


# ---------------------------------------------------------------------------
# HeBA visual
# ---------------------------------------------------------------------------

@torch.library.register_fake("heba::cuda_visual_fwd")
def _visual_fwd_fake(x, down_weight, mid_weight, up_weight, norm_weight, norm_bias, scale,
                     scale_t, num_prefix_tokens, grid_h, grid_w, batch_first, eps, rescale_param_grad):
    rows, D, h = x.shape[0] * x.shape[1], x.shape[2], down_weight.shape[0]
    wt, acc = down_weight.dtype, _acc_dtype(x)
    return (torch.empty_like(x), x.new_empty((rows, h), dtype=wt), x.new_empty((rows, h), dtype=wt),
            x.new_empty((rows, D), dtype=wt), x.new_empty((rows,), dtype=acc),
            x.new_empty((rows,), dtype=acc))


@torch.library.register_fake("heba::cuda_visual_bwd")
def _visual_bwd_fake(grad_out, x, down_weight, mid_weight, up_weight, norm_weight, u, g, z, mean,
                     rstd, scale, scale_t, num_prefix_tokens, grid_h, grid_w, batch_first,
                     rescale_param_grad):
    wt = down_weight.dtype
    return (torch.empty_like(x),
            down_weight.new_empty(down_weight.shape, dtype=wt),
            mid_weight.new_empty(mid_weight.shape, dtype=wt),
            up_weight.new_empty(up_weight.shape, dtype=wt),
            norm_weight.new_empty(norm_weight.shape, dtype=wt),
            norm_weight.new_empty(norm_weight.shape, dtype=wt))


def _visual_setup_context(ctx, inputs, output):
    (x, down_weight, mid_weight, up_weight, norm_weight, _norm_bias, scale, scale_t,
     num_prefix_tokens, grid_h, grid_w, batch_first, _eps, rescale_param_grad) = inputs
    ctx.set_materialize_grads(False)   # no zero-filled gradients of the saved outputs
    _out, u, g, z, mean, rstd = output
    ctx.save_for_backward(x, down_weight, mid_weight, up_weight, norm_weight, u, g, z, mean, rstd,
                          scale_t)
    ctx.args = (scale, num_prefix_tokens, grid_h, grid_w, batch_first, rescale_param_grad)


def _visual_backward(ctx, grad_out, *_grads_of_saved):
    (x, down_weight, mid_weight, up_weight, norm_weight, u, g, z, mean, rstd,
     scale_t) = ctx.saved_tensors
    scale, *rest = ctx.args
    grads = _ops.cuda_visual_bwd(grad_out, x, down_weight, mid_weight, up_weight, norm_weight,
                                 u, g, z, mean, rstd, scale, scale_t, *rest)
    return tuple(grads) + (None,) * 8  # scale, scale_t, P, H, W, batch_first, eps, rescale


torch.library.register_autograd("heba::cuda_visual_fwd", _visual_backward,
                                setup_context=_visual_setup_context)


def heba_visual(x, down_weight, mid_weight, up_weight, norm_weight, norm_bias, *,
                scale, num_prefix_tokens, grid, batch_first, eps, rescale_param_grad):
    """HeBA visual adapter on CUDA; same contract as :func:`heba_kernels.reference.heba_visual`.

    ``scale``: a Python float or a 0-d float32 tensor on x's device (read by the kernels).
    """
    xin = _prepare_x(x, down_weight)
    out = _ops.cuda_visual_fwd(xin, down_weight, mid_weight, up_weight, norm_weight, norm_bias,
                               *_scale_args(scale), int(num_prefix_tokens), int(grid[0]),
                               int(grid[1]), bool(batch_first), float(eps),
                               bool(rescale_param_grad))[0]
    return out if out.dtype == x.dtype else out.to(x.dtype)


# ---------------------------------------------------------------------------
# HeBA text
# ---------------------------------------------------------------------------

@torch.library.register_fake("heba::cuda_text_fwd")
def _text_fwd_fake(x, down_weight, up_weight, norm_weight, norm_bias, scale, scale_t, eps,
                   rescale_param_grad):
    D, h = x.shape[-1], down_weight.shape[0]
    rows = math.prod(x.shape[:-1])
    wt, acc = down_weight.dtype, _acc_dtype(x)
    return (torch.empty_like(x), x.new_empty((rows, h), dtype=wt), x.new_empty((rows, h), dtype=wt),
            x.new_empty((rows, D), dtype=wt), x.new_empty((rows,), dtype=acc),
            x.new_empty((rows,), dtype=acc))


@torch.library.register_fake("heba::cuda_text_bwd")
def _text_bwd_fake(grad_out, x, down_weight, up_weight, norm_weight, u, g, z, mean, rstd, scale,
                   scale_t, rescale_param_grad):
    contiguous = torch.contiguous_format
    return (torch.empty_like(x), torch.empty_like(down_weight, memory_format=contiguous),
            torch.empty_like(up_weight, memory_format=contiguous),
            norm_weight.new_empty(norm_weight.shape), norm_weight.new_empty(norm_weight.shape))


def _text_setup_context(ctx, inputs, output):
    (x, down_weight, up_weight, norm_weight, _norm_bias, scale, scale_t, _eps,
     rescale_param_grad) = inputs
    ctx.set_materialize_grads(False)   # no zero-filled gradients of the saved outputs
    _out, u, g, z, mean, rstd = output
    ctx.save_for_backward(x, down_weight, up_weight, norm_weight, u, g, z, mean, rstd, scale_t)
    ctx.args = (scale, rescale_param_grad)


def _text_backward(ctx, grad_out, *_grads_of_saved):
    x, down_weight, up_weight, norm_weight, u, g, z, mean, rstd, scale_t = ctx.saved_tensors
    scale, rescale_param_grad = ctx.args
    grads = _ops.cuda_text_bwd(grad_out, x, down_weight, up_weight, norm_weight, u, g, z, mean,
                               rstd, scale, scale_t, rescale_param_grad)
    return tuple(grads) + (None,) * 4  # scale, scale_t, eps, rescale_param_grad


torch.library.register_autograd("heba::cuda_text_fwd", _text_backward,
                                setup_context=_text_setup_context)


def heba_text(x, down_weight, up_weight, norm_weight, norm_bias, *, scale, eps,
              rescale_param_grad):
    """HeBA text adapter on CUDA; same contract as :func:`heba_kernels.reference.heba_text`.

    ``scale``: a Python float or a 0-d float32 tensor on x's device (read by the kernels).
    """
    xin = _prepare_x(x, down_weight)
    out = _ops.cuda_text_fwd(xin, down_weight, up_weight, norm_weight, norm_bias,
                             *_scale_args(scale), float(eps), bool(rescale_param_grad))[0]
    return out if out.dtype == x.dtype else out.to(x.dtype)


# ---------------------------------------------------------------------------
# Low-rank residual
# ---------------------------------------------------------------------------

@torch.library.register_fake("heba::cuda_low_rank_fwd")
def _low_rank_fwd_fake(x, down_weight, down_bias, up_weight, up_bias, alpha):
    return torch.empty_like(x)


@torch.library.register_fake("heba::cuda_low_rank_bwd")
def _low_rank_bwd_fake(grad_out, x, down_weight, down_bias, up_weight, up_bias, alpha):
    r, D = down_weight.shape
    wt = down_weight.dtype
    return (torch.empty_like(x), down_weight.new_empty((r, D), dtype=wt),
            down_weight.new_empty((r,), dtype=wt), down_weight.new_empty((D, r), dtype=wt),
            down_weight.new_empty((D,), dtype=wt))


def _low_rank_setup_context(ctx, inputs, output):
    x, down_weight, down_bias, up_weight, up_bias, alpha = inputs
    ctx.save_for_backward(x, down_weight, down_bias, up_weight, up_bias)
    ctx.alpha = alpha
    ctx.has_bias = (down_bias is not None, up_bias is not None)


def _low_rank_backward(ctx, grad_out):
    x, down_weight, down_bias, up_weight, up_bias = ctx.saved_tensors
    dx, d_down, d_down_b, d_up, d_up_b = _ops.cuda_low_rank_bwd(
        grad_out, x, down_weight, down_bias, up_weight, up_bias, ctx.alpha)
    return (dx, d_down, d_down_b if ctx.has_bias[0] else None, d_up,
            d_up_b if ctx.has_bias[1] else None, None)


torch.library.register_autograd("heba::cuda_low_rank_fwd", _low_rank_backward,
                                setup_context=_low_rank_setup_context)


def low_rank(x, down_weight, down_bias, up_weight, up_bias, *, alpha):
    """Low-rank residual on CUDA; same contract as :func:`heba_kernels.reference.low_rank`."""
    xin = _prepare_x(x, down_weight)
    out = _ops.cuda_low_rank_fwd(xin, down_weight, down_bias, up_weight, up_bias, float(alpha))
    return out if out.dtype == x.dtype else out.to(x.dtype)
