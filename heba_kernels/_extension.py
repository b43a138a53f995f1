"""Finding, compiling and loading the CUDA extension ``heba_kernels._C``.

The extension reaches a process by one of three routes, tried in order by
:func:`load`:

1. **prebuilt**: ``heba_kernels/_C*.so`` built at install time (``setup.py``,
   when torch was importable in the build environment, e.g.
   ``pip install --no-build-isolation .``);
2. **JIT-cached**: a ``_C.so`` compiled on an earlier first use, found in the
   cache directory for this torch version, CUDA version, architecture list,
   Python and source hash;
3. **JIT build**: compiled now with :func:`torch.utils.cpp_extension.load` from
   the CUDA sources shipped in the wheel (``heba_kernels/csrc/``) or, in a
   source checkout, from ``csrc/``. One line on stderr says so while it builds
   (about a minute); torch's file lock lets parallel processes share one build.

Whichever route wins, the module is registered as ``heba_kernels._C``, so
``import heba_kernels._C`` works afterwards and ``torch.ops.heba.cuda_*`` exist.

Nothing here compiles at import: :func:`status` only looks (it never builds and
never initialises CUDA unless a GPU must be asked for its architecture), and
:func:`load` is called when the CUDA backend is actually requested
(``backend="cuda"``, or ``"auto"`` choosing it for a CUDA tensor).

Cache directory: ``$HEBA_CACHE_DIR`` if set, else ``$TORCH_EXTENSIONS_DIR/heba``,
else ``~/.cache/torch_extensions/heba`` (``$XDG_CACHE_HOME`` honoured), with one
sub-directory per key, e.g. ``heba_C-py311-torch2.14.1+cu130-cuda13.0-sm9.0-1a2b3c4d5e6f``.

Example::

    >>> from heba_kernels import _extension
    >>> _extension.status()            # never compiles
    Status(state='jit-buildable', detail='...')
    >>> _extension.load()              # compiles once if needed, then imports
    <module 'heba_kernels._C' ...>
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import NamedTuple, Optional

MODULE = "heba_kernels._C"
# Build flags, shared with setup.py (which imports this module without torch).
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "-lineinfo",
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__"]
# Without TORCH_CUDA_ARCH_LIST and without a visible GPU; +PTX lets newer GPUs JIT the 9.0 code.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
SOURCE_SUFFIXES = (".cpp", ".cu")
HEADER_SUFFIXES = (".h", ".cuh")

_PACKAGE_DIR = Path(__file__).resolve().parent


class Status(NamedTuple):
    """``state`` is ``prebuilt``, ``loaded``, ``jit-cached``, ``jit-buildable`` or ``unavailable``."""

    state: str
    detail: str


class ExtensionUnavailableError(RuntimeError):
    """The CUDA extension cannot be loaded or compiled here; the message says why, in one line."""


# ---------------------------------------------------------------------------
# What is there (no torch needed: setup.py uses these too)
# ---------------------------------------------------------------------------

def source_dir() -> Optional[Path]:
    """The CUDA sources: shipped in the wheel (``heba_kernels/csrc``) or a checkout's ``csrc``."""
    for d in (_PACKAGE_DIR / "csrc", _PACKAGE_DIR.parent / "csrc"):
        if d.is_dir() and any(p.suffix in SOURCE_SUFFIXES for p in d.iterdir()):
            return d
    return None


def source_files(directory) -> list[Path]:
    """The translation units in ``directory`` (sorted), which the build compiles."""
    return sorted(p for p in Path(directory).rglob("*") if p.suffix in SOURCE_SUFFIXES)


