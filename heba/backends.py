"""Backend registry: which implementations exist, which are usable, which ``"auto"`` picks.

Every backend implements the ops in :data:`OPS` with the signatures of
:mod:`heba_kernels.reference`. A new kernel registers by adding its
``"module:function"`` to :data:`IMPLS` (and, if it should win ``"auto"`` on
some device, by listing its backend in :data:`AUTO_ORDER`); modules in
:mod:`heba.nn` never change for it.

One record, :data:`registry`, holds what is known about every backend: the
functions imported, the import errors, and the CUDA extension's first-use
compile (loaded, or failed and why). Dispatch (:func:`resolve`), the trainer's
preflight (:func:`backend_status`) and ``python -m heba.info`` all read it, and
whether Triton runs in its interpreter is answered by one live function,
:func:`heba_kernels.runtime.triton_interpreting`.

Example::

    >>> from heba import backends
    >>> backends.backend_status("reference")
    (True, 'pure PyTorch, runs on every device')
"""

from __future__ import annotations

import functools
import importlib
import warnings
from typing import Callable, Optional

import torch

from heba_kernels import _extension
from heba_kernels.runtime import triton_interpreting

__all__ = ["BACKENDS", "OPS", "IMPLS", "AUTO_ORDER", "ROUNDS_IN_KERNEL", "BackendUnavailableError", "Registry",
           "registry", "backend_status", "check_backend_name", "implemented", "resolve",
           "extension_status", "triton_interpreting"]

BACKENDS = ("auto", "reference", "triton", "cuda")
OPS = ("heba_visual", "heba_text", "low_rank")

