"""Pieces shared by the Triton kernels of :mod:`heba_kernels.heba_visual`,
:mod:`heba_kernels.heba_text` and :mod:`heba_kernels.low_rank`: exact GELU and
its derivative, the operand cast and matmul helpers, the weight-gradient
reduction ``C = s * A^T B`` over all tokens, summed in the launch that computes it.

Weight gradients of a token-wise adapter are reductions over every token,
``dW[i, j] = sum_m A[m, i] * B[m, j]`` with ``m`` in the millions and
``i, j`` small. :func:`atb_partials` splits the token axis into ``S`` chunks; program
``(i, j, s)`` writes its float32 partial ``[BLOCK_I, BLOCK_J]`` tile of chunk
``s`` to its own slot of a ``[S, I, J]`` buffer (no atomic adds). An adapter's two weight
gradients ``[I, J]`` and ``[J, I]`` are one launch of two such products
(:func:`atb_pair_partials`, the second stored transposed). :func:`atb_pair_sums`, the
form the ops launch, also sums them: each program counts its tile's arrival in an int32
counter (:func:`tile_counters`), and the tile's last split to arrive reads every slot
back in slot order and writes the sum in the parameter's dtype (multiplied by the op's
scale where the gradient rule says so), resetting the counter for the next launch; more
programs of the same launch sum the op's other float32 partial buffers (LayerNorm, dWm),
written by its earlier launches. :func:`reduce_partials` is the same sum as a launch of
its own, for partial buffers no split-K launch follows. Every sum has a fixed order,
whoever arrives last, so the result is bitwise deterministic run to run: no ``torch.sum``,
cast or multiplication launches, and no reduction launch after the split-K one.

Operand dtypes: the kernels round every matmul operand to the weights' dtype
(``OP``: 0 float32, 1 float16, 2 bfloat16) and accumulate in float32. Triton's
interpreter returns garbage from ``tl.dot`` on 16-bit operands, so on the CPU
(``UPCAST``) the operands are rounded to ``OP`` and then widened back to
float32: the interpreter sees the same rounded values as the GPU does.
float32 operands use exact ("ieee") products unless PyTorch itself allows
TF32 (``torch.set_float32_matmul_precision("high")``), so float32 results
meet docs/semantics.md's float32 tolerance.
"""

import contextlib
import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from heba_kernels.runtime import ONE, Launch, Scale, launch, new_buffer, triton_interpreting

__all__ = ["OP_CODES", "op_code", "launch_flags", "num_sms", "atb", "check_dtypes",
           "device_guard", "atb_plan", "atb_partials", "atb_pair_plan", "atb_pair_partials",
           "Partial", "reduce_partials", "reduce_plan", "plan_device", "Sum", "atb_pair_sums",
           "atb_pair_sum_plan", "MAX_EXTRAS", "tile_counters", "ATB_PROGRAMS_PER_SM"]

# float64 (accepted by all three ops, as by the reference) computes as float32: operands
# rounded to float32, float32 accumulation (docs/semantics.md section 3), results back in float64.
OP_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 0}

# Globals read inside @triton.jit functions must be constexpr.
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


# ----------------------------------------------------------------------------- jit helpers

@triton.jit
def _gelu(u):
    """Exact (erf) GELU of a float32 tile."""
    return 0.5 * u * (1.0 + tl.math.erf(u * _INV_SQRT2))


@triton.jit
def _gelu_grad(u):
    """d gelu(u) / du = Phi(u) + u * phi(u), float32."""
    cdf = 0.5 * (1.0 + tl.math.erf(u * _INV_SQRT2))
    pdf = tl.exp(-0.5 * u * u) * _INV_SQRT_2PI
    return cdf + u * pdf


@triton.jit
def _scalar(value, ptr, FROM_PTR: tl.constexpr):
    """A float32 scalar argument: ``value`` itself, or ``*ptr`` if ``FROM_PTR`` (a 0-d
    tensor read at run time, so a captured CUDA graph replays with its current value)."""
    if FROM_PTR:
        value = tl.load(ptr).to(tl.float32)
    return value


