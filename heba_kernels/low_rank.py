"""Triton kernels for the AdapterTune low-rank residual adapter (docs/semantics.md section 2).

Math, per token ``x`` (a row of ``[M, D]``; ``W_d [r, D]``, ``b_d [r]``,
``W_u [D, r]``, ``b_u [D]``, biases optional)::

    forward     u = W_d x + b_d                      # [r]
                a = gelu(u)                          # [r]  exact (erf) GELU
                out = x + alpha * (W_u a + b_u)      # [D]

    backward    (g = d loss / d out)
                da = alpha * W_u^T g                 # [r]
                du = da * gelu'(u)                   # [r]
                dx = g + W_d^T du                    # [D]
                dW_u = alpha * sum_tokens g a^T      dW_d = sum_tokens du x^T
                db_u = alpha * sum_tokens g          db_d = sum_tokens du

Forward: one kernel, one program per ``BLOCK_M`` tokens. ``u`` is accumulated
over ``D`` in ``BLOCK_N`` chunks, GELU'd and kept on chip; the up-projection
and the residual are written chunk by chunk. The rank-r activation never
reaches memory and nothing is saved for the backward beyond the inputs.

Backward: ``_low_rank_bwd_kernel_dx`` (one program per ``BLOCK_M`` tokens)
recomputes ``u`` from ``x``, forms ``da``, ``du`` and ``dx``, and writes ``a``
and ``du`` (``[M, r]``, the weights' dtype: small next to ``x``) for the
weight gradients. Those are reductions over all tokens, computed in ONE launch by
:func:`heba_kernels._triton_common.atb_pair_sums` (both weights and both biases):
float32 partials per token chunk in separate slots, each output tile's last chunk to
finish summing the tile's slots in float32 and in a fixed order, straight into the
weights' dtype (no atomic adds of values: one arrival counter per tile). **The
backward is deterministic** (bitwise identical run to run on the same device).

At the zero-init start (``W_u = 0``): ``da = 0`` exactly, so ``du``, ``dW_d``
and ``db_d`` are exactly zero, while ``dW_u = alpha * g^T gelu(u)`` is not.

Matmul operands are rounded to the weights' dtype (under autocast,
:mod:`heba.ops` hands over bfloat16/float16 weights with a float32 ``x``),
accumulation is float32, ``out`` and ``dx`` have ``x``'s dtype and each
weight gradient its weight's dtype.

Example::

    >>> import torch
    >>> from heba_kernels.low_rank import low_rank
    >>> x = torch.randn(2, 10, 64, device="cuda")
    >>> wd, bd = torch.randn(8, 64, device="cuda") / 8, torch.zeros(8, device="cuda")
    >>> wu, bu = torch.zeros(64, 8, device="cuda"), torch.zeros(64, device="cuda")
    >>> torch.equal(low_rank(x, wd, bd, wu, bu, alpha=1.0), x)
    True
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from heba_kernels._triton_common import (Sum, _gelu, _gelu_grad, _mma, _op_cast,
                                         atb_pair_sum_plan, atb_pair_sums, check_dtypes,
                                         device_guard, launch_flags, op_code, plan_device)
from heba_kernels.runtime import Launch, Scale, launch, new_buffer

__all__ = ["low_rank", "low_rank_fwd", "low_rank_bwd", "low_rank_plan"]


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _low_rank_fwd_kernel(X, WD, BD, WU, BU, OUT,          # X [M, D], WD [R, D], WU [D, R]
                         M, D, R, stride_xm, stride_om, alpha,
                         HAS_BD: tl.constexpr, HAS_BU: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                         OP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)                       # [BLOCK_M]
    row_ok = rows < M
    rows64 = rows.to(tl.int64)                                         # M * D may pass 2^31
    offs_r = tl.arange(0, BLOCK_R)                                     # [BLOCK_R]
    r_ok = offs_r < R
    offs_n = tl.arange(0, BLOCK_N)                                     # [BLOCK_N]

    # u = x @ W_d^T + b_d, accumulated over D.
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)                 # [BLOCK_M, BLOCK_R]
    for n0 in range(0, D, BLOCK_N):
        cols = n0 + offs_n
        c_ok = cols < D
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :],
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)   # [BLOCK_M, BLOCK_N]
        wd_t = tl.load(WD + offs_r[None, :] * D + cols[:, None],
                       mask=r_ok[None, :] & c_ok[:, None], other=0.0)  # [BLOCK_N, BLOCK_R]
        u = _mma(_op_cast(x, OP, UPCAST), _op_cast(wd_t, OP, UPCAST), u, IEEE)
    if HAS_BD:
        u += tl.load(BD + offs_r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    # Padded rank columns hold u = 0, gelu(0) = 0 and zero W_u rows: they add nothing.
    a = _op_cast(_gelu(u), OP, UPCAST)                                 # [BLOCK_M, BLOCK_R]

    # out = x + alpha * (a @ W_u^T + b_u), chunk by chunk over D.
    for n0 in range(0, D, BLOCK_N):
        cols = n0 + offs_n
        c_ok = cols < D
        mask = row_ok[:, None] & c_ok[None, :]
        wu_t = tl.load(WU + cols[None, :] * R + offs_r[:, None],
                       mask=r_ok[:, None] & c_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
        z = _mma(a, _op_cast(wu_t, OP, UPCAST),
                 tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE)
        if HAS_BU:
            z += tl.load(BU + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)                          # [BLOCK_M, BLOCK_N]
        out = x + alpha * z
        tl.store(OUT + rows64[:, None] * stride_om + cols[None, :],
                 out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _low_rank_bwd_kernel_dx(X, G, WD, BD, WU, DX, A_OUT, DU_OUT,    # A_OUT, DU_OUT [M, R]
                            M, D, R, stride_xm, stride_gm, stride_dxm, alpha,
                            HAS_BD: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                            OP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)                       # [BLOCK_M]
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)                                     # [BLOCK_R]
    r_ok = offs_r < R
    offs_n = tl.arange(0, BLOCK_N)                                     # [BLOCK_N]

    # Recompute u = x @ W_d^T + b_d and accumulate da = g @ W_u in the same sweep over D.
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)                 # [BLOCK_M, BLOCK_R]
    da = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)                # [BLOCK_M, BLOCK_R]
    for n0 in range(0, D, BLOCK_N):
        cols = n0 + offs_n
        c_ok = cols < D
        mask = row_ok[:, None] & c_ok[None, :]
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        g = tl.load(G + rows64[:, None] * stride_gm + cols[None, :], mask=mask, other=0.0)
        w_mask = r_ok[None, :] & c_ok[:, None]
        wd_t = tl.load(WD + offs_r[None, :] * D + cols[:, None], mask=w_mask, other=0.0)
        wu = tl.load(WU + cols[:, None] * R + offs_r[None, :], mask=w_mask, other=0.0)
        u = _mma(_op_cast(x, OP, UPCAST), _op_cast(wd_t, OP, UPCAST), u, IEEE)
        da = _mma(_op_cast(g, OP, UPCAST), _op_cast(wu, OP, UPCAST), da, IEEE)
    if HAS_BD:
        u += tl.load(BD + offs_r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    du = (alpha * da) * _gelu_grad(u)                                  # exactly 0 where W_u = 0
    rm_mask = row_ok[:, None] & r_ok[None, :]
    r_ptrs = rows64[:, None] * R + offs_r[None, :]
    tl.store(A_OUT + r_ptrs, _gelu(u).to(A_OUT.dtype.element_ty), mask=rm_mask)
    tl.store(DU_OUT + r_ptrs, du.to(DU_OUT.dtype.element_ty), mask=rm_mask)

    # dx = g + du @ W_d, chunk by chunk over D.
    du_op = _op_cast(du, OP, UPCAST)
    for n0 in range(0, D, BLOCK_N):
        cols = n0 + offs_n
        c_ok = cols < D
        mask = row_ok[:, None] & c_ok[None, :]
        wd = tl.load(WD + offs_r[:, None] * D + cols[None, :],
                     mask=r_ok[:, None] & c_ok[None, :], other=0.0)    # [BLOCK_R, BLOCK_N]
        g = tl.load(G + rows64[:, None] * stride_gm + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        dx = _mma(du_op, _op_cast(wd, OP, UPCAST), g, IEEE)
        tl.store(DX + rows64[:, None] * stride_dxm + cols[None, :],
                 dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

def _rows(t):
    """``t`` as ``[M, D]`` rows with unit column stride: a view when strides allow,
    otherwise one contiguous copy (e.g. an ``[N, B, D]`` transpose of ``[B, N, D]``).
    The backward makes that copy of the saved ``x`` again rather than keep it alive."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] <= 1 else t2.contiguous()


