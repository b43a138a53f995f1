"""Pieces shared by the Triton kernels of :mod:`heba_kernels.heba_text` and
:mod:`heba_kernels.low_rank`: exact GELU and its derivative, the operand cast
and matmul helpers, and the weight-gradient reduction ``C = s * A^T B`` over
all tokens.

Weight gradients of a token-wise adapter are reductions over every token,
``dW[i, j] = sum_m A[m, i] * B[m, j]`` with ``m`` in the millions and
``i, j`` small. :func:`atb` splits the token axis into ``S`` chunks; program
``(i, j, s)`` writes its float32 partial ``[BLOCK_I, BLOCK_J]`` tile of chunk
``s`` to its own slot of a ``[S, I, J]`` buffer (no atomics), and the ``S``
partials are summed afterwards with ``torch.sum(dim=0)``. Both steps have a
fixed order, so the result is bitwise deterministic run to run.

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

import torch
import triton
import triton.language as tl

from heba_kernels.runtime import ONE, Scale, launch, new_buffer, triton_interpreting

__all__ = ["OP_CODES", "op_code", "launch_flags", "num_sms", "atb", "check_dtypes",
           "scaled_sum", "device_guard", "atb_plan",
           "plan_device"]

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


# ----------------------------------------------------------------------------- A^T B kernel

@triton.jit
def _atb_kernel(A, B, C_PART, S_PART,     # A [M, I], B [M, J], C_PART [S, I, J], S_PART [S, I]
                M, I, J, rows_per_split, stride_am, stride_bm,
                COLSUM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_I: tl.constexpr,
                BLOCK_J: tl.constexpr, OP: tl.constexpr, UPCAST: tl.constexpr,
                IEEE: tl.constexpr):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)                  # [BLOCK_I]
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)                  # [BLOCK_J]
    i_ok = offs_i < I
    j_ok = offs_j < J
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)              # [BLOCK_I, BLOCK_J]
    csum = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_K):
        rows = m0 + tl.arange(0, BLOCK_K)                             # [BLOCK_K]
        r_ok = rows < m_end
        rows64 = rows.to(tl.int64)
        a = tl.load(A + rows64[:, None] * stride_am + offs_i[None, :],
                    mask=r_ok[:, None] & i_ok[None, :], other=0.0)    # [BLOCK_K, BLOCK_I]
        b = tl.load(B + rows64[:, None] * stride_bm + offs_j[None, :],
                    mask=r_ok[:, None] & j_ok[None, :], other=0.0)    # [BLOCK_K, BLOCK_J]
        if COLSUM:
            csum += tl.sum(a.to(tl.float32), axis=0)
        acc = _mma(tl.trans(_op_cast(a, OP, UPCAST)), _op_cast(b, OP, UPCAST), acc, IEEE)
    c_ptrs = C_PART + pid_s.to(tl.int64) * I * J + offs_i[:, None] * J + offs_j[None, :]
    tl.store(c_ptrs, acc, mask=i_ok[:, None] & j_ok[None, :])
    if COLSUM:
        if pid_j == 0:
            tl.store(S_PART + pid_s.to(tl.int64) * I + offs_i, csum, mask=i_ok)


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


def scaled_sum(part, scale: Scale, out_dtype):
    """``scale * part.sum(0)`` in ``out_dtype``, summed in float32 in a fixed order
    (deterministic); the multiplication is skipped when ``scale`` is the constant 1."""
    total = part.sum(0)
    if not scale.is_one():
        total = total * scale.joined()
    return total.to(out_dtype)


def atb(a, b, op_dtype, out_dtype, scale: Scale = ONE, colsum=False):
    """``scale * a^T @ b`` (and ``scale * a.sum(0)`` if ``colsum``) reduced over the rows.

    Args:
        a: ``[M, I]``, b: ``[M, J]``, each with unit column stride (any row stride, any
            of float32/float16/bfloat16); matmul operands are rounded to ``op_dtype``.
        out_dtype: dtype of the results.

    Returns ``(C [I, J], colsum [I] or None)``. Deterministic: float32 partials per
    token chunk, summed in a fixed order.
    """
    M, I = a.shape
    J = b.shape[1]
    dev = a.device
    if M == 0:
        c = torch.zeros(I, J, device=dev, dtype=out_dtype)
        return c, (torch.zeros(I, device=dev, dtype=out_dtype) if colsum else None)
    grid, meta = atb_plan(M, I, J, op_dtype, *plan_device(dev))
    meta = dict(meta)
    splits, rows_per_split = grid[2], meta.pop("ROWS_PER_SPLIT")
    c_part = new_buffer((splits, I, J), torch.float32, dev)
    s_part = new_buffer((splits, I), torch.float32, dev) if colsum else c_part
    launch(_atb_kernel, grid, a, b, c_part, s_part, M, I, J, rows_per_split, a.stride(0),
           b.stride(0), COLSUM=colsum, **meta)
    s = scaled_sum(s_part, scale, out_dtype) if colsum else None
    return scaled_sum(c_part, scale, out_dtype), s


def plan_device(device) -> tuple[int, bool]:
    """``(SMs, gpu)`` that the launch plans take: a CUDA device runs compiled kernels,
    anything else (or ``TRITON_INTERPRET=1``) Triton's interpreter."""
    gpu = device.type == "cuda" and not triton_interpreting()
    return (num_sms(device) if gpu else 1), gpu


def atb_plan(M, I, J, op_dtype, sms, gpu):
    """``(grid, meta)`` of :func:`atb`'s launch for ``a [M, I]``, ``b [M, J]``."""
    BLOCK_K = 32
    BLOCK_I = 64 if I >= 64 else max(16, triton.next_power_of_2(I))
    BLOCK_J = 64 if J >= 64 else max(16, triton.next_power_of_2(J))
    tiles = triton.cdiv(I, BLOCK_I) * triton.cdiv(J, BLOCK_J)
    # Enough token chunks to fill the GPU about four times over; in the interpreter
    # two chunks, so the tests exercise the partial-sum path.
    target = 4 * sms if gpu else 2
    splits = max(1, min(triton.cdiv(target, tiles), triton.cdiv(M, BLOCK_K)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), BLOCK_K) * BLOCK_K
    splits = triton.cdiv(M, rows_per_split)
    ieee = op_dtype in (torch.float32, torch.float64) \
        and torch.get_float32_matmul_precision() == "highest"
    grid = (triton.cdiv(I, BLOCK_I), triton.cdiv(J, BLOCK_J), splits)
    return grid, dict(ROWS_PER_SPLIT=rows_per_split, BLOCK_K=BLOCK_K, BLOCK_I=BLOCK_I,
                      BLOCK_J=BLOCK_J, OP=op_code(op_dtype), UPCAST=not gpu, IEEE=ieee,
                      num_warps=4)