@triton.jit
def _op_cast(t, OP: tl.constexpr, UPCAST: tl.constexpr):
    """Round a tile to the matmul operand dtype (and widen it again in the interpreter)."""
    if OP == 1:
        t = t.to(tl.float16)
    elif OP == 2:
        t = t.to(tl.bfloat16)
    else:
        t = t.to(tl.float32)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b`` with float32 accumulation; exact float32 products if ``IEEE``."""
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


# ----------------------------------------------------------------------------- partial sums

@triton.jit
def _sum_slots(P, O, offs, mask, n_slots, slot, scale, SCALED: tl.constexpr):
    """``O[offs] = (scale *) sum_s P[s, offs]``, ``s`` in order, float32: the partial slots
    of one output tile, read past L1 (``.cg``: written by other programs of the launch)."""
    acc = tl.zeros_like(offs).to(tl.float32)
    ptrs = P + offs                      # stepped by one slot: 64-bit pointer arithmetic
    for _ in range(0, n_slots):
        acc += tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
        ptrs += slot
    if SCALED:
        acc = acc * scale
    tl.store(O + offs, acc.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_one(P, O, S, N, pid, scale, SCALED: tl.constexpr, BLOCK: tl.constexpr):
    """``O[n] = (scale *) sum_s P[s, n]`` for block ``pid`` of ``BLOCK`` outputs of a
    ``[S, N]`` buffer, ``s`` in order, float32."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)                          # [BLOCK]
    _sum_slots(P, O, offs, offs < N, S, N, scale, SCALED)


# ----------------------------------------------------------------------------- A^T B kernel