def _config(R, op_dtype, backward):
    """Block sizes: ``(BLOCK_M, BLOCK_N, BLOCK_R, num_warps)``.

    Chosen without a GPU at hand, by compiling for sm_90 with Triton 3.8
    (``scripts/triton_aot_check.py``) and
    reading ptxas's register report: no (or < 256 bytes of) register spills at
    r = 1..256 for 16-bit and float32 operands, shared memory under 70 KiB.
    The backward loop loads two weight tiles and holds two ``[BLOCK_M, BLOCK_R]``
    float32 tiles; float32 operands need about twice the registers. Not yet
    tuned by timing.

    Re-measured with launch-like hints (scripts/triton_aot_check.py, sm_90, D=768):
    16-bit r=1..16 64x64 4 warps fwd 94-96 / bwd 84-85 registers (the hint-free compile
    reported 254), r=64 74-76, r=256 fwd 80 / bwd 186; float32 up to 210 (r=256 bwd);
    no spills anywhere, shared memory <= 64 KiB. The tiles leave register room (larger
    BLOCK_M at small r is possible), unchanged until a GPU times them.
    """
    BLOCK_R = max(16, triton.next_power_of_2(R))
    wide = op_dtype == torch.float32
    BLOCK_M = 64 if BLOCK_R <= (32 if wide else 128) else 32           # [BLOCK_M, BLOCK_R] tiles
    if BLOCK_R >= 256 or (wide and (backward or BLOCK_R >= 64)):
        BLOCK_N = 32 if not (wide and backward and BLOCK_R >= 256) else 16
    else:
        BLOCK_N = 64                                                   # [BLOCK_R, BLOCK_N] tiles
    num_warps = 8 if BLOCK_M * BLOCK_R >= 4096 or (wide and backward) else 4
    return BLOCK_M, BLOCK_N, BLOCK_R, num_warps


