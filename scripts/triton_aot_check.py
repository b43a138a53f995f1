"""Compile heba's Triton text and low-rank kernels for a GPU target without a GPU.

For every block-size choice the launchers make (``_config`` in
``heba_kernels/heba_text.py`` and ``heba_kernels/low_rank.py``), this compiles
the kernel ahead of time for ``--arch`` (default 90: H100/H200) with the
installed Triton and its bundled ptxas, and prints shared memory, registers and
register-spill bytes. It fails (exit 1) when a kernel does not compile or needs
more shared memory than the target has. No CUDA driver is needed; it takes a
few minutes on two cores.

    python scripts/triton_aot_check.py [--arch 90] [--jobs 2]
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from heba_kernels import _triton_common, heba_text, low_rank  # noqa: E402
from heba_kernels._triton_common import OP_CODES  # noqa: E402

TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# (x dtype, weight dtype): plain 16-bit, autocast (float32 x, 16-bit weights), float32.
DTYPES = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
          (torch.float16, torch.float16), (torch.float32, torch.float32)]


def _cases():
    for xdt, wdt in DTYPES:
        xs, ws = TY[xdt], TY[wdt]
        for H in (10, 128, 256, 512):
            for bwd in (False, True):
                BM, BN, BH, nw = heba_text._config(H, wdt, backward=bwd)
                c = dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_H=BH)
                if bwd:
                    ptrs = dict(X=xs, G=xs, WD=ws, WU=ws, NW=ws, MEAN="fp32", RSTD="fp32",
                                DX=xs, DY=xs, A_OUT=ws, DU_OUT=ws, DNW_PART="fp32",
                                DNB_PART="fp32")
                    yield ("heba_text bwd", H, xdt, wdt, "_heba_text_bwd_kernel_dx", ptrs,
                           ("scale",), c, nw)
                else:
                    ptrs = dict(X=xs, WD=ws, WU=ws, NW=ws, NB=ws, OUT=xs, MEAN="fp32",
                                RSTD="fp32")
                    yield ("heba_text fwd", H, xdt, wdt, "_heba_text_fwd_kernel", ptrs,
                           ("scale", "eps"), c, nw)
        for R in (1, 16, 64, 256):
            for bwd in (False, True):
                BM, BN, BR, nw = low_rank._config(R, wdt, backward=bwd)
                c = dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_R=BR, HAS_BD=True)
                if bwd:
                    ptrs = dict(X=xs, G=xs, WD=ws, BD=ws, WU=ws, DX=xs, A_OUT=ws, DU_OUT=ws)
                    yield ("low_rank bwd", R, xdt, wdt, "_low_rank_bwd_kernel_dx", ptrs,
                           ("alpha",), c, nw)
                else:
                    c["HAS_BU"] = True
                    ptrs = dict(X=xs, WD=ws, BD=ws, WU=ws, BU=ws, OUT=xs)
                    yield ("low_rank fwd", R, xdt, wdt, "_low_rank_fwd_kernel", ptrs,
                           ("alpha",), c, nw)
        for BI, BJ in ((64, 64), (64, 16), (16, 64)):   # the tiles atb() picks
            c = dict(BLOCK_M=BI, BLOCK_N=BJ, BLOCK_K=32, BLOCK_I=BI, BLOCK_J=BJ, COLSUM=True)
            yield ("atb (dW)", BJ, xdt, wdt, "_atb_kernel",
                   dict(A=xs, B=ws, C_PART="fp32", S_PART="fp32"), (), c, 4)


def _compile(args):
    name, width, xdt, wdt, kernel, ptrs, floats, consts, num_warps, arch = args
    os.environ["TRITON_CACHE_DIR"] = os.path.join(tempfile.gettempdir(),
                                                  f"heba_aot_cache_{os.getpid()}")
    module = (heba_text if kernel.startswith("_heba_text") else
              low_rank if kernel.startswith("_low_rank") else _triton_common)
    fn = getattr(module, kernel)
    consts = dict(consts, OP=OP_CODES[wdt], UPCAST=False, IEEE=wdt == torch.float32)
    shown = {k: consts.pop(k) for k in ("BLOCK_M", "BLOCK_N")} if kernel == "_atb_kernel" \
        else {k: consts[k] for k in ("BLOCK_M", "BLOCK_N")}
    sig = {n: ("constexpr" if n in consts else "*" + ptrs[n] if n in ptrs
               else "fp32" if n in floats else "i32") for n in fn.arg_names}
    dim = "h" if "text" in name else "J" if "atb" in name else "r"
    label = (f"{name} {dim}={width:<3} x {TY[xdt]} w {TY[wdt]} "
             f"{shown['BLOCK_M']}x{shown['BLOCK_N']} warps={num_warps}")
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": num_warps, "num_stages": 2})
    except Exception as err:  # report every failure, not just the first
        return label, None, f"compile error: {type(err).__name__}: {err}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    res = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                         capture_output=True, text=True)
    os.unlink(f.name)
    regs = re.findall(r"Used (\d+) registers", res.stderr)
    spill = re.findall(r"(\d+) bytes spill stores", res.stderr)
    return label, k.metadata.shared, f"regs {regs[0] if regs else '?'} " \
        f"spill {spill[0] if spill else '?'} B"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    limit = SMEM_LIMIT.get(a.arch, 99 * 1024)
    failed = False
    with ProcessPoolExecutor(a.jobs) as ex:
        for label, smem, info in ex.map(_compile, [(*c, a.arch) for c in _cases()]):
            bad = smem is None or smem > limit
            failed |= bad
            print(f"{'FAIL' if bad else 'ok  '} {label}: smem {smem} B, {info}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