@triton.jit
def _atb_tile(A, B, C_PART, S_PART, A2, B2, C2_PART, S2_PART, O, O2, OS, OS2, CNT,
              M, I, J, rows_per_split, n_splits, R, stride_ab, stride_am, stride_bb,
              stride_bm, stride_a2b, stride_a2m, stride_b2b, stride_b2m, scale,
              COLSUM: tl.constexpr, PAIR: tl.constexpr, REDUCE: tl.constexpr,
              SCALED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_I: tl.constexpr,
              BLOCK_J: tl.constexpr, OP: tl.constexpr, UPCAST: tl.constexpr,
              IEEE: tl.constexpr):
    """Program ``(i, j, s)`` of :func:`_atb_kernel`: split ``s``'s partial of one output
    tile (and its column sums), then with ``REDUCE`` the tile's arrival; the last split to
    arrive sums the tile's slots into the output."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_s = tl.program_id(2)
    second = pid_s < 0                  # False: a runtime flag, set in PAIR's second half
    if PAIR:
        second = pid_s >= n_splits
        pid_s = pid_s % n_splits
        A = tl.where(second, A2, A)
        B = tl.where(second, B2, B)
        stride_ab = tl.where(second, stride_a2b, stride_ab)
        stride_am = tl.where(second, stride_a2m, stride_am)
        stride_bb = tl.where(second, stride_b2b, stride_bb)
        stride_bm = tl.where(second, stride_b2m, stride_bm)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)                  # [BLOCK_I]
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)                  # [BLOCK_J]
    i_ok = offs_i < I
    j_ok = offs_j < J
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)              # [BLOCK_I, BLOCK_J]
    csum = tl.zeros((BLOCK_I,), dtype=tl.float32)
    csum2 = tl.zeros((BLOCK_J,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_K):
        rows = m0 + tl.arange(0, BLOCK_K)                             # [BLOCK_K]
        r_ok = rows < m_end
        rows64 = rows.to(tl.int64)
        outer, inner = rows64 // R, rows64 % R
        a = tl.load(A + (outer * stride_ab + inner * stride_am)[:, None] + offs_i[None, :],
                    mask=r_ok[:, None] & i_ok[None, :], other=0.0)    # [BLOCK_K, BLOCK_I]
        b = tl.load(B + (outer * stride_bb + inner * stride_bm)[:, None] + offs_j[None, :],
                    mask=r_ok[:, None] & j_ok[None, :], other=0.0)    # [BLOCK_K, BLOCK_J]
        if COLSUM:
            csum += tl.sum(a.to(tl.float32), axis=0)
            if PAIR:
                csum2 += tl.sum(b.to(tl.float32), axis=0)
        acc = _mma(tl.trans(_op_cast(a, OP, UPCAST)), _op_cast(b, OP, UPCAST), acc, IEEE)
    tile_ok = i_ok[:, None] & j_ok[None, :]
    off = offs_i[:, None] * J + offs_j[None, :]                       # [I, J] layout
    off2 = offs_j[None, :] * I + offs_i[:, None]                      # [J, I]: transposed
    slot = pid_s.to(tl.int64) * I * J
    if second:                          # PAIR's second half: the tile transposed
        tl.store(C2_PART + slot + off2, acc, mask=tile_ok)
        if COLSUM:
            if pid_i == 0:
                tl.store(S2_PART + pid_s.to(tl.int64) * J + offs_j, csum2, mask=j_ok)
    else:
        tl.store(C_PART + slot + off, acc, mask=tile_ok)
        if COLSUM:
            if pid_j == 0:
                tl.store(S_PART + pid_s.to(tl.int64) * I + offs_i, csum, mask=i_ok)
    if REDUCE:
        # Every thread's stores are issued before the one arrival (a CTA barrier, then
        # a release at GPU scope); the last arrival's acquire makes every split's slots
        # visible to it. The order of the sum is the slots' order, whoever arrives last.
        tl.debug_barrier()
        tile = (second.to(tl.int32) * tl.num_programs(1) + pid_j) * tl.num_programs(0) + pid_i
        arrived = tl.atomic_add(CNT + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == n_splits - 1:
            if second:
                _sum_slots(C2_PART, O2, off2, tile_ok, n_splits, I * J, scale,
                           (SCALED >> 1) & 1)
                if COLSUM:
                    if pid_i == 0:
                        _sum_slots(S2_PART, OS2, offs_j, j_ok, n_splits, J, scale,
                                   (SCALED >> 3) & 1)
            else:
                _sum_slots(C_PART, O, off, tile_ok, n_splits, I * J, scale, SCALED & 1)
                if COLSUM:
                    if pid_j == 0:
                        _sum_slots(S_PART, OS, offs_i, i_ok, n_splits, I, scale,
                                   (SCALED >> 2) & 1)
            tl.atomic_xchg(CNT + tile, 0, sem="relaxed", scope="gpu")   # ready for reuse


@triton.jit
def _atb_kernel(A, B, C_PART, S_PART,     # A [M, I], B [M, J], C_PART [S, I, J], S_PART [S, I]
                A2, B2, C2_PART, S2_PART,  # PAIR: A2 [M, I], B2 [M, J], C2_PART [S, J, I],
                #                            S2_PART [S, J]
                O, O2, OS, OS2, CNT,       # REDUCE: O [I, J], O2 [J, I], OS [I], OS2 [J],
                #                            CNT int32 [2, gj, gi], zero
                E0, EO0, ES0, EN0, E1, EO1, ES1, EN1, E2, EO2, ES2, EN2,  # E_k [ES_k, EN_k]
                M, I, J, rows_per_split, n_splits, R, stride_ab, stride_am, stride_bb,
                stride_bm, stride_a2b, stride_a2m, stride_b2b, stride_b2m, scale, scale_ptr,
                COLSUM: tl.constexpr, PAIR: tl.constexpr, REDUCE: tl.constexpr,
                SCALE_PTR: tl.constexpr, SCALED: tl.constexpr, EBLOCK: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                OP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``A^T B`` over token rows in ``n_splits`` chunks, float32 partial slots.

    Row ``m`` of A is ``A + (m // R) * stride_ab + (m % R) * stride_am`` (B alike): a
    ``[M, I]`` matrix (``R = M``) or the ``[Bt, R, I]`` rows of a strided 3-D view. With
    ``PAIR`` the grid's third axis has twice the splits: its second half computes
    ``A2^T B2`` (the same shapes and dtypes as ``A``, ``B``) and stores it transposed, into
    ``C2_PART [S, J, I]``: two weight gradients ``[I, J]`` and ``[J, I]`` in one launch;
    with ``COLSUM`` its column sums are ``B2``'s (``[S, J]``: the second weight's bias).

    With ``REDUCE`` the launch also writes the sums: each output tile's last split to
    arrive (counted in ``CNT``, which it leaves at zero) sums the tile's slots in order into
    ``O`` / ``O2`` (and the column sums into ``OS`` / ``OS2``) in their dtype, and the grid's
    third axis beyond the splits holds programs that sum an op's other partial buffers
    ``E_k`` (written by earlier launches) into ``EO_k``, ``EBLOCK`` outputs each. Bit ``k``
    of ``SCALED`` multiplies output ``k`` (O, O2, OS, OS2, EO0, EO1, EO2) by ``scale``.
    """
    pid_z = tl.program_id(2)
    extra = pid_z < 0                   # False: a runtime flag
    if REDUCE:
        scale = _scalar(scale, scale_ptr, SCALE_PTR)
        extra = pid_z >= (2 * n_splits if PAIR else n_splits)
    if extra:                           # one block of one other partial buffer
        gi = tl.num_programs(0)
        blk = ((pid_z - (2 * n_splits if PAIR else n_splits)) * tl.num_programs(1)
               + tl.program_id(1)) * gi + tl.program_id(0)
        nb0 = tl.cdiv(EN0, EBLOCK)
        nb1 = tl.cdiv(EN1, EBLOCK)
        nb2 = tl.cdiv(EN2, EBLOCK)
        if blk < nb0:
            _reduce_one(E0, EO0, ES0, EN0, blk, scale, (SCALED >> 4) & 1, EBLOCK)
        elif blk < nb0 + nb1:
            _reduce_one(E1, EO1, ES1, EN1, blk - nb0, scale, (SCALED >> 5) & 1, EBLOCK)
        elif blk < nb0 + nb1 + nb2:
            _reduce_one(E2, EO2, ES2, EN2, blk - nb0 - nb1, scale, (SCALED >> 6) & 1, EBLOCK)
    else:
        _atb_tile(A, B, C_PART, S_PART, A2, B2, C2_PART, S2_PART, O, O2, OS, OS2, CNT,
                  M, I, J, rows_per_split, n_splits, R, stride_ab, stride_am, stride_bb,
                  stride_bm, stride_a2b, stride_a2m, stride_b2b, stride_b2m, scale,
                  COLSUM, PAIR, REDUCE, SCALED, BLOCK_K, BLOCK_I, BLOCK_J, OP, UPCAST, IEEE)