# (backend, op) -> "module:function". A missing entry means "not implemented".
IMPLS: dict[tuple[str, str], str] = {
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

# Backends whose kernels take the weights as they are under autocast, with the autocast
# dtype as ``op_dtype``, and round the matmul operands in registers: no weight casts
# before the op, no gradient casts after it (the gradients come out in the weights'
# dtype). heba.ops casts the weights for the other fused backends.
ROUNDS_IN_KERNEL: frozenset[str] = frozenset({"triton"})

# Preference of "auto" on a CUDA device, per op, fastest first. The reference
# closes every list implicitly. On other devices "auto" is the reference.
# Triton leads until a GPU benchmark says otherwise: its kernels have been
# executed (in Triton's interpreter) against the reference, the CUDA kernels
# only compiled. Reorder per op from benchmarks/results when timings exist.
AUTO_ORDER: dict[str, tuple[str, ...]] = {op: ("triton", "cuda") for op in OPS}

_CUDA_HINT = ("reinstall on a machine with nvcc and a CUDA build of torch, or build it at install "
              "with `pip install --no-build-isolation .` (HEBA_BUILD_CUDA=force makes a failed "
              "build loud)")


class BackendUnavailableError(RuntimeError):
    """Raised when a backend was asked for by name and cannot run here."""


def check_backend_name(backend: str) -> None:
    """Raise a clear error for a misspelt backend (the one check of the name)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def implemented(backend: str, op: str) -> bool:
    return (backend, op) in IMPLS


@functools.lru_cache(maxsize=None)
def _triton_importable() -> tuple[bool, str]:
    try:
        import triton
    except Exception as err:  # ImportError or a broken install
        return False, f"triton is not importable ({err}); install it with `pip install triton`"
    return True, f"triton {triton.__version__}"


def extension_status() -> _extension.Status:
    """Where the CUDA extension comes from here (never compiles); see heba_kernels' loader."""
    return _extension.status()


class Registry:
    """What this process knows about every backend, in one place.

    ``fns``: ``(backend, op) -> function`` for every implementation imported;
    ``errors``: ``(backend, op) -> one line`` for an implementation module that
    failed to import; ``cuda_failed``: why the CUDA extension could not be loaded
    or compiled on first use (None until that fails), so ``"auto"`` tries it once
    and then keeps falling back without retrying.

    Everything importable without compiling is imported when the registry is
    built (at import of this module), which keeps :func:`resolve` a handful of dict
    lookups that torch.compile traces without a graph break.
    """

    def __init__(self):
        self.fns: dict[tuple[str, str], Callable] = {}
        self.errors: dict[tuple[str, str], str] = {}
        self.cuda_failed: Optional[str] = None
        for (backend, op), spec in IMPLS.items():
            if backend == "triton" and not _triton_importable()[0]:
                continue
            if backend == "cuda" and not (_extension.prebuilt()[0] or _extension.loaded()):
                continue   # compiled on first use (load_cuda), never at import
            self._import(backend, op, spec)

    def _import(self, backend: str, op: str, spec: str) -> None:
        module, name = spec.split(":")
        try:
            self.fns[(backend, op)] = getattr(importlib.import_module(module), name)
        except Exception as err:
            self.errors[(backend, op)] = f"{spec} failed to import: {type(err).__name__}: {err}"

    def load_cuda(self, op: str, strict: bool) -> Optional[Callable]:
        """Load (compiling on first use) the CUDA extension and its ops; None (or raise)."""
        try:
            _extension.load()
            module = importlib.import_module("heba_kernels.cuda_ops")
        except Exception as err:
            first = self.cuda_failed is None
            self.cuda_failed = str(err)
            if strict:
                raise BackendUnavailableError(f"backend='cuda' cannot run {op}: {err}") from None
            if first:
                warnings.warn(f"heba: backend='auto' uses the reference for {op} on CUDA "
                              f"tensors: the CUDA backend is unavailable ({err})",
                              RuntimeWarning, stacklevel=4)
            return None
        for (backend, name), spec in IMPLS.items():
            if backend == "cuda":
                self.fns[(backend, name)] = getattr(module, spec.split(":")[1])
        return self.fns.get(("cuda", op))

    def cuda_state(self) -> tuple[bool, str]:
        """Whether the CUDA extension is loaded or can be (prebuilt, JIT-cached or
        JIT-buildable), and why (not). Never compiles."""
        if self.cuda_failed is not None:
            return False, f"{self.cuda_failed}; {_CUDA_HINT}"
        st = _extension.status()
        if st.state == "unavailable":
            return False, f"{st.detail}; {_CUDA_HINT}"
        return True, st.detail


registry = Registry()


def _triton_on(device: Optional[torch.device]) -> Optional[str]:
    """Why Triton cannot run on ``device`` (any device if None), or None when it can."""
    interpreting = triton_interpreting()
    if device is None:
        if torch.cuda.is_available() or interpreting:
            return None
        return "no CUDA GPU is visible and TRITON_INTERPRET=1 is not set"
    if device.type == "cuda" or (device.type == "cpu" and interpreting):
        return None
    return (f"the triton backend runs on CUDA tensors, or on the CPU through "
            f"Triton's interpreter with TRITON_INTERPRET=1; got a {device.type} tensor")


def _cuda_on(device: Optional[torch.device], why: str) -> Optional[str]:
    if device is None:
        return None if torch.cuda.is_available() else f"no CUDA GPU is visible ({why})"
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors; got a {device.type} tensor ({why})"
    return None


def backend_status(backend: str, device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether ``backend`` can run on ``device`` (any device if None), and why (not)."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")
    device = torch.device(device) if device is not None else None
    if backend == "reference":
        return True, "pure PyTorch, runs on every device"
    if backend == "triton":
        ok, why = _triton_importable()
        blocker = _triton_on(device) if ok else why
        if blocker is None and device is not None and device.type == "cpu":
            why += " in the interpreter (TRITON_INTERPRET=1)"
    else:
        ok, why = registry.cuda_state()
        blocker = _cuda_on(device, why) if ok else why
    return (True, why) if blocker is None else (False, blocker)


def _runs_on(backend: str, device: torch.device) -> bool:
    return backend == "reference" or device.type == "cuda" or (
        backend == "triton" and device.type == "cpu" and triton_interpreting())


def resolve(op: str, backend: str, device: torch.device) -> tuple[str, Callable]:
    """The ``(backend name, function)`` that runs ``op`` for a tensor on ``device``."""
    fns = registry.fns
    if backend == "auto":
        if device.type == "cuda":
            for name in AUTO_ORDER[op]:
                fn = fns.get((name, op))
                if fn is None and name == "cuda" and registry.cuda_failed is None:
                    fn = registry.load_cuda(op, strict=False)
                if fn is not None:
                    return name, fn
        return "reference", fns[("reference", op)]
    fn = fns.get((backend, op))
    if fn is None and backend == "cuda" and device.type == "cuda" and implemented(backend, op):
        fn = registry.load_cuda(op, strict=True)  # compiles here on first use, once
    if fn is not None and _runs_on(backend, device):
        return backend, fn
    return backend, _unavailable(op, backend, device)


def _unavailable(op: str, backend: str, device: torch.device):
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    check_backend_name(backend)
    ok, why = backend_status(backend, device)
    if not ok:
        raise BackendUnavailableError(f"backend={backend!r} cannot run {op}: {why}")
    if (backend, op) in registry.errors:
        raise BackendUnavailableError(f"backend={backend!r} cannot run {op}: "
                                      f"{registry.errors[(backend, op)]}")
    raise BackendUnavailableError(f"backend={backend!r} does not implement {op} in this "
                                  f"version of heba; use backend='reference' or 'auto'")


# Names of earlier versions, kept importable.
_AUTO_ORDER = AUTO_ORDER
_IMPLS = IMPLS
