"""Backend registry: which implementations exist, which are usable, which ``"auto"`` picks.

Every backend implements the ops in :data:`OPS` with the signatures of
:mod:`heba_kernels.reference`. A new kernel registers by adding its
``"module:function"`` to :data:`_IMPLS` (and, if it should win ``"auto"`` on
some device, by listing its backend in :data:`_AUTO_ORDER`); modules in
:mod:`heba.nn` never change for it.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import warnings
from typing import Callable, Optional

import torch

BACKENDS = ("auto", "reference", "triton", "cuda")
OPS = ("heba_visual", "heba_text", "low_rank")

# (backend, op) -> "module:function". A missing entry means "not implemented".
_IMPLS: dict[tuple[str, str], str] = {
    ("reference", "heba_visual"): "heba_kernels.reference:heba_visual",
    ("reference", "heba_text"): "heba_kernels.reference:heba_text",
    ("reference", "low_rank"): "heba_kernels.reference:low_rank",
    ("triton", "heba_visual"): "heba_kernels.heba_visual:heba_visual",
    ("triton", "heba_text"): "heba_kernels.heba_text:heba_text",
    ("triton", "low_rank"): "heba_kernels.low_rank:low_rank",
    ("cuda", "heba_visual"): "heba_kernels.cuda_ops:heba_visual",
    ("cuda", "heba_text"): "heba_kernels.cuda_ops:heba_text",
    ("cuda", "low_rank"): "heba_kernels.cuda_ops:low_rank",
}

# Preference of "auto" on a CUDA device, per op, fastest first. The reference
# closes every list implicitly. On other devices "auto" is the reference.
# Triton leads until a GPU benchmark says otherwise: its kernels have been
# executed (in Triton's interpreter) against the reference, the CUDA kernels
# only compiled. Reorder per op from benchmarks/results when timings exist.
_AUTO_ORDER: dict[str, tuple[str, ...]] = {op: ("triton", "cuda") for op in OPS}


class BackendUnavailableError(RuntimeError):
    """Raised when a backend was asked for by name and cannot run here."""


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as err:  # ImportError or a broken install
        return False, f"triton is not importable ({err}); install it with `pip install triton`"
    return True, f"triton {triton.__version__}"


_CUDA_HINT = ("reinstall on a machine with nvcc and a CUDA build of torch, or build it at install "
              "with `pip install --no-build-isolation .` (HEBA_BUILD_CUDA=force makes a failed "
              "build loud)")


def _cuda_ext_status() -> tuple[bool, str]:
    """Whether heba_kernels._C is loaded or prebuilt (usable without compiling), and why (not).

    Cheap (no compilation, no CUDA initialisation): :func:`backend_status` says
    whether it can be compiled on first use.
    """
    from heba_kernels import _extension
    ok, why = _extension.prebuilt()
    if ok or not _extension.loaded():
        return ok, why if ok else f"{why}; {_CUDA_HINT}"
    return True, f"{_extension.MODULE} is loaded from {sys.modules[_extension.MODULE].__file__}"


# The first failure to load or compile the extension in this process, so that
# "auto" tries once and then keeps falling back without retrying.
_CUDA_JIT: dict[str, Optional[str]] = {"failed": None}


def _cuda_jit(op: str, strict: bool):
    """Load (compiling on first use) the CUDA extension and its ops; None (or raise) if it cannot."""
    from heba_kernels import _extension
    try:
        _extension.load()
        module = importlib.import_module("heba_kernels.cuda_ops")
    except Exception as err:
        first = _CUDA_JIT["failed"] is None
        _CUDA_JIT["failed"] = str(err)
        if strict:
            raise BackendUnavailableError(f"backend='cuda' cannot run {op}: {err}") from None
        if first:
            warnings.warn(f"heba: backend='auto' uses the reference for {op} on CUDA tensors: "
                          f"the CUDA backend is unavailable ({err})", RuntimeWarning, stacklevel=4)
        return None
    for (backend, name), spec in _IMPLS.items():
        if backend == "cuda":
            _LOADED[(backend, name)] = getattr(module, spec.split(":")[1])
    return _LOADED.get(("cuda", op))


def backend_status(backend: str, device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether ``backend`` can run on ``device`` (any device if None), and why (not)."""
    device = torch.device(device) if device is not None else None
    if backend == "reference":
        return True, "pure PyTorch, runs on every device"
    if backend == "triton":
        ok, why = _triton_status()
        if not ok:
            return ok, why
        if device is None:
            if torch.cuda.is_available() or _triton_interpret():
                return True, why
            return False, "no CUDA GPU is visible and TRITON_INTERPRET=1 is not set"
        if device.type == "cuda":
            return True, why
        if device.type == "cpu" and _triton_interpret():
            return True, why + " in the interpreter (TRITON_INTERPRET=1)"
        return False, (f"the triton backend runs on CUDA tensors, or on the CPU through "
                       f"Triton's interpreter with TRITON_INTERPRET=1; got a {device.type} tensor")
    if backend == "cuda":
        ok, why = _cuda_ext_status()
        if not ok:  # not built at install: can it be compiled on first use?
            from heba_kernels import _extension
            ext = _extension.status()
            if ext.state == "unavailable":
                return False, f"{ext.detail}; {_CUDA_HINT}"
            if ext.state not in ("jit-cached", "jit-buildable"):
                return False, why
            why = ext.detail
        if device is None:
            if torch.cuda.is_available():
                return True, why
            return False, f"no CUDA GPU is visible ({why})"
        if device.type != "cuda":
            return False, f"the cuda backend runs on CUDA tensors; got a {device.type} tensor ({why})"
        return True, why
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_backend_name(backend: str) -> None:
    """Raise a clear error for a misspelt backend, at module construction."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _load_all() -> dict[tuple[str, str], Callable]:
    """Import every implementation whose backend is importable, once, at import time.

    Doing it eagerly keeps :func:`resolve` a handful of dict lookups, which
    torch.compile traces without a graph break. An implementation module that
    fails to import is remembered with its error, not hidden.
    """
    loaded = {}
    for (backend, op), spec in _IMPLS.items():
        if backend == "triton" and not _triton_status()[0]:
            continue
        if backend == "cuda" and not _cuda_ext_status()[0]:
            continue
        module, name = spec.split(":")
        try:
            loaded[(backend, op)] = getattr(importlib.import_module(module), name)
        except Exception as err:
            _IMPORT_ERRORS[(backend, op)] = f"{spec} failed to import: {type(err).__name__}: {err}"
    return loaded


_IMPORT_ERRORS: dict[tuple[str, str], str] = {}
_INTERPRET = _triton_interpret()


def implemented(backend: str, op: str) -> bool:
    return (backend, op) in _IMPLS


def resolve(op: str, backend: str, device: torch.device) -> tuple[str, Callable]:
    """The ``(backend name, function)`` that runs ``op`` for a tensor on ``device``."""
    if backend == "auto":
        if device.type == "cuda":
            for name in _AUTO_ORDER[op]:
                if (name, op) in _LOADED:
                    return name, _LOADED[(name, op)]
                if (name == "cuda" and _CUDA_JIT["failed"] is None
                        and _cuda_jit(op, strict=False) is not None):
                    return name, _LOADED[(name, op)]
        return "reference", _LOADED[("reference", op)]
    fn = _LOADED.get((backend, op))
    if fn is None and backend == "cuda" and device.type == "cuda" and implemented(backend, op):
        fn = _cuda_jit(op, strict=True)  # the extension compiles here on first use, once
    if fn is not None and (backend == "reference" or device.type == "cuda"
                           or (backend == "triton" and device.type == "cpu" and _INTERPRET)):
        return backend, fn
    return backend, _unavailable(op, backend, device)


def _unavailable(op: str, backend: str, device: torch.device):
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    check_backend_name(backend)
    ok, why = backend_status(backend, device)
    if not ok:
        raise BackendUnavailableError(f"backend={backend!r} cannot run {op}: {why}")
    if (backend, op) in _IMPORT_ERRORS:
        raise BackendUnavailableError(f"backend={backend!r} cannot run {op}: "
                                      f"{_IMPORT_ERRORS[(backend, op)]}")
    raise BackendUnavailableError(f"backend={backend!r} does not implement {op} in this "
                                  f"version of heba; use backend='reference' or 'auto'")


_LOADED = _load_all()