# ----------------------------------------------------------------------------- one sum launch

@triton.jit
def _reduce_partials_kernel(P0, O0, S0, N0, P1, O1, S1, N1, P2, O2, S2, N2,
                            P3, O3, S3, N3, P4, O4, S4, N4,   # P_k [S_k, N_k] fp32, O_k [N_k]
                            scale, scale_ptr, SCALE_PTR: tl.constexpr, SCALED: tl.constexpr,
                            BLOCK: tl.constexpr):
    """Every partial buffer of one op's backward in one launch: program ``(i, k)`` reduces
    block ``i`` of buffer ``k``; bit ``k`` of ``SCALED`` multiplies buffer ``k`` by scale."""
    pid = tl.program_id(0)
    k = tl.program_id(1)
    scale = _scalar(scale, scale_ptr, SCALE_PTR)
    if k == 0:
        _reduce_one(P0, O0, S0, N0, pid, scale, SCALED & 1, BLOCK)
    elif k == 1:
        _reduce_one(P1, O1, S1, N1, pid, scale, (SCALED >> 1) & 1, BLOCK)
    elif k == 2:
        _reduce_one(P2, O2, S2, N2, pid, scale, (SCALED >> 2) & 1, BLOCK)
    elif k == 3:
        _reduce_one(P3, O3, S3, N3, pid, scale, (SCALED >> 3) & 1, BLOCK)
    else:
        _reduce_one(P4, O4, S4, N4, pid, scale, (SCALED >> 4) & 1, BLOCK)


# ----------------------------------------------------------------------------- launch helpers

def check_dtypes(op_name, x, *weights):
    """One rule for every Triton op: float32, float16, bfloat16 and float64 tensors are
    accepted; float64 is computed in float32 (float32 accuracy, float64 results)."""
    for t in (x, *weights):
        if t is not None and t.dtype not in OP_CODES:
            raise TypeError(f"the triton backend of {op_name} supports float32, float16, "
                            f"bfloat16 and float64 tensors, got {t.dtype}")


def device_guard(t):
    """Context in which to launch kernels on ``t``: Triton launches on the *current*
    CUDA device and its current stream, so make ``t``'s device current (as the CUDA
    backend's C++ guard does). A no-op for CPU tensors (the interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def op_code(dtype):
    return OP_CODES[dtype]


def launch_flags(device, op_dtype):
    """``(UPCAST, IEEE)`` constexpr flags for a launch on ``device`` with operands ``op_dtype``."""
    upcast = device.type != "cuda" or triton_interpreting()   # Triton's interpreter
    ieee = op_dtype in (torch.float32, torch.float64) \
        and torch.get_float32_matmul_precision() == "highest"
    return upcast, ieee


@functools.lru_cache(maxsize=None)
def _num_sms(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device):
    """Streaming multiprocessors of a CUDA device; a small stand-in for the interpreter."""
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 1


class Partial(NamedTuple):
    """One float32 partial buffer ``part [S, *shape]`` to be summed over its first axis into
    a ``shape`` tensor of ``dtype``, multiplied by the op's scale if ``scaled``."""
    part: torch.Tensor
    shape: tuple
    dtype: torch.dtype
    scaled: bool = False