def low_rank_plan(M, D, R, op_dtype, sms, gpu, backward):
    """The launches of the forward (``backward`` False) or of the backward for ``M`` tokens
    of width ``D``, rank ``R``: the row kernel, then (backward) the two reductions."""
    BLOCK_M, BLOCK_N, BLOCK_R, num_warps = _config(R, op_dtype, backward=backward)
    meta = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, num_warps=num_warps)
    grid = (triton.cdiv(M, BLOCK_M),)
    if not backward:
        return [Launch("fwd", "_low_rank_fwd_kernel", grid, meta)]
    # both weight gradients and biases, summed: one split-K launch
    return [Launch("dx", "_low_rank_bwd_kernel_dx", grid, meta),
            atb_pair_sum_plan(M, D, R, op_dtype, sms, gpu)]


def low_rank_fwd(x, down_weight, down_bias, up_weight, up_bias, alpha, op_dtype=None):
    """``x + alpha * (up(gelu(down(x))))`` for ``x [..., D]``; returns a contiguous tensor."""
    D = x.shape[-1]
    R = down_weight.shape[0]
    x2 = _rows(x)
    M = x2.shape[0]
    out = new_buffer(x.shape, x.dtype, x.device)
    if M == 0:
        return out
    out2 = out.view(M, D)
    op_dtype = op_dtype or down_weight.dtype       # matmul operands (autocast: its dtype)
    upcast, ieee = launch_flags(x.device, op_dtype)
    (fwd,) = low_rank_plan(M, D, R, op_dtype, *plan_device(x.device), backward=False)
    BLOCK_M, BLOCK_N, BLOCK_R, num_warps = (fwd.meta[k] for k in
                                            ("BLOCK_M", "BLOCK_N", "BLOCK_R", "num_warps"))
    grid = fwd.grid
    launch(_low_rank_fwd_kernel, grid,
        x2, down_weight, down_bias if down_bias is not None else down_weight,
        up_weight, up_bias if up_bias is not None else up_weight, out2,
        M, D, R, x2.stride(0), out2.stride(0), float(alpha),
        HAS_BD=down_bias is not None, HAS_BU=up_bias is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
        OP=op_code(op_dtype), UPCAST=upcast, IEEE=ieee, num_warps=num_warps, num_stages=2)
    return out


def low_rank_bwd(g, x, down_weight, down_bias, up_weight, alpha, op_dtype=None):
    """Gradients ``(dx, d down.weight, d down.bias, d up.weight, d up.bias)``.

    The bias gradients are returned whether or not the biases exist (they cost
    one column sum); ``dx`` is contiguous with ``x``'s shape and dtype.
    """
    D = x.shape[-1]
    R = down_weight.shape[0]
    x2, g2 = _rows(x), _rows(g)
    M = x2.shape[0]
    op_dtype = op_dtype or down_weight.dtype       # matmul operands (autocast: its dtype)
    wdt = down_weight.dtype
    dx = new_buffer(x.shape, x.dtype, x.device)
    a_buf = new_buffer((M, R), op_dtype, x.device)        # gelu(u)   [M, R]
    du_buf = new_buffer((M, R), op_dtype, x.device)       # dL/du     [M, R]
    if M > 0:
        dx2 = dx.view(M, D)
        upcast, ieee = launch_flags(x.device, op_dtype)
        row = low_rank_plan(M, D, R, op_dtype, *plan_device(x.device), backward=True)[0]
        BLOCK_M, BLOCK_N, BLOCK_R, num_warps = (row.meta[k] for k in
                                                ("BLOCK_M", "BLOCK_N", "BLOCK_R", "num_warps"))
        grid = row.grid
        launch(_low_rank_bwd_kernel_dx, grid,
            x2, g2, down_weight, down_bias if down_bias is not None else down_weight,
            up_weight, dx2, a_buf, du_buf,
            M, D, R, x2.stride(0), g2.stride(0), dx2.stride(0), float(alpha),
            HAS_BD=down_bias is not None,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
            OP=op_code(op_dtype), UPCAST=upcast, IEEE=ieee, num_warps=num_warps, num_stages=2)
    # dWu = g^T a [D, R] with its bias g.sum(0), dWd = du^T x [R, D] with du.sum(0), all four
    # summed in the same launch: the up gradients times alpha, the down ones as they are
    d_up_w, d_down_w, d_up_b, d_down_b = atb_pair_sums(
        g2, a_buf, x2, du_buf, op_dtype,
        [Sum((D, R), wdt, scaled=True), Sum((R, D), wdt), Sum((D,), wdt, scaled=True),
         Sum((R,), wdt)], scale=Scale(float(alpha)), colsum=True)
    return dx, d_down_w, d_down_b, d_up_w, d_up_b


