"""Triton kernels for the HeBA text adapter (docs/semantics.md section 1, modality "text").

Math, per token ``x`` (a row of ``[M, D]``; ``W_d [h, D]``, ``W_u [D, h]``,
LayerNorm weight ``w [D]`` and bias ``b [D]``, no projection biases)::

    forward     u = W_d x                            # [h]
                a = gelu(u)                          # [h]  exact (erf) GELU
                y = x + W_u a                        # [D]
                mu = mean(y),  rstd = 1 / sqrt(var(y) + eps)
                yhat = (y - mu) * rstd
                out = x + scale * (w * yhat + b)     # [D]

    backward    (g = d loss / d out, the adapter's part taken with upstream g)
                dyhat = w * g
                dy = rstd * (dyhat - mean(dyhat) - yhat * mean(dyhat * yhat))
                da = W_u^T dy,  du = da * gelu'(u)
                dx = g + scale * (dy + W_d^T du)
                dw = s_p * sum_tokens g * yhat       db = s_p * sum_tokens g
                dW_u = s_p * sum_tokens dy a^T       dW_d = s_p * sum_tokens du x^T

with ``s_p = 1`` under docs/semantics.md's gradient-scaling rule (``rescale_param_grad=True``:
parameter gradients as if ``scale`` were 1, finite at ``scale = 0``) and
``s_p = scale`` for plain gradients. ``dx`` is the true gradient either way.

Forward: one kernel, one program per ``BLOCK_M`` tokens. ``u`` is accumulated
over ``D`` in ``BLOCK_N`` chunks and ``a`` stays on chip; a second sweep over
``D`` forms ``y`` chunk by chunk and merges per-chunk means and squared
deviations (Chan et al.'s parallel variance, no ``E[y^2] - E[y]^2``
cancellation); a third sweep recomputes ``y`` (one more ``a @ W_u^T`` instead of a
float32 round trip of ``y`` through memory; a choice not yet timed) and
writes ``out``. Saved for the backward: ``x`` (an input)
and the per-token ``mean`` and ``rstd`` (float32, ``[M]``).

Backward up to ``FUSED_DW_MAX_H`` = 128 bottleneck columns (``h`` padded to a
power of two: ViT-B/16's attention-position text adapters, width 512, h = 128; the
MLP-position ones, h = 512 at ViT-B/16 and 768 at ViT-L/14, and ViT-L/14's
attention-position ones, h = 192, take the split-K path below, which the model
prefers there), two launches:

* ``_heba_text_bwd_kernel_du``, one program per ``BLOCK_M`` tokens: recomputes
  ``u`` and ``a``; sweeps ``D`` once for the LayerNorm backward's two row constants
  ``c1 = mean(dyhat * yhat)``, ``c2 = mean(dyhat)`` (stored, float32 ``[M, 2]``) and
  once more for ``dy`` chunk by chunk and ``da = W_u^T dy`` on the fly (``dy`` is
  never stored); writes ``a`` and ``du`` (``[M, h]``, the operand dtype).
* ``_heba_text_bwd_kernel_dx_dw``, ``S x n_d`` programs: program ``(s, j)`` owns
  ``BLOCK_D`` columns ``j`` of ``D`` and the row blocks ``s, s + S, ...``. Per
  block it recomputes ``y = x + a W_u^T`` for its columns (K = h), ``yhat`` and
  ``dy = rstd (dyhat - c2 - yhat c1)``, writes ``dx = g + scale (dy + du W_d)``, and
  adds the block's ``dy^T a``, ``du^T x``, ``g yhat`` and ``g`` to float32 registers:
  its shares of ``dW_u``, ``dW_d``, ``dw`` and ``db``, written once to its slot. The
  last of a column chunk's ``S`` programs to finish sums the chunk's slots of the four
  buffers into the gradients.

Wider bottlenecks (the two ``[BLOCK_D, h]`` float32 accumulators would not fit in
registers), two launches: ``_heba_text_bwd_kernel_dx`` (one program per
``BLOCK_M`` tokens) recomputes ``u``, ``a`` and ``yhat``, sweeps ``D`` once for
the two row means and the per-program partial sums of ``dw``/``db``, once more
for ``dy`` (written to a ``[M, D]`` buffer in ``x``'s dtype) and ``da``, and a last
time for ``dx``; ``a`` and ``du`` (``[M, h]``) are written for the projection
gradients, reductions over all tokens done in one launch by
:func:`heba_kernels._triton_common.atb_pair_sums` (float32 partials per token chunk
in separate slots, each output tile's last chunk to finish summing the tile's slots),
which also sums the row kernel's ``dw``/``db`` partials.

Either way the partial buffers are summed by the launch that writes them, in float32,
in a fixed order, straight into the parameters' dtype, times ``s_p``. No atomic adds of
values anywhere (an arrival counter per output tile or column chunk, not sums):
**the backward is deterministic** (bitwise identical run to run on the same
device). Rounding points: ``a`` and ``du`` are rounded to the operand dtype;
``dy`` is rounded to it as an operand of ``da`` and ``dW_u``; in ``dx`` the split-K
path adds ``dy`` as stored in ``x``'s dtype, the fused path in float32.

Wide bottlenecks (``h > WIDE_H`` = 512, e.g. the text MLP adapter of ViT-L/14,
h = 768): ``u``, ``a`` and ``da`` no longer fit in registers as ``[BLOCK_M, h]``
tiles, so ``_heba_text_bwd_kernel_dx`` with ``WIDE`` runs the same math with ``h`` in
256-column chunks: ``u`` (float32) and ``a`` to ``[M, h]`` buffers, ``y``
recomputed from ``a`` read back chunk by chunk, ``du`` to its buffer before the
``dx`` sweep. Same rounding points, a different summation order over ``h``.

``scale`` is a Python float or a 0-d float32 tensor on x's device that the
kernels load (``SCALE_PTR``): a captured CUDA graph replays with its current
value, bitwise the same results. Launches run under ``device_guard(x)``.
float64 inputs are computed in float32 (float64 results).

Matmul operands are rounded to the weights' dtype (under autocast
:mod:`heba.ops` hands over bfloat16/float16 weights with a float32 ``x``);
accumulation and the LayerNorm are float32; ``out`` and ``dx`` have ``x``'s
dtype, each parameter gradient its parameter's dtype.

Example::

    >>> import torch
    >>> from heba_kernels.heba_text import heba_text
    >>> D, h = 512, 128
    >>> x = torch.randn(4, 77, D, device="cuda")
    >>> wd = torch.randn(h, D, device="cuda") / D**0.5
    >>> wu = torch.randn(D, h, device="cuda") / h**0.5
    >>> w, b = torch.ones(D, device="cuda"), torch.zeros(D, device="cuda")
    >>> heba_text(x, wd, wu, w, b, scale=0.025, eps=1e-5, rescale_param_grad=True).shape
    torch.Size([4, 77, 512])
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from heba_kernels._triton_common import (Partial, Sum, _gelu, _gelu_grad, _mma, _op_cast,
                                         _scalar, _sum_slots, atb_pair_sum_plan,
                                         atb_pair_sums, check_dtypes, device_guard,
                                         launch_flags, op_code, plan_device, tile_counters)
from heba_kernels.runtime import ONE, Launch, Scale, launch, new_buffer

__all__ = ["heba_text", "heba_text_fwd", "heba_text_bwd", "text_plan"]


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _heba_text_fwd_kernel(X, WD, WU, NW, NB, OUT, MEAN, RSTD,   # X [M, D], WD [H, D], WU [D, H]
                          M, D, H, stride_xm, stride_om, scale, scale_ptr, eps,
                          SCALE_PTR: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                          OP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    scale = _scalar(scale, scale_ptr, SCALE_PTR)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)                       # [BLOCK_M]
    row_ok = rows < M
    rows64 = rows.to(tl.int64)                                         # M * D may pass 2^31
    offs_h = tl.arange(0, BLOCK_H)                                     # [BLOCK_H]
    h_ok = offs_h < H
    offs_n = tl.arange(0, BLOCK_N)                                     # [BLOCK_N]

    # u = x @ W_d^T, accumulated over D; a = gelu(u) stays on chip.
    u = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)                 # [BLOCK_M, BLOCK_H]
    for n0 in range(0, D, BLOCK_N):
        cols = n0 + offs_n
        c_ok = cols < D
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :],
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)   # [BLOCK_M, BLOCK_N]
        wd_t = tl.load(WD + offs_h[None, :] * D + cols[:, None],
                       mask=h_ok[None, :] & c_ok[:, None], other=0.0)  # [BLOCK_N, BLOCK_H]
        u = _mma(_op_cast(x, OP, UPCAST), _op_cast(wd_t, OP, UPCAST), u, IEEE)
    # Padded hidden columns: u = 0, gelu(0) = 0, and their W_u rows load as zero.
    a = _op_cast(_gelu(u), OP, UPCAST)                                 # [BLOCK_M, BLOCK_H]

    # Row statistics of y = x + a @ W_u^T, merged chunk by chunk (Chan et al.).
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_N):
        cols = n0 + offs_n
        c_ok = cols < D
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :],
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        wu_t = tl.load(WU + cols[None, :] * H + offs_h[:, None],
                       mask=h_ok[:, None] & c_ok[None, :], other=0.0)  # [BLOCK_H, BLOCK_N]
        y = _mma(a, _op_cast(wu_t, OP, UPCAST), x, IEEE)   # [BLOCK_M, BLOCK_N], 0 where padded
        n_c = tl.minimum(D - n0, BLOCK_N) * 1.0                        # columns in this chunk
        n_a = n0 * 1.0                                                 # columns merged so far
        c_mean = tl.sum(y, axis=1) / n_c
        dev = tl.where(c_ok[None, :], y - c_mean[:, None], 0.0)
        c_m2 = tl.sum(dev * dev, axis=1)
        delta = c_mean - mean
        tot = n_a + n_c
        mean += delta * (n_c / tot)
        m2 += c_m2 + delta * delta * (n_a * n_c / tot)
    rstd = 1.0 / tl.sqrt(m2 / D + eps)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)

    # out = x + scale * (w * yhat + b), recomputing y chunk by chunk.
    for n0 in range(0, D, BLOCK_N):
        cols = n0 + offs_n
        c_ok = cols < D
        mask = row_ok[:, None] & c_ok[None, :]
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        wu_t = tl.load(WU + cols[None, :] * H + offs_h[:, None],
                       mask=h_ok[:, None] & c_ok[None, :], other=0.0)
        y = _mma(a, _op_cast(wu_t, OP, UPCAST), x, IEEE)
        yhat = (y - mean[:, None]) * rstd[:, None]
        w = tl.load(NW + cols, mask=c_ok, other=0.0).to(tl.float32)
        b = tl.load(NB + cols, mask=c_ok, other=0.0).to(tl.float32)
        out = x + scale * (yhat * w[None, :] + b[None, :])
        tl.store(OUT + rows64[:, None] * stride_om + cols[None, :],
                 out.to(OUT.dtype.element_ty), mask=mask)


# Above this BLOCK_H the backward's three [BLOCK_M, BLOCK_H] float32 tiles no longer fit
# in registers (scripts/triton_aot_check.py, sm_90: h=768/1024 at 16x16x1024 used 255
# registers and spilled 380-396 bytes); from there the wide kernel below tiles h.
WIDE_H = 512


@triton.jit
def _text_y(X, WU, a, rows64, cols, mask, offs_h, h_ok, c_ok, H, stride_xm, OP: tl.constexpr,
            UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """y = x + a @ W_u^T for one column chunk, ``a [BLOCK_M, BLOCK_H]`` in registers."""
    x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    wu_t = tl.load(WU + cols[None, :] * H + offs_h[:, None],
                   mask=h_ok[:, None] & c_ok[None, :], other=0.0)      # [BLOCK_H, BLOCK_N]
    return _mma(a, _op_cast(wu_t, OP, UPCAST), x, IEEE)


@triton.jit
def _ln_bwd_terms(y, G, NW, rows64, cols, mask, c_ok, mean, rstd, stride_gm):
    """One column chunk of the LayerNorm backward's inputs, float32: ``yhat`` (0 off the
    mask), the incoming gradient ``g`` and ``dyhat = w * g``."""
    yhat = tl.where(mask, (y - mean[:, None]) * rstd[:, None], 0.0)
    g = tl.load(G + rows64[:, None] * stride_gm + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    dyhat = g * tl.load(NW + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    return yhat, g, dyhat


@triton.jit
def _text_u(X, WD, rows64, row_ok, offs_h, h_ok, offs_n, D, stride_xm, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, OP: tl.constexpr,
            UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """u = x @ W_d^T of ``BLOCK_M`` rows, accumulated over D in ``BLOCK_N`` chunks: float32
    ``[BLOCK_M, BLOCK_H]``, 0 in padded hidden columns."""
    u = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_N):
        cols = n0 + offs_n
        c_ok = cols < D
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :],
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)   # [BLOCK_M, BLOCK_N]
        wd_t = tl.load(WD + offs_h[None, :] * D + cols[:, None],
                       mask=h_ok[None, :] & c_ok[:, None], other=0.0)  # [BLOCK_N, BLOCK_H]
        u = _mma(_op_cast(x, OP, UPCAST), _op_cast(wd_t, OP, UPCAST), u, IEEE)
    return u


@triton.jit
def _text_bwd_wide_du(DY, WU, U_BUF, DU_OUT, rows64, row_ok, offs_n, D, H,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HC: tl.constexpr,
                      OP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """da = dy @ W_u and du = da * gelu'(u), chunk by chunk of h, to DU_OUT."""
    for h0 in range(0, H, BLOCK_HC):
        offs_h = h0 + tl.arange(0, BLOCK_HC)
        h_ok = offs_h < H
        da = tl.zeros((BLOCK_M, BLOCK_HC), dtype=tl.float32)
        for n0 in range(0, D, BLOCK_N):
            cols = n0 + offs_n
            c_ok = cols < D
            dy = tl.load(DY + rows64[:, None] * D + cols[None, :],
                         mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            wu = tl.load(WU + cols[:, None] * H + offs_h[None, :],
                         mask=c_ok[:, None] & h_ok[None, :], other=0.0)     # [BLOCK_N, BLOCK_HC]
            da = _mma(_op_cast(dy, OP, UPCAST), _op_cast(wu, OP, UPCAST), da, IEEE)
        h_ptrs = rows64[:, None] * H + offs_h[None, :]
        hm = row_ok[:, None] & h_ok[None, :]
        u = tl.load(U_BUF + h_ptrs, mask=hm, other=0.0)
        tl.store(DU_OUT + h_ptrs, (da * _gelu_grad(u)).to(DU_OUT.dtype.element_ty), mask=hm)


@triton.jit
def _text_bwd_wide_hidden(X, WD, A_OUT, U_BUF, rows64, row_ok, offs_n, D, H,
                          stride_xm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_HC: tl.constexpr, OP: tl.constexpr, UPCAST: tl.constexpr,
                          IEEE: tl.constexpr):
    """u = x W_d^T chunk by chunk of h: u to U_BUF (float32), a = gelu(u) to A_OUT."""
    for h0 in range(0, H, BLOCK_HC):
        offs_h = h0 + tl.arange(0, BLOCK_HC)
        h_ok = offs_h < H
        u = tl.zeros((BLOCK_M, BLOCK_HC), dtype=tl.float32)
        for n0 in range(0, D, BLOCK_N):
            cols = n0 + offs_n
            c_ok = cols < D
            x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :],
                        mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            wd_t = tl.load(WD + offs_h[None, :] * D + cols[:, None],
                           mask=h_ok[None, :] & c_ok[:, None], other=0.0)
            u = _mma(_op_cast(x, OP, UPCAST), _op_cast(wd_t, OP, UPCAST), u, IEEE)
        h_ptrs = rows64[:, None] * H + offs_h[None, :]
        hm = row_ok[:, None] & h_ok[None, :]
        tl.store(U_BUF + h_ptrs, u, mask=hm)
        tl.store(A_OUT + h_ptrs, _gelu(u).to(A_OUT.dtype.element_ty), mask=hm)


