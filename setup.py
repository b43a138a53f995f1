"""Build script: the pure-Python package always, the CUDA extension when it can.

The extension ``heba_kernels._C`` is compiled from ``csrc/`` when a CUDA build
of torch and nvcc are present. ``HEBA_BUILD_CUDA`` steers it:

* ``auto`` (default): build when CUDA is there, otherwise say once that the
  CUDA backend was skipped and install the pure-Python package;
* ``1`` / ``force``: build or fail loudly;
* ``0`` / ``skip``: never build.

``TORCH_CUDA_ARCH_LIST`` picks the architectures (default ``8.0;9.0``). The
extension builds against the torch already installed, so install with
``pip install --no-build-isolation .`` to get it.
"""

import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
MODE = os.environ.get("HEBA_BUILD_CUDA", "auto").strip().lower()
if MODE not in ("auto", "1", "force", "0", "skip"):
    sys.exit(f"HEBA_BUILD_CUDA must be auto, 1/force or 0/skip, got {MODE!r}")
FORCE = MODE in ("1", "force")
SKIP = MODE in ("0", "skip")


# setup.py runs several times per pip install (metadata, then the build); speak
# only in the run that builds, so the message appears once.
_BUILDING = any(cmd in sys.argv for cmd in
                ("bdist_wheel", "build_ext", "build", "install", "develop", "editable_wheel"))


def _say(msg):
    if _BUILDING:
        print(f"heba setup: {msg}", file=sys.stderr, flush=True)


def _cuda_extension():
    """Return ([ext], cmdclass) for the CUDA extension, or ([], {}) with a reason."""
    if SKIP:
        _say("HEBA_BUILD_CUDA=skip: the CUDA backend is not built.")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
                     + glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as err:
        reason = f"torch is not importable in the build environment ({err}); " \
                 "install torch first and use `pip install --no-build-isolation .`"
        return _skip_or_fail(reason)
    if not sources:
        return _skip_or_fail("csrc/ holds no sources")
    if torch.version.cuda is None:
        return _skip_or_fail(f"torch {torch.__version__} is not a CUDA build")
    if os.environ.get("CUDA_HOME") is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        # torch guesses /usr/local when nvcc is not on PATH; point it at the toolkit.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
        cpp_extension.CUDA_HOME = "/usr/local/cuda"
    if cpp_extension.CUDA_HOME is None:
        return _skip_or_fail("nvcc was not found (set CUDA_HOME)")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = cpp_extension.CUDAExtension(
        name="heba_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__"],
        },
    )
    _say(f"building the CUDA backend heba_kernels._C for TORCH_CUDA_ARCH_LIST="
         f"{os.environ['TORCH_CUDA_ARCH_LIST']} with {cpp_extension.CUDA_HOME}")
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


def _skip_or_fail(reason):
    if FORCE:
        sys.exit(f"heba setup: HEBA_BUILD_CUDA=force but the CUDA backend cannot be built: {reason}")
    _say(f"the CUDA backend was skipped: {reason}. The Triton and reference backends are installed.")
    return [], {}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