MAX_PARTIALS = 5        # buffers one _reduce_partials_kernel launch takes
MAX_EXTRAS = 3          # other partial buffers one atb_pair_sums launch sums
# Programs per SM the split-K launches aim for (token splits = this x SMs / output tiles):
# more splits balance the SMs' work, fewer write and sum fewer float32 slots. Modelled
# (benchmarks/roofline.py, which has no wave quantization and so prefers fewer splits at
# every size) not decided yet: the GPU check's ``tune`` stage times 1 (``splits-per-sm-1``).
ATB_PROGRAMS_PER_SM = 4
REDUCE_BLOCK = 1024     # outputs per program of the reduction


def reduce_plan(sizes) -> Launch:
    """The reduction's launch for partial buffers of ``(slots, outputs)`` ``sizes``."""
    if not 0 < len(sizes) <= MAX_PARTIALS:
        raise ValueError(f"reduce_plan takes 1 to {MAX_PARTIALS} buffers, got {len(sizes)}")
    blocks = max(triton.cdiv(n, REDUCE_BLOCK) for _, n in sizes)
    return Launch("reduce", "_reduce_partials_kernel", (max(1, blocks), len(sizes)),
                  dict(BLOCK=REDUCE_BLOCK, num_warps=4), tuple(sizes))


def reduce_partials(partials, scale: Scale = ONE):
    """Sum every :class:`Partial` of an op in ONE launch, in a fixed order (deterministic),
    in float32, each written straight in its own dtype: no separate sums or casts.
    Returns the reduced tensors in ``partials``' order."""
    outs = [new_buffer(p.shape, p.dtype, p.part.device) for p in partials]
    live = [(p, o) for p, o in zip(partials, outs) if o.numel() > 0]
    if not live:
        return outs
    step = reduce_plan([(p.part.shape[0], o.numel()) for p, o in live])
    args, scaled = [], 0
    for k in range(MAX_PARTIALS):
        p, o = live[k] if k < len(live) else live[0]
        args += [p.part, o, p.part.shape[0] if k < len(live) else 0, o.numel()]
        scaled |= int(k < len(live) and p.scaled and not scale.is_one()) << k
    value, ptr, from_ptr = scale.kernel_args(live[0][0].part)
    launch(_reduce_partials_kernel, step.grid, *args, value, ptr, SCALE_PTR=from_ptr,
           SCALED=scaled, **step.meta)
    return outs


def _token_rows(t: torch.Tensor) -> torch.Tensor:
    """``[M, K]`` as ``[1, M, K]``; ``[Bt, R, K]`` as it is (the kernel's row addressing)."""
    return t if t.dim() == 3 else t.unsqueeze(0)


def _launch_atb(grid, meta, a3, b3, a23, b23, c_part, s_part, c2_part, s2_part, colsum,
                outs=None, counters=None, extras=(), scale: Scale = ONE, scaled: int = 0):
    """One launch of :func:`_atb_kernel` over ``[Bt, R, .]`` row views (the pair's second
    operands ``a23``, ``b23``: ``a3``, ``b3`` again for a single product); with ``outs``
    (``O, O2, OS, OS2``), ``counters`` and ``extras`` (:class:`Partial`, with their outputs)
    the sums too (``meta["REDUCE"]``)."""
    Bt, R, I = a3.shape
    meta = dict(meta)
    rows_per_split, splits = meta.pop("ROWS_PER_SPLIT"), meta.pop("SPLITS")
    o = list(outs) if outs is not None else [c_part] * 4
    o += [c_part] * (4 - len(o))                              # no column sums: unused
    ex = []
    for k in range(MAX_EXTRAS):
        if k < len(extras):
            p, out = extras[k]
            ex += [p.part, out, p.part.shape[0], out.numel()]
        else:
            ex += [c_part, c_part, 0, 0]                      # no blocks: never read
    value, ptr, from_ptr = scale.kernel_args(c_part)
    launch(_atb_kernel, grid, a3, b3, c_part, s_part, a23, b23, c2_part, s2_part, *o,
           c_part if counters is None else counters, *ex, Bt * R, I, b3.shape[2],
           rows_per_split, splits, R, a3.stride(0), a3.stride(1), b3.stride(0), b3.stride(1),
           a23.stride(0), a23.stride(1), b23.stride(0), b23.stride(1), value, ptr,
           COLSUM=colsum, SCALE_PTR=from_ptr, SCALED=scaled, **meta)