def source_hash(directory) -> str:
    """12 hex digits over every source and header (names and bytes): new sources, new build."""
    directory, h = Path(directory), hashlib.sha256()
    for p in sorted(q for q in directory.rglob("*") if q.suffix in SOURCE_SUFFIXES + HEADER_SUFFIXES):
        h.update(p.relative_to(directory).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def find_cuda_home() -> tuple[Optional[str], str]:
    """``(toolkit root, how it was found)``; the root is None when no usable nvcc exists.

    ``CUDA_HOME`` (or ``CUDA_PATH``) wins when set, and must hold ``bin/nvcc``.
    Otherwise the toolkit of the ``nvcc`` on PATH (symlinks resolved; a wrapper
    script outside a toolkit does not count), otherwise ``/usr/local/cuda``.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            if (Path(home) / "bin" / "nvcc").is_file():
                return home, f"{var}={home}"
            return None, f"{var}={home} has no bin/nvcc"
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = Path(os.path.realpath(nvcc)).parent.parent
        if (home / "include" / "cuda_runtime.h").is_file():
            return str(home), f"nvcc on PATH ({nvcc})"
    if Path("/usr/local/cuda/bin/nvcc").is_file():
        return "/usr/local/cuda", "/usr/local/cuda"
    return None, "no CUDA toolkit on PATH or in /usr/local/cuda (install it or set CUDA_HOME)"


def cache_root() -> Path:
    """Where JIT builds go: ``$HEBA_CACHE_DIR``, ``$TORCH_EXTENSIONS_DIR/heba`` or the user cache."""
    if os.environ.get("HEBA_CACHE_DIR"):
        return Path(os.environ["HEBA_CACHE_DIR"]).expanduser()
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]).expanduser() / "heba"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "torch_extensions" / "heba"


# ---------------------------------------------------------------------------
# The cache key (needs torch)
# ---------------------------------------------------------------------------

def arch_list() -> str:
    """``TORCH_CUDA_ARCH_LIST`` if set, else the visible GPUs' capabilities, else the default."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env
    import torch
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return DEFAULT_ARCH_LIST


def build_dir(sources: Path) -> Path:
    """The cache sub-directory for this torch, CUDA, architecture list, Python and source hash."""
    import torch
    arch = arch_list().replace(" ", "").replace(";", "_").replace("+", "")
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    key = f"heba_C-{py}-torch{torch.__version__}-cuda{torch.version.cuda}-sm{arch}-" \
          f"{source_hash(sources)}"
    return cache_root() / key


def _cached_library(directory: Path) -> Path:
    return directory / f"_C{sysconfig.get_config_var('SHLIB_SUFFIX') or '.so'}"


# ---------------------------------------------------------------------------
# Status and loading
# ---------------------------------------------------------------------------

_PREBUILT: dict[str, object] = {}   # {"ok": bool, "why": str}, filled once
_FAILED: dict[str, str] = {}        # {"why": one line} after a failed JIT build in this process


def loaded() -> bool:
    """Whether ``heba_kernels._C`` is imported in this process (by any route)."""
    return MODULE in sys.modules


def prebuilt() -> tuple[bool, str]:
    """Import the install-time build ``heba_kernels/_C*.so`` if there is one (cheap; no build)."""
    if not _PREBUILT:
        if importlib.util.find_spec(MODULE) is None:
            _PREBUILT.update(ok=False, why=f"{MODULE} was not built at install")
        else:
            try:
                importlib.import_module(MODULE)
                _PREBUILT.update(ok=True, why=f"prebuilt {MODULE} (built at install)")
            except Exception as err:  # an ABI mismatch after a torch upgrade, a missing library
                _PREBUILT.update(ok=False, why=f"the prebuilt {MODULE} does not load "
                                               f"({type(err).__name__}: {err})")
    return bool(_PREBUILT["ok"]), str(_PREBUILT["why"])


def _jit_blocker() -> Optional[str]:
    """Why a JIT build cannot run here (one line), or None when it can."""
    import torch
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch "
                "(https://pytorch.org/get-started/locally/)")
    if source_dir() is None:
        return "the CUDA sources (csrc) are not installed with heba; reinstall heba from its source"
    home, how = find_cuda_home()
    if home is None:
        return f"nvcc was not found: {how}"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the pip package puts the binary on its own path)
        except ImportError:
            return "ninja is not installed (pip install ninja)"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler: {cxx!r} is not on PATH (install g++ or set CXX)"
    return None


def _cached_library_path() -> Optional[Path]:
    """Where a JIT build for this torch/CUDA/arch/sources lies (it may not exist); None if no key."""
    import torch
    sources = source_dir()
    if sources is None or torch.version.cuda is None:
        return None
    return _cached_library(build_dir(sources))


