"""A residual sum and the frozen LayerNorm that reads it, fused: one launch forward, one backward.

In a pre-norm transformer block the attention's output joins the residual stream and the
MLP's LayerNorm reads the sum at once::

    s = x + a                      # the residual stream after the attention
    y = LayerNorm(s)               # the MLP's input (its weight and bias frozen)

Eager PyTorch runs two launches forward (the sum, the norm) and two backward (the norm's
input gradient, then its sum with the gradient ``s`` gets from the next residual sum); here
the forward reads ``x`` and ``a`` and writes ``s`` and ``y``, and the backward reads both
gradients and ``s`` and writes one::

    ds = gs + rstd (w gy - mean(w gy) - s_hat mean(w gy s_hat))     # the gradient of x and of a

``s`` is rounded to its dtype as eager PyTorch rounds it; the norm computes in float32
from that ``s`` and writes ``s``'s dtype (as open_clip's LayerNorms do); ``ds`` rounds once
where eager rounds the norm's gradient and then the sum. The LayerNorm's weight and bias
get no gradient: the op is for frozen norms (a weight or bias that requires grad is
refused). The reference is :func:`heba_kernels.reference.add_layer_norm`; heba-train runs
the frozen open_clip blocks through it (:func:`heba.train.graph.prepare_frozen`).

Example (Triton's interpreter on a CPU, ``TRITON_INTERPRET=1``, or a CUDA tensor)::

    >>> import torch
    >>> from heba_kernels.add_layer_norm import add_layer_norm
    >>> x, a, w, b = torch.randn(2, 5, 64), torch.randn(2, 5, 64), torch.rand(64), torch.randn(64)
    >>> s, y = add_layer_norm(x, a, w, b, 1e-5)
    >>> torch.allclose(y, torch.nn.functional.layer_norm(x + a, (64,), w, b), atol=1e-5)
    True
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from heba_kernels._triton_common import device_guard
from heba_kernels.runtime import launch, new_buffer

__all__ = ["add_layer_norm", "add_layer_norm_plan", "ROW_ELEMS", "INTERPRETER_ELEMS",
           "MAX_DIM"]

# Elements (rows x padded D) per program on a GPU: 8 rows at D 512, 4 at 768 and 1024, 2 at
# 1280; 4 warps. Compiled for sm_90 (scripts/triton_aot_check.py --only add_layer_norm):
# forward 72-80 registers, backward 96-125 with Triton 3.8; 70-93 and 96-134 with Triton
# 3.6; no spills in any dtype.
ROW_ELEMS = 4096
# In Triton's CPU interpreter a program costs Python time, not a thread's: far fewer of them.
INTERPRETER_ELEMS = 1 << 16
MAX_DIM = 16384         # one program holds whole rows; wider norms stay eager
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _add_layer_norm_fwd_kernel(x_ptr, a_ptr, w_ptr, b_ptr, s_ptr, y_ptr, mean_ptr, rstd_ptr,
                               rows, D, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_D)
    r_mask, c_mask = r < rows, c < D
    mask = r_mask[:, None] & c_mask[None, :]
    offs = r[:, None] * D + c[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = (x + a).to(s_ptr.dtype.element_ty)          # the residual stream, rounded as eager
    tl.store(s_ptr + offs, s, mask=mask)
    s = s.to(tl.float32)
    mean = tl.sum(s, axis=1) / D
    d = tl.where(mask, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / D + eps)
    y = d * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + r, mean, mask=r_mask)
    tl.store(rstd_ptr + r, rstd, mask=r_mask)


@triton.jit
def _add_layer_norm_bwd_kernel(gs_ptr, gy_ptr, s_ptr, w_ptr, mean_ptr, rstd_ptr, ds_ptr, rows, D,
                               HAS_W: tl.constexpr, BLOCK_R: tl.constexpr,
                               BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_D)
    r_mask, c_mask = r < rows, c < D
    mask = r_mask[:, None] & c_mask[None, :]
    offs = r[:, None] * D + c[None, :]
    mean = tl.load(mean_ptr + r, mask=r_mask, other=0.0)
    rstd = tl.load(rstd_ptr + r, mask=r_mask, other=0.0)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s_hat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
    wg = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_W:
        wg = wg * tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    c1 = tl.sum(wg * s_hat, axis=1) / D
    c2 = tl.sum(wg, axis=1) / D
    ds = (wg - s_hat * c1[:, None] - c2[:, None]) * rstd[:, None]
    ds += tl.load(gs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ds_ptr + offs, ds.to(ds_ptr.dtype.element_ty), mask=mask)


def add_layer_norm_plan(rows: int, D: int, device: torch.device) -> tuple[tuple[int], int, int]:
    """``(grid, BLOCK_R, BLOCK_D)`` of both launches over ``[rows, D]`` on ``device``: whole
    rows per program (``BLOCK_D`` the next power of two of ``D``), as many as fill
    ``ROW_ELEMS`` (``INTERPRETER_ELEMS`` on the CPU)."""
    block_d = triton.next_power_of_2(D)
    elems = INTERPRETER_ELEMS if device.type == "cpu" else ROW_ELEMS
    block_r = max(1, elems // block_d)
    return (triton.cdiv(rows, block_r),), block_r, block_d


def _ptr(t: Optional[torch.Tensor], stand_in: torch.Tensor) -> torch.Tensor:
    """``t``, or any tensor for an absent weight or bias (its ``HAS_*`` switch is off)."""
    return stand_in if t is None else t


def _warps(block_r: int, block_d: int) -> int:
    return 8 if block_r * block_d >= 8192 else 4


@torch.library.custom_op("heba::triton_add_layer_norm_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, a: torch.Tensor, weight: Optional[torch.Tensor],
            bias: Optional[torch.Tensor], eps: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    D = x.shape[-1]
    rows = x.numel() // D if D else 0
    s = new_buffer(x.shape, x.dtype, x.device)
    y = new_buffer(x.shape, x.dtype, x.device)
    mean = new_buffer((rows,), torch.float32, x.device)
    rstd = new_buffer((rows,), torch.float32, x.device)
    if x.numel():
        grid, block_r, block_d = add_layer_norm_plan(rows, D, x.device)
        with device_guard(x):
            launch(_add_layer_norm_fwd_kernel, grid, x, a, _ptr(weight, x), _ptr(bias, x), s, y,
                   mean, rstd,
                   rows, D, eps, HAS_W=weight is not None, HAS_B=bias is not None,
                   BLOCK_R=block_r, BLOCK_D=block_d, num_warps=_warps(block_r, block_d))
    return s, y, mean, rstd


@_fwd_op.register_fake
def _(x, a, weight, bias, eps):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (torch.empty_like(x), torch.empty_like(x), x.new_empty((rows,), dtype=torch.float32),
            x.new_empty((rows,), dtype=torch.float32))


@torch.library.custom_op("heba::triton_add_layer_norm_bwd", mutates_args=())
def _bwd_op(gs: torch.Tensor, gy: torch.Tensor, s: torch.Tensor, weight: Optional[torch.Tensor],
            mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    D = s.shape[-1]
    rows = mean.numel()
    ds = new_buffer(s.shape, s.dtype, s.device)
    if s.numel():
        grid, block_r, block_d = add_layer_norm_plan(rows, D, s.device)
        with device_guard(s):
            launch(_add_layer_norm_bwd_kernel, grid, gs, gy, s, _ptr(weight, s), mean, rstd, ds,
                   rows, D,
                   HAS_W=weight is not None, BLOCK_R=block_r, BLOCK_D=block_d,
                   num_warps=_warps(block_r, block_d))
    return ds


@_bwd_op.register_fake
def _(gs, gy, s, weight, mean, rstd):
    return torch.empty_like(s)


def _setup_context(ctx, inputs, output):
    _, _, weight, _, _ = inputs
    s, _, mean, rstd = output
    ctx.save_for_backward(s, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)      # no zero-filled gradients for an unused output


def _backward(ctx, gs, gy, _gmean, _grstd):
    s, weight, mean, rstd = ctx.saved_tensors
    gs = torch.zeros_like(s) if gs is None else gs
    gy = torch.zeros_like(s) if gy is None else gy
    ds = torch.ops.heba.triton_add_layer_norm_bwd(gs.contiguous(), gy.contiguous(), s, weight,
                                                  mean, rstd)
    return ds, ds, None, None, None


torch.library.register_autograd("heba::triton_add_layer_norm_fwd", _backward,
                                setup_context=_setup_context)


def add_layer_norm(x: torch.Tensor, a: torch.Tensor, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, y)``: ``s = x + a`` and ``y = layer_norm(s)`` over the last dimension, both in
    ``x``'s dtype (float32, float16 or bfloat16; ``a`` the same dtype and shape), the norm
    computed in float32; differentiable in ``x`` and ``a``. ``weight`` / ``bias``: ``[D]`` (or
    None), any float dtype, frozen (no ``requires_grad``). On a CUDA device, or on the CPU
    in Triton's interpreter; any layout (non-contiguous tensors are copied first)."""
    for name, t in (("x", x), ("a", a)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _DTYPES:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"add_layer_norm: {name} must be a float32, float16 or bfloat16 "
                            f"tensor, got {got}")
    if a.shape != x.shape or a.dtype != x.dtype or a.device != x.device:
        raise ValueError(f"add_layer_norm: a must match x in shape, dtype and device, got "
                         f"{tuple(a.shape)} {a.dtype} {a.device} for x {tuple(x.shape)} "
                         f"{x.dtype} {x.device}")
    if x.dim() < 1 or not 1 <= x.shape[-1] <= MAX_DIM:
        raise ValueError(f"add_layer_norm: x's last dimension must be 1..{MAX_DIM}, got shape "
                         f"{tuple(x.shape)}")
    D = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.shape != (D,) or not t.is_floating_point() or t.device != x.device:
            raise ValueError(f"add_layer_norm: {name} must be a float tensor of shape ({D},) on "
                             f"{x.device}, got {tuple(t.shape)} {t.dtype} {t.device}")
        if t.requires_grad:
            raise ValueError(f"add_layer_norm: {name} must be frozen (requires_grad=False): the "
                             f"fused op computes no gradient for the norm's parameters")
    w = weight.contiguous() if weight is not None else None
    b = bias.contiguous() if bias is not None else None
    s, y, _, _ = torch.ops.heba.triton_add_layer_norm_fwd(x.contiguous(), a.contiguous(), w, b,
                                                          float(eps))
    return s, y
