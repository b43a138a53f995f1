"""The slow-fast scales of one tower forward in one launch.

HeBA's slow-fast rule (:class:`heba.adapters.ScalePolicy`) draws, at each training forward
of a tower, a scale for every block: ``base * factor`` when 24 hashed bits of
``(key of the block, the tower's forward counter)`` reach a threshold, else ``base``; then
the counter advances. As element-wise tensor ops that is 20 launches per tower forward;
here one program reads the counter, hashes every key, writes the ``[n_blocks, 2]`` scales
and advances the counter in device memory (a captured CUDA graph replays new draws, as the
tensor ops do). The hash is :func:`heba.adapters.policy.slow_fast_bits` in 64-bit integer
arithmetic with no overflow, so the bits are those of the host and the tensor path,
exactly; the tests compare the three.

Example (Triton's interpreter on a CPU, ``TRITON_INTERPRET=1``, or CUDA tensors)::

    >>> import torch
    >>> from heba_kernels.slow_fast import draw_scales
    >>> keys = torch.tensor([[12345, 678], [9, 10]])
    >>> counters = torch.zeros(2, dtype=torch.long)
    >>> s = draw_scales(keys, counters, 1, torch.tensor([0.025, 0.05625]), 1 << 23)
    >>> s.shape, counters.tolist()
    (torch.Size([2, 2]), [0, 1])
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from heba_kernels._triton_common import device_guard
from heba_kernels.runtime import launch, new_buffer

__all__ = ["draw_scales"]


@triton.jit
def _mix32(x):
    # lowbias32 on int64 values in [0, 2**32); every product stays below 2**63 (the second
    # multiplier is split in 16-bit halves), as heba.adapters.policy._mix32 computes it
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    lo = x * 0xA68B
    hi = ((x * 0x846C) & 0xFFFF) << 16
    x = (lo + hi) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _slow_fast_draw_kernel(keys_ptr, counters_ptr, values_ptr, out_ptr, n, tower, threshold,
                           BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    count = tl.load(counters_ptr + tower)
    keys = tl.load(keys_ptr + offs, mask=mask, other=0)
    bits = _mix32(keys ^ (count & 0xFFFFFFFF)) >> 8
    lo = tl.load(values_ptr)
    hi = tl.load(values_ptr + 1)
    tl.store(out_ptr + offs, tl.where(bits >= threshold, hi, lo), mask=mask)
    tl.store(counters_ptr + tower, count + 1)


@torch.library.custom_op("heba::triton_slow_fast_draw", mutates_args=("counters",))
def _draw_op(keys: torch.Tensor, counters: torch.Tensor, tower: int, values: torch.Tensor,
             threshold: int) -> torch.Tensor:
    out = new_buffer(keys.shape, torch.float32, keys.device)
    n = keys.numel()
    if n:
        with device_guard(keys):
            launch(_slow_fast_draw_kernel, (1,), keys, counters, values, out, n, tower,
                   threshold, BLOCK=max(16, triton.next_power_of_2(n)), num_warps=1)
    return out


@_draw_op.register_fake
def _(keys, counters, tower, values, threshold):
    return keys.new_empty(keys.shape, dtype=torch.float32)


def draw_scales(keys: torch.Tensor, counters: torch.Tensor, tower: int, values: torch.Tensor,
                threshold: int) -> torch.Tensor:
    """The scales of one forward: ``values[1]`` where the bits of ``(keys, counters[tower])``
    reach ``threshold``, else ``values[0]``, float32 in ``keys``' shape; ``counters[tower]``
    then advances by one, in place. ``keys``: int64 in ``[0, 2**32)``, contiguous;
    ``counters``: int64 ``[towers]``; ``values``: float32 ``[2]`` (base, base * factor); all
    on one device (CUDA, or the CPU in Triton's interpreter)."""
    if keys.dtype != torch.int64 or counters.dtype != torch.int64 or values.dtype != torch.float32:
        raise TypeError(f"draw_scales: keys and counters must be int64 and values float32, got "
                        f"{keys.dtype}, {counters.dtype}, {values.dtype}")
    if not (0 <= tower < counters.numel()) or values.numel() != 2:
        raise ValueError(f"draw_scales: tower must index counters ({counters.numel()}) and "
                         f"values hold 2 scales, got tower={tower}, {values.numel()} values")
    if not (keys.device == counters.device == values.device):
        raise ValueError(f"draw_scales: keys, counters and values must share a device, got "
                         f"{keys.device}, {counters.device}, {values.device}")
    if not (keys.is_contiguous() and counters.is_contiguous() and values.is_contiguous()):
        raise ValueError("draw_scales: keys, counters and values must be contiguous")
    return torch.ops.heba.triton_slow_fast_draw(keys, counters, int(tower), values,
                                                int(threshold))
