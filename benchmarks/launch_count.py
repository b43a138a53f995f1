"""Count the kernel launches and dispatches of a step on any device, the CPU included.

:func:`count_launches` runs a function under a :class:`LaunchRecorder`, a
``TorchDispatchMode`` that sees every ATen op the step dispatches (forward,
backward and optimizer), and under :func:`heba_kernels.runtime.record_launches`
where that exists, which lists every Triton launch of heba's fused ops. Counted:

* ``aten_kernels``: ATen ops that would launch a device kernel, one launch
  each: every op but views (an output that aliases an input without writing
  it), ``empty``-like allocations, scalar reads (``_local_scalar_dense``, a
  copy to the host, counted in ``host_reads``) and metadata ops. On a GPU a few
  ops launch more than one kernel (``sort``, ``nonzero``, a split-K GEMM) or
  none (a copy between devices is a memcpy): the count is the dispatcher's
  view, the same on every device for the same step.
* ``triton``: Triton launches of heba's kernels, as
  :func:`heba_kernels.runtime.record_launches` lists them (where this heba has
  it; else counted at Triton's own ``run``). In Triton's CPU interpreter the
  copies it makes around a launch are not the step's and are not counted.
* ``custom``: calls of custom ops (``heba::*``); their inner ATen ops are
  counted as any other (the recorder re-enters itself below the Python key).
* ``launches = aten_kernels + triton``; ``dispatches``: every op seen.

Example::

    >>> import torch
    >>> from benchmarks.launch_count import count_launches
    >>> x = torch.randn(4, 4, requires_grad=True)
    >>> c = count_launches(lambda: (x.t() @ x).sum().backward())
    >>> c["launches"] >= 3, c["triton"]
    (True, 0)
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

try:        # the kernels' launch recorder (heba_kernels.runtime), where this heba has it
    from heba_kernels.runtime import record_launches
except ImportError:          # pragma: no cover - an older heba_kernels: Triton uncounted
    record_launches = None

__all__ = ["LaunchRecorder", "count_launches", "kernel_op", "TRITON_RECORDED"]

TRITON_RECORDED = record_launches is not None
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
              "_local_scalar_dense", "detach", "alias", "lift_fresh", "set_", "resize_",
              "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
              "_has_compatible_shallow_copy_type", "record_stream", "size", "stride", "dim",
              "is_contiguous", "is_non_overlapping_and_dense", "_unsafe_view"}


def _is_view(func) -> bool:
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write
                              for r in rets)


def kernel_op(func) -> bool:
    """Whether the ATen op ``func`` launches a device kernel (module docstring)."""
    name = func._schema.name.split("::")[-1]
    return name not in _NO_KERNEL and not _is_view(func)


class LaunchRecorder(TorchDispatchMode):
    """Counts the ops dispatched while active: ``kernels`` (ATen ops that launch),
    ``custom`` (non-ATen ops), ``other`` (ATen ops that do not), by op name."""

    def __init__(self):
        super().__init__()
        self.kernels, self.custom, self.other = Counter(), Counter(), Counter()
        self.triton, self.paused = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:                       # inside a Triton launch (the interpreter's copies)
            return func(*args, **kwargs)
        ns = func.namespace
        if ns in ("aten", "prims"):
            (self.kernels if kernel_op(func) else self.other)[str(func.overloadpacket)] += 1
            return func(*args, **kwargs)
        self.custom[str(func)] += 1
        # A custom op's implementation runs below the Python key: re-enter this mode so
        # that the ATen ops it issues (allocations, casts, sums) are counted too.
        with self:
            return func.redispatch(_below_python(args), *args, **kwargs)


def _below_python(args):
    """The backend key of the op's first tensor (CPU, CUDA, Meta): its kernel, no Python."""
    dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
    key = {"cuda": "CUDA", "meta": "Meta"}.get(dev, "CPU")
    return torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))


@contextlib.contextmanager
def _triton_runs(rec: LaunchRecorder):
    """Note every Triton launch (``run`` of a jitted or interpreted kernel, not a warm-up)
    in ``rec.triton`` and pause ``rec`` inside it."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:                       # pragma: no cover - no Triton: nothing to hook
        yield
        return
    saved = {cls: cls.__dict__["run"] for cls in (InterpretedFunction, JITFunction)}

    def wrap(run):
        def hooked(self, *args, grid, warmup, **kwargs):
            if warmup:
                return run(self, *args, grid=grid, warmup=warmup, **kwargs)
            rec.triton.append(getattr(self.fn, "__name__", "?"))
            paused, rec.paused = rec.paused, True
            try:
                return run(self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                rec.paused = paused
        return hooked
    for cls, run in saved.items():
        cls.run = wrap(run)
    try:
        yield
    finally:
        for cls, run in saved.items():
            cls.run = run


def count_launches(fn: Callable[[], object]) -> dict:
    """Run ``fn()`` once under the recorders; return the counts of the module docstring
    and ``by_op`` (a Counter of ATen kernels and Triton kernel names)."""
    rec = LaunchRecorder()
    with contextlib.ExitStack() as stack:
        listed = stack.enter_context(record_launches()) if TRITON_RECORDED else None
        stack.enter_context(_triton_runs(rec))
        stack.enter_context(rec)
        fn()
    triton = [name for name, *_ in listed] if listed is not None else rec.triton
    n_aten = sum(rec.kernels.values())
    by_op = Counter(rec.kernels)
    by_op.update(f"triton:{name}" for name in triton)
    return dict(launches=n_aten + len(triton), aten_kernels=n_aten, triton=len(triton),
                custom=sum(rec.custom.values()),
                dispatches=n_aten + sum(rec.custom.values()) + sum(rec.other.values()),
                host_reads=rec.other.get("aten._local_scalar_dense", 0),
                triton_recorded=TRITON_RECORDED, by_op=by_op)