def atb_partials(a, b, op_dtype, colsum=False):
    """Float32 partials of ``a^T @ b`` (and of ``a.sum(0)`` if ``colsum``) over the rows.

    Args:
        a: ``[M, I]`` or ``[Bt, R, I]``, b: ``[M, J]`` or ``[Bt, R, J]`` (the same rows),
            each with unit last stride (any other strides, e.g. the grid tokens of a
            ``[B, N, D]`` tensor); matmul operands are rounded to ``op_dtype``.

    Returns ``(C_part [S, I, J], colsum_part [S, I] or None)`` for :func:`reduce_partials`:
    one launch, one float32 slot per token chunk (no atomics).
    """
    a3, b3 = _token_rows(a), _token_rows(b)
    Bt, R, I = a3.shape
    J, M, dev = b3.shape[2], Bt * R, a.device
    if M == 0:
        c = torch.zeros(1, I, J, device=dev, dtype=torch.float32)
        return c, (torch.zeros(1, I, device=dev, dtype=torch.float32) if colsum else None)
    grid, meta = atb_plan(M, I, J, op_dtype, *plan_device(dev))
    c_part = new_buffer((grid[2], I, J), torch.float32, dev)
    s_part = new_buffer((grid[2], I), torch.float32, dev) if colsum else c_part
    _launch_atb(grid, meta, a3, b3, a3, b3, c_part, s_part, c_part, s_part, colsum)
    return c_part, (s_part if colsum else None)


def _pair_rows(name, a, b, a2, b2):
    """The pair's four operands as ``[Bt, R, .]`` row views, checked to match."""
    a3, b3, a23, b23 = (_token_rows(t) for t in (a, b, a2, b2))
    if a3.shape != a23.shape or b3.shape != b23.shape or a.dtype != a2.dtype \
            or b.dtype != b2.dtype:
        raise ValueError(f"{name}: a2, b2 must match a, b in shape and dtype, got "
                         f"{tuple(a2.shape)} {a2.dtype} / {tuple(b2.shape)} {b2.dtype} for "
                         f"{tuple(a.shape)} {a.dtype} / {tuple(b.shape)} {b.dtype}")
    return a3, b3, a23, b23


def atb_pair_partials(a, b, a2, b2, op_dtype, colsum=False):
    """Float32 partials of ``a^T @ b`` ``[I, J]`` and ``b2^T @ a2`` ``[J, I]`` in ONE launch
    (``a2``, ``b2`` shaped and typed as ``a``, ``b``; the second product is computed as
    ``(a2^T b2)^T``, so both share one tiling and split plan), and with ``colsum`` of
    ``a.sum(0)`` ``[I]`` and ``b2.sum(0)`` ``[J]`` (the two weights' biases): ``(C [S, I,
    J], C2 [S, J, I], s [S, I] or None, s2 [S, J] or None)`` for :func:`reduce_partials`.
    Two weight gradients of one adapter, one launch."""
    a3, b3, a23, b23 = _pair_rows("atb_pair_partials", a, b, a2, b2)
    Bt, R, I = a3.shape
    J, M, dev = b3.shape[2], Bt * R, a.device
    if M == 0:
        z = [torch.zeros(1, *shape, device=dev, dtype=torch.float32)
             for shape in ((I, J), (J, I), (I,), (J,))]
        return z[0], z[1], (z[2] if colsum else None), (z[3] if colsum else None)
    grid, meta = atb_pair_plan(M, I, J, op_dtype, *plan_device(dev))
    splits = meta["SPLITS"]
    c_part = new_buffer((splits, I, J), torch.float32, dev)
    c2_part = new_buffer((splits, J, I), torch.float32, dev)
    s_part = new_buffer((splits, I), torch.float32, dev) if colsum else c_part
    s2_part = new_buffer((splits, J), torch.float32, dev) if colsum else c_part
    _launch_atb(grid, meta, a3, b3, a23, b23, c_part, s_part, c2_part, s2_part, colsum)
    return c_part, c2_part, (s_part if colsum else None), (s2_part if colsum else None)


def atb(a, b, op_dtype, out_dtype, scale: Scale = ONE, colsum=False):
    """``scale * a^T @ b`` (and ``scale * a.sum(0)`` if ``colsum``) in ``out_dtype``: the
    partials of :func:`atb_partials` and their :func:`reduce_partials` (two launches). An
    op with several reductions collects all its partials into one reduction instead."""
    c_part, s_part = atb_partials(a, b, op_dtype, colsum)
    I, J = c_part.shape[1:]
    parts = [Partial(c_part, (I, J), out_dtype, True)]
    if colsum:
        parts.append(Partial(s_part, (I,), out_dtype, True))
    outs = reduce_partials(parts, scale)
    return outs[0], (outs[1] if colsum else None)


