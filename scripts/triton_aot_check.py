"""Compile every heba Triton kernel (text, low-rank, visual, the dW reduction, QuickGELU)
for a GPU target without a GPU, the way the launchers launch them.

For every block-size choice the launchers make (``_config`` in each kernel module),
this compiles the kernel ahead of time for ``--arch`` (default 90: H100/H200) with the
installed Triton and its bundled ptxas, with the specialisation a real launch gets
(pointers 16-byte aligned, int arguments divisible by 16 marked so, ints equal to 1
made constants, at CLIP shapes: ViT-B/16 and ViT-L/14 widths, 14x14 grid, 77 text
tokens, batch 32), and prints shared memory, registers and register-spill bytes. The
register and spill counts come from the installed Triton's own ptxas run (its -v log),
so they are a launch's under whichever Triton release is installed. It fails (exit 1)
when a kernel does not compile or needs more shared memory than the target has. No
CUDA driver is needed; it takes a few minutes on two cores.

    python scripts/triton_aot_check.py [--arch 90] [--jobs 2]
"""

import argparse
import contextlib
import io
import itertools
import os
import re
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from heba_kernels import (_triton_common, add_layer_norm, heba_text, heba_visual,  # noqa: E402
                          low_rank, quick_gelu, slow_fast)
from heba_kernels._triton_common import OP_CODES  # noqa: E402

TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# (x dtype, weight dtype): plain 16-bit, autocast (float32 x, 16-bit weights), float32.
DTYPES = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
          (torch.float16, torch.float16), (torch.float32, torch.float32)]