def status() -> Status:
    """Which route :func:`load` would take, and why; never compiles.

    States: ``prebuilt`` (built at install, imported), ``loaded`` (imported by an
    earlier :func:`load`), ``jit-cached`` (compiled earlier, loads on first use),
    ``jit-buildable`` (compiles on first use), ``unavailable`` (``detail`` says why).
    """
    ok, why = prebuilt()
    if ok:
        return Status("prebuilt", why)
    if loaded():
        return Status("loaded", f"{MODULE} is loaded from {sys.modules[MODULE].__file__}")
    if "why" in _FAILED:
        return Status("unavailable", _FAILED["why"])
    lib = _cached_library_path()
    if lib is not None and lib.is_file():
        return Status("jit-cached", f"{why}; compiled earlier, loads on first use from {lib}")
    blocker = _jit_blocker()
    if blocker is not None:
        return Status("unavailable", f"{why}, and it cannot be compiled on first use: {blocker}")
    return Status("jit-buildable", f"{why}; it compiles on first use of the CUDA backend "
                                   f"(about a minute, once) into {cache_root()} "
                                   "(or at install: `pip install --no-build-isolation .`)")


def _import_library(path: Path):
    """Import the compiled library at ``path`` as ``heba_kernels._C`` (registers the ops)."""
    import torch  # noqa: F401  (the library needs torch's shared libraries loaded first)
    spec = importlib.util.spec_from_file_location(MODULE, str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[MODULE] = module
    import heba_kernels
    heba_kernels._C = module
    return module


def load():
    """Return ``heba_kernels._C``: prebuilt, from the JIT cache, or compiled now (once).

    Raises :class:`ExtensionUnavailableError` with a one-line reason (CPU-only
    torch, no nvcc, no ninja, a compiler error with the path of the full log).
    """
    if loaded():
        return sys.modules[MODULE]
    ok, why = prebuilt()
    if ok:
        return sys.modules[MODULE]
    if "why" in _FAILED:
        raise ExtensionUnavailableError(_FAILED["why"])
    lib = _cached_library_path()
    if lib is not None and lib.is_file():
        return _import_library(lib)
    blocker = _jit_blocker()
    if blocker is not None:
        _FAILED["why"] = f"the CUDA extension cannot be compiled: {blocker} ({why})"
        raise ExtensionUnavailableError(_FAILED["why"])
    return _import_library(_build(source_dir()))


def _build(sources: Path) -> Path:
    """Compile the extension into its cache directory; return the library's path."""
    import torch
    directory = build_dir(sources)
    directory.mkdir(parents=True, exist_ok=True)
    home, _ = find_cuda_home()
    arch = arch_list()
    print(f"heba: compiling the CUDA backend ({MODULE}) for torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, arch {arch} into {directory} (once; about a minute)",
          file=sys.stderr, flush=True)
    log = directory / "build.log"
    saved = {k: os.environ.get(k) for k in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST")}
    os.environ.update(CUDA_HOME=home, TORCH_CUDA_ARCH_LIST=arch)
    try:
        from torch.utils import cpp_extension
        cpp_extension.CUDA_HOME = home  # computed when torch imported it; point it at ours
        cpp_extension.load(name="_C", sources=[str(p) for p in source_files(sources)],
                           extra_include_paths=[str(sources)], extra_cflags=CXX_FLAGS,
                           extra_cuda_cflags=NVCC_FLAGS, build_directory=str(directory),
                           is_python_module=False, verbose=False)
    except Exception as err:
        log.write_text(f"{type(err).__name__}: {err}\n")
        _FAILED["why"] = (f"compiling the CUDA extension failed ({_first_error(str(err))}); "
                          f"full log: {log}")
        raise ExtensionUnavailableError(_FAILED["why"]) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return _cached_library(directory)


def _first_error(text: str) -> str:
    """The first line of a build log that reads like a compiler error, shortened."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"\berror\b", ln, re.IGNORECASE) and not ln.startswith("[") \
                and not ln.startswith(("RuntimeError", "ninja:", "Error building")):
            return ln[:240]
    return (lines[0] if lines else "no output")[:240]