class Sum(NamedTuple):
    """One output of :func:`atb_pair_sums`: its shape (of the product's size), dtype, and
    whether the op's scale multiplies it."""
    shape: tuple
    dtype: torch.dtype
    scaled: bool = False


def atb_pair_sums(a, b, a2, b2, op_dtype, sums, extras=(), scale: Scale = ONE, colsum=False,
                  per_sm=ATB_PROGRAMS_PER_SM):
    """``a^T @ b`` ``[I, J]`` and ``b2^T @ a2`` ``[J, I]`` (with ``colsum`` also ``a.sum(0)``
    ``[I]`` and ``b2.sum(0)`` ``[J]``) summed over the rows, and an op's other partial
    buffers ``extras`` (:class:`Partial`, at most ``MAX_EXTRAS``, written by earlier launches)
    summed beside them: ONE launch for all of an op's weight gradients.

    :func:`atb_pair_partials`' products and splits; each output tile's last split to arrive
    sums the tile's float32 slots in order (bitwise the sum :func:`reduce_partials` makes of
    the same slots), and programs of their own sum the extras. ``sums``: a :class:`Sum` per
    output (two, or four with ``colsum``), written in its dtype and shape, multiplied by
    ``scale`` where it says so; ``per_sm``: the plan's programs per SM
    (:func:`atb_plan`). Returns the outputs of ``sums``, then of ``extras``.
    """
    a3, b3, a23, b23 = _pair_rows("atb_pair_sums", a, b, a2, b2)
    Bt, R, I = a3.shape
    J, M, dev = b3.shape[2], Bt * R, a.device
    sizes = (I * J, J * I, I, J)[:4 if colsum else 2]
    if len(sums) != len(sizes) or any(math.prod(sm.shape) != n for sm, n in zip(sums, sizes)):
        raise ValueError(f"atb_pair_sums: sums must be {len(sizes)} outputs of {sizes} "
                         f"elements, got {[tuple(sm.shape) for sm in sums]}")
    if len(extras) > MAX_EXTRAS:
        raise ValueError(f"atb_pair_sums: at most {MAX_EXTRAS} extras, got {len(extras)}")
    if M == 0:
        outs = [torch.zeros(sm.shape, dtype=sm.dtype, device=dev) for sm in sums]
        return outs + (reduce_partials(list(extras), scale) if extras else [])
    step = atb_pair_sum_plan(M, I, J, op_dtype, *plan_device(dev),
                             extras=[(p.part.shape[0], math.prod(p.shape)) for p in extras],
                             per_sm=per_sm)
    splits = step.meta["SPLITS"]
    c_part = new_buffer((splits, I, J), torch.float32, dev)
    c2_part = new_buffer((splits, J, I), torch.float32, dev)
    s_part = new_buffer((splits, I), torch.float32, dev) if colsum else c_part
    s2_part = new_buffer((splits, J), torch.float32, dev) if colsum else c_part
    outs = [new_buffer(sm.shape, sm.dtype, dev) for sm in sums]
    ex_outs = [new_buffer(p.shape, p.dtype, dev) for p in extras]
    scaled = 0
    if not scale.is_one():
        for k, sm in enumerate(sums):
            scaled |= int(sm.scaled) << k
        for k, p in enumerate(extras):
            scaled |= int(p.scaled) << (4 + k)
    counters = tile_counters(dev, 2 * step.grid[0] * step.grid[1])
    _launch_atb(step.grid, step.meta, a3, b3, a23, b23, c_part, s_part, c2_part, s2_part,
                colsum, outs, counters, list(zip(extras, ex_outs)), scale, scaled)
    return outs + ex_outs


# Arrival counters of the launches that sum their own partial slots (atb_pair_sums' output
# tiles, the text backward's D chunks), per (device, stream): launches in one stream run
# one after another, and each leaves its counters at zero for the next.
_COUNTERS: dict = {}


