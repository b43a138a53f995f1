"""Run-time switches every backend reads, each answered in exactly one place.

* :func:`triton_interpreting`: whether Triton runs through its CPU interpreter
  (``TRITON_INTERPRET=1``). Read live, so a test or a process that changes the
  variable after import sees the same answer in dispatch, preflight and the
  launchers.
* :func:`debug_nan_fill` and :func:`new_buffer`: under ``HEBA_DEBUG_NAN_FILL=1``
  every fresh output and scratch buffer of a fused op is filled with NaN, so a
  tile a kernel forgets to write fails the tests loudly.
* :class:`Scale`: the outer residual's scale in the one form the kernels take.
* :func:`launch` and :func:`record_launches`: every Triton launch goes through
  :func:`launch`, so a recorder can list the launches an op makes (the roofline
  model's launch plans are tested against that list).

Example::

    >>> from heba_kernels import runtime
    >>> runtime.Scale.of(0.5).kernel_args(None)
    (0.5, None, False)
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple, Optional

import torch

__all__ = ["triton_interpreting", "debug_nan_fill", "new_buffer", "Scale", "ONE", "launch",
           "record_launches", "Launch"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def triton_interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return _flag("TRITON_INTERPRET")


def debug_nan_fill() -> bool:
    """Whether fresh kernel buffers are NaN-filled (``HEBA_DEBUG_NAN_FILL=1``)."""
    return _flag("HEBA_DEBUG_NAN_FILL")


def new_buffer(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A fresh buffer for a kernel to write: ``torch.empty``, or NaN under
    ``HEBA_DEBUG_NAN_FILL=1`` so an unwritten tile shows."""
    if debug_nan_fill():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


class Scale(NamedTuple):
    """A scale as the kernels take it: ``value`` (a Python float) or, when ``tensor`` is a
    0-d float32 tensor on the device, that tensor, read by the kernels at run time (a
    captured CUDA graph then replays with its current value). :mod:`heba.ops` builds it
    once, validated; the custom ops carry it as their ``(float, Tensor?)`` pair."""

    value: float
    tensor: Optional[torch.Tensor] = None

    @staticmethod
    def of(scale) -> "Scale":
        """From a Python float or a 0-d float32 tensor (already validated)."""
        if isinstance(scale, Scale):
            return scale
        if isinstance(scale, torch.Tensor):
            return Scale(0.0, scale)
        return Scale(scale, None)

    def kernel_args(self, dummy):
        """``(value, ptr, FROM_PTR)`` for the kernels' ``_scalar(value, ptr, FROM_PTR)``;
        ``dummy`` is any tensor of the launch, passed as the unused pointer."""
        if self.tensor is not None:
            return 0.0, self.tensor, True
        return self.value, dummy, False

    def is_one(self) -> bool:
        """Whether this is the exact constant 1 (a multiplication by it can be skipped)."""
        return self.tensor is None and self.value == 1.0

    def joined(self):
        """The scale as one value (a float or the tensor), for code that takes either."""
        return self.value if self.tensor is None else self.tensor


ONE = Scale(1.0, None)


# --------------------------------------------------------------------------- launches


class Launch(NamedTuple):
    """One kernel launch of a plan: ``step`` names it in the launcher, ``kernel`` is the
    Triton kernel's name, ``grid`` its grid and ``meta`` its block sizes (the kernel's
compile-time arguments). The launchers
    launch exactly their plan; benchmarks/roofline.py models the same plan."""

    step: str
    kernel: str
    grid: tuple
    meta: dict
    work: tuple = ()     # a reduction's (slots, outputs) per partial buffer, for the model


_RECORDERS: list = []


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, told to any active :func:`record_launches`."""
    for rec in _RECORDERS:
        rec.append((kernel_name(kernel), tuple(grid)))
    return kernel[grid](*args, **kwargs)


def kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", repr(fn))


@contextlib.contextmanager
def record_launches():
    """Collect ``(kernel name, grid)`` for every Triton launch made inside the block."""
    rec: list = []
    _RECORDERS.append(rec)
    try:
        yield rec
    finally:
        _RECORDERS.remove(rec)
