"""Fused Triton kernels for the HeBA visual adapter, forward and backward.

Notation, per image and per grid token ``p`` (token ``P + p`` of ``x``; the grid
is row-major ``H x W``, the first ``P`` tokens pass through)::

    Wd = down.weight  [h, D]      Wm = mid.weight  [h, 9]      Wu = up.weight  [D, h]
    off_k = (k // 3 - 1, k % 3 - 1)   the 3x3 tap k as a (row, column) offset

Forward::

    u_p   = Wd t_p                                  # [h]  saved for backward, or recomputed
    v_p   = sum_k Wm[:, k] * u_{p + off_k}          # zero outside the grid (padding 1)
    s_p   = gelu(v_p)                               # exact (erf) GELU
    y_p   = t_p + Wu s_p                            # [D]
    yhat  = (y_p - mean_p) * rstd_p                 # mean, rstd saved (float32)
    out_p = t_p + scale * (gamma * yhat + beta)     # prefix tokens: out = x

Backward, with ``g = dL/dout`` and docs/semantics.md's gradient rule folded into two
factors, ``(gs, xs) = (1, scale)`` if ``rescale_param_grad`` else ``(scale, 1)``
(nothing is ever divided by ``scale``)::

    ga     = gs * g                                 # what the adapter's parameters see
    dgamma = sum_p ga * yhat            dbeta = sum_p ga
    dyhat  = ga * gamma
    dy     = rstd * (dyhat - mean_D(dyhat) - yhat * mean_D(dyhat * yhat))
    dWu    = sum_p dy_p s_p^T
    dv_p   = (Wu^T dy_p) * gelu'(v_p)               # gelu'(v) = Phi(v) + v phi(v)
    dWm[:, k] = sum_p dv_p * u_{p + off_k}
    du_q   = sum_k Wm[:, k] * dv_{q - off_k}        # the same stencil, taps mirrored
    dWd    = sum_p du_p t_p^T
    dx_p   = g_p + xs * (dy_p + Wd^T du_p)          # prefix tokens: dx = g

Kernels. Every kernel tiles the ``B x HW`` grid tokens of all images at once, in
blocks of ``BLOCK_T`` rows (a block may span two images; each row knows its image and
grid position, and the stencil reads neighbours of its own image only), so the weights
are read once per block of up to 128 rows, not once per short block of one image, and
no rows are padded but the last block's. ``D`` and ``h`` run in chunks, masked, so any
width works. The intermediate buffers are ``[B * HW, .]``.

Laid out for the L2 (benchmarks/roofline.py's re-read rules): a program that sweeps its
block's rows over D more than once (LayerNorm's statistics, then its output; the dv
phase once per ``BLOCK_HV`` bottleneck columns) sweeps in alternating directions, so each
sweep starts on the chunks it touched last, still in L2; and the programs that share a
row block (the down kernel's bottleneck chunks, the dx kernel's D chunks) have
consecutive program ids on a 1-D grid, so CUDA dispatches them together and the block's
rows come from HBM once (the switches ``ALTERNATE_SWEEPS`` and ``CHUNKS_FASTEST``: the
model prices both ways of each, the GPU check's ``tune`` stage times both). The kernels:

* ``_heba_visual_fwd_kernel_down`` (from ``FUSE_DOWN_BELOW_DIM`` up: every width as
  shipped): ``u = t Wd^T`` into a ``[B * HW, h]`` buffer in the weights' dtype (kept for
  backward).
* ``_heba_visual_fwd_kernel``: ``S`` persistent programs, each looping over blocks
  with one scratch of its own. Per block: below ``FUSE_DOWN_BELOW_DIM``, ``u`` of the
  block and of its stencil's halo (``W + 1`` rows each side) into the scratch (the
  block's own rows also into ``u``, kept for backward), so the forward is one launch;
  then ``s = gelu(dwconv(u))`` of its own rows into the scratch (read back after a
  barrier), the up-projection ``Wu s``, the residual, LayerNorm (Welford merge over D
  chunks, ``y`` stored; then a second sweep that reads ``y`` back, from the kept buffer or
  the program's scratch), ``t + scale * a``, and the prefix tokens of every image that
  starts in the block copied through.
* backward: ``_dy``, ``S`` programs each looping over the blocks ``s, s + S, ...``,
  three phases per block on its own rows: ``s`` again, the LayerNorm backward
  (dgamma/dbeta partials; writes ``dy`` into the ``dx`` buffer), then ``Wu^T dy``,
  GELU', the dWm partials (from ``dv`` in float32) and ``dv`` in the operand dtype (from
  ``DV_GEMM_MIN_DIM``, the MLP position, that phase is ``_heba_visual_bwd_kernel_dv``, a
  launch of its own tiled as a GEMM, and the _dy kernel stores ``gelu'(v)`` for its
  epilogue); ``_heba_visual_kernel_dwconv``: ``du = dwconv^T(dv)`` (its own pass: it
  needs ``dv`` of neighbouring blocks; after the dv launch it also sums dWm); dWu and dWd
  by ONE launch of :func:`~heba_kernels._triton_common.atb_pair_sums` (split-K ``A^T B``
  over the grid tokens into float32 partial slots, ``dWd`` as ``(t^T du)^T``; each output
  tile's last split sums its slots into the parameter's dtype, and programs of their own
  sum the dWm and LayerNorm partials: every parameter gradient in that launch); ``_dx``
  (``dx = g + xs (dy + Wd^T du)``, in place over ``dy``). With ``DW_IN_DX`` (off: the
  L2's bandwidth prices it higher; see the switch), up to ``FUSED_DW_MAX_H`` bottleneck
  columns, ``dy`` and ``s`` stay in the _dy programs' scratch: ``_dx`` recomputes ``dy``
  from ``u``, ``x``, ``g`` and two row constants, and its programs sum dWu and dWd
  themselves (no split-K launch); then ONE launch of
  :func:`~heba_kernels._triton_common.reduce_partials` sums all five partial buffers
  into the parameters' dtypes. Forward 2 launches (1 below ``FUSE_DOWN_BELOW_DIM``),
  backward 4 (5 from ``DV_GEMM_MIN_DIM``, 4 with ``DW_IN_DX``; one more when ``u`` is
  recomputed).

Saved for backward: ``x`` itself (by reference), ``mean``, ``rstd`` (8 bytes per
grid token) and ``u`` (``h`` values per grid token in the operand dtype: ``D/2``
bytes in bf16; kept from ``D >= SAVE_U_MIN_DIM``, today every width: the forward
writes ``u`` anyway, and the model prefers keeping it to a backward that reads
``x`` again for the down GEMM; see the constant). Below ``SAVE_U_MIN_DIM`` the
backward runs the down kernel again instead. From ``D >= KEEP_Y_MIN_DIM`` (today every
width) the forward also keeps the pre-LayerNorm ``y = t + Wu s`` (``D`` values per grid
token in x's dtype): the backward's two sweeps read it instead of recomputing the
up-projection (1.00x instead of 1.50x the ideal FLOPs at D=3072, and no weight re-reads
for it; see the constant). Saved or recomputed ``u``, the gradients are bitwise the
same (the same kernel computes the same ``u``). Everything else is recomputed.
Transient buffers: the forward's ``y`` below ``KEEP_Y_MIN_DIM`` (one block per program),
``s`` (forward and backward) and ``du`` (``h`` values per token in the weights'
dtype), ``dv`` (``h`` values per token, rounded to the operand dtype like ``du``:
bf16 halves its round trip); ``dy`` lives in the ``dx``
buffer. Parameter gradients are float32 partials summed in one launch in a fixed
order: deterministic, no atomics. The dgamma/dbeta/dWm partials have a bounded number
of slots: the _dy kernel runs ``S`` programs (``_partial_slots``: two per SM on a GPU),
program ``s`` summing blocks ``s, s + S, ...`` in that fixed order into its own slot, so
those buffers are ``S * (2 D + 9 h) * 4`` bytes whatever the batch (17 MB at D=4096 on
132 SMs; one slot per image and token block took 1.28 GB at B=1024).

``scale`` is a Python float (a kernel argument) or a 0-d float32 tensor on x's
device, which the kernels load (``SCALE_PTR``/``GS_PTR``/``XS_PTR``), so a
captured CUDA graph replays with the tensor's current value; both give the same
bits. Every launch runs under ``device_guard(x)``: Triton launches on the
current device's current stream. float64 inputs are computed in float32.

Environment variables: ``TRITON_INTERPRET=1`` (run on the CPU through Triton's
interpreter; matmul operands are then upcast to float32, since the interpreter's
``tl.dot`` on 16-bit operands is wrong) and ``HEBA_DEBUG_NAN_FILL=1`` (fill fresh
buffers with NaN so a tile a kernel forgets to write fails loudly in tests).
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from heba_kernels._triton_common import (Partial, Sum, _gelu, _gelu_grad, _mma, _op_cast,
                                         _scalar, atb_pair_sum_plan, atb_pair_sums,
                                         check_dtypes, device_guard, op_code, plan_device,
                                         reduce_partials, reduce_plan, tile_counters)
from heba_kernels.runtime import ONE, Launch, Scale, launch, new_buffer

__all__ = ["heba_visual", "heba_visual_fwd", "heba_visual_bwd", "visual_fwd_plan",
           "visual_bwd_plan"]

# Keep the bottleneck ``u`` for backward from this width up; below it, recompute ``u`` in
# backward. The forward writes ``u`` to memory at every width (its stencil phase reads
# it), so keeping it costs only its lifetime, while recomputing costs a launch, a read of
# x and the down GEMM. Modelled (benchmarks/roofline.py, H200, bf16, B256 14x14):
# attention position (D768 h192) recompute 6 launches, 854 MB, 191 GFLOP, floor
# 212 us (4.23 ns/token); keep 5 launches, 757 MB, 177 GFLOP, 192 us (3.83 ns/token),
# for 19 MB kept per adapter (the reference keeps 135 MB). So: kept at every width. A
# speed/memory choice only: the results are bitwise the same (tested both ways).
SAVE_U_MIN_DIM = 0

# Keep the pre-LayerNorm value y = t + Wu s (x's dtype) in a [B * HW, D] buffer from this
# width up, for the forward's second sweep and both sweeps of the backward's _dy, instead of
# recomputing the up-projection there. Below it the forward's second sweep reads y back from
# a per-program scratch of one block ([S, BLOCK_T, D], reused block after block: 13 MB at
# D768 on 132 SMs, L2-resident) and the backward recomputes it. Modelled forward + backward
# (benchmarks/roofline.py, bf16, B256 14x14, floor on H200 / H100):
#   MLP position (D3072 h768): kept 30.1 / 35.4 ns per token (1424 GFLOP, 1.00x ideal;
#     37 GB L2->SM), for 2 bytes per token and channel kept (308 MB per adapter at B256);
#     scratch + recompute 39.3 / 41.1 (1898 GFLOP; its 104 MB scratch would not stay in L2).
#   attention position (D768 h192): scratch + recompute 3.50 / 4.58 ns per token
#     (157 GFLOP, 770 MB); kept 3.77 / 4.96 (127 GFLOP, 834 MB: memory-bound, the y round
#     trip costs more than the GEMMs it saves); recomputing in the forward too (the
#     scratch's predecessor) 3.83 / 4.51 (177 GFLOP, 757 MB: the H100's lower bandwidth
#     makes the scratch's write-back cost more than the GEMM it saves, by 1.5%).
# Under the L2 re-read rule (benchmarks/roofline.py, with this module's alternating sweeps
# and blocks), forward + backward, H200 / H100: MLP position kept 30.9 / 37.3 ns per
# token (5103 MB), recomputed 48.6 / 62.6 (9357 MB); attention position recomputed (the
# scratch) 3.50 / 4.58, kept 3.73 / 4.92.
# With the L2's bandwidth a ceiling too (the model's third, HOPPER_L2_BW there), the
# recompute's cost is the up-projection's weight re-reads more than its FLOPs, at both
# widths, H200 / H100: attention position kept 8.10 / 8.34 ns per token (406 us at B256;
# 4.1 GB L2->SM, 1092 MB), scratch + recompute 10.26 / 10.50 (515 us; 5.2 GB, 1027 MB);
# at batch 16, 34 against 49 us. MLP position kept 67.1 / 67.6, recomputed 88.7 / 89.2.
# So y is kept at every width, for 2 bytes per token and channel (77 MB per
# attention-position adapter at B256; the reference keeps 135 MB).
# Numerics: in float32 the same bits whichever way; in 16-bit the forward's second sweep
# reads y rounded to x's dtype (as the reference rounds it), the backward's recomputed y
# is float32 (tested both ways).
KEEP_Y_MIN_DIM = 0

# Whether the dx kernel sums the weight gradients itself (``DW``, for bottlenecks up to
# ``FUSED_DW_MAX_H`` columns, padded to a power of two): each program keeps its share of
# dWu and dWd in registers over its row blocks, and recomputes dy (s from u by the
# stencil, z = Wu s, the LayerNorm backward from two stored row constants) instead of
# reading it, so dy and s never leave the _dy kernel's scratch and the split-K
# launch goes. Off: dy and s written once, one split-K launch (then two). Modelled
# (benchmarks/roofline.py, bf16, B256 14x14, H200), attention position (D768 h192),
# forward + backward, y recomputed: in the dx kernel 5 launches, 770 MB HBM (1.99x
# ideal), 8.8 GB L2->SM, floor 877 us; split-K 7 launches, 1027 MB (2.65x), 5.2 GB, 515
# us. With y kept (KEEP_Y_MIN_DIM): 5 launches, 826 MB, 7.7 GB, 768 us; split-K 7 (6 since
# the two split-K launches are one), 1092 MB, 4.1 GB, 406 us (at batch 16: 56 / 34 us).
# Fewer bytes, but every one of the dx kernel's 24 D chunks per row block recomputes s and
# z = Wu s, and the L2's bandwidth (HOPPER_L2_BW there, a lead until a GPU check measures
# it) binds before HBM's: off. The GPU check's ``tune`` stage times both (``dw-in-dx``).
DW_IN_DX = False

# The widest bottleneck (padded) whose weight gradients the dx kernel can sum: at h=512
# and up the two [BLOCK_D, h] accumulators would not fit in registers.
FUSED_DW_MAX_H = 256

# From this width ``dv = (dy Wu) * gelu'(v)`` is a launch of its own
# (``_heba_visual_bwd_kernel_dv``: one [DV_TILE, WIDE_TILE_COLS] tile per program, D as the
# GEMM's depth, as the down projection's), after the _dy kernel, which then writes dy and
# gelu'(v) (into dv's buffer: it computes v for s anyway), and dWm moves to the dwconv
# launch that reads dv next (``DWM``: its row programs loop over ``DWM_ROWS``-row blocks,
# one dWm slot each). Inside the _dy kernel every 32-row block re-reads all of Wu (4.7 MB at
# D3072 h768): 7.4 GB of L2->SM traffic per backward at B256. With v and dWm's nine taps
# recomputed in its epilogue the launch spilled registers past 64 x 64 tiles
# (scripts/triton_aot_check.py, sm_90, bf16, 8 warps: 128 x 128 1228 B); with the one
# product left, 128 x 128 takes 126 registers and 128 x 256 240, no spill (Triton 3.8;
# float32 weights spill at 256: 128 columns there), the dwconv launch with dWm at 64 rows
# 128 (152 fp16, 209 fp32), no spill. Modelled (benchmarks/roofline.py, bf16, 14x14, H200;
# the L2's bandwidth a lead there until a GPU check measures it), MLP position (D3072 h768),
# forward + backward, 8 launches either way (the weight gradients' split-K launches are one):
# dv in the _dy kernel 3369 us at B256 (256 at batch 16), a launch of its own 2749 (229 at
# batch 16; 128 x 128 tiles 2932), for 456 MB more HBM traffic (gelu'(v) and dy's round
# trips; 3.59x the ideal bytes against 3.29x). At the attention position (D768 h192, where
# Wu is 0.3 MB) a launch of its own models 396 against 406 us at B256 but 38.9 against 34.4
# at the published batch 16: kept in the _dy kernel below 2048. The GPU check's ``tune``
# stage times both ways at both widths (``dv-in-dy``, ``dv-gemm``).
DV_GEMM_MIN_DIM = 2048
DV_TILE = 128
DWM_ROWS = 64

# Bottleneck columns per tile of the down and dv launches with 16-bit operands (from
# ``BIG_BLOCK_MIN_DIM``, where such tiles alone give every SM a program: ``_tile_cols``;
# else 128): each tile reads its rows of x (or dy) over all of D once, so wider tiles read
# them fewer times. Modelled at D3072 h768, B256, H200:
# down 3.7 -> 2.8 GB L2->SM (365 -> 274 us), dv 3.9 -> 2.9 GB (380 -> 289 us). Registers
# (sm_90, bf16, 8 warps, Triton 3.8): down 187, dv 240, no spill (float32 weights spill
# 940 / 728 B at 256). The ``tune`` stage's ``tiles-128`` variant times 128.
WIDE_TILE_COLS = 256

# At most this many parts of D per row block in the forward kernel (``fwd_parts``): a batch
# of fewer row blocks than SMs (the published batch 16: 49 blocks of 64 rows on 132 SMs)
# splits each block's up-projection across programs, each streaming its share of ``Wu``
# (which every program otherwise streams whole, per block, at one SM's L2 bandwidth), and
# the block's last part normalises it. Modelled (benchmarks/roofline.py, bf16, 14x14, H200)
# at the MLP position (D3072 h768), the forward kernel: batch 8 70.2 -> 23.7 us (4 parts),
# batch 16 70.2 -> 44.2 (2 parts; 3, in two rounds on 132 SMs, 45.3), forward + backward
# 220 -> 194; from 67 blocks up (batch 22) one part, as the model prefers (batch 32: 2
# parts 88.3 against 86.0: the second round costs what the split gains). Where u is
# recomputed by the forward (below FUSE_DOWN_BELOW_DIM: the attention position) one part:
# each part would redo the down projection. Registers (scripts/triton_aot_check.py, sm_90,
# bf16, 8 warps, D3072, 2 parts): 212 with Triton 3.8, 249 with 3.6, no spill.
FWD_MAX_PARTS = 4

# Programs per SM of the weight gradients' split-K launch (``_triton_common.atb_plan``'s
# ``per_sm``: token splits = this x SMs / output tiles). At batch 16 its float32 slots
# outweigh its operands (attention position: 33 MB written and summed against 14 MB read;
# the model, which has no wave quantization, prefers 1 at every size: MLP position 54 ->
# 49 us at batch 16); kept at the shipped 4 until the ``tune`` stage (``splits-per-sm-1``)
# times it.
ATB_PROGRAMS_PER_SM = 4

# Rows per program up to 128 from this width (up to 64 below it): see ``_block_t``.
BIG_BLOCK_MIN_DIM = 2048

# Rows per program and bottleneck columns per dv sweep of the _dy kernel where y is kept
# (from ``KEEP_Y_MIN_DIM``): small enough blocks that its re-sweeps over y, g and dy stay in
# L2, wide enough h chunks that Wu is read as often as with 128-row blocks. See
# ``_dy_config``.
RESWEEP_ROWS = 32
RESWEEP_HV = 128

# Rows per program of the forward kernel where y is kept, and its columns of D per chunk on
# a GPU: see ``_fwd_config``.
KEPT_Y_ROWS = 64
FWD_COLS = 128

# The L2 layout (the module docstring; benchmarks/roofline.py prices both ways of each):
# programs sharing a row block consecutive on the down and dx kernels' 1-D grids, and a
# program's repeated sweeps over its rows in alternating directions. Off, the other order
# (the rows-fastest and one-way variants the GPU check's ``tune`` stage times).
CHUNKS_FASTEST = True
ALTERNATE_SWEEPS = True

# Below this width the forward is one launch: each block computes ``u`` of its rows and of
# its stencil's halo (W + 1 rows on each side) itself, instead of a down launch writing ``u``
# for the forward kernel to read back. The model used to prefer that below D2048 (HBM and
# FLOPs alone: attention position, B256, forward 53 against 57 us). With the L2's bandwidth
# a ceiling too (a lead until a GPU measures it) and the forward split into parts of D
# where the blocks are fewer than the SMs (``FWD_MAX_PARTS``: a part of a fused forward
# would redo the down projection and its halo, so the fused forward runs whole blocks),
# two launches model faster at every width and batch. Modelled (benchmarks/roofline.py,
# bf16, 14x14, H200, forward + backward), attention position (D768 h192): B256 387 against
# 404 us, batch 16 28.4 against 34.4 (the forward kernel 4.6 against 13.5: 98 programs in
# 2 parts against 49), batch 8 19.8 against 29.0; D1024 batch 16 41.9 against 51.8; D384
# batch 16 13.0 against 15.4. So: never fused (one launch more per adapter, 6 at the
# attention position). The fused path stays for the ``tune`` stage (``down-fused``) and
# its tests.
FUSE_DOWN_BELOW_DIM = 0


# --------------------------------------------------------------------------- kernels


@triton.jit
def _rows(blk, T, HW, BLOCK_T: tl.constexpr):
    """Grid-token rows of block ``blk``: ``(r, mask, b, p)``, int64 row ``r`` of the
    ``[B * HW, .]`` buffers, its image ``b`` and its position ``p`` on the image's grid.
    Blocks run over ``B x HW`` grid tokens at once, so a block may span two images."""
    r = blk.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = r // HW
    return r, r < T, b, r - b * HW


@triton.jit
def _chunk(i, n, TURN):
    """The ``i``-th of ``n`` chunks a sweep visits: ``i``, or ``n - 1 - i`` when the sweep
    runs back (``TURN`` 1)."""
    return i + TURN * (n - 1 - 2 * i)


@triton.jit
def _row_and_chunk(n_chunks, CHUNK_FASTEST: tl.constexpr):
    """``(row program, chunk)`` of this program on a 1-D grid of ``rows x n_chunks``: with
    ``CHUNK_FASTEST`` the programs that share a row program are consecutive (CUDA dispatches
    them together, so its rows are read from HBM once), else the row programs are (the
    order the roofline model's ``rows-fastest`` variant prices)."""
    q = tl.program_id(0)
    if CHUNK_FASTEST:
        return q // n_chunks, q % n_chunks
    rows = tl.num_programs(0) // n_chunks
    return q % rows, q // rows


@triton.jit
def _shifted(src_ptr, img, p, p_mask, c, c_mask, H, W, h, DI: tl.constexpr, DJ: tl.constexpr):
    """``src[img + p + (DI, DJ), c]`` of ``src [B * HW, h]`` (``img``: the row of each token's
    image's first grid token), zero off the grid: [BT, BH] fp32."""
    i = p // W + DI
    j = p % W + DJ
    ok = p_mask & (i >= 0) & (i < H) & (j >= 0) & (j < W)
    q = img + i * W + j
    val = tl.load(src_ptr + q[:, None] * h + c[None, :], mask=ok[:, None] & c_mask[None, :],
                  other=0.0)
    return val.to(tl.float32)


@triton.jit
def _stencil(src_ptr, wm_ptr, img, p, p_mask, c, c_mask, H, W, h, MIRROR: tl.constexpr,
             BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """3x3 depthwise stencil over the grid: ``sum_k Wm[c, k] src[p +- off_k, c]``, [BT, BH] fp32.

    ``MIRROR=False`` is the forward conv (``+off_k``); ``True`` its transpose (``-off_k``).
    """
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k in tl.static_range(9):
        w = tl.load(wm_ptr + c * 9 + k, mask=c_mask, other=0.0).to(tl.float32)    # [BH]
        if MIRROR:
            nb = _shifted(src_ptr, img, p, p_mask, c, c_mask, H, W, h, 1 - k // 3, 1 - k % 3)
        else:
            nb = _shifted(src_ptr, img, p, p_mask, c, c_mask, H, W, h, k // 3 - 1, k % 3 - 1)
        acc += w[None, :] * nb
    return acc


@triton.jit
def _up_tile(s_ptr, wu_ptr, r, r_mask, d, d_mask, h, s_stride,
             BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
             OP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``z[r, d] = (Wu s_r)[d]`` for a block of rows and columns (rows of ``s`` ``s_stride``
    apart), h in ``BLOCK_H`` chunks (no tensor-core work on padding past ``h`` but the last
    chunk's): [BT, BD] fp32."""
    z = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    s_rows = s_ptr + r * s_stride                                                  # [BT]
    for h0 in range(0, h, BLOCK_H):
        c = h0 + tl.arange(0, BLOCK_H)
        c_mask = c < h
        s = tl.load(s_rows[:, None] + c[None, :], mask=r_mask[:, None] & c_mask[None, :],
                    other=0.0)                                                     # [BT, BH]
        wu_t = tl.load(wu_ptr + d[None, :].to(tl.int64) * h + c[:, None],
                       mask=c_mask[:, None] & d_mask[None, :], other=0.0)          # [BH, BD] = Wu^T
        z = _mma(_op_cast(s, OP, UPCAST), _op_cast(wu_t, OP, UPCAST), z, IEEE)
    return z


@triton.jit
def _gelu_stencil_block(u_ptr, wm_ptr, s_ptr, r, img, p, r_mask, H, W, h, s_stride, gp_ptr,
                        gp_r, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                        GP: tl.constexpr):
    """``s[r, :] = gelu(dwconv3x3(u)[r, :])`` for one block of rows (all of ``h``, written
    in s's dtype, rows ``s_stride`` apart), then a barrier: the program reads its own rows
    back. The stencil needs neighbours from other blocks of ``u``, complete since the down
    launch. With ``GP`` also ``gelu'(v)`` into ``gp [B * HW, h]`` at rows ``gp_r`` (for the
    dv launch's epilogue)."""
    for h0 in range(0, h, BLOCK_H):
        c = h0 + tl.arange(0, BLOCK_H)
        c_mask = c < h
        v = _stencil(u_ptr, wm_ptr, img, p, r_mask, c, c_mask, H, W, h, False, BLOCK_T, BLOCK_H)
        tl.store(s_ptr + r[:, None] * s_stride + c[None, :],
                 _gelu(v).to(s_ptr.dtype.element_ty), mask=r_mask[:, None] & c_mask[None, :])
        if GP:
            tl.store(gp_ptr + gp_r[:, None] * h + c[None, :],
                     _gelu_grad(v).to(gp_ptr.dtype.element_ty),
                     mask=r_mask[:, None] & c_mask[None, :])
    tl.debug_barrier()


@triton.jit
def _copy_prefix(src_ptr, dst_ptr, b, first, d, d_mask, stride_sb, stride_sn, stride_db,
                 stride_dn, P):
    """``dst[b, :P, d] = src[b, :P, d]`` for the rows of the block that start an image
    (``first``): the prefix tokens pass through."""
    for k in range(0, P):
        rows = b * 0 + k                                                           # int64
        mask = first[:, None] & d_mask[None, :]
        val = tl.load(src_ptr + (b * stride_sb + rows * stride_sn)[:, None] + d[None, :],
                      mask=mask)
        tl.store(dst_ptr + (b * stride_db + rows * stride_dn)[:, None] + d[None, :],
                 val.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _down_tile(x_rows, row_mask, wd_ptr, c, c_mask, D, stride_wc, stride_wd,
               BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
               OP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``t W^T`` of ``BLOCK_R`` token rows (pointers ``x_rows``, ``D`` wide) and the columns
    ``c`` of a weight whose element ``(c, d)`` sits at ``c * stride_wc + d * stride_wd``
    (Wd ``[h, D]``: ``(D, 1)``, the down projection; Wu ``[D, h]``: ``(1, h)``, ``dy Wu``),
    D in chunks: [BLOCK_R, BLOCK_H] fp32."""
    acc = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    w_cols = wd_ptr + c[None, :].to(tl.int64) * stride_wc
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        t = tl.load(x_rows[:, None] + d[None, :], mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0)                                                     # [BR, BD]
        w_t = tl.load(w_cols + d[:, None].to(tl.int64) * stride_wd,
                      mask=d_mask[:, None] & c_mask[None, :], other=0.0)           # [BD, BH] = W^T
        acc = _mma(_op_cast(t, OP, UPCAST), _op_cast(w_t, OP, UPCAST), acc, IEEE)
    return acc


@triton.jit
def _heba_visual_fwd_kernel_down(
    x_ptr, wd_ptr, u_ptr,                 # x [B, N, D] via strides, Wd [h, D], u [B * HW, h]
    stride_xb, stride_xn, T, HW, D, h, P,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    OP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, CHUNK_FASTEST: tl.constexpr,
):
    """One bottleneck chunk of one row block per program (:func:`_row_and_chunk`: with
    ``CHUNK_FASTEST`` a block's chunks are consecutive programs, dispatched together, so
    the block's rows of x are read from HBM once and shared in L2 by its programs)."""
    blk, hk = _row_and_chunk(tl.cdiv(h, BLOCK_H), CHUNK_FASTEST)
    r, r_mask, b, p = _rows(blk, T, HW, BLOCK_T)
    c = hk * BLOCK_H + tl.arange(0, BLOCK_H)
    c_mask = c < h
    x_rows = x_ptr + b * stride_xb + (P + p) * stride_xn                           # [BT]
    acc = _down_tile(x_rows, r_mask, wd_ptr, c, c_mask, D, D, 1, BLOCK_T, BLOCK_H, BLOCK_D,
                     OP, UPCAST, IEEE)
    tl.store(u_ptr + r[:, None] * h + c[None, :], acc.to(u_ptr.dtype.element_ty),
             mask=r_mask[:, None] & c_mask[None, :])


@triton.jit
def _heba_visual_kernel_dwconv(
    dv_ptr, wm_ptr, du_ptr, u_ptr, dwm_part_ptr,    # dv, du, u [B * HW, h]; Wm [h, 9]
    H, W, T, HW, h,                                 # dWm partials [R, h, 9] fp32
    DWM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """``du = dwconv3x3^T(dv)``: its own pass, since it needs ``dv`` of neighbouring blocks.
    Program ``(s, k)`` of ``R x n_h``: bottleneck columns ``k`` of the row blocks ``s, s + R,
    ...``; with ``DWM`` (where the dv launch computed ``dv``) it also sums their dWm
    (``sum_t dv[t, c] u[t + off_k, c]``, 9 taps padded to 16) into slot ``s``: ``R`` slots
    whatever the batch."""
    pid = tl.program_id(0)
    n_r = tl.num_programs(0)
    c = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    c_mask = c < h
    taps = tl.arange(0, 16)
    dwm = tl.zeros((BLOCK_H, 16), dtype=tl.float32)                               # [BH, taps]
    for i in range(0, tl.cdiv(tl.cdiv(T, BLOCK_T) - pid, n_r)):
        r, r_mask, b, p = _rows(pid + i * n_r, T, HW, BLOCK_T)
        mask = r_mask[:, None] & c_mask[None, :]
        acc = _stencil(dv_ptr, wm_ptr, b * HW, p, r_mask, c, c_mask, H, W, h, True,
                       BLOCK_T, BLOCK_H)                                           # [BT, BH]
        tl.store(du_ptr + r[:, None] * h + c[None, :], acc.to(du_ptr.dtype.element_ty),
                 mask=mask)
        if DWM:
            dv = tl.load(dv_ptr + r[:, None] * h + c[None, :], mask=mask,
                         other=0.0).to(tl.float32)
            for k in tl.static_range(9):
                un = _shifted(u_ptr, b * HW, p, r_mask, c, c_mask, H, W, h, k // 3 - 1,
                              k % 3 - 1)
                dwm += tl.where(taps[None, :] == k, tl.sum(dv * un, axis=0)[:, None], 0.0)
    if DWM:
        slot = dwm_part_ptr + pid.to(tl.int64) * h * 9 + c[:, None] * 9 + taps[None, :]
        tl.store(slot, dwm, mask=c_mask[:, None] & (taps[None, :] < 9))


@triton.jit
def _down_halo(x_ptr, wd_ptr, u_ptr, uh_ptr, r0, stride_xb, stride_xn, T, HW, W, D, h, P, n_e,
               BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
               BLOCK_D: tl.constexpr, OP: tl.constexpr, UPCAST: tl.constexpr,
               IEEE: tl.constexpr):
    """``u = t Wd^T`` of the rows ``r0 - W - 1 .. r0 + BLOCK_T + W`` (the block and its
    stencil's halo, in ``n_e`` chunks of ``BLOCK_E``) into the program's scratch ``uh`` (row
    ``k``: row ``r0 - W - 1 + k``); the block's own rows also into ``u`` (kept for backward).
    Rows outside ``[0, T)`` are skipped; rows of another image are computed but never read
    (the stencil reads its own image only). Ends with a barrier: the stencil reads back."""
    lo = r0 - W - 1
    for e in range(0, n_e):
        k = (e * BLOCK_E + tl.arange(0, BLOCK_E)).to(tl.int64)                     # [BE]
        g = lo + k
        ok = (g >= 0) & (g < T) & (k < BLOCK_T + 2 * W + 2)
        bb = g // HW
        x_rows = x_ptr + bb * stride_xb + (P + g - bb * HW) * stride_xn
        own = ok & (g >= r0) & (g < r0 + BLOCK_T)
        for h0 in range(0, h, BLOCK_H):
            c = h0 + tl.arange(0, BLOCK_H)
            c_mask = c < h
            acc = _down_tile(x_rows, ok, wd_ptr, c, c_mask, D, D, 1, BLOCK_E, BLOCK_H,
                             BLOCK_D, OP, UPCAST, IEEE)
            val = acc.to(uh_ptr.dtype.element_ty)
            tl.store(uh_ptr + k[:, None] * h + c[None, :], val, mask=ok[:, None] & c_mask[None, :])
            tl.store(u_ptr + g[:, None] * h + c[None, :], val,
                     mask=own[:, None] & c_mask[None, :])
    tl.debug_barrier()


@triton.jit
def _fwd_sweeps(x_ptr, s_ptr, wu_ptr, nw_ptr, nb_ptr, out_ptr, mean_ptr, rstd_ptr, y_rows,
                st_ptr, cnt_ptr, blk, part, r, r_mask, b, p, loc, stride_xb, stride_xn,
                stride_ob, stride_on, D, h, P, scale, eps,
                PARTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_D: tl.constexpr, OP: tl.constexpr, UPCAST: tl.constexpr,
                IEEE: tl.constexpr, ALTERNATE: tl.constexpr):
    """The block's up-projection, residual, LayerNorm and output, ``s`` at rows ``loc`` of
    the program's scratch: statistics, then ``out`` (and the prefix tokens of every image
    that starts in the block copied through). Sweep 1 stores ``y`` at the row pointers
    ``y_rows`` (the kept ``[B * HW, D]`` buffer, or the program's scratch) and sweep 2 reads
    it back: the up-projection is computed once. With ``PARTS`` > 1 this program's sweep 1
    covers part ``part`` of the block's D chunks and leaves its statistics in ``st_ptr``
    (``[T, PARTS, 2]``); the last of the block's parts to arrive (``cnt_ptr[blk]``) merges
    them in part order and runs sweep 2 over all of D."""
    x_rows = x_ptr + b * stride_xb + (P + p) * stride_xn                           # [BT]
    o_rows = out_ptr + b * stride_ob + (P + p) * stride_on
    n_d = tl.cdiv(D, BLOCK_D)
    per = tl.cdiv(n_d, PARTS)                     # D chunks per part (the last may have fewer)

    # Sweep 1: LayerNorm statistics of y = t + z, merged chunk by chunk (Chan/Welford),
    # so y never has to be held in registers for the whole row.
    mean = tl.zeros((BLOCK_T,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_T,), dtype=tl.float32)
    lo = part * per * BLOCK_D
    for d0 in range(lo, tl.minimum(lo + per * BLOCK_D, D), BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        mask = r_mask[:, None] & d_mask[None, :]
        z = _up_tile(s_ptr, wu_ptr, loc, r_mask, d, d_mask, h, h,
                     BLOCK_T, BLOCK_H, BLOCK_D, OP, UPCAST, IEEE)
        t = tl.load(x_rows[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
        y = t + z                                                                  # [BT, BD]
        tl.store(y_rows[:, None] + d[None, :], y.to(y_rows.dtype.element_ty), mask=mask)
        n_b = tl.sum(d_mask.to(tl.float32), axis=0)
        n_a = (d0 - lo) * 1.0
        c_mean = tl.sum(y, axis=1) / n_b
        dev = tl.where(d_mask[None, :], y - c_mean[:, None], 0.0)
        c_m2 = tl.sum(dev * dev, axis=1)
        delta = c_mean - mean
        mean = mean + delta * (n_b / (n_a + n_b))
        m2 = m2 + c_m2 + delta * delta * (n_a * n_b / (n_a + n_b))
    arrived = PARTS - 1                  # one part: this program normalises its block
    if PARTS > 1:
        st_rows = st_ptr + (r * PARTS + part) * 2
        tl.store(st_rows, mean, mask=r_mask)
        tl.store(st_rows + 1, m2, mask=r_mask)
        # Every thread's y and statistics stored before the one arrival (see
        # _triton_common._atb_tile); the last part's acquire makes the others' visible.
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + blk, 1, sem="acq_rel", scope="gpu")
        if arrived == PARTS - 1:
            mean = tl.zeros((BLOCK_T,), dtype=tl.float32)
            m2 = tl.zeros((BLOCK_T,), dtype=tl.float32)
            for q in range(0, PARTS):                 # Chan's merge, in part order
                n_a = tl.minimum(q * per * BLOCK_D, D) * 1.0
                n_b = tl.minimum((q + 1) * per * BLOCK_D, D) * 1.0 - n_a
                q_rows = st_ptr + (r * PARTS + q) * 2
                q_mean = tl.load(q_rows, mask=r_mask, other=0.0, cache_modifier=".cg")
                q_m2 = tl.load(q_rows + 1, mask=r_mask, other=0.0, cache_modifier=".cg")
                if n_b > 0:
                    delta = q_mean - mean
                    mean = mean + delta * (n_b / (n_a + n_b))
                    m2 = m2 + q_m2 + delta * delta * (n_a * n_b / (n_a + n_b))
            tl.atomic_xchg(cnt_ptr + blk, 0, sem="relaxed", scope="gpu")   # for reuse
    if arrived == PARTS - 1:
        rstd = 1.0 / tl.sqrt(m2 / D + eps)
        tl.store(mean_ptr + r, mean, mask=r_mask)
        tl.store(rstd_ptr + r, rstd, mask=r_mask)

        tl.debug_barrier()               # y rows written by other threads, read back below

        # Sweep 2: y read back, out written; with ALTERNATE D chunks in reverse, the newest
        # in L2 first.
        first = r_mask & (p == 0)
        for i in range(0, n_d):
            d = _chunk(i, n_d, ALTERNATE * 1) * BLOCK_D + tl.arange(0, BLOCK_D)
            d_mask = d < D
            mask = r_mask[:, None] & d_mask[None, :]
            t = tl.load(x_rows[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
            if PARTS > 1:                # other programs' y: read past L1
                y = tl.load(y_rows[:, None] + d[None, :], mask=mask, other=0.0,
                            cache_modifier=".cg").to(tl.float32)
            else:
                y = tl.load(y_rows[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
            gamma = tl.load(nw_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
            beta = tl.load(nb_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
            a = (y - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
            tl.store(o_rows[:, None] + d[None, :],
                     (t + scale * a).to(out_ptr.dtype.element_ty), mask=mask)
            _copy_prefix(x_ptr, out_ptr, b, first, d, d_mask, stride_xb, stride_xn, stride_ob,
                         stride_on, P)


@triton.jit
def _heba_visual_fwd_kernel(
    x_ptr, wd_ptr, u_ptr, wm_ptr, scr_ptr, wu_ptr, nw_ptr, nb_ptr, out_ptr, mean_ptr, rstd_ptr,
    y_ptr, st_ptr, cnt_ptr,                               # PARTS: [T, PARTS, 2], [blocks]
    stride_xb, stride_xn, stride_ob, stride_on,           # u [B * HW, h]; y: see below
    H, W, T, HW, D, h, P, n_e, scale, scale_ptr, eps,     # scratch [S, BLOCK_T + n_e * BLOCK_E, h]
    SCALE_PTR: tl.constexpr, KEEP_Y: tl.constexpr, FUSE_DOWN: tl.constexpr, PARTS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    OP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, ALTERNATE: tl.constexpr,
):
    """Program ``s`` of ``S``: row blocks ``s, s + S, ...``. Per block: with ``FUSE_DOWN``,
    ``u`` of the block and its stencil's halo (:func:`_down_halo`, into the program's
    scratch; else ``u`` as the down launch wrote it), ``s = gelu(dwconv(u))`` of its rows
    into the program's scratch, then :func:`_fwd_sweeps`. The scratch is reused block after
    block, so ``s`` and the halo stay on chip (L2) instead of a ``[B * HW, h]`` round trip.
    ``y`` (sweep 2 reads it back instead of recomputing the up-projection): with ``KEEP_Y``
    the kept ``[B * HW, D]`` buffer, else the programs' ``[S, BLOCK_T, D]`` scratch.
    With ``PARTS`` > 1 (``y`` kept, ``u`` from the down launch) the work items are
    ``(block, part)``: each computes ``s`` of the block and ``y`` of its part of D (its
    share of ``Wu``), and the block's last part to finish normalises the whole block, so a
    batch of fewer blocks than SMs still gives every SM a share of the up-projection."""
    pid = tl.program_id(0)
    n_s = tl.num_programs(0)
    scale = _scalar(scale, scale_ptr, SCALE_PTR)
    s_scr = scr_ptr + pid.to(tl.int64) * (BLOCK_T + n_e * BLOCK_E) * h
    loc = tl.arange(0, BLOCK_T).to(tl.int64)
    y_scr = y_ptr + (pid.to(tl.int64) * BLOCK_T + loc) * D                        # [BT]
    for i in range(0, tl.cdiv(tl.cdiv(T, BLOCK_T) * PARTS - pid, n_s)):
        item = pid + i * n_s
        blk = item // PARTS
        part = item % PARTS
        r, r_mask, b, p = _rows(blk, T, HW, BLOCK_T)
        if FUSE_DOWN:
            r0 = blk.to(tl.int64) * BLOCK_T
            uh = s_scr + BLOCK_T * h
            _down_halo(x_ptr, wd_ptr, u_ptr, uh, r0, stride_xb, stride_xn, T, HW, W, D, h, P,
                       n_e, BLOCK_T, BLOCK_E, BLOCK_H, BLOCK_D, OP, UPCAST, IEEE)
            _gelu_stencil_block(uh, wm_ptr, s_scr, loc, b * HW - (r0 - W - 1), p, r_mask, H, W,
                                h, h, s_scr, loc, BLOCK_T, BLOCK_H, False)
        else:
            _gelu_stencil_block(u_ptr, wm_ptr, s_scr, loc, b * HW, p, r_mask, H, W, h, h,
                                s_scr, loc, BLOCK_T, BLOCK_H, False)
        y_rows = y_ptr + r * D if KEEP_Y else y_scr
        _fwd_sweeps(x_ptr, s_scr, wu_ptr, nw_ptr, nb_ptr, out_ptr, mean_ptr, rstd_ptr, y_rows,
                    st_ptr, cnt_ptr, blk, part, r, r_mask, b, p, loc, stride_xb, stride_xn,
                    stride_ob, stride_on, D, h, P, scale, eps, PARTS, BLOCK_T, BLOCK_H,
                    BLOCK_D, OP, UPCAST, IEEE, ALTERNATE)
        tl.debug_barrier()               # the next block overwrites the scratch


@triton.jit
def _pre_norm(x_rows, y_rows, s_ptr, wu_ptr, r, r_mask, d, d_mask, mask, h, KEEP_Y: tl.constexpr,
              BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
              OP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``y = t + Wu s`` of a [BT, BD] tile in float32: the forward's kept y, or recomputed."""
    if KEEP_Y:
        y = tl.load(y_rows[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        y = tl.load(x_rows[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32) + \
            _up_tile(s_ptr, wu_ptr, r, r_mask, d, d_mask, h, h, BLOCK_T, BLOCK_H, BLOCK_D, OP,
                     UPCAST, IEEE)
    return y


@triton.jit
def _heba_visual_bwd_dy_block(
    x_ptr, g_ptr, s_ptr, sr, wu_ptr, nw_ptr, mean_ptr, rstd_ptr, y_ptr, dy_rows, cst_ptr,
    dnw_slot, dnb_slot, r, r_mask, b, p, stride_xb, stride_xn, stride_gb, stride_gn,
    D, h, P, gs, ACCUMULATE, KEEP_Y: tl.constexpr, DW: tl.constexpr, ALTERNATE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    OP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """LayerNorm backward of one block of rows (``s`` at rows ``sr`` of ``s_ptr``, ``dy``
    written at the row pointers ``dy_rows``); adds its dgamma/dbeta to the slot
    (``ACCUMULATE`` False: the slot's first block, which overwrites it). With ``DW`` the
    row constants ``c1, c2`` also go to ``cst [B * HW, 2]``: the dx kernel recomputes dy."""
    n = P + p
    x_rows = x_ptr + b * stride_xb + n * stride_xn
    g_rows = g_ptr + b * stride_gb + n * stride_gn
    y_rows = y_ptr + r * D
    mean = tl.load(mean_ptr + r, mask=r_mask, other=0.0)
    rstd = tl.load(rstd_ptr + r, mask=r_mask, other=0.0)

    # Sweep 1: the two row reductions of LayerNorm backward, and dgamma/dbeta partials.
    c1 = tl.zeros((BLOCK_T,), dtype=tl.float32)
    c2 = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        mask = r_mask[:, None] & d_mask[None, :]
        yhat = (_pre_norm(x_rows, y_rows, s_ptr, wu_ptr, sr, r_mask, d, d_mask, mask, h,
                          KEEP_Y, BLOCK_T, BLOCK_H, BLOCK_D, OP, UPCAST, IEEE)
                - mean[:, None]) * rstd[:, None]
        ga = tl.load(g_rows[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32) * gs
        gamma = tl.load(nw_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
        dyhat = ga * gamma[None, :]
        c1 += tl.sum(dyhat, axis=1)
        c2 += tl.sum(dyhat * yhat, axis=1)
        old_w = tl.load(dnw_slot + d, mask=d_mask & ACCUMULATE, other=0.0)
        old_b = tl.load(dnb_slot + d, mask=d_mask & ACCUMULATE, other=0.0)
        tl.store(dnw_slot + d, old_w + tl.sum(ga * yhat, axis=0), mask=d_mask)
        tl.store(dnb_slot + d, old_b + tl.sum(ga, axis=0), mask=d_mask)
    c1 = c1 / D
    c2 = c2 / D
    if DW:
        tl.store(cst_ptr + r * 2, c1, mask=r_mask)
        tl.store(cst_ptr + r * 2 + 1, c2, mask=r_mask)

    # Sweep 2: dy (into the dx buffer, which the dx kernel finishes in place, or with DW
    # into the program's scratch, read back by the dv phase only); with ALTERNATE D chunks in
    # reverse, the newest in L2 first.
    n_d = tl.cdiv(D, BLOCK_D)
    for i in range(0, n_d):
        d = _chunk(i, n_d, ALTERNATE * 1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = d < D
        mask = r_mask[:, None] & d_mask[None, :]
        yhat = (_pre_norm(x_rows, y_rows, s_ptr, wu_ptr, sr, r_mask, d, d_mask, mask, h,
                          KEEP_Y, BLOCK_T, BLOCK_H, BLOCK_D, OP, UPCAST, IEEE)
                - mean[:, None]) * rstd[:, None]
        ga = tl.load(g_rows[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32) * gs
        gamma = tl.load(nw_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
        dyhat = ga * gamma[None, :]
        dy = rstd[:, None] * (dyhat - c1[:, None] - yhat * c2[:, None])
        tl.store(dy_rows[:, None] + d[None, :], dy.to(dy_rows.dtype.element_ty), mask=mask)


@triton.jit
def _heba_visual_bwd_dv_block(
    dy_rows, u_ptr, wm_ptr, wu_ptr, dv_ptr, dwm_slot, r, r_mask, b, p,
    H, W, HW, D, h, ACCUMULATE,
    BLOCK_T: tl.constexpr, BLOCK_HV: tl.constexpr, BLOCK_D: tl.constexpr,
    OP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, ALTERNATE: tl.constexpr,
):
    """``dv = (Wu^T dy) * gelu'(v)`` of one block of rows (dy as this program wrote it at
    ``dy_rows``), h in ``BLOCK_HV`` chunks; adds the block's dWm to the slot (9 taps
    padded to 16). Each h chunk sweeps the block's dy rows over D; with ``ALTERNATE`` in the
    direction opposite to the sweep before it (the first forward: the dy sweep ran in
    reverse), so every sweep starts on the chunks still in L2."""
    img = b * HW
    n_d = tl.cdiv(D, BLOCK_D)
    for h0 in range(0, h, BLOCK_HV):
        c = h0 + tl.arange(0, BLOCK_HV)
        c_mask = c < h
        turn = ALTERNATE * ((h0 // BLOCK_HV) % 2)
        ds = tl.zeros((BLOCK_T, BLOCK_HV), dtype=tl.float32)                       # Wu^T dy
        for i in range(0, n_d):
            d = _chunk(i, n_d, turn) * BLOCK_D + tl.arange(0, BLOCK_D)
            d_mask = d < D
            dy = tl.load(dy_rows[:, None] + d[None, :], mask=r_mask[:, None] & d_mask[None, :],
                         other=0.0)                                                # [BT, BD]
            wu = tl.load(wu_ptr + d[:, None].to(tl.int64) * h + c[None, :],
                         mask=d_mask[:, None] & c_mask[None, :], other=0.0)        # [BD, BHV]
            ds = _mma(_op_cast(dy, OP, UPCAST), _op_cast(wu, OP, UPCAST), ds, IEEE)
        v = _stencil(u_ptr, wm_ptr, img, p, r_mask, c, c_mask, H, W, h, False, BLOCK_T,
                     BLOCK_HV)                    # recomputed: nine shifted loads of u (L1)
        gp = _gelu_grad(v)
        _dv_epilogue(ds, gp, u_ptr, dv_ptr, dwm_slot, r, r_mask, img, p, c, c_mask, H, W, h,
                     ACCUMULATE, BLOCK_T, BLOCK_HV)


@triton.jit
def _dv_epilogue(ds, gp, u_ptr, dv_ptr, dwm_slot, r, r_mask, img, p, c, c_mask, H, W, h,
                 ACCUMULATE, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """``dv = ds * gp`` of a [BT, BH] tile (``ds = Wu^T dy``, ``gp = gelu'(v)``) stored in
    the operand dtype, and the tile's dWm (``sum_t dv[t, c] u[t + off_k, c]``, 9 taps padded
    to 16) added to ``dwm_slot`` (``ACCUMULATE`` False: written)."""
    taps = tl.arange(0, 16)
    dv = ds * gp                                                                   # [BT, BH]
    tl.store(dv_ptr + r[:, None] * h + c[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=r_mask[:, None] & c_mask[None, :])
    dwm = tl.zeros((BLOCK_H, 16), dtype=tl.float32)                                # [BH, taps]
    for k in tl.static_range(9):
        un = _shifted(u_ptr, img, p, r_mask, c, c_mask, H, W, h, k // 3 - 1, k % 3 - 1)
        dwm += tl.where(taps[None, :] == k, tl.sum(dv * un, axis=0)[:, None], 0.0)
    slot = dwm_slot + c[:, None] * 9 + taps[None, :]
    ok = c_mask[:, None] & (taps[None, :] < 9)
    tl.store(slot, tl.load(slot, mask=ok & ACCUMULATE, other=0.0) + dwm, mask=ok)


@triton.jit
def _heba_visual_bwd_kernel_dv(
    dy_ptr, wu_ptr, dv_ptr,               # dy [B, N, D] via strides; Wu [D, h]; dv [B * HW, h]
    stride_db, stride_dn, T, HW, D, h, P,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    OP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, CHUNK_FASTEST: tl.constexpr,
):
    """``dv = (dy Wu) * gelu'(v)`` as a GEMM of its own (``DV_GEMM_MIN_DIM`` up), one
    ``[BLOCK_T, BLOCK_H]`` tile per program with D as the depth, in place: ``dv`` holds
    ``gelu'(v)`` on entry (the _dy kernel wrote it, from the stencil it computes anyway), so
    the epilogue is one product, and dWm is summed by the dwconv launch that reads ``dv``
    next. With ``CHUNK_FASTEST`` a row block's ``n_h`` programs are consecutive, so they
    share its rows of dy in L2."""
    blk, k = _row_and_chunk(tl.cdiv(h, BLOCK_H), CHUNK_FASTEST)
    r, r_mask, b, p = _rows(blk, T, HW, BLOCK_T)
    c = k * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = r_mask[:, None] & (c < h)[None, :]
    dy_rows = dy_ptr + b * stride_db + (P + p) * stride_dn
    ds = _down_tile(dy_rows, r_mask, wu_ptr, c, c < h, D, 1, h, BLOCK_T, BLOCK_H, BLOCK_D,
                    OP, UPCAST, IEEE)                                              # dy Wu
    tile = dv_ptr + r[:, None] * h + c[None, :]
    gp = tl.load(tile, mask=mask, other=0.0).to(tl.float32)
    tl.store(tile, (ds * gp).to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _heba_visual_bwd_kernel_dy(
    x_ptr, g_ptr, u_ptr, wm_ptr, s_ptr, wu_ptr, nw_ptr, mean_ptr, rstd_ptr, y_ptr,
    dy_ptr, dv_ptr, cst_ptr, dnw_part_ptr, dnb_part_ptr,   # dv [B * HW, h]; cst [B * HW, 2]
    dwm_part_ptr,                                 # partials [S, D], [S, D], [S, h, 9] fp32
    stride_xb, stride_xn, stride_gb, stride_gn, stride_db, stride_dn,
    H, W, T, HW, D, h, P, gs, gs_ptr,
    GS_PTR: tl.constexpr, KEEP_Y: tl.constexpr, DW: tl.constexpr, DV: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HV: tl.constexpr,
    BLOCK_D: tl.constexpr, OP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ALTERNATE: tl.constexpr,
):
    """Program ``s`` of ``S``: row blocks ``s, s + S, s + 2S, ...`` in that order. Per block,
    three phases on the program's own rows: ``s = gelu(dwconv(u))``, the LayerNorm backward
    (``dy``, dgamma/dbeta), then (``DV``; else :func:`_heba_visual_bwd_kernel_dv`, a launch
    of its own) ``dv`` and dWm; the partials summed into slot ``s``: the
    partial buffers stay ``[S, ...]`` whatever the batch. ``s`` and ``dy`` go to
    ``s [B * HW, h]`` and the dx buffer ``[B, N, D]`` (read by the weight-gradient and dx
    launches), or with ``DW`` to the program's scratch (``s [S, BLOCK_T, h]``, ``dy
    [S, BLOCK_T, D]``), since the dx kernel recomputes both."""
    pid = tl.program_id(0)
    n_s = tl.num_programs(0)
    gs = _scalar(gs, gs_ptr, GS_PTR)
    slot = pid.to(tl.int64)
    loc = tl.arange(0, BLOCK_T).to(tl.int64)
    for i in range(0, tl.cdiv(tl.cdiv(T, BLOCK_T) - pid, n_s)):
        r, r_mask, b, p = _rows(pid + i * n_s, T, HW, BLOCK_T)
        if DW:
            s_base, sr = s_ptr + slot * BLOCK_T * h, loc
            dy_rows = dy_ptr + slot * BLOCK_T * D + loc * D
        else:
            s_base, sr = s_ptr, r
            dy_rows = dy_ptr + b * stride_db + (P + p) * stride_dn
        _gelu_stencil_block(u_ptr, wm_ptr, s_base, sr, b * HW, p, r_mask, H, W, h, h,
                            dv_ptr, r, BLOCK_T, BLOCK_H, not DV)     # gelu'(v) for the dv launch
        _heba_visual_bwd_dy_block(
            x_ptr, g_ptr, s_base, sr, wu_ptr, nw_ptr, mean_ptr, rstd_ptr, y_ptr, dy_rows,
            cst_ptr, dnw_part_ptr + slot * D, dnb_part_ptr + slot * D, r, r_mask, b, p,
            stride_xb, stride_xn, stride_gb, stride_gn,
            D, h, P, gs, i > 0, KEEP_Y, DW, ALTERNATE, BLOCK_T, BLOCK_H, BLOCK_D, OP, UPCAST,
            IEEE)
        if DV:
            tl.debug_barrier()           # dy rows written by other threads, read back next
            _heba_visual_bwd_dv_block(
                dy_rows, u_ptr, wm_ptr, wu_ptr, dv_ptr, dwm_part_ptr + slot * h * 9, r, r_mask,
                b, p, H, W, HW, D, h, i > 0, BLOCK_T, BLOCK_HV, BLOCK_D, OP, UPCAST, IEEE,
                ALTERNATE)
        # The next block reads back the slots (and rewrites the scratch), written by other
        # threads of the program.
        tl.debug_barrier()


@triton.jit
def _dy_tile(x_ptr, g_ptr, u_ptr, wm_ptr, wu_ptr, nw_ptr, mean_ptr, rstd_ptr, cst_ptr, s_scr,
             r, r_mask, b, p, d, d_mask, cp, cp_mask, stride_xb, stride_xn, stride_gb,
             stride_gn, H, W, HW, h, P, gs, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
             BLOCK_HP: tl.constexpr, BLOCK_D: tl.constexpr, OP: tl.constexpr,
             UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``dy`` of a [BT, BD] tile recomputed: ``s = gelu(dwconv(u))`` of the rows (in
    ``BLOCK_H`` column chunks into the program's scratch ``s_scr [BLOCK_T, BLOCK_HP]``, then
    read back whole: a [BT, BLOCK_HP] stencil at once would spill), ``y = t + Wu s``, the
    LayerNorm backward with the row constants the _dy kernel stored. Returns
    ``(dy, s, t, g)``: ``s`` rounded to the operand dtype, ``t`` and ``g`` the tiles of x
    and of the incoming gradient."""
    mask = r_mask[:, None] & d_mask[None, :]
    loc = tl.arange(0, BLOCK_T).to(tl.int64)
    _gelu_stencil_block(u_ptr, wm_ptr, s_scr, loc, b * HW, p, r_mask, H, W, h, BLOCK_HP,
                        s_scr, loc, BLOCK_T, BLOCK_H, False)                       # + barrier
    s = tl.load(s_scr + loc[:, None] * BLOCK_HP + cp[None, :],
                mask=r_mask[:, None] & cp_mask[None, :], other=0.0)
    s = _op_cast(s, OP, UPCAST)                                                    # [BT, HP]
    # z = Wu s in BLOCK_H chunks of h: no tensor-core work on the padding up to BLOCK_HP
    # (h 192 -> 256 at ViT-B/16's attention position), as in the _dy kernel's sweeps.
    z = _up_tile(s_scr, wu_ptr, loc, r_mask, d, d_mask, h, BLOCK_HP, BLOCK_T, BLOCK_H,
                 BLOCK_D, OP, UPCAST, IEEE)
    n = P + p
    t = tl.load(x_ptr + (b * stride_xb + n * stride_xn)[:, None] + d[None, :], mask=mask,
                other=0.0)
    g = tl.load(g_ptr + (b * stride_gb + n * stride_gn)[:, None] + d[None, :], mask=mask,
                other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + r, mask=r_mask, other=0.0)
    rstd = tl.load(rstd_ptr + r, mask=r_mask, other=0.0)
    c1 = tl.load(cst_ptr + r * 2, mask=r_mask, other=0.0)
    c2 = tl.load(cst_ptr + r * 2 + 1, mask=r_mask, other=0.0)
    gamma = tl.load(nw_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    yhat = (t.to(tl.float32) + z - mean[:, None]) * rstd[:, None]
    dy = rstd[:, None] * ((g * gs) * gamma[None, :] - c1[:, None] - yhat * c2[:, None])
    return dy, s, t, g


@triton.jit
def _wd_du(du_ptr, wd_ptr, r, r_mask, d, d_mask, D, h, BLOCK_T: tl.constexpr,
           BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, OP: tl.constexpr,
           UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``Wd^T du`` of a [BT, BD] tile, h in ``BLOCK_H`` chunks, float32."""
    du_rows = du_ptr + r * h                                                       # [BT]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for h0 in range(0, h, BLOCK_H):
        c = h0 + tl.arange(0, BLOCK_H)
        c_mask = c < h
        du = tl.load(du_rows[:, None] + c[None, :], mask=r_mask[:, None] & c_mask[None, :],
                     other=0.0)                                                    # [BT, BH]
        wd = tl.load(wd_ptr + c[:, None].to(tl.int64) * D + d[None, :],
                     mask=c_mask[:, None] & d_mask[None, :], other=0.0)            # [BH, BD]
        acc = _mma(_op_cast(du, OP, UPCAST), _op_cast(wd, OP, UPCAST), acc, IEEE)
    return acc


@triton.jit
def _heba_visual_bwd_kernel_dx(
    g_ptr, du_ptr, wd_ptr, dx_ptr,        # du [B * HW, h]; dx holds dy on entry unless DW
    x_ptr, u_ptr, wm_ptr, wu_ptr, nw_ptr, mean_ptr, rstd_ptr, cst_ptr,   # DW: dy recomputed
    scr_ptr, dwu_part_ptr, dwd_part_ptr,  # DW: s scratch [S, n_d, BT, HP]; [S, D, h], [S, h, D]
    stride_gb, stride_gn, stride_db, stride_dn, stride_xb, stride_xn,
    H, W, T, HW, D, h, P, gs, xs, gs_ptr, xs_ptr,
    GS_PTR: tl.constexpr, XS_PTR: tl.constexpr, DW: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HP: tl.constexpr,
    OP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, CHUNK_FASTEST: tl.constexpr,
):
    """Program ``(s, j)`` of ``S x n_d`` (:func:`_row_and_chunk`): columns ``j`` of D, row
    blocks ``s, s + S, ...``: ``dx = g + xs (dy + Wd^T du)`` in place, the prefix tokens of
    every image that starts in a block ``dx = g``. With ``DW`` (a bottleneck of at most
    ``BLOCK_HP`` columns) ``dy`` is not read but recomputed (:func:`_dy_tile`), and the
    program sums its share of both weight gradients, ``dWu[j, :] = sum dy^T s`` and
    ``dWd[:, j] = sum du^T t``, in registers over its blocks, written once to its slot
    ``s``: no ``dy`` or ``s`` round trip through memory, no split-K launch. With
    ``CHUNK_FASTEST`` the ``n_d`` programs of a row program are consecutive (dispatched
    together), so they share its rows of ``du`` (and ``u``) in L2: each read from HBM
    once."""
    n_d = tl.cdiv(D, BLOCK_D)
    q = tl.program_id(0)
    pid, j = _row_and_chunk(n_d, CHUNK_FASTEST)
    n_s = tl.num_programs(0) // n_d
    gs = _scalar(gs, gs_ptr, GS_PTR)
    xs = _scalar(xs, xs_ptr, XS_PTR)
    d = j * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    cp = tl.arange(0, BLOCK_HP)
    cp_mask = cp < h
    acc_u = tl.zeros((BLOCK_D, BLOCK_HP), dtype=tl.float32)                        # dWu[j, :]
    acc_d = tl.zeros((BLOCK_HP, BLOCK_D), dtype=tl.float32)                        # dWd[:, j]
    s_scr = scr_ptr + q.to(tl.int64) * BLOCK_T * BLOCK_HP
    if DW:                               # row blocks pid, pid + n_s, ...
        n_iter = tl.cdiv(tl.cdiv(T, BLOCK_T) - pid, n_s)
    else:                                # one row block per program
        n_iter = 1
    for i in range(0, n_iter):
        r, r_mask, b, p = _rows(pid + i * n_s, T, HW, BLOCK_T)
        mask = r_mask[:, None] & d_mask[None, :]
        dx_tile = dx_ptr + (b * stride_db + (P + p) * stride_dn)[:, None] + d[None, :]
        if DW:
            dy, s, t, g = _dy_tile(x_ptr, g_ptr, u_ptr, wm_ptr, wu_ptr, nw_ptr, mean_ptr,
                                   rstd_ptr, cst_ptr, s_scr, r, r_mask, b, p, d, d_mask, cp,
                                   cp_mask, stride_xb, stride_xn, stride_gb, stride_gn, H, W,
                                   HW, h, P, gs, BLOCK_T, BLOCK_H, BLOCK_HP, BLOCK_D, OP,
                                   UPCAST, IEEE)
        else:
            dy = tl.load(dx_tile, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + (b * stride_gb + (P + p) * stride_gn)[:, None] + d[None, :],
                        mask=mask, other=0.0).to(tl.float32)
        acc = _wd_du(du_ptr, wd_ptr, r, r_mask, d, d_mask, D, h, BLOCK_T, BLOCK_H, BLOCK_D,
                     OP, UPCAST, IEEE)
        tl.store(dx_tile, (g + xs * (dy + acc)).to(dx_ptr.dtype.element_ty), mask=mask)
        _copy_prefix(g_ptr, dx_ptr, b, r_mask & (p == 0), d, d_mask, stride_gb, stride_gn,
                     stride_db, stride_dn, P)                                      # dx = g
        if DW:
            du = tl.load(du_ptr + r[:, None] * h + cp[None, :],
                         mask=r_mask[:, None] & cp_mask[None, :], other=0.0)       # [BT, HP]
            acc_u = _mma(tl.trans(_op_cast(dy, OP, UPCAST)), s, acc_u, IEEE)
            acc_d = _mma(tl.trans(_op_cast(du, OP, UPCAST)), _op_cast(t, OP, UPCAST), acc_d,
                         IEEE)
            tl.debug_barrier()           # the next block rewrites the scratch
    if DW:
        slot = pid.to(tl.int64) * D * h
        tl.store(dwu_part_ptr + slot + d[:, None].to(tl.int64) * h + cp[None, :], acc_u,
                 mask=d_mask[:, None] & cp_mask[None, :])
        tl.store(dwd_part_ptr + slot + cp[:, None].to(tl.int64) * D + d[None, :], acc_d,
                 mask=cp_mask[:, None] & d_mask[None, :])


# --------------------------------------------------------------------------- launch plans


def _config(T: int, D: int, h: int, weight_dtype: torch.dtype, sms: int, gpu: bool) -> dict:
    """Block sizes and operand flags for ``T`` grid tokens (all images: blocks run over
    ``B x HW`` at once). ``tl.dot`` needs every dimension >= 16. ``gpu`` False: Triton's
    interpreter (whose cost is per program: bigger D chunks run faster there)."""
    upcast, ieee = not gpu, weight_dtype in (torch.float32, torch.float64) \
        and torch.get_float32_matmul_precision() == "highest"
    return dict(
        BLOCK_T=_block_t(T, D, sms) if gpu else 16,
        BLOCK_H=min(64, max(16, triton.next_power_of_2(h))),
        BLOCK_D=min(64 if gpu else 128, max(16, triton.next_power_of_2(D))),
        # 16-bit weights: tensor-core operands in that dtype, float32 accumulation; float32
        # weights: IEEE products unless torch allows TF32 (_triton_common's scheme).
        OP=op_code(weight_dtype), UPCAST=upcast, IEEE=ieee,
        num_warps=8 if gpu else 4,
    )


def _block_t(T: int, D: int, sms: int) -> int:
    """Rows per program. Every program sweeps all of Wu (forward, ``_dy``) or its share of
    Wd (down, ``_dx``) once per block, so the weights' L2->SM traffic falls as the block
    grows; blocks run over all images' grid tokens, so a larger block pads nothing but the
    last one. Modelled (benchmarks/roofline.py, bf16, B256 14x14, forward + backward,
    with the down/dx blocks below): MLP position (D3072 h768) 32 rows 59.0 GB L2->SM, 64
    rows 44.2, 128 rows 36.8 (32-row blocks of one image each: 78.5); attention position
    (D768 h192) 15.2 / 13.9 / 13.3 GB. ``BIG_BLOCK_MIN_DIM`` up 128 rows, 64 below (at 128
    rows the fused forward's halo costs registers), whatever ``sms``: blocks are
    not shrunk to give every SM a program. A small batch then runs fewer programs than
    SMs, and the model (which prices that: a launch's matrix rate and L2 bandwidth are its
    programs' SMs') still prefers the large blocks, since each halving of the block
    doubles every program's weight reads. At the published batch 16 (H200, forward +
    backward, with this module's other choices): D3072 16-row blocks (the largest that
    filled 132 SMs) 504 us, 128 rows 256; D768 16 rows 48 us, 64 rows 34. Only a block
    longer than all the tokens is halved. Registers (scripts/triton_aot_check.py, sm_90,
    bf16, 8 warps; Triton 3.8 / 3.6): at 128 rows, D3072, down (256 bottleneck columns)
    187 / 187, _dx (128 columns of D) 252 / 252, no spill; float32 tokens spill up to a few
    hundred bytes at 128 rows (the dwconv launch runs 64-row blocks where it sums dWm). The
    forward and _dy kernels run blocks of their own, sized for the L2 where y is kept
    (``_fwd_config``, ``_dy_config``: their registers there). To be tuned on a GPU (the GPU
    check's opt-in ``tune`` stage times 32 / 64 / 128 rows against this choice)."""
    bt = 128 if D >= BIG_BLOCK_MIN_DIM else 64
    while bt > 16 and bt // 2 >= T:
        bt //= 2
    return bt


def _tile_cols(cfg: dict, rows: int, T: int, h: int, sms: int) -> int:
    """Bottleneck columns per tile of the down and dv launches: ``WIDE_TILE_COLS`` with
    16-bit operands where such tiles of ``rows`` rows alone give every SM a program, else
    128. At the published batch 16 (D3072 h768, 3136 grid tokens) 256-column tiles would
    leave 57 of 132 SMs idle: modelled forward + backward on an H200, 236 us against 229
    with 128 columns; from batch 32 up the wide tiles win (B32 361 against 383, B256 2749
    against 2932)."""
    if cfg["OP"] and triton.cdiv(T, rows) * triton.cdiv(h, WIDE_TILE_COLS) >= sms:
        return WIDE_TILE_COLS
    return 128


def _down_config(cfg: dict, T: int, D: int, h: int, sms: int) -> dict:
    """The down kernel's blocks: from ``BIG_BLOCK_MIN_DIM`` up, 128 or 256 bottleneck
    columns per program (:func:`_tile_cols`), so x is re-read less often (``h / BLOCK_H``
    programs per row block each read the block's rows of x). Modelled at D3072 h768, B256:
    64 columns 5.5 GB L2->SM, 128 3.7, 256 2.8."""
    if D < BIG_BLOCK_MIN_DIM:
        return cfg
    cols = _tile_cols(cfg, cfg["BLOCK_T"], T, h, sms)
    return dict(cfg, BLOCK_H=min(cols, max(16, triton.next_power_of_2(h))))


def _dx_config(cfg: dict, D: int, h: int, gpu: bool) -> dict:
    """The dx kernel's blocks. With ``DW_IN_DX``, bottlenecks up to ``FUSED_DW_MAX_H``
    columns: ``DW``, the weight gradients summed in the dx kernel, 32 rows and 32 columns
    of D per program on a GPU (two ``[32, BLOCK_HP]`` float32 accumulators;
    scripts/triton_aot_check.py, sm_90, 8 warps, D768: 227 registers with Triton 3.8, 247
    with 3.6, no spill in 16-bit; 16 warps spilled 100 B). From ``BIG_BLOCK_MIN_DIM`` up:
    128 columns of D per program, so ``du`` and the token tiles are re-read half as often
    (modelled at D3072 h768, B256: 6.2 -> 4.3 GB L2->SM)."""
    hp = max(16, triton.next_power_of_2(h))
    if DW_IN_DX and hp <= FUSED_DW_MAX_H:    # on a GPU 32 x 32 tiles: the [32, HP] stencil
        return dict(cfg, DW=True, BLOCK_HP=hp, BLOCK_D=32 if gpu else cfg["BLOCK_D"],
                    BLOCK_T=min(32, cfg["BLOCK_T"]), num_warps=8 if gpu else 4)
    if D < BIG_BLOCK_MIN_DIM:
        return dict(cfg, DW=False, BLOCK_HP=16)
    return dict(cfg, DW=False, BLOCK_HP=16,
                BLOCK_D=min(128, max(16, triton.next_power_of_2(D))))


def _dv_config(cfg: dict, T: int, h: int, sms: int, gpu: bool) -> dict:
    """The dv launch's tiles: ``DV_TILE`` rows x :func:`_tile_cols` bottleneck columns on a
    GPU (the interpreter: its own rows, 16 columns, so the tests run several chunks), D in
    64-wide steps, 8 warps, chunks of a row block consecutive (``CHUNKS_FASTEST``)."""
    t = DV_TILE if gpu else cfg["BLOCK_T"]
    return dict(cfg, BLOCK_T=t, BLOCK_H=_tile_cols(cfg, t, T, h, sms) if gpu else 16,
                BLOCK_D=64 if gpu else cfg["BLOCK_D"],
                CHUNK_FASTEST=CHUNKS_FASTEST)


def _fwd_config(cfg: dict, D: int, gpu: bool) -> dict:
    """The forward kernel's blocks. From ``KEEP_Y_MIN_DIM`` up its second sweep reads the
    block's x and kept y back after the first touched both: ``KEPT_Y_ROWS`` rows per
    program (and 128 columns of D per chunk on a GPU, so ``s`` is re-read per chunk as
    often as with the other blocks' 128 x 64), since the resident programs' 128-row blocks
    (207 MB at D3072 on 132 SMs) would miss L2 on three quarters of that sweep. Modelled
    (benchmarks/roofline.py, bf16, B256 14x14, H200) at D3072 h768: 128 x 64 1504 MB,
    floor 313 us, 7.55 GB L2->SM; 64 x 128 1343 MB, 280 us, 7.55 GB; 32 x 128 1039 MB,
    240 us (the FLOP floor), 11.25 GB (Wu re-read per block: past the L2->SM budget).
    Registers (scripts/triton_aot_check.py, sm_90, 8 warps, D3072, bf16): 64 x 128 215 with
    Triton 3.8, 250 with 3.6, no spill (128 x 64: 241 / 255, 108 B spilled with 3.6);
    float32 tokens and weights spill 36 / 88 B. 64 x 256 (``FWD_COLS``; ``s`` re-read from
    the scratch half as often) models 2658 against 2749 us forward + backward at B256 and
    220 against 229 at batch 16, but spills: 254 registers and none in bf16 with Triton 3.8,
    44 B with 3.6, 720 B with float32 tokens under bf16 autocast (3.8). Kept at 128 until
    a GPU times it (the ``tune`` stage's ``fwd-cols-256``)."""
    if D < KEEP_Y_MIN_DIM:
        return cfg
    bt = min(cfg["BLOCK_T"], KEPT_Y_ROWS)
    wide = gpu and bt <= 64           # [128, 128] float32 tiles would not fit in registers
    cols = min(FWD_COLS, max(16, triton.next_power_of_2(D)))
    return dict(cfg, BLOCK_T=bt, BLOCK_D=cols if wide else cfg["BLOCK_D"])


def _dy_config(cfg: dict, D: int, h: int, dw: bool) -> dict:
    """The _dy kernel's blocks. Its dv phase sweeps the block's ``dy`` rows over D once per
    ``BLOCK_HV`` bottleneck columns; each sweep hits L2 only while the resident programs'
    blocks fit there (benchmarks/roofline.py's re-sweep rule: one program per SM, ``S x
    BLOCK_T x D`` bytes of ``dy``). Where y is recomputed (below ``KEEP_Y_MIN_DIM``, today
    no width) the other kernels' blocks are used and h runs in 32-column chunks (at 64 the
    former _dv kernel spilled 20-44 B in every 16-bit and mixed config of
    scripts/triton_aot_check.py; at 32, 105 registers, none). Where y is kept the other
    kernels' 128-row blocks would not fit (D3072: 104 MB, and the
    LayerNorm's second sweep over y and g 207 MB): there the _dy kernel runs
    ``RESWEEP_ROWS`` rows per program, so both fit (26 and 52 MB; this kernel has no
    up-projection left to amortise over larger blocks: y is kept), and ``RESWEEP_HV``
    columns of h per dv sweep, so Wu's L2->SM traffic stays that of 128-row blocks.
    Modelled (benchmarks/roofline.py, bf16, B256 14x14, H200) at the MLP position (D3072
    h768): 128 x 32 (the other kernels' blocks) 5548 MB HBM, floor 1156 us; 64 x 128 1633 MB,
    340 us; 32 x 128 1268 MB, 264 us (the FLOP floor is 241), 12.7 GB L2->SM either way.
    Registers (scripts/triton_aot_check.py, sm_90, bf16, 8 warps, D768 and D3072): 195
    with Triton 3.8, 225 with 3.6, no spill (128 x 32 blocks: 255, 136 B spilled with
    3.6). The GPU check's ``tune`` stage times the 128 x 32 blocks against these."""
    BT, BH = cfg["BLOCK_T"], cfg["BLOCK_H"]
    out = dict(cfg, BLOCK_HV=min(32, BH), KEEP_Y=D >= KEEP_Y_MIN_DIM, DW=dw,
               ALTERNATE=ALTERNATE_SWEEPS)
    if D >= KEEP_Y_MIN_DIM:
        out.update(BLOCK_T=min(BT, RESWEEP_ROWS),
                   BLOCK_HV=min(RESWEEP_HV, max(16, triton.next_power_of_2(h))))
    return out


def _programs(n_blocks: int, sms: int, gpu: bool) -> int:
    """Programs ``S`` of the persistent kernels (forward, _dy), each looping over the row
    blocks ``s, s + S, ...``: one per SM on a GPU (their registers allow one 8-warp program
    per SM anyway). The _dy kernel sums each program's dgamma/dbeta/dWm partials into its
    own slot, so those buffers hold ``S`` slots whatever the batch (9 MB at D=4096,
    h=1024 on 132 SMs); both reuse one scratch per program. Two in the interpreter, so
    that the tests run the loops and the summing."""
    return max(1, min(n_blocks, sms if gpu else 2))


def halo_chunks(W: int, meta: dict) -> int:
    """Chunks of ``BLOCK_E`` rows the fused forward computes ``u`` in: the block and its
    stencil's halo, ``BLOCK_T + 2 (W + 1)`` rows (0 when the down launch is separate)."""
    if not meta["FUSE_DOWN"]:
        return 0
    return triton.cdiv(meta["BLOCK_T"] + 2 * W + 2, meta["BLOCK_E"])


def fwd_parts(n_blocks: int, n_chunks: int, sms: int, gpu: bool, fused_down: bool,
              keep_y: bool) -> int:
    """Parts of D the forward kernel splits each row block's up-projection into: as many
    as ``n_blocks`` blocks' parts fit on the SMs in one wave (at most ``FWD_MAX_PARTS``,
    none empty), where ``y`` is kept and ``u`` comes from the down launch (a part would
    otherwise redo the down projection of the block and its halo); else 1. Two SMs' worth
    in the interpreter, so the tests run the parts and their merge."""
    if fused_down or not keep_y:
        return 1
    parts = max(1, min(FWD_MAX_PARTS, (sms if gpu else 2) // n_blocks, n_chunks))
    return triton.cdiv(n_chunks, triton.cdiv(n_chunks, parts))      # no empty part


def visual_fwd_plan(B, H, W, D, h, weight_dtype, sms, gpu):
    """The forward's launches for ``B`` images of an ``H x W`` grid, width ``D``, bottleneck ``h``."""
    T = B * H * W
    cfg = _config(T, D, h, weight_dtype, sms, gpu)
    n_t, fuse = triton.cdiv(T, cfg["BLOCK_T"]), D < FUSE_DOWN_BELOW_DIM
    fcfg = _fwd_config(cfg, D, gpu)
    n_fb, keep = triton.cdiv(T, fcfg["BLOCK_T"]), D >= KEEP_Y_MIN_DIM
    parts = fwd_parts(n_fb, triton.cdiv(D, fcfg["BLOCK_D"]), sms, gpu, fuse, keep)
    fwd = Launch("fwd", "_heba_visual_fwd_kernel", (_programs(n_fb * parts, sms, gpu),),
                 dict(fcfg, KEEP_Y=keep, FUSE_DOWN=fuse, PARTS=parts,
                      BLOCK_E=min(32, fcfg["BLOCK_T"]), ALTERNATE=ALTERNATE_SWEEPS))
    if fuse:
        return [fwd]
    down = dict(_down_config(cfg, T, D, h, sms), CHUNK_FASTEST=CHUNKS_FASTEST)
    return [Launch("down", "_heba_visual_fwd_kernel_down",
                   (n_t * triton.cdiv(h, down["BLOCK_H"]),), down), fwd]


def visual_bwd_plan(B, H, W, D, h, weight_dtype, sms, gpu, recompute_u):
    """The backward's launches (``recompute_u``: the down kernel runs again first)."""
    T = B * H * W
    cfg = _config(T, D, h, weight_dtype, sms, gpu)
    BT, BH = cfg["BLOCK_T"], cfg["BLOCK_H"]
    down = dict(_down_config(cfg, T, D, h, sms), CHUNK_FASTEST=CHUNKS_FASTEST)
    dx = dict(_dx_config(cfg, D, h, gpu), CHUNK_FASTEST=CHUNKS_FASTEST)
    n_t, n_h, n_d = triton.cdiv(T, BT), triton.cdiv(h, BH), triton.cdiv(D, dx["BLOCK_D"])
    dv_gemm = D >= DV_GEMM_MIN_DIM and not dx["DW"]
    dy_cfg = dict(_dy_config(cfg, D, h, dx["DW"]), DV=not dv_gemm)
    slots = _programs(triton.cdiv(T, dy_cfg["BLOCK_T"]), sms, gpu)
    n_dh = triton.cdiv(h, down["BLOCK_H"])
    plan = [Launch("down", "_heba_visual_fwd_kernel_down", (n_t * n_dh,), down)] \
        if recompute_u else []
    plan += [Launch("dy", "_heba_visual_bwd_kernel_dy", (slots,), dy_cfg)]
    dwm_slots = slots
    if dv_gemm:       # one tile per program; dWm then summed by the dwconv launch's R row
        dv = _dv_config(cfg, T, h, sms, gpu)    # programs per bottleneck chunk, two per SM
        n_tv, n_hv = triton.cdiv(T, dv["BLOCK_T"]), triton.cdiv(h, dv["BLOCK_H"])
        plan.append(Launch("dv", "_heba_visual_bwd_kernel_dv", (n_tv * n_hv,), dv))
        n_tw = triton.cdiv(T, min(BT, DWM_ROWS))
        dwm_slots = max(1, min(n_tw, 2 * sms // n_h)) if gpu else min(n_tw, 2)
    plan.append(Launch("dwconv_t", "_heba_visual_kernel_dwconv",
                       (dwm_slots if dv_gemm else n_t, n_h),
                       dict(cfg, DWM=dv_gemm, BLOCK_T=min(BT, DWM_ROWS) if dv_gemm else BT)))
    if dx["DW"]:      # the weight gradients in the dx kernel: S row programs per D chunk
        n_tx = triton.cdiv(T, dx["BLOCK_T"])
        rows = max(1, min(n_tx, triton.cdiv(2 * sms, n_d))) if gpu else min(n_tx, 2)
        return plan + [Launch("dx", "_heba_visual_bwd_kernel_dx", (rows * n_d,), dx),
                       reduce_plan([(rows, h * D), (dwm_slots, h * 9), (rows, D * h),
                                    (slots, D), (slots, D)])]
    # dy, (dv,) du, then dWu and dWd (one split-K launch that also sums them, dWm and the
    # LayerNorm's partials), dx
    dw = atb_pair_sum_plan(T, D, h, weight_dtype, sms, gpu,
                           extras=[(dwm_slots, h * 9), (slots, D), (slots, D)],
                           per_sm=ATB_PROGRAMS_PER_SM)
    return plan + [dw, Launch("dx", "_heba_visual_bwd_kernel_dx", (n_t * n_d,), dx)]


# --------------------------------------------------------------------------- launchers


def _token_strides(t: torch.Tensor, batch_first: bool) -> Tuple[int, int]:
    """(batch stride, token stride) of a [B, N, D] or [N, B, D] tensor."""
    return (t.stride(0), t.stride(1)) if batch_first else (t.stride(1), t.stride(0))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _kw(step: Launch) -> dict:
    """The kernel's compile-time arguments of a plan step."""
    return dict(step.meta)


def _grid_tokens(t: torch.Tensor, P: int, batch_first: bool) -> torch.Tensor:
    """The grid tokens of a ``[B, N, D]`` (or ``[N, B, D]``) tensor as a ``[B, HW, D]`` view."""
    return t[:, P:] if batch_first else t[P:].transpose(0, 1)


def heba_visual_fwd(x, down_weight, mid_weight, up_weight, norm_weight, norm_bias,
                    scale: Scale, num_prefix_tokens: int, H: int, W: int, batch_first: bool,
                    eps: float, op_dtype: Optional[torch.dtype] = None):
    """Forward launcher. Returns ``(out, u, mean, rstd, y)``.

    ``out`` has ``x``'s shape and dtype (contiguous); ``u`` ``[B, HW, h]`` in the
    operand dtype ``op_dtype`` (default: the weights' dtype; under autocast the autocast
    dtype, the weights then read in float32 and rounded in registers); ``mean``, ``rstd``
    ``[B, HW]`` float32 (the LayerNorm statistics); ``y`` the pre-LayerNorm value
    ``[B, HW, D]`` in x's dtype from ``KEEP_Y_MIN_DIM`` up, else empty.
    """
    x = _last_dim_contiguous(x)
    B = x.shape[0] if batch_first else x.shape[1]
    D, h, HW, P = x.shape[2], mid_weight.shape[0], H * W, num_prefix_tokens
    dev = x.device
    out = new_buffer(x.shape, x.dtype, dev)
    op = op_dtype or down_weight.dtype
    u = new_buffer((B, HW, h), op, dev)
    mean = new_buffer((B, HW), torch.float32, dev)
    rstd = new_buffer((B, HW), torch.float32, dev)
    y = new_buffer((B, HW, D) if D >= KEEP_Y_MIN_DIM else (0,), x.dtype, dev)
    if B == 0:
        return out, u, mean, rstd, y
    wd = down_weight.reshape(h, D).contiguous()
    wm = mid_weight.reshape(h, 9).contiguous()
    wu = up_weight.reshape(D, h).contiguous()
    nw, nb = norm_weight.contiguous(), norm_bias.contiguous()
    plan = {st.step: st for st in visual_fwd_plan(B, H, W, D, h, op, *plan_device(dev))}
    fwd = plan["fwd"]
    sxb, sxn = _token_strides(x, batch_first)
    sob, son = _token_strides(out, batch_first)
    if "down" in plan:
        launch(_heba_visual_fwd_kernel_down, plan["down"].grid, x, wd, u, sxb, sxn, B * HW, HW,
               D, h, P, **_kw(plan["down"]))
    n_e = halo_chunks(W, fwd.meta)          # per program: s of a block, u of its halo
    scratch = new_buffer((fwd.grid[0], fwd.meta["BLOCK_T"] + n_e * fwd.meta["BLOCK_E"], h),
                         op, dev)
    # y for the forward's second sweep: the kept buffer, or one block's per program
    y_buf = y if y.numel() else new_buffer((fwd.grid[0], fwd.meta["BLOCK_T"], D), x.dtype, dev)
    # the parts' statistics and the blocks' arrival counters, where D is split in parts
    parts = fwd.meta["PARTS"]
    stats = counters = mean                                  # one part: never read
    if parts > 1:
        stats = new_buffer((B * HW, parts, 2), torch.float32, dev)
        counters = tile_counters(dev, triton.cdiv(B * HW, fwd.meta["BLOCK_T"]))
    scale_v, scale_p, scale_from_ptr = scale.kernel_args(mean)
    launch(_heba_visual_fwd_kernel, fwd.grid, x, wd, u, wm, scratch, wu, nw, nb, out, mean,
           rstd, y_buf, stats, counters, sxb, sxn, sob, son, H, W,
           B * HW, HW, D, h, P, n_e, scale_v, scale_p, float(eps), SCALE_PTR=scale_from_ptr,
           **_kw(fwd))
    return out, u, mean, rstd, y


def heba_visual_bwd(grad_out, x, u, mean, rstd, y, down_weight, mid_weight, up_weight,
                    norm_weight, norm_bias, scale: Scale, num_prefix_tokens: int, H: int,
                    W: int, batch_first: bool, rescale_param_grad: bool,
                    op_dtype: Optional[torch.dtype] = None):
    """Backward launcher. Returns the gradients of ``x`` and the five parameters.

    ``u`` is the forward's bottleneck, or None to recompute it here from ``x``; ``y`` the
    forward's kept pre-LayerNorm value (when ``D >= KEEP_Y_MIN_DIM``), else None.

    With ``rescale_param_grad`` the parameters' gradients are those of docs/semantics.md's rule
    (as if ``scale`` were 1); ``x``'s is always the true gradient.
    """
    x = _last_dim_contiguous(x)
    g = _last_dim_contiguous(grad_out)
    B = x.shape[0] if batch_first else x.shape[1]
    D, h, HW, P = x.shape[2], mid_weight.shape[0], H * W, num_prefix_tokens
    dev = x.device
    gs, xs = (ONE, scale) if rescale_param_grad else (scale, ONE)
    dx = new_buffer(x.shape, x.dtype, dev)
    if B == 0:
        return (dx, torch.zeros_like(down_weight), torch.zeros_like(mid_weight),
                torch.zeros_like(up_weight), torch.zeros_like(norm_weight),
                torch.zeros_like(norm_bias))
    wd = down_weight.reshape(h, D).contiguous()
    wm = mid_weight.reshape(h, 9).contiguous()
    wu = up_weight.reshape(D, h).contiguous()
    nw = norm_weight.contiguous()
    op = op_dtype or down_weight.dtype
    plan = {st.step: st for st in visual_bwd_plan(B, H, W, D, h, op,
                                                  *plan_device(dev), recompute_u=u is None)}
    cfg = plan["dwconv_t"].meta
    T = B * HW
    sxb, sxn = _token_strides(x, batch_first)
    sgb, sgn = _token_strides(g, batch_first)
    sdb, sdn = _token_strides(dx, batch_first)

    if u is None:                                                     # recompute u = t Wd^T
        u = new_buffer((B, HW, h), op, dev)
        launch(_heba_visual_fwd_kernel_down, plan["down"].grid, x, wd, u, sxb, sxn, T, HW, D,
               h, P, **_kw(plan["down"]))
    n_s, fused = plan["dy"].grid[0], plan["dx"].meta["DW"]
    # s = gelu(v) and dy: for the split-K weight gradients and the dx launch, or (DW, the dx
    # kernel recomputes both) only a scratch per _dy program; cst: LayerNorm row constants.
    BT = plan["dy"].meta["BLOCK_T"]
    s = new_buffer((n_s, BT, h) if fused else (B, HW, h), op, dev)
    dy = new_buffer((n_s, BT, D), x.dtype, dev) if fused else dx
    cst = new_buffer((T, 2) if fused else (0,), torch.float32, dev)
    dnw_part = new_buffer((n_s, D), torch.float32, dev)
    dnb_part = new_buffer((n_s, D), torch.float32, dev)
    dv = new_buffer((B, HW, h), op, dev)
    dv_step = plan.get("dv")          # dv = (dy Wu) gelu'(v): a launch of its own, or in _dy
    n_dwm = plan["dwconv_t"].grid[0] if dv_step else n_s     # dWm: in dwconv_t, or in _dy
    dwm_part = new_buffer((n_dwm, h, 9), torch.float32, dev)
    gs_v, gs_p, gs_from_ptr = gs.kernel_args(mean)
    assert (y is not None) == plan["dy"].meta["KEEP_Y"], "y is kept iff D >= KEEP_Y_MIN_DIM"
    launch(_heba_visual_bwd_kernel_dy, plan["dy"].grid, x, g, u, wm, s, wu, nw, mean, rstd,
           mean if y is None else y, dy, dv, cst if fused else mean, dnw_part, dnb_part,
           dwm_part, sxb, sxn, sgb, sgn, sdb, sdn, H, W, T, HW, D, h, P, gs_v, gs_p,
           GS_PTR=gs_from_ptr, **_kw(plan["dy"]))
    if dv_step:
        launch(_heba_visual_bwd_kernel_dv, dv_step.grid, dy, wu, dv, sdb, sdn, T, HW, D, h, P,
               **_kw(dv_step))

    du = new_buffer((B, HW, h), op, dev)                              # dwconv^T(dv)
    launch(_heba_visual_kernel_dwconv, plan["dwconv_t"].grid, dv, wm, du, u, dwm_part, H, W, T,
           HW, h, DWM=cfg["DWM"], BLOCK_T=cfg["BLOCK_T"], BLOCK_H=cfg["BLOCK_H"],
           num_warps=cfg["num_warps"])
    n_dx = triton.cdiv(D, plan["dx"].meta["BLOCK_D"])       # the dx kernel's D chunks
    dwm = Partial(dwm_part, mid_weight.shape, mid_weight.dtype)
    norm = [Partial(dnw_part, norm_weight.shape, norm_weight.dtype),
            Partial(dnb_part, norm_bias.shape, norm_bias.dtype)]
    if fused:
        rows = plan["dx"].grid[0] // n_dx
        dwu_part = new_buffer((rows, D, h), torch.float32, dev)
        dwd_part = new_buffer((rows, h, D), torch.float32, dev)
    else:   # dWu = dy^T s, dWd = du^T t: one split-K launch, which also sums dWm and norm's
        d_up, d_down, d_mid, d_nw, d_nb = atb_pair_sums(
            _grid_tokens(dx, P, batch_first), s, _grid_tokens(x, P, batch_first), du, op,
            [Sum(up_weight.shape, up_weight.dtype), Sum(down_weight.shape, down_weight.dtype)],
            [dwm, *norm], per_sm=ATB_PROGRAMS_PER_SM)
    # Last: turns dy (still read by the kernels above, unless DW) into dx, in place.
    xs_v, xs_p, xs_from_ptr = xs.kernel_args(mean)
    scr = new_buffer((plan["dx"].grid[0], plan["dx"].meta["BLOCK_T"],
                      plan["dx"].meta["BLOCK_HP"]) if fused else (0,), op, dev)
    launch(_heba_visual_bwd_kernel_dx, plan["dx"].grid, g, du, wd, dx, x, u, wm, wu, nw, mean,
           rstd, cst if fused else mean, scr if fused else mean, dwu_part if fused else mean,
           dwd_part if fused else mean, sgb, sgn, sdb, sdn, sxb, sxn, H, W, T, HW, D, h, P,
           gs_v, xs_v, gs_p, xs_p, GS_PTR=gs_from_ptr, XS_PTR=xs_from_ptr,
           **_kw(plan["dx"]))
    if not fused:
        return dx, d_down, d_mid, d_up, d_nw, d_nb
    # Every partial buffer summed in one launch, straight into the parameters' dtypes.
    grads = reduce_partials([Partial(dwd_part, down_weight.shape, down_weight.dtype), dwm,
                             Partial(dwu_part, up_weight.shape, up_weight.dtype), *norm])
    return (dx, *grads)


# --------------------------------------------------------------------------- registered ops


@torch.library.custom_op("heba::triton_visual_fwd", mutates_args=())
def _triton_visual_fwd(x: torch.Tensor, down_weight: torch.Tensor, mid_weight: torch.Tensor,
                       up_weight: torch.Tensor, norm_weight: torch.Tensor,
                       norm_bias: torch.Tensor, scale: float, scale_t: Optional[torch.Tensor],
                       num_prefix_tokens: int, H: int, W: int, batch_first: bool, eps: float,
                       rescale_param_grad: bool, op_dtype: Optional[torch.dtype]
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                  torch.Tensor]:
    """``(out, u, mean, rstd, y)``; the scale is ``scale_t`` (0-d float32) if given, else
    ``scale``; ``rescale_param_grad`` is only read by the backward."""
    with device_guard(x):
        return heba_visual_fwd(x, down_weight, mid_weight, up_weight, norm_weight, norm_bias,
                               Scale(scale, scale_t), num_prefix_tokens, H, W, batch_first, eps,
                               op_dtype)


@_triton_visual_fwd.register_fake
def _(x, down_weight, mid_weight, up_weight, norm_weight, norm_bias, scale, scale_t,
      num_prefix_tokens, H, W, batch_first, eps, rescale_param_grad, op_dtype):
    B = x.shape[0] if batch_first else x.shape[1]
    h = mid_weight.shape[0]
    return (x.new_empty(x.shape),
            down_weight.new_empty((B, H * W, h), dtype=op_dtype or down_weight.dtype),
            x.new_empty((B, H * W), dtype=torch.float32),
            x.new_empty((B, H * W), dtype=torch.float32),
            x.new_empty((B, H * W, x.shape[-1]) if x.shape[-1] >= KEEP_Y_MIN_DIM else (0,)))


@torch.library.custom_op("heba::triton_visual_bwd", mutates_args=())
def _triton_visual_bwd(grad_out: torch.Tensor, x: torch.Tensor, u: Optional[torch.Tensor],
                       mean: torch.Tensor, rstd: torch.Tensor, y: Optional[torch.Tensor],
                       down_weight: torch.Tensor,
                       mid_weight: torch.Tensor, up_weight: torch.Tensor,
                       norm_weight: torch.Tensor, norm_bias: torch.Tensor, scale: float,
                       scale_t: Optional[torch.Tensor], num_prefix_tokens: int, H: int, W: int,
                       batch_first: bool, rescale_param_grad: bool,
                       op_dtype: Optional[torch.dtype]
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                  torch.Tensor, torch.Tensor]:
    """Gradients of ``(x, down_weight, mid_weight, up_weight, norm_weight, norm_bias)``;
    ``u`` None: recomputed from ``x``."""
    with device_guard(x):
        return heba_visual_bwd(grad_out, x, u, mean, rstd, y, down_weight, mid_weight, up_weight,
                               norm_weight, norm_bias, Scale(scale, scale_t), num_prefix_tokens,
                               H, W, batch_first, rescale_param_grad, op_dtype)


@_triton_visual_bwd.register_fake
def _(grad_out, x, u, mean, rstd, y, down_weight, mid_weight, up_weight, norm_weight, norm_bias,
      scale, scale_t, num_prefix_tokens, H, W, batch_first, rescale_param_grad, op_dtype):
    return (x.new_empty(x.shape), torch.empty_like(down_weight), torch.empty_like(mid_weight),
            torch.empty_like(up_weight), torch.empty_like(norm_weight),
            torch.empty_like(norm_bias))


# --------------------------------------------------------------------------- autograd glue


def _setup_context(ctx, inputs, output):
    (x, down_weight, mid_weight, up_weight, norm_weight, norm_bias, scale, scale_t,
     num_prefix_tokens, H, W, batch_first, eps, rescale_param_grad, op_dtype) = inputs
    _, u, mean, rstd, y = output
    ctx.set_materialize_grads(False)   # no zero-filled gradients of the statistics
    ctx.mark_non_differentiable(u, mean, rstd, y)
    if x.shape[-1] < SAVE_U_MIN_DIM:
        u = None                  # memory-bound width: the backward recomputes it
    ctx.save_for_backward(x, u, mean, rstd, y if y.numel() else None, down_weight, mid_weight,
                          up_weight, norm_weight, norm_bias, scale_t)
    ctx.args = (scale, num_prefix_tokens, H, W, batch_first, rescale_param_grad, op_dtype)


def _backward(ctx, grad_out, _grad_u, _grad_mean, _grad_rstd, _grad_y):
    *saved, scale_t = ctx.saved_tensors
    scale, *rest = ctx.args
    grads = torch.ops.heba.triton_visual_bwd(grad_out, *saved, scale, scale_t, *rest)
    return (*grads, None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("heba::triton_visual_fwd", _backward,
                                setup_context=_setup_context)


# --------------------------------------------------------------------------- public function


def heba_visual(x, down_weight, mid_weight, up_weight, norm_weight, norm_bias, *,
                scale, num_prefix_tokens, grid, batch_first, eps, rescale_param_grad,
                op_dtype=None):
    """HeBA visual adapter on the Triton backend (arguments validated by :mod:`heba.ops`).

    ``x``: ``[B, N, D]`` (``[N, B, D]`` if not ``batch_first``); ``down_weight``
    ``[h, D, 1, 1]``, ``mid_weight`` ``[h, 1, 3, 3]``, ``up_weight`` ``[D, h, 1, 1]``,
    ``norm_weight``/``norm_bias`` ``[D]``; ``grid=(H, W)`` with ``H * W = N - num_prefix_tokens``.
    Returns ``x + scale * LayerNorm(x + up(gelu(dwconv3x3(down(x)))))`` on the grid tokens
    and ``x`` on the prefix tokens, in ``x``'s dtype; differentiable, with docs/semantics.md's
    gradient rule when ``rescale_param_grad``. ``op_dtype`` (default None: the weights'
    dtype) is the matmul operand dtype: under autocast :mod:`heba.ops` passes the autocast
    dtype with the float32 weights, which the kernels round in registers (no cast
    launches; the gradients come out in the weights' float32).

    Example::

        >>> import torch, heba.nn
        >>> a = heba.nn.HeBAAdapter(64, backend="triton").cuda()
        >>> a(torch.randn(2, 1 + 7 * 7, 64, device="cuda"), scale=0.025).shape
        torch.Size([2, 50, 64])
    """
    check_dtypes("heba_visual", x, down_weight, mid_weight, up_weight, norm_weight, norm_bias)
    H, W = grid
    out, *_ = torch.ops.heba.triton_visual_fwd(
        x, down_weight, mid_weight, up_weight, norm_weight, norm_bias, *Scale.of(scale),
        int(num_prefix_tokens), int(H), int(W), bool(batch_first), float(eps),
        bool(rescale_param_grad), op_dtype)
    return out