# ----------------------------------------------------------------------------- torch.library ops

@torch.library.custom_op("heba::triton_low_rank_fwd", mutates_args=())
def _low_rank_fwd_op(x: torch.Tensor, down_weight: torch.Tensor,
                     down_bias: Optional[torch.Tensor], up_weight: torch.Tensor,
                     up_bias: Optional[torch.Tensor], alpha: float,
                     op_dtype: Optional[torch.dtype]) -> torch.Tensor:
    with device_guard(x):
        return low_rank_fwd(x, down_weight, down_bias, up_weight, up_bias, alpha, op_dtype)


@_low_rank_fwd_op.register_fake
def _(x, down_weight, down_bias, up_weight, up_bias, alpha, op_dtype):
    return x.new_empty(x.shape)


@torch.library.custom_op("heba::triton_low_rank_bwd", mutates_args=())
def _low_rank_bwd_op(g: torch.Tensor, x: torch.Tensor, down_weight: torch.Tensor,
                     down_bias: Optional[torch.Tensor], up_weight: torch.Tensor,
                     alpha: float, op_dtype: Optional[torch.dtype]
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor]:
    with device_guard(x):
        return low_rank_bwd(g, x, down_weight, down_bias, up_weight, alpha, op_dtype)


@_low_rank_bwd_op.register_fake
def _(g, x, down_weight, down_bias, up_weight, alpha, op_dtype):
    R, D = down_weight.shape
    return (x.new_empty(x.shape), down_weight.new_empty(R, D), down_weight.new_empty(R),
            up_weight.new_empty(D, R), up_weight.new_empty(D))


def _low_rank_setup_context(ctx, inputs, output):
    x, down_weight, down_bias, up_weight, up_bias, alpha, op_dtype = inputs
    ctx.save_for_backward(x, down_weight, down_bias, up_weight)
    ctx.alpha = alpha
    ctx.op_dtype = op_dtype
    ctx.has_down_bias = down_bias is not None
    ctx.has_up_bias = up_bias is not None


def _low_rank_backward(ctx, g):
    x, down_weight, down_bias, up_weight = ctx.saved_tensors
    dx, d_down_w, d_down_b, d_up_w, d_up_b = torch.ops.heba.triton_low_rank_bwd(
        g, x, down_weight, down_bias, up_weight, ctx.alpha, ctx.op_dtype)
    return (dx, d_down_w, d_down_b if ctx.has_down_bias else None, d_up_w,
            d_up_b if ctx.has_up_bias else None, None, None)


torch.library.register_autograd("heba::triton_low_rank_fwd", _low_rank_backward,
                                setup_context=_low_rank_setup_context)


# ----------------------------------------------------------------------------- public function

def low_rank(x, down_weight, down_bias, up_weight, up_bias, *, alpha, op_dtype=None):
    """AdapterTune low-rank residual ``x + alpha * (W_u gelu(W_d x + b_d) + b_u)``.

    Args:
        x: ``[..., D]`` tokens, float32/float16/bfloat16, any strides.
        down_weight: ``[r, D]``; down_bias: ``[r]`` or None.
        up_weight: ``[D, r]``; up_bias: ``[D]`` or None.
        alpha: residual scale (Python float).
        op_dtype: matmul operand dtype (default None: the weights'); under autocast the
            autocast dtype with float32 weights, rounded in registers.

    Returns ``[..., D]`` in ``x``'s dtype. Differentiable in every tensor argument.
    """
    check_dtypes("low_rank", x, down_weight, down_bias, up_weight, up_bias)
    return torch.ops.heba.triton_low_rank_fwd(
        x, down_weight.contiguous(),
        None if down_bias is None else down_bias.contiguous(),
        up_weight.contiguous(), None if up_bias is None else up_bias.contiguous(), float(alpha),
        op_dtype)
