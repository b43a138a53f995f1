"""Build script: the pure-Python package always, the CUDA extension when it can.

Every wheel ships the CUDA sources as package data (``heba_kernels/csrc``), so
the CUDA backend is reachable after any install: if ``heba_kernels._C`` is not
built here, it is compiled on first use (``heba_kernels/_extension.py``).

The extension is built at install when torch is importable in the build
environment, i.e. ``pip install --no-build-isolation .`` (or ``-e .``) with a
CUDA build of torch and nvcc present. A plain ``pip install .`` builds in an
isolated environment without torch, so it installs the pure-Python package and
leaves the compilation to the first use. torch is deliberately not a build
requirement: pip would install a second torch into the build environment and
the extension would then be built against a torch other than the one it runs on.

``HEBA_BUILD_CUDA`` steers the install-time build:

* ``auto`` (default): build when torch, CUDA and nvcc are there; otherwise, or
  if the compilation fails, say why in one line and install the pure-Python
  package (the line is in pip's log: ``pip install -v``);
* ``1`` / ``force``: build or fail loudly;
* ``0`` / ``skip``: never build at install.

``TORCH_CUDA_ARCH_LIST`` picks the architectures (default ``8.0;9.0+PTX``);
``CUDA_HOME`` the toolkit (it must hold ``bin/nvcc``).
"""

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
MODE = os.environ.get("HEBA_BUILD_CUDA", "auto").strip().lower()
if MODE not in ("auto", "1", "force", "0", "skip"):
    sys.exit(f"HEBA_BUILD_CUDA must be auto, 1/force or 0/skip, got {MODE!r}")
FORCE = MODE in ("1", "force")
SKIP = MODE in ("0", "skip")

# setup.py runs several times per pip install (metadata, then the build); speak
# only in the run that builds, so the message appears once.
_BUILDING = any(cmd in sys.argv for cmd in
                ("bdist_wheel", "build_ext", "build", "install", "develop", "editable_wheel"))


def _load_extension_module():
    """heba_kernels/_extension.py by path: its helpers need no torch (isolated builds have none)."""
    spec = importlib.util.spec_from_file_location(
        "_heba_extension_setup", os.path.join(HERE, "heba_kernels", "_extension.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXT = _load_extension_module()


def _say(msg):
    if _BUILDING:
        print(f"heba setup: {msg}", file=sys.stderr, flush=True)


class BuildPyWithSources(build_py):
    """Also copy csrc/ into the wheel as heba_kernels/csrc/, for the compilation on first use."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install finds csrc/ in the checkout
        target = os.path.join(self.build_lib, "heba_kernels", "csrc")
        os.makedirs(target, exist_ok=True)
        for path in glob.glob(os.path.join(CSRC, "*")):
            if path.endswith(EXT.SOURCE_SUFFIXES + EXT.HEADER_SUFFIXES + (".md",)):
                shutil.copy2(path, target)


def _torch_blocker():
    """Why the extension cannot be built at install (one line), or None."""
    try:
        import torch
    except ImportError:
        return ("torch is not importable in the build environment (pip's isolated build); "
                "it compiles on first use instead, or install with "
                "`pip install --no-build-isolation .` to build it now")
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if not EXT.source_files(CSRC):
        return "csrc/ holds no sources"
    home, how = EXT.find_cuda_home()
    if home is None:
        return f"nvcc was not found: {how}"
    os.environ["CUDA_HOME"] = home
    return None


def _cuda_extension():
    """Return ([ext], {"build_ext": ...}) for the CUDA extension, or ([], {}) with a reason."""
    if SKIP:
        _say("HEBA_BUILD_CUDA=skip: the CUDA backend is not built at install "
             "(it compiles on first use).")
        return [], {}
    reason = _torch_blocker()
    if reason is not None:
        return _skip_or_fail(reason)
    from torch.utils import cpp_extension
    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]  # torch guessed it at import
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", EXT.DEFAULT_ARCH_LIST)
    ext = cpp_extension.CUDAExtension(
        name="heba_kernels._C",
        sources=[os.path.relpath(p, HERE) for p in EXT.source_files(CSRC)],
        include_dirs=[CSRC],
        # No -std here: torch.utils.cpp_extension adds the standard the installed torch needs.
        extra_compile_args={"cxx": list(EXT.CXX_FLAGS), "nvcc": list(EXT.NVCC_FLAGS)},
        optional=not FORCE,  # setuptools then skips copying a library that failed to build
    )
    _say(f"building the CUDA backend heba_kernels._C for TORCH_CUDA_ARCH_LIST="
         f"{os.environ['TORCH_CUDA_ARCH_LIST']} with CUDA_HOME={os.environ['CUDA_HOME']}")
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtOrSkip(base):
        """In auto mode a failed compilation installs the pure-Python package, saying why."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as err:
                if FORCE:
                    raise
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                _say(f"compiling the CUDA backend failed ({first[:200]}); installing the "
                     "pure-Python package (HEBA_BUILD_CUDA=force makes this an error)")

    return [ext], {"build_ext": BuildExtOrSkip}


def _skip_or_fail(reason):
    if FORCE:
        sys.exit(f"heba setup: HEBA_BUILD_CUDA=force but the CUDA backend cannot be built: {reason}")
    _say(f"the CUDA backend is not built at install: {reason}. "
         "Installing the pure-Python package (Triton and reference backends).")
    return [], {}


ext_modules, cmdclass = _cuda_extension()
cmdclass["build_py"] = BuildPyWithSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)
