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
from typing import Callable

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
}

# Preference of "auto" on a CUDA device, per op, fastest first. The reference
# closes every list implicitly. On other devices "auto" is the reference.
_AUTO_ORDER: dict[str, tuple[str, ...]] = {op: ("cuda", "triton") for op in OPS}


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


@functools.lru_cache(maxsize=None)
def _cuda_ext_status() -> tuple[bool, str]:
    try:
        importlib.import_module("heba_kernels._C")
    except Exception as err:
        return False, ("the CUDA extension heba_kernels._C was not built or does not load "
                       f"({type(err).__name__}: {err}); reinstall on a machine with nvcc and a CUDA "
                       "build of torch: `pip install --no-build-isolation .` "
                       "(HEBA_BUILD_CUDA=force makes a failed build loud)")
    return True, "heba_kernels._C is built"


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
        if not ok:
            return ok, why
        if device is None:
            if torch.cuda.is_available():
                return True, why
            return False, "no CUDA GPU is visible"
        if device.type != "cuda":
            return False, f"the cuda backend runs on CUDA tensors; got a {device.type} tensor"
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
        return "reference", _LOADED[("reference", op)]
    fn = _LOADED.get((backend, op))
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