def tile_counters(device, n: int) -> torch.Tensor:
    """``n`` int32 counters at zero for one launch on ``device``'s current stream. Kept
    and reused (no memset per launch), except inside a CUDA graph capture: a buffer zeroed
    there is zero only when the graph replays, so a capture gets its own, zeroed in it."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(n, dtype=torch.int32, device=device)
        stream = torch.cuda.current_stream(device)
        key = (stream.device_index, stream.cuda_stream)
    else:
        key = (str(device), 0)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[key] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return buf


def plan_device(device) -> tuple[int, bool]:
    """``(SMs, gpu)`` that the launch plans take: a CUDA device runs compiled kernels,
    anything else (or ``TRITON_INTERPRET=1``) Triton's interpreter."""
    gpu = device.type == "cuda" and not triton_interpreting()
    return (num_sms(device) if gpu else 1), gpu


def atb_plan(M, I, J, op_dtype, sms, gpu, per_sm=ATB_PROGRAMS_PER_SM):
    """``(grid, meta)`` of :func:`atb`'s launch for ``a [M, I]``, ``b [M, J]``: enough token
    splits for about ``per_sm`` programs per SM."""
    BLOCK_K = 32
    BLOCK_I, BLOCK_J = _atb_tiles(I, J, sms)
    tiles = triton.cdiv(I, BLOCK_I) * triton.cdiv(J, BLOCK_J)
    # Enough token chunks to fill the GPU per_sm times over; in the interpreter two per
    # output tile, so the tests exercise the partial slots and their sums.
    target = per_sm * sms if gpu else 2 * tiles
    splits = max(1, min(triton.cdiv(target, tiles), triton.cdiv(M, BLOCK_K)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), BLOCK_K) * BLOCK_K
    splits = triton.cdiv(M, rows_per_split)
    ieee = op_dtype in (torch.float32, torch.float64) \
        and torch.get_float32_matmul_precision() == "highest"
    grid = (triton.cdiv(I, BLOCK_I), triton.cdiv(J, BLOCK_J), splits)
    return grid, dict(ROWS_PER_SPLIT=rows_per_split, SPLITS=splits, PAIR=False, REDUCE=False,
                      EBLOCK=REDUCE_BLOCK, BLOCK_K=BLOCK_K,
                      BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J, OP=op_code(op_dtype), UPCAST=not gpu,
                      IEEE=ieee,
                      num_warps=8 if BLOCK_I * BLOCK_J >= 128 * 128 else 4)


def atb_pair_plan(M, I, J, op_dtype, sms, gpu, per_sm=ATB_PROGRAMS_PER_SM):
    """``(grid, meta)`` of :func:`atb_pair_partials`' launch: :func:`atb_plan`'s tiles and
    splits for one product, the grid's third axis doubled (the pair's second product)."""
    (gi, gj, splits), meta = atb_plan(M, I, J, op_dtype, sms, gpu, per_sm)
    return (gi, gj, 2 * splits), dict(meta, PAIR=True)


def atb_pair_sum_plan(M, I, J, op_dtype, sms, gpu, extras=(),
                      per_sm=ATB_PROGRAMS_PER_SM) -> Launch:
    """The ``"dw"`` launch of :func:`atb_pair_sums`: :func:`atb_pair_plan`'s tiles and splits,
    ``REDUCE``, and beyond the splits enough of the grid's third axis for the ``extras``'
    blocks of ``REDUCE_BLOCK`` outputs (``(slots, outputs)`` each, kept as the launch's
    ``work``)."""
    (gi, gj, z), meta = atb_pair_plan(M, I, J, op_dtype, sms, gpu, per_sm)
    blocks = sum(triton.cdiv(n, REDUCE_BLOCK) for _, n in extras)
    return Launch("dw", "_atb_kernel", (gi, gj, z + triton.cdiv(blocks, gi * gj)),
                  dict(meta, REDUCE=True), tuple(extras))


def _atb_tiles(I: int, J: int, sms: int) -> tuple:
    """Output tile of :func:`atb`: 128 x 128 where both sides are multiples of 128 and such
    tiles alone give every SM a program, else up to 64 x 64 (16 at least, for ``tl.dot``).
    Every program re-reads its chunk of both operands, so the L2->SM traffic halves with
    the larger tile: dWu of the MLP-position visual adapter (D3072 h768, B256 14x14) 7.4
    GB at 64 x 64, 3.7 GB at 128 x 128 (modelled, benchmarks/roofline.py). Where 128-tiles
    would pad (h=192) or need more token splits to fill the GPU (more float32 partials to
    write and sum: text at D512), 64 is the better trade on the same model."""
    if I % 128 == 0 and J % 128 == 0 and (I // 128) * (J // 128) >= sms:
        return 128, 128

    def side(n):
        return 64 if n >= 64 else max(16, triton.next_power_of_2(n))
    return side(I), side(J)
