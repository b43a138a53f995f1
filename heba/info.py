"""``python -m heba.info``: what heba can run on this machine, and why not."""

from __future__ import annotations

import platform

import torch

from heba import __version__
from heba.backends import (AUTO_ORDER, BACKENDS, OPS, backend_status, extension_status,
                           implemented, registry)


_EXTENSION_WORDS = {
    "prebuilt": "prebuilt at install",
    "loaded": "loaded",
    "jit-cached": "JIT-cached (compiled earlier; loads on first use)",
    "jit-buildable": "JIT-buildable (compiles on first use)",
    "unavailable": "unavailable",
}


def _extension_line() -> str:
    """Where heba_kernels._C comes from here: prebuilt, JIT-cached, JIT-buildable or why not."""
    st = extension_status()
    return f"{'':<10} extension: heba_kernels._C {_EXTENSION_WORDS[st.state]}"


def report() -> str:
    lines = [f"heba {__version__}  python {platform.python_version()}  torch {torch.__version__}"
             f"  (CUDA build {torch.version.cuda})"]
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name()}  "
                     f"(capability {'.'.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        lines.append("GPU: none visible")
    lines.append("")
    for backend in BACKENDS[1:]:
        ok, why = backend_status(backend)
        ops = ", ".join(op for op in OPS if implemented(backend, op)) or "none yet"
        lines.append(f"{backend:<10} {'available' if ok else 'unavailable':<12} {why}")
        lines.append(f"{'':<10} ops: {ops}")
        if backend == "cuda":
            lines.append(_extension_line())
    for (backend, op), err in registry.errors.items():
        lines.append(f"import error: {backend}/{op}: {err}")
    lines.append("")
    lines.append("auto on CUDA picks, per op, the first available of: "
                 + "; ".join(f"{op}: {' > '.join(order)} > reference"
                             for op, order in AUTO_ORDER.items()))
    lines.append("auto on other devices: reference")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