def _cases():
    for xdt, wdt in DTYPES:
        xs, ws = TY[xdt], TY[wdt]
        for H in (10, 128, 192, 256, 512, 768, 1024):
            fused = max(16, triton.next_power_of_2(H)) <= heba_text.FUSED_DW_MAX_H
            for bwd in (False, True):
                BM, BN, BH, nw = heba_text._config(H, wdt, backward=bwd)
                c = dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_H=BH, _shown=f"{BM}x{BN}x{BH}",
                         _shape=dict(D=4 * H, h=H))
                if bwd and fused:
                    # the row kernel (a, du, row constants) and the dx kernel that sums the
                    # parameter gradients, at the blocks text_plan picks on a GPU
                    ptrs = dict(X=xs, G=xs, WD=ws, WU=ws, NW=ws, MEAN="fp32", RSTD="fp32",
                                A_OUT=ws, DU_OUT=ws, CST="fp32")
                    yield ("heba_text bwd du", H, xdt, wdt, "_heba_text_bwd_kernel_du", ptrs,
                           (), c, nw)
                    BT, BD, BH, nw = heba_text._dx_dw_config(H, wdt, gpu=True)
                    c = dict(BLOCK_M=BT, BLOCK_D=BD, BLOCK_H=BH, SCALE_PTR=False,
                             PSCALE_PTR=True, PSCALED=True,
                             _shown=f"{BT}x{BD}x{BH}", _shape=dict(D=4 * H, h=H))
                    ptrs = dict(X=xs, G=xs, WD=ws, WU=ws, NW=ws, MEAN="fp32", RSTD="fp32",
                                CST="fp32", A_IN=ws, DU_IN=ws, DX=xs, DWU_PART="fp32",
                                DWD_PART="fp32", DNW_PART="fp32", DNB_PART="fp32", D_UP=ws,
                                D_DOWN=ws, D_NW=ws, D_NB=ws, CNT="i32", scale_ptr="fp32",
                                pscale_ptr="fp32")
                    yield ("heba_text bwd dx_dw", H, xdt, wdt, "_heba_text_bwd_kernel_dx_dw",
                           ptrs, ("scale", "pscale"), c, nw)
                elif bwd:
                    ptrs = dict(X=xs, G=xs, WD=ws, WU=ws, NW=ws, MEAN="fp32", RSTD="fp32",
                                DX=xs, DY=xs, A_OUT=ws, DU_OUT=ws, DNW_PART="fp32",
                                DNB_PART="fp32", U_BUF="fp32", scale_ptr="fp32")
                    kernel, c["SCALE_PTR"] = "_heba_text_bwd_kernel_dx", False
                    c["WIDE"], c["BLOCK_HC"] = BH > heba_text.WIDE_H, heba_text._WIDE_BLOCK_HC
                    if c["WIDE"]:
                        c["_shown"] = f"{BM}x{BN}x{BH}(h chunks {c['BLOCK_HC']})"
                    yield ("heba_text bwd", H, xdt, wdt, kernel, ptrs, ("scale",), c, nw)
                else:
                    ptrs = dict(X=xs, WD=ws, WU=ws, NW=ws, NB=ws, OUT=xs, MEAN="fp32",
                                RSTD="fp32", scale_ptr="fp32")
                    c["SCALE_PTR"] = False
                    yield ("heba_text fwd", H, xdt, wdt, "_heba_text_fwd_kernel", ptrs,
                           ("scale", "eps"), c, nw)
        for R in (1, 16, 64, 256):
            for bwd in (False, True):
                BM, BN, BR, nw = low_rank._config(R, wdt, backward=bwd)
                c = dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_R=BR, HAS_BD=True,
                         _shown=f"{BM}x{BN}x{BR}", _shape=dict(D=768, h=R, M=32 * 197))
                if bwd:
                    ptrs = dict(X=xs, G=xs, WD=ws, BD=ws, WU=ws, DX=xs, A_OUT=ws, DU_OUT=ws)
                    yield ("low_rank bwd", R, xdt, wdt, "_low_rank_bwd_kernel_dx", ptrs,
                           ("alpha",), c, nw)
                else:
                    c["HAS_BU"] = True
                    ptrs = dict(X=xs, WD=ws, BD=ws, WU=ws, BU=ws, OUT=xs)
                    yield ("low_rank fwd", R, xdt, wdt, "_low_rank_fwd_kernel", ptrs,
                           ("alpha",), c, nw)
        # single products (the general form), pairs: the visual adapter's two weights, the
        # low-rank adapter's two weights and biases; as the ops launch them, with the sums
        # (REDUCE: each tile's last split sums its slots, other programs the op's LayerNorm
        # and dWm partials)
        for BI, BJ, pair, colsum, reduce in (
                (128, 128, False, True, False), (128, 64, False, True, False),
                (64, 128, False, True, False), (64, 64, False, True, False),
                (64, 16, False, True, False), (16, 64, False, True, False),
                (128, 128, True, False, False), (64, 64, True, False, False),
                (128, 128, True, False, True), (64, 64, True, False, True),
                (64, 16, True, True, True), (64, 64, True, True, True)):
            c = dict(BLOCK_K=32, BLOCK_I=BI, BLOCK_J=BJ, COLSUM=colsum, PAIR=pair,
                     REDUCE=reduce, SCALE_PTR=reduce, SCALED=0b1111111 if reduce else 0,
                     EBLOCK=_triton_common.REDUCE_BLOCK,
                     _shown=(f"{BI}x{BJ}{' pair' if pair else ''}{' colsum' if colsum else ''}"
                             f"{' sums' if reduce else ''}"),
                     _shape=dict(D=768, h=BI))
            yield ("atb (dW)", BJ, xdt, wdt, "_atb_kernel",
                   dict(A=xs, B=ws, C_PART="fp32", S_PART="fp32", A2=xs, B2=ws,
                        C2_PART="fp32", S2_PART="fp32", O=ws, O2=ws, OS=ws, OS2=ws, CNT="i32",
                        E0="fp32", EO0=ws, E1="fp32", EO1=ws, E2="fp32", EO2=ws,
                        scale_ptr="fp32"), ("scale",), c,
                   8 if BI * BJ >= 128 * 128 else 4)             # as atb_plan
        # the one reduction of an op's partial buffers (float32 in, the weights' dtype out)
        c = dict(SCALE_PTR=True, SCALED=0b10101, BLOCK=_triton_common.REDUCE_BLOCK,
                 _shown=f"B{_triton_common.REDUCE_BLOCK}", _shape=dict(D=768, h=192))
        ptrs = {f"{k}{i}": ("fp32" if k == "P" else ws) for i in range(5) for k in "PO"}
        yield ("reduce partials", 5, xdt, wdt, "_reduce_partials_kernel",
               dict(ptrs, scale_ptr="fp32"), ("scale",), c, 4)
    # the frozen backbone's fused QuickGELU (x's dtype throughout), at a ViT-B/16 MLP
    for xdt in (torch.float32, torch.bfloat16, torch.float16):
        xs, B = TY[xdt], quick_gelu.QUICK_GELU_BLOCK
        for step, ptrs in (("fwd", dict(x_ptr=xs, y_ptr=xs)),
                           ("bwd", dict(g_ptr=xs, x_ptr=xs, dx_ptr=xs))):
            yield (f"quick_gelu {step}", 3072, xdt, xdt, f"_quick_gelu_{step}_kernel", ptrs, (),
                   dict(BLOCK=B, _shown=f"B{B}", _shape=dict(D=3072, h=768, M=16 * 197)), 4)
    # the frozen blocks' residual sum + ln_2 (x's dtype, float32 norm weights), at the
    # widths of ViT-B/16's two towers and ViT-L/14's and ViT-H/14's image towers
    for xdt in (torch.float32, torch.bfloat16, torch.float16):
        xs = TY[xdt]
        for D in (512, 768, 1024, 1280):
            _, BR, BD = add_layer_norm.add_layer_norm_plan(16 * 197, D, torch.device("cuda"))
            c = dict(BLOCK_R=BR, BLOCK_D=BD, _shown=f"{BR}x{BD}",
                     _shape=dict(D=D, h=D // 4, M=16 * 197))
            nw = add_layer_norm._warps(BR, BD)
            yield ("add_layer_norm fwd", D, xdt, xdt, "_add_layer_norm_fwd_kernel",
                   dict(x_ptr=xs, a_ptr=xs, s_ptr=xs, y_ptr=xs), ("eps",),
                   dict(c, HAS_W=True, HAS_B=True), nw)
            yield ("add_layer_norm bwd", D, xdt, xdt, "_add_layer_norm_bwd_kernel",
                   dict(gs_ptr=xs, gy_ptr=xs, s_ptr=xs, ds_ptr=xs), (), dict(c, HAS_W=True), nw)
    # the slow-fast draw of a tower forward (ViT-B/16: 12 blocks x 2 keys)
    yield ("slow_fast draw", 24, torch.float32, torch.float32, "_slow_fast_draw_kernel",
           dict(keys_ptr="i64", counters_ptr="i64", values_ptr="fp32", out_ptr="fp32"), (),
           dict(BLOCK=32, _shown="B32", _shape=dict(D=24, h=24)), 1)


def _int_value(name, shape):
    """The value a real launch passes for int argument ``name`` at a CLIP shape."""
    D, h, M = shape["D"], shape["h"], shape.get("M", 32 * 77)
    HW, N, P = 196, 197, 1
    values = dict(M=M, D=D, H=h, R=h, I=h, J=D, h=h, HW=HW, P=P, B=32, W=14, T=32 * HW,
                  stride_xm=D, stride_om=D, stride_gm=D, stride_dxm=D, stride_am=h,
                  stride_bm=D, stride_xb=N * D, stride_xn=D, stride_ob=N * D, stride_on=D,
                  stride_gb=N * D, stride_gn=D, stride_db=N * D, stride_dn=D,
                  rows_per_split=M // 8, stride_ab=0, stride_bb=0, n=M * D)
    if name == "H" and "HW" in shape:
        return 14                                   # the visual kernels' grid height
    return values.get(name, 7)


def _launch_attrs(fn, sig, shape):
    """Triton's launch-time specialisation: 16-aligned pointers and ints divisible by 16
    get ``tt.divisibility=16``; an int equal to 1 becomes a constant."""
    attrs, ones = {}, {}
    for i, n in enumerate(fn.arg_names):
        if sig[n].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif sig[n] == "i32":
            v = _int_value(n, shape)
            if v == 1:
                ones[n] = 1
            elif v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs, ones


def _visual_cases():
    """Every visual kernel at the blocks ``heba_visual._config`` picks for ViT-B/16
    (D=768) and ViT-L/14 (D=1024) attention and MLP widths (4 * D), 14x14 grids, batch 32
    and 256 (the row block grows with the batch), on 132 SMs."""
    f32 = {"mean_ptr", "rstd_ptr", "dnw_part_ptr", "dnb_part_ptr", "dwm_part_ptr",
           "dwu_part_ptr", "dwd_part_ptr", "scale_ptr", "gs_ptr", "xs_ptr", "st_ptr"}
    tok = {"x_ptr", "out_ptr", "g_ptr", "dx_ptr", "dy_ptr", "y_ptr"}
    kernels = ["_heba_visual_fwd_kernel_down", "_heba_visual_fwd_kernel",
               "_heba_visual_bwd_kernel_dy", "_heba_visual_bwd_kernel_dv",
               "_heba_visual_bwd_kernel_dx", "_heba_visual_kernel_dwconv"]
    for xdt, wdt in DTYPES:
        for D, B in itertools.product((768, 1024, 3072, 4096), (32, 256)):
            h = D // 4
            # the blocks the plans pick (the backward that recomputes u has the down kernel
            # at every width; the forward has it from FUSE_DOWN_BELOW_DIM up)
            plan = {st.kernel: st.meta for st in
                    heba_visual.visual_bwd_plan(B, 14, 14, D, h, wdt, 132, True, True)
                    + heba_visual.visual_fwd_plan(B, 14, 14, D, h, wdt, 132, True)}
            for kern in kernels:
                if kern not in plan:            # dv from DV_GEMM_MIN_DIM, dwconv with DW
                    continue
                cfg = {k: v for k, v in plan[kern].items() if k != "num_warps"}
                warps = plan[kern]["num_warps"]
                consts = dict(cfg)
                if kern.endswith("dwconv"):     # du = dwconv^T(dv) (and dWm after the dv launch)
                    consts = dict(BLOCK_T=cfg["BLOCK_T"], BLOCK_H=cfg["BLOCK_H"],
                                  DWM=cfg["DWM"])
                if kern == "_heba_visual_fwd_kernel":
                    consts["SCALE_PTR"] = False
                if kern.endswith("_dy"):
                    consts["GS_PTR"] = False
                if kern.endswith("_dx"):
                    consts["XS_PTR"] = False
                ptrs = {n: ("fp32" if n in f32 else "i32" if n == "cnt_ptr" else
                            TY[xdt] if n in tok else TY[wdt])
                        for n in getattr(heba_visual, kern).arg_names if n.endswith("_ptr")}
                consts["_shown"] = (f"T{cfg['BLOCK_T']}xH{consts['BLOCK_H']}"
                                    f"xD{cfg['BLOCK_D']}"
                                    + (f"xHV{cfg['BLOCK_HV']}" if "BLOCK_HV" in cfg else "")
                                    + (f" {cfg['PARTS']} parts" if cfg.get("PARTS", 1) > 1
                                       else ""))
                consts["_shape"] = dict(D=D, h=h, HW=196)
                yield (f"visual {kern[13:]}", D, xdt, wdt, kern, ptrs,
                       ("scale", "eps", "gs", "xs"), consts, warps)


def _compile(args):
    name, width, xdt, wdt, kernel, ptrs, floats, consts, num_warps, arch = args
    os.environ["TRITON_CACHE_DIR"] = os.path.join(tempfile.gettempdir(),
                                                  f"heba_aot_cache_{os.getpid()}")
    module = (heba_text if kernel.startswith("_heba_text") else
              heba_visual if kernel.startswith("_heba_visual") else
              low_rank if kernel.startswith("_low_rank") else
              quick_gelu if kernel.startswith("_quick_gelu") else
              add_layer_norm if kernel.startswith("_add_layer_norm") else
              slow_fast if kernel.startswith("_slow_fast") else _triton_common)
    fn = getattr(module, kernel)
    shape = consts.pop("_shape")
    if not any(k in name for k in ("visual", "reduce", "quick_gelu", "add_layer_norm",
                                   "slow_fast")):
        consts = dict(consts, OP=OP_CODES[wdt], UPCAST=False, IEEE=wdt == torch.float32)
    shown = consts.pop("_shown")
    sig = {n: ("constexpr" if n in consts else "*" + ptrs.get(n, ptrs.get("*", "fp32"))
               if n in ptrs or n.endswith("_ptr") else "fp32" if n in floats else "i32")
           for n in fn.arg_names}
    attrs, ones = _launch_attrs(fn, sig, shape)
    consts = dict(consts, **ones)
    sig.update({n: "constexpr" for n in ones})
    dim = ("h" if "text" in name else "J" if "atb" in name else "D" if "visual" in name
           else "k" if "reduce" in name else "D" if "_gelu" in name or "_norm" in name
           else "n" if "slow_fast" in name else "r")
    label = f"{name} {dim}={width:<4} x {TY[xdt]} w {TY[wdt]} {shown} warps={num_warps}"
    # Triton's own ptxas run (its flags differ between Triton releases) prints its -v log
    # when asked; a fresh compile every time, so a cached kernel never hides the log.
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                               target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": num_warps,
                                        "num_stages": 3 if "visual" in name else 2})
    except Exception as err:  # report every failure, not just the first
        return label, None, f"compile error: {type(err).__name__}: {err}"
    log = log.getvalue()
    regs = re.findall(r"Used (\d+) registers", log)
    spill = re.findall(r"(\d+) bytes spill stores", log)
    return label, k.metadata.shared, f"regs {regs[0] if regs else '?'} " \
        f"spill {spill[0] if spill else '?'} B"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default="", help="only kernels whose name contains this")
    a = ap.parse_args()
    limit = SMEM_LIMIT.get(a.arch, 99 * 1024)
    failed = False
    with ProcessPoolExecutor(a.jobs) as ex:
        cases = [*_cases(), *_visual_cases()]
        if a.only:
            cases = [c for c in cases if a.only in c[0]]
        for label, smem, info in ex.map(_compile, [(*c, a.arch) for c in cases]):
            bad = smem is None or smem > limit
            failed |= bad
            print(f"{'FAIL' if bad else 'ok  '} {label}: smem {smem} B, {info}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