@triton.jit
def _text_bwd_wide_y(X, WU, A_OUT, rows64, row_ok, cols, c_ok, H, stride_xm,
                     BLOCK_M: tl.constexpr, BLOCK_HC: tl.constexpr, OP: tl.constexpr,
                     UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """y = x + a @ W_u^T for one column chunk, a read back from A_OUT chunk by chunk of h."""
    y = tl.load(X + rows64[:, None] * stride_xm + cols[None, :],
                mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    for h0 in range(0, H, BLOCK_HC):
        offs_h = h0 + tl.arange(0, BLOCK_HC)
        h_ok = offs_h < H
        a = tl.load(A_OUT + rows64[:, None] * H + offs_h[None, :],
                    mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        wu_t = tl.load(WU + cols[None, :] * H + offs_h[:, None],
                       mask=h_ok[:, None] & c_ok[None, :], other=0.0)
        y = _mma(_op_cast(a, OP, UPCAST), _op_cast(wu_t, OP, UPCAST), y, IEEE)
    return y


@triton.jit
def _heba_text_bwd_kernel_dx(X, G, WD, WU, NW, MEAN, RSTD,          # as in the forward; G [M, D]
                             DX, DY, A_OUT, DU_OUT, U_BUF, DNW_PART, DNB_PART,
                             M, D, H, stride_xm, stride_gm, stride_dxm, scale, scale_ptr,
                             SCALE_PTR: tl.constexpr, WIDE: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_H: tl.constexpr, BLOCK_HC: tl.constexpr, OP: tl.constexpr,
                             UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """The backward of ``BLOCK_M`` tokens. ``WIDE`` False: ``u``, ``a``, ``da`` and ``du``
    live in ``[BLOCK_M, BLOCK_H]`` registers (h <= WIDE_H). ``WIDE`` True: the same math
    with h in ``BLOCK_HC`` chunks, ``u`` (float32), ``a`` and ``du`` kept in ``[M, h]``
    buffers (``U_BUF``, ``A_OUT``, ``DU_OUT``) and read back after a barrier."""
    pid = tl.program_id(0)
    scale = _scalar(scale, scale_ptr, SCALE_PTR)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)                       # [BLOCK_M]
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)                                     # [BLOCK_H]
    h_ok = offs_h < H
    offs_n = tl.arange(0, BLOCK_N)                                     # [BLOCK_N]

    # Recompute u = x @ W_d^T and a = gelu(u).
    if WIDE:
        _text_bwd_wide_hidden(X, WD, A_OUT, U_BUF, rows64, row_ok, offs_n, D, H, stride_xm,
                              BLOCK_M, BLOCK_N, BLOCK_HC, OP, UPCAST, IEEE)
        tl.debug_barrier()                    # A_OUT is read back by other threads
    else:
        u = _text_u(X, WD, rows64, row_ok, offs_h, h_ok, offs_n, D, stride_xm, BLOCK_M,
                    BLOCK_N, BLOCK_H, OP, UPCAST, IEEE)                # [BLOCK_M, BLOCK_H]
        a = _op_cast(_gelu(u), OP, UPCAST)                             # [BLOCK_M, BLOCK_H]
    mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)

    # Sweep 1: c1 = mean(dyhat * yhat), c2 = mean(dyhat); this program's dw, db partials.
    c1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    c2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_N):
        cols = n0 + offs_n
        c_ok = cols < D
        mask = row_ok[:, None] & c_ok[None, :]
        if WIDE:
            y = _text_bwd_wide_y(X, WU, A_OUT, rows64, row_ok, cols, c_ok, H, stride_xm,
                                 BLOCK_M, BLOCK_HC, OP, UPCAST, IEEE)
        else:
            y = _text_y(X, WU, a, rows64, cols, mask, offs_h, h_ok, c_ok, H, stride_xm, OP,
                        UPCAST, IEEE)
        yhat, g, dyhat = _ln_bwd_terms(y, G, NW, rows64, cols, mask, c_ok, mean, rstd,
                                       stride_gm)
        c1 += tl.sum(dyhat * yhat, axis=1)
        c2 += tl.sum(dyhat, axis=1)
        tl.store(DNW_PART + pid * D + cols, tl.sum(g * yhat, axis=0), mask=c_ok)
        tl.store(DNB_PART + pid * D + cols, tl.sum(g, axis=0), mask=c_ok)
    c1 = c1 / D
    c2 = c2 / D

    # Sweep 2: dy = rstd * (dyhat - c2 - yhat * c1), written for dx and dW_u; da = dy @ W_u
    # on the fly (narrow) or after the sweep from dy read back (wide).
    if not WIDE:
        da = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)            # [BLOCK_M, BLOCK_H]
    for n0 in range(0, D, BLOCK_N):
        cols = n0 + offs_n
        c_ok = cols < D
        mask = row_ok[:, None] & c_ok[None, :]
        if WIDE:
            y = _text_bwd_wide_y(X, WU, A_OUT, rows64, row_ok, cols, c_ok, H, stride_xm,
                                 BLOCK_M, BLOCK_HC, OP, UPCAST, IEEE)
        else:
            y = _text_y(X, WU, a, rows64, cols, mask, offs_h, h_ok, c_ok, H, stride_xm, OP,
                        UPCAST, IEEE)
        yhat = (y - mean[:, None]) * rstd[:, None]
        g = tl.load(G + rows64[:, None] * stride_gm + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        w = tl.load(NW + cols, mask=c_ok, other=0.0).to(tl.float32)
        dy = rstd[:, None] * (g * w[None, :] - c2[:, None] - yhat * c1[:, None])
        dy = tl.where(mask, dy, 0.0)                                   # [BLOCK_M, BLOCK_N]
        tl.store(DY + rows64[:, None] * D + cols[None, :], dy.to(DY.dtype.element_ty), mask=mask)
        if not WIDE:
            wu_t = _op_cast(tl.load(WU + cols[None, :] * H + offs_h[:, None],
                                    mask=h_ok[:, None] & c_ok[None, :], other=0.0), OP, UPCAST)
            da = _mma(_op_cast(dy, OP, UPCAST), tl.trans(wu_t), da, IEEE)
    if WIDE:
        tl.debug_barrier()                    # DY is read back by other threads
        _text_bwd_wide_du(DY, WU, U_BUF, DU_OUT, rows64, row_ok, offs_n, D, H,
                          BLOCK_M, BLOCK_N, BLOCK_HC, OP, UPCAST, IEEE)
    else:
        du = da * _gelu_grad(u)                                        # 0 in padded columns
        hm_mask = row_ok[:, None] & h_ok[None, :]
        h_ptrs = rows64[:, None] * H + offs_h[None, :]
        tl.store(A_OUT + h_ptrs, a.to(A_OUT.dtype.element_ty), mask=hm_mask)
        tl.store(DU_OUT + h_ptrs, du.to(DU_OUT.dtype.element_ty), mask=hm_mask)
    # Sweep 3 reads back dy (and, wide, du) that other threads of this program wrote.
    tl.debug_barrier()

    # Sweep 3: dx = g + scale * (dy + du @ W_d).
    for n0 in range(0, D, BLOCK_N):
        cols = n0 + offs_n
        c_ok = cols < D
        mask = row_ok[:, None] & c_ok[None, :]
        acc = tl.load(DY + rows64[:, None] * D + cols[None, :], mask=mask,
                      other=0.0).to(tl.float32)
        if WIDE:
            for h0 in range(0, H, BLOCK_HC):
                offs_hc = h0 + tl.arange(0, BLOCK_HC)
                hc_ok = offs_hc < H
                du_c = tl.load(DU_OUT + rows64[:, None] * H + offs_hc[None, :],
                               mask=row_ok[:, None] & hc_ok[None, :], other=0.0)
                wd = tl.load(WD + offs_hc[:, None] * D + cols[None, :],
                             mask=hc_ok[:, None] & c_ok[None, :], other=0.0)
                acc = _mma(_op_cast(du_c, OP, UPCAST), _op_cast(wd, OP, UPCAST), acc, IEEE)
        else:
            wd = tl.load(WD + offs_h[:, None] * D + cols[None, :],
                         mask=h_ok[:, None] & c_ok[None, :], other=0.0)    # [BLOCK_H, BLOCK_N]
            acc = _mma(_op_cast(du, OP, UPCAST), _op_cast(wd, OP, UPCAST), acc, IEEE)
        g = tl.load(G + rows64[:, None] * stride_gm + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        tl.store(DX + rows64[:, None] * stride_dxm + cols[None, :],
                 (g + scale * acc).to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _heba_text_bwd_kernel_du(X, G, WD, WU, NW, MEAN, RSTD,          # as in the forward; G [M, D]
                             A_OUT, DU_OUT, CST,                    # [M, H], [M, H], [M, 2] fp32
                             M, D, H, stride_xm, stride_gm,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_H: tl.constexpr, OP: tl.constexpr, UPCAST: tl.constexpr,
                             IEEE: tl.constexpr):
    """The row part of the backward for bottlenecks up to ``FUSED_DW_MAX_H`` columns, one
    program per ``BLOCK_M`` tokens: ``u``, ``a = gelu(u)``, the LayerNorm backward's row
    constants ``c1 = mean(dyhat * yhat)``, ``c2 = mean(dyhat)`` (to ``CST``), then
    ``da = dy @ W_u`` with ``dy`` formed chunk by chunk and never stored, and
    ``du = da * gelu'(u)``; writes ``a`` and ``du`` in the operand dtype."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)                       # [BLOCK_M]
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)                                     # [BLOCK_H]
    h_ok = offs_h < H
    offs_n = tl.arange(0, BLOCK_N)                                     # [BLOCK_N]
    u = _text_u(X, WD, rows64, row_ok, offs_h, h_ok, offs_n, D, stride_xm, BLOCK_M, BLOCK_N,
                BLOCK_H, OP, UPCAST, IEEE)                             # [BLOCK_M, BLOCK_H]
    a = _op_cast(_gelu(u), OP, UPCAST)
    mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)

    # Sweep 1: the row constants c1, c2.
    c1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    c2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_N):
        cols = n0 + offs_n
        c_ok = cols < D
        mask = row_ok[:, None] & c_ok[None, :]
        y = _text_y(X, WU, a, rows64, cols, mask, offs_h, h_ok, c_ok, H, stride_xm, OP,
                    UPCAST, IEEE)
        yhat, g, dyhat = _ln_bwd_terms(y, G, NW, rows64, cols, mask, c_ok, mean, rstd,
                                       stride_gm)
        c1 += tl.sum(dyhat * yhat, axis=1)
        c2 += tl.sum(dyhat, axis=1)
    c1 = c1 / D
    c2 = c2 / D
    tl.store(CST + rows64 * 2, c1, mask=row_ok)
    tl.store(CST + rows64 * 2 + 1, c2, mask=row_ok)

    # Sweep 2: dy = rstd * (dyhat - c2 - yhat * c1) chunk by chunk, da = dy @ W_u on the fly
    # (one load of the W_u tile serves y and da).
    da = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)                # [BLOCK_M, BLOCK_H]
    for n0 in range(0, D, BLOCK_N):
        cols = n0 + offs_n
        c_ok = cols < D
        mask = row_ok[:, None] & c_ok[None, :]
        wu_t = _op_cast(tl.load(WU + cols[None, :] * H + offs_h[:, None],
                                mask=h_ok[:, None] & c_ok[None, :], other=0.0),
                        OP, UPCAST)                                    # [BLOCK_H, BLOCK_N]
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        yhat = (_mma(a, wu_t, x, IEEE) - mean[:, None]) * rstd[:, None]
        g = tl.load(G + rows64[:, None] * stride_gm + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        dyhat = g * tl.load(NW + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        dy = tl.where(mask, rstd[:, None] * (dyhat - c2[:, None] - yhat * c1[:, None]), 0.0)
        da = _mma(_op_cast(dy, OP, UPCAST), tl.trans(wu_t), da, IEEE)
    du = da * _gelu_grad(u)                                            # 0 in padded columns
    hm_mask = row_ok[:, None] & h_ok[None, :]
    h_ptrs = rows64[:, None] * H + offs_h[None, :]
    tl.store(A_OUT + h_ptrs, a.to(A_OUT.dtype.element_ty), mask=hm_mask)
    tl.store(DU_OUT + h_ptrs, du.to(DU_OUT.dtype.element_ty), mask=hm_mask)


@triton.jit
def _text_w_tiles(WU, WD, cols, offs_h, w_mask, D, H, OP: tl.constexpr, UPCAST: tl.constexpr):
    """The dx kernel's weight tiles ``W_u[cols, :]^T`` and ``W_d[:, cols]``, both
    ``[BLOCK_H, BLOCK_D]`` in the operand dtype."""
    wu_t = tl.load(WU + cols[None, :] * H + offs_h[:, None], mask=w_mask, other=0.0)
    wd = tl.load(WD + offs_h[:, None] * D + cols[None, :], mask=w_mask, other=0.0)
    return _op_cast(wu_t, OP, UPCAST), _op_cast(wd, OP, UPCAST)


@triton.jit
def _heba_text_bwd_kernel_dx_dw(X, G, WD, WU, NW, MEAN, RSTD, CST, A_IN, DU_IN,  # as above
                                DX, DWU_PART, DWD_PART, DNW_PART, DNB_PART,  # [S, D, H],
                                #                                  [S, H, D], [S, D], [S, D]
                                D_UP, D_DOWN, D_NW, D_NB, CNT,   # [D, H], [H, D], [D], [D];
                                #                                  int32 [n_d], zero
                                M, D, H, stride_xm, stride_gm, stride_dxm,
                                scale, scale_ptr, pscale, pscale_ptr,
                                SCALE_PTR: tl.constexpr, PSCALE_PTR: tl.constexpr,
                                PSCALED: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK_H: tl.constexpr, OP: tl.constexpr, UPCAST: tl.constexpr,
                                IEEE: tl.constexpr):
    """Program ``(s, j)`` of ``S x n_d``: columns ``j`` of D (``BLOCK_D`` wide), row blocks
    ``s, s + S, ...``. Per block ``dy`` of its columns is recomputed from ``x``, ``g``, ``a``
    and the row constants (``y = x + a @ W_u^T``, K = h), ``dx = g + scale * (dy + du @ W_d)``
    written, and the program's shares ``dW_u[j, :] += dy^T a``, ``dW_d[:, j] += du^T x``,
    ``dw[j] += sum g * yhat``, ``db[j] += sum g`` summed in float32 registers, written
    once to slot ``s``: no ``dy`` round trip through memory, no split-K launches. The
    last of column ``j``'s ``S`` programs to arrive (counted in ``CNT[j]``, left at zero)
    sums the column's slots in order into the four gradients, times ``pscale`` if
    ``PSCALED``: no reduction launch either."""
    pid = tl.program_id(0)
    n_s = tl.num_programs(0)
    scale = _scalar(scale, scale_ptr, SCALE_PTR)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)          # [BLOCK_D]
    c_ok = cols < D
    offs_h = tl.arange(0, BLOCK_H)                                     # [BLOCK_H]
    h_ok = offs_h < H
    w_mask = h_ok[:, None] & c_ok[None, :]
    if not IEEE:         # tensor-core operands: the program's weight tiles stay in registers
        wu_t, wd = _text_w_tiles(WU, WD, cols, offs_h, w_mask, D, H, OP, UPCAST)
    nw = tl.load(NW + cols, mask=c_ok, other=0.0).to(tl.float32)
    acc_u = tl.zeros((BLOCK_D, BLOCK_H), dtype=tl.float32)             # dW_u[j, :]
    acc_d = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)             # dW_d[:, j]
    dnw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dnb = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(0, tl.cdiv(tl.cdiv(M, BLOCK_M) - pid, n_s)):
        rows = (pid + i * n_s) * BLOCK_M + tl.arange(0, BLOCK_M)       # [BLOCK_M]
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        mask = row_ok[:, None] & c_ok[None, :]
        hm_mask = row_ok[:, None] & h_ok[None, :]
        h_ptrs = rows64[:, None] * H + offs_h[None, :]
        if IEEE:         # float32 FMA products: held across the loop, the tiles spill
            wu_t, wd = _text_w_tiles(WU, WD, cols, offs_h, w_mask, D, H, OP, UPCAST)
        a = _op_cast(tl.load(A_IN + h_ptrs, mask=hm_mask, other=0.0), OP, UPCAST)
        du = _op_cast(tl.load(DU_IN + h_ptrs, mask=hm_mask, other=0.0), OP, UPCAST)
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        g = tl.load(G + rows64[:, None] * stride_gm + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)                          # [BLOCK_M, BLOCK_D]
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        c1 = tl.load(CST + rows64 * 2, mask=row_ok, other=0.0)
        c2 = tl.load(CST + rows64 * 2 + 1, mask=row_ok, other=0.0)
        yhat = (_mma(a, wu_t, x.to(tl.float32), IEEE) - mean[:, None]) * rstd[:, None]
        dy = rstd[:, None] * (g * nw[None, :] - c2[:, None] - yhat * c1[:, None])
        dy = tl.where(mask, dy, 0.0)                                   # float32
        acc = _mma(du, wd, dy, IEEE)                                   # dy + du @ W_d[:, j]
        tl.store(DX + rows64[:, None] * stride_dxm + cols[None, :],
                 (g + scale * acc).to(DX.dtype.element_ty), mask=mask)
        dnw += tl.sum(g * yhat, axis=0)                                # g = 0 off the tile
        dnb += tl.sum(g, axis=0)
        acc_u = _mma(tl.trans(_op_cast(dy, OP, UPCAST)), a, acc_u, IEEE)
        acc_d = _mma(tl.trans(du), _op_cast(x, OP, UPCAST), acc_d, IEEE)
    slot = pid.to(tl.int64)
    tl.store(DWU_PART + slot * D * H + cols[:, None] * H + offs_h[None, :], acc_u,
             mask=c_ok[:, None] & h_ok[None, :])
    tl.store(DWD_PART + slot * H * D + offs_h[:, None] * D + cols[None, :], acc_d, mask=w_mask)
    tl.store(DNW_PART + slot * D + cols, dnw, mask=c_ok)
    tl.store(DNB_PART + slot * D + cols, dnb, mask=c_ok)
    # The column's arrival (every thread's stores first; see _triton_common._atb_tile).
    tl.debug_barrier()
    arrived = tl.atomic_add(CNT + tl.program_id(1), 1, sem="acq_rel", scope="gpu")
    if arrived == n_s - 1:
        pscale = _scalar(pscale, pscale_ptr, PSCALE_PTR)
        _sum_slots(DWU_PART, D_UP, cols[:, None] * H + offs_h[None, :],
                   c_ok[:, None] & h_ok[None, :], n_s, D * H, pscale, PSCALED)
        _sum_slots(DWD_PART, D_DOWN, offs_h[:, None] * D + cols[None, :], w_mask, n_s, H * D,
                   pscale, PSCALED)
        _sum_slots(DNW_PART, D_NW, cols, c_ok, n_s, D, pscale, PSCALED)
        _sum_slots(DNB_PART, D_NB, cols, c_ok, n_s, D, pscale, PSCALED)
        tl.atomic_xchg(CNT + tl.program_id(1), 0, sem="relaxed", scope="gpu")


# ----------------------------------------------------------------------------- launchers

def _rows(t):
    """``t`` as ``[M, D]`` rows with unit column stride: a view when strides allow,
    otherwise one contiguous copy (e.g. an ``[N, B, D]`` transpose of ``[B, N, D]``).
    The backward makes that copy of the saved ``x`` again rather than keep it alive."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] <= 1 else t2.contiguous()


def _config(H, op_dtype, backward):
    """Block sizes: ``(BLOCK_M, BLOCK_N, BLOCK_H, num_warps)``.

    Chosen without a GPU at hand, by compiling for sm_90 with Triton 3.8
    (``scripts/triton_aot_check.py``) and
    reading ptxas's register report: tiles that compile with no (or < 256
    bytes of) register spills at h = 10..512, for 16-bit and
    float32 operands; every choice keeps shared memory under 70 KiB. The
    backward holds three ``[BLOCK_M, BLOCK_H]`` float32 tiles, the forward one;
    float32 operands ("ieee" products on FMA units) need about twice the
    registers of 16-bit ones. Not yet tuned by timing.

    Measured with the launch-like hints of scripts/triton_aot_check.py (sm_90): backward
    h=512 16x16x512 255 registers, no spill (16-bit; 36 B in float32 with Triton 3.8);
    h=768/1024 with the old single kernel (16x16x1024) 255 registers and 380-396 B of
    spills, hence the wide kernel: 32x32, h chunks of 256, 232-237 registers, no spill
    (16-bit; float32 16x32: 128 registers, 28 B), 32-48 KiB shared memory. The fused
    backward's row kernel (``_heba_text_bwd_kernel_du``, h <= ``FUSED_DW_MAX_H``) takes
    the backward's blocks and holds the same three tiles (``u``, ``a``, ``da``) without
    the dx sweep: 16-bit 125-158 registers at h=10..256, no spill; float32 100-184,
    12 B spilled at h=192/256.
    """
    BLOCK_H = max(16, triton.next_power_of_2(H))
    wide = op_dtype == torch.float32
    max_tile = (4096 if backward else 8192) // (2 if wide else 1)
    BLOCK_M = max(16, min(64, max_tile // BLOCK_H))                    # [BLOCK_M, BLOCK_H] tiles
    if backward or wide:
        BLOCK_N = 32 if BLOCK_H <= 256 else 16                         # [BLOCK_H, BLOCK_N] tiles
    else:
        BLOCK_N = 64 if BLOCK_H <= 128 else 32
    if backward and BLOCK_H > WIDE_H:
        # The wide kernel: h in _WIDE_BLOCK_HC chunks; its tiles are [BLOCK_M, 256].
        return (16 if wide else 32), 32, BLOCK_H, 8
    return BLOCK_M, BLOCK_N, BLOCK_H, 8


_WIDE_BLOCK_HC = 256     # h chunk of the wide backward kernel

# Bottlenecks up to this many columns (padded to a power of two) take the fused backward:
# _heba_text_bwd_kernel_du (a, du, the LayerNorm row constants), then
# _heba_text_bwd_kernel_dx_dw, whose programs recompute dy for their columns of D and sum
# their shares of dW_u, dW_d, dw and db in registers: dy never goes through memory and the
# two split-K launches go. Modelled (benchmarks/roofline.py, bf16, H200, B512 x 77 tokens):
#   D512 h128 (text-d512), forward + backward: split-K 5 launches, 444 MB (2.20x ideal),
#     51.7 GFLOP, floor 93 us; fused 4 launches, 334 MB (1.65x), 56.8 GFLOP, floor 70 us.
#     Backward alone 363 -> 253 MB, 36.2 -> 41.3 GFLOP (one more y = x + a W_u^T pass),
#     76 -> 53 us: no dy written and read back, no split-K re-reads of dy and x, 8
#     float32 partial slots where there were 33 per weight and 1232 for dw and db.
#   D768 h192 (ViT-L/14 text width), backward: split-K 536 MB, 100.8 GFLOP, floor
#     121 us; fused 378 MB, 124.0 GFLOP, 127 us: on this model FLOP-bound and 5% slower
#     (h padded to 256 in all eight GEMM passes) for 30% fewer bytes.
# So the fused backward up to 128 columns (ViT-B/16's attention-position text adapters),
# split-K from 129 on (ViT-L/14's h = 192, every MLP-position one); both untimed on a
# GPU, and the kernels compile for 256 columns (no spill in 16-bit) should a GPU favour
# the fused path there. At h = 512 the two [BLOCK_D, h] float32 accumulators would not
# fit in registers.
FUSED_DW_MAX_H = 128


def _dx_dw_config(H, op_dtype, gpu):
    """Blocks of ``_heba_text_bwd_kernel_dx_dw``: ``(BLOCK_M, BLOCK_D, BLOCK_H, num_warps)``.

    16-bit operands: blocks of 32 rows x 32 columns of D, 8 warps, the program's two weight
    tiles held in registers over its row blocks. scripts/triton_aot_check.py (sm_90,
    Triton 3.8, launch-like hints): h=10 140-154 registers, h=128 146-148, h=192/256
    173-186, no spill, 9-77 KiB shared memory (the weight tiles loaded per block instead:
    160 / 224 registers at h=128 / 256). float32 operands (FMA products): 16 x 16 blocks,
    16 warps, the weight tiles loaded per block: h=10..128 109-126 registers, no spill;
    h=192/256 128 and 24 B spilled (32 x 32 at 8 warps spilled 9-17 KB; holding the
    weight tiles at 16 x 16, 0.9-2.6 KB). Either way one program fills an SM's registers,
    hence about one program per SM in :func:`text_plan`. Not yet tuned by timing.
    """
    BLOCK_H = max(16, triton.next_power_of_2(H))
    if not gpu:              # the interpreter: small row blocks, several D chunks in tests
        return 16, 32, BLOCK_H, 4
    if op_dtype in (torch.float32, torch.float64):
        return 16, 16, BLOCK_H, 16
    return 32, 32, BLOCK_H, 8


def text_plan(M, D, H, op_dtype, sms, gpu, backward):
    """The launches of the forward (``backward`` False) or of the backward for ``M`` tokens
    of width ``D``, bottleneck ``H``. Backward up to ``FUSED_DW_MAX_H``: the row kernel
    (``du``), the dx kernel that also sums the parameter gradients (``dx``, ``S x n_d``
    programs, the last of each chunk's ``S`` summing their slots). Wider: the row kernel (``dx``),
    then both weight-gradient reductions and the sums of every partial buffer in one launch
    (:func:`~heba_kernels._triton_common.atb_pair_sums`)."""
    BLOCK_M, BLOCK_N, BLOCK_H, num_warps = _config(H, op_dtype, backward=backward)
    meta = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_H=BLOCK_H, num_warps=num_warps)
    grid = (triton.cdiv(M, BLOCK_M),)
    if not backward:
        return [Launch("fwd", "_heba_text_fwd_kernel", grid, meta)]
    if BLOCK_H <= FUSED_DW_MAX_H:
        BT, BD, BH, warps = _dx_dw_config(H, op_dtype, gpu)
        n_d = triton.cdiv(D, BD)
        # S row programs per D chunk, each looping over the row blocks s, s + S, ...: about
        # one program per SM (its registers allow one 8-warp program per SM), so they all
        # run in one wave; S is also the number of float32 partial slots. Two in the
        # interpreter, so that the tests run the loop and the summing.
        n_s = max(1, min(triton.cdiv(M, BT), sms // n_d if gpu else 2))
        return [Launch("du", "_heba_text_bwd_kernel_du", grid, meta),
                Launch("dx", "_heba_text_bwd_kernel_dx_dw", (n_s, n_d),
                       dict(BLOCK_M=BT, BLOCK_D=BD, BLOCK_H=BH, num_warps=warps))]
    row = Launch("dx", "_heba_text_bwd_kernel_dx", grid,
                 dict(meta, WIDE=BLOCK_H > WIDE_H, BLOCK_HC=_WIDE_BLOCK_HC))
    # both weight gradients, summed with the LayerNorm's partials: one split-K launch
    return [row, atb_pair_sum_plan(M, D, H, op_dtype, sms, gpu,
                                   extras=[(grid[0], D), (grid[0], D)])]


def heba_text_fwd(x, down_weight, up_weight, norm_weight, norm_bias, scale, eps, op_dtype=None):
    """Forward for ``x [..., D]``: ``(out [..., D] contiguous, mean [M], rstd [M])``."""
    D = x.shape[-1]
    H = down_weight.shape[0]
    x2 = _rows(x)
    M = x2.shape[0]
    out = new_buffer(x.shape, x.dtype, x.device)
    mean = new_buffer((M,), torch.float32, x.device)
    rstd = new_buffer((M,), torch.float32, x.device)
    if M == 0:
        return out, mean, rstd
    out2 = out.view(M, D)
    op_dtype = op_dtype or down_weight.dtype       # matmul operands (autocast: its dtype)
    upcast, ieee = launch_flags(x.device, op_dtype)
    (fwd,) = text_plan(M, D, H, op_dtype, *plan_device(x.device), backward=False)
    BLOCK_M, BLOCK_N, BLOCK_H, num_warps = (fwd.meta[k] for k in
                                            ("BLOCK_M", "BLOCK_N", "BLOCK_H", "num_warps"))
    grid = fwd.grid
    scale_v, scale_p, scale_from_ptr = scale.kernel_args(mean)
    launch(_heba_text_fwd_kernel, grid,
        x2, down_weight, up_weight, norm_weight, norm_bias, out2, mean, rstd,
        M, D, H, x2.stride(0), out2.stride(0), scale_v, scale_p, float(eps),
        SCALE_PTR=scale_from_ptr, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_H=BLOCK_H,
        OP=op_code(op_dtype), UPCAST=upcast, IEEE=ieee, num_warps=num_warps, num_stages=2)
    return out, mean, rstd


def heba_text_bwd(g, x, down_weight, up_weight, norm_weight, mean, rstd, scale,
                  rescale_param_grad, op_dtype=None):
    """Gradients ``(dx, d down.weight, d up.weight, d norm.weight, d norm.bias)``."""
    D = x.shape[-1]
    H = down_weight.shape[0]
    x2, g2 = _rows(x), _rows(g)
    M = x2.shape[0]
    op_dtype = op_dtype or down_weight.dtype       # matmul operands (autocast: its dtype)
    p_scale = ONE if rescale_param_grad else scale        # the parameters' gradient factor
    dev = x.device
    dx = new_buffer(x.shape, x.dtype, dev)
    if M == 0:
        return (dx, torch.zeros_like(down_weight), torch.zeros_like(up_weight),
                torch.zeros_like(norm_weight), torch.zeros_like(norm_weight))
    dx2 = dx.view(M, D)
    upcast, ieee = launch_flags(dev, op_dtype)
    flags = dict(OP=op_code(op_dtype), UPCAST=upcast, IEEE=ieee, num_stages=2)
    plan = {st.step: st for st in text_plan(M, D, H, op_dtype, *plan_device(dev),
                                            backward=True)}
    scale_v, scale_p, scale_from_ptr = scale.kernel_args(mean)
    a_buf = new_buffer((M, H), op_dtype, dev)             # gelu(u)    [M, H]
    du_buf = new_buffer((M, H), op_dtype, dev)            # dL/du      [M, H]
    if "du" in plan:     # h <= FUSED_DW_MAX_H: the dx kernel sums the parameter gradients
        row, step = plan["du"], plan["dx"]
        cst = new_buffer((M, 2), torch.float32, dev)      # c1, c2 per token
        launch(_heba_text_bwd_kernel_du, row.grid,
            x2, g2, down_weight, up_weight, norm_weight, mean, rstd, a_buf, du_buf, cst,
            M, D, H, x2.stride(0), g2.stride(0), **row.meta, **flags)
        n_s = step.grid[0]
        up = new_buffer((n_s, D, H), torch.float32, dev)
        down = new_buffer((n_s, H, D), torch.float32, dev)
        dnw_part = new_buffer((n_s, D), torch.float32, dev)
        dnb_part = new_buffer((n_s, D), torch.float32, dev)
        d_up = new_buffer((D, H), up_weight.dtype, dev)
        d_down = new_buffer((H, D), down_weight.dtype, dev)
        dnw = new_buffer((D,), norm_weight.dtype, dev)
        dnb = new_buffer((D,), norm_weight.dtype, dev)
        ps_v, ps_p, ps_from_ptr = p_scale.kernel_args(mean)
        launch(_heba_text_bwd_kernel_dx_dw, step.grid,
            x2, g2, down_weight, up_weight, norm_weight, mean, rstd, cst, a_buf, du_buf,
            dx2, up, down, dnw_part, dnb_part, d_up, d_down, dnw, dnb,
            tile_counters(dev, step.grid[1]), M, D, H, x2.stride(0), g2.stride(0),
            dx2.stride(0), scale_v, scale_p, ps_v, ps_p, SCALE_PTR=scale_from_ptr,
            PSCALE_PTR=ps_from_ptr, PSCALED=not p_scale.is_one(), **step.meta, **flags)
        return dx, d_down, d_up, dnw, dnb
    row = plan["dx"]
    dy = new_buffer((M, D), x.dtype, dev)              # dL/dy      [M, D]
    dnw_part = new_buffer((row.grid[0], D), torch.float32, dev)
    dnb_part = new_buffer((row.grid[0], D), torch.float32, dev)
    wide = row.meta["WIDE"]
    u_buf = new_buffer((M, H), torch.float32, dev) if wide else dnw_part   # u, wide only
    launch(_heba_text_bwd_kernel_dx, row.grid,
        x2, g2, down_weight, up_weight, norm_weight, mean, rstd,
        dx2, dy, a_buf, du_buf, u_buf, dnw_part, dnb_part,
        M, D, H, x2.stride(0), g2.stride(0), dx2.stride(0), scale_v, scale_p,
        SCALE_PTR=scale_from_ptr, **row.meta, **flags)
    # dWu = dy^T a [D, H] and dWd = du^T x [H, D], summed with dw and db: one launch
    d_up, d_down, dnw, dnb = atb_pair_sums(
        dy, a_buf, x2, du_buf, op_dtype,
        [Sum((D, H), up_weight.dtype, True), Sum((H, D), down_weight.dtype, True)],
        [Partial(dnw_part, (D,), norm_weight.dtype, True),
         Partial(dnb_part, (D,), norm_weight.dtype, True)], p_scale)
    return dx, d_down, d_up, dnw, dnb


# ----------------------------------------------------------------------------- torch.library ops

@torch.library.custom_op("heba::triton_text_fwd", mutates_args=())
def _heba_text_fwd_op(x: torch.Tensor, down_weight: torch.Tensor, up_weight: torch.Tensor,
                      norm_weight: torch.Tensor, norm_bias: torch.Tensor, scale: float,
                      scale_t: Optional[torch.Tensor], eps: float, rescale_param_grad: bool,
                      op_dtype: Optional[torch.dtype]
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The scale is scale_t (0-d float32) if given, else scale. rescale_param_grad is
    # unused here: it is an input so that the backward sees it.
    with device_guard(x):
        return heba_text_fwd(x, down_weight, up_weight, norm_weight, norm_bias,
                             Scale(scale, scale_t), eps, op_dtype)


@_heba_text_fwd_op.register_fake
def _(x, down_weight, up_weight, norm_weight, norm_bias, scale, scale_t, eps,
      rescale_param_grad, op_dtype):
    M = x.numel() // x.shape[-1]
    return (x.new_empty(x.shape), x.new_empty(M, dtype=torch.float32),
            x.new_empty(M, dtype=torch.float32))


@torch.library.custom_op("heba::triton_text_bwd", mutates_args=())
def _heba_text_bwd_op(g: torch.Tensor, x: torch.Tensor, down_weight: torch.Tensor,
                      up_weight: torch.Tensor, norm_weight: torch.Tensor, mean: torch.Tensor,
                      rstd: torch.Tensor, scale: float, scale_t: Optional[torch.Tensor],
                      rescale_param_grad: bool, op_dtype: Optional[torch.dtype]
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                 torch.Tensor]:
    with device_guard(x):
        return heba_text_bwd(g, x, down_weight, up_weight, norm_weight, mean, rstd,
                             Scale(scale, scale_t), rescale_param_grad, op_dtype)


@_heba_text_bwd_op.register_fake
def _(g, x, down_weight, up_weight, norm_weight, mean, rstd, scale, scale_t,
      rescale_param_grad, op_dtype):
    return (x.new_empty(x.shape), down_weight.new_empty(down_weight.shape),
            up_weight.new_empty(up_weight.shape), norm_weight.new_empty(norm_weight.shape),
            norm_weight.new_empty(norm_weight.shape))


def _heba_text_setup_context(ctx, inputs, output):
    (x, down_weight, up_weight, norm_weight, norm_bias, scale, scale_t, eps,
     rescale_param_grad, op_dtype) = inputs
    _, mean, rstd = output
    ctx.set_materialize_grads(False)   # no zero-filled gradients of the statistics
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, down_weight, up_weight, norm_weight, mean, rstd, scale_t)
    ctx.scale = scale
    ctx.rescale_param_grad = rescale_param_grad
    ctx.op_dtype = op_dtype


def _heba_text_backward(ctx, g, _g_mean, _g_rstd):
    x, down_weight, up_weight, norm_weight, mean, rstd, scale_t = ctx.saved_tensors
    dx, d_down, d_up, dnw, dnb = torch.ops.heba.triton_text_bwd(
        g, x, down_weight, up_weight, norm_weight, mean, rstd, ctx.scale, scale_t,
        ctx.rescale_param_grad, ctx.op_dtype)
    return dx, d_down, d_up, dnw, dnb, None, None, None, None, None


torch.library.register_autograd("heba::triton_text_fwd", _heba_text_backward,
                                setup_context=_heba_text_setup_context)


# ----------------------------------------------------------------------------- public function

def heba_text(x, down_weight, up_weight, norm_weight, norm_bias, *, scale, eps,
              rescale_param_grad, op_dtype=None):
    """HeBA text adapter ``x + scale * LayerNorm(x + W_u gelu(W_d x))``, token-wise.

    Args:
        x: ``[..., D]`` tokens, float32/float16/bfloat16, any strides.
        down_weight: ``[h, D]``; up_weight: ``[D, h]``; norm_weight, norm_bias: ``[D]``.
        scale: the outer residual's scale: a Python float, or a 0-d float32 tensor on
            x's device, read by the kernels (0 is fine).
        eps: LayerNorm epsilon.
        rescale_param_grad: parameter gradients as if ``scale`` were 1 (docs/semantics.md) if True,
            plain gradients if False. ``x``'s gradient is the true one either way.
        op_dtype: matmul operand dtype (default None: the weights'); under autocast the
            autocast dtype with float32 weights, rounded in registers.

    Returns ``[..., D]`` in ``x``'s dtype.
    """
    check_dtypes("heba_text", x, down_weight, up_weight, norm_weight, norm_bias)
    out, _, _ = torch.ops.heba.triton_text_fwd(
        x, down_weight.contiguous(), up_weight.contiguous(), norm_weight.contiguous(),
        norm_bias.contiguous(), *Scale.of(scale), float(eps), bool(rescale_param_grad), op_dtype)
    return out
