"""``python -m benchmarks.roofline``: a modelled roofline of every op, backend and shape.

    python -m benchmarks.roofline [--gpus H100,H200] [--batch 16] [--launches]

Everything here is **modelled**, not measured: it runs on a CPU. For every case of
:mod:`benchmarks.cases` it lists, per kernel launch of the Triton backend, the HBM bytes,
the L2-to-SM bytes and the FLOPs issued, taking the launches (kernel, grid, block sizes)
from the very plan functions the launchers call (``visual_fwd_plan``, ``visual_bwd_plan``,
``text_plan``, ``low_rank_plan``), so the model cannot drift from the launchers
(tests/benchmarks/test_roofline.py ties them to a launch recorder, and checks that the
fused ops launch nothing else: no torch sum, cast or multiplication). Beside them:

* **ideal**: read ``x`` and write ``out`` forward, read ``x`` and ``g`` and write ``dx``
  backward, the minimal GEMM FLOPs (two token-wise projections forward, four backward);
* **eager**: the reference backend's aten ops, counted with a TorchDispatchMode on meta
  tensors (every op reads its inputs and writes its outputs in full);
* the modelled floor, ``max(HBM bytes / bandwidth, FLOPs / dense bf16 rate, L2->SM
  bytes / L2 bandwidth)`` per launch, summed, on the GPUs of :data:`GPUS` (datasheet
  numbers and, for the L2's bandwidth, which no datasheet gives, a lead:
  :data:`HOPPER_L2_BW`; parameters of the model). A launch of fewer programs than SMs
  gets their share of the matrix rate and of the L2's bandwidth (``GPU.l2_bw_sm`` each).

Model of one launch: every tensor a launch touches moves between HBM and L2 once, except
the re-reads the L2 cannot hold (below); every program loads its own tiles from L2
(re-reads across D sweeps and weight tiles per program count each time), except a 3x3
stencil's shifted loads, whose taps after the first hit L1 (:func:`stencil_rows`); FLOPs
are those of the padded tiles the kernel issues. Output: a markdown table.

Which re-reads hit L2 (an LRU stack-distance model, with the L2 size a parameter of the
GPU):

* **A program re-sweeping its own rows** (LayerNorm's second sweep over a row block, the
  visual ``_dy`` kernel's sweeps over ``dy`` per bottleneck chunk) re-reads a chunk after
  touching ``f`` bytes of its block; with ``P`` such programs resident at once (one per
  SM: the persistent kernels use more than half an SM's registers), its reuse distance is
  up to ``P f``. A sweep in the direction of the previous one re-reads the chunk touched
  longest ago first: every chunk hits iff ``P f`` fits in L2, else none does (LRU's cyclic
  worst case). A sweep in the opposite direction re-reads the newest chunk first: a
  fraction ``min(1, L2 / (P f))`` hits. heba's kernels alternate directions
  (:func:`resweep_misses`).
* **Programs sharing a tile** hit L2 when they run close together. CUDA dispatches
  programs with the grid's first axis fastest (Triton's ``program_id(0)`` is
  ``blockIdx.x``), so heba's grids put the programs that share a tile next to each other
  (the visual down and dx kernels: the bottleneck or D chunk fastest): shared tiles are
  read from HBM once. With the sharing axis slower, every program in between would touch
  its own tiles, and past the L2 size the sharers would re-read theirs from HBM (at the
  MLP position, before heba's grids were ordered this way: x read 6 times by the down
  kernel and du 24 times by the dx kernel).

The CUDA backend's launches come from C++: the host-only op ``heba::_cuda_launch_plan``
(csrc/ops.cpp, run on the CPU) lists, per op call, its heba kernels with the grids their
launchers take from the same functions (csrc/launch_dims.h), its cuBLAS GEMMs and the
ATen casts, sums and copies it issues, with the bytes each reads and writes
(:func:`cuda_plan`, :func:`cuda_costs`). Its rows count the heba kernels + the GEMMs and
ATen ops as "launches (Triton + torch)"; they need the extension built (else they say
why they are not modelled).

:func:`modelled_floor_ms` gives one case's floor on any :class:`GPU`, and
:func:`measured_gpu` builds one from a benchmark run's own measured copy and matmul rates:
the GPU check's op benchmark table (benchmarks/report.py) prints every Triton row's
measured time beside that floor, as "% of modelled floor", so each GPU run checks the model.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.cases import CASES, Case
from heba_kernels.heba_text import text_plan
from heba_kernels.heba_visual import (SAVE_U_MIN_DIM, halo_chunks, visual_bwd_plan,
                                      visual_fwd_plan)
from heba_kernels.low_rank import low_rank_plan


# L2-to-SM read bandwidth of a Hopper part, bytes/s: a lead, not a datasheet figure (NVIDIA
# publishes none). 5120 bytes per clock across the L2's slices (the figure behind the 9.0
# TB/s quoted for a full GH100 at 1755 MHz), at the SXM parts' 1980 MHz boost clock: 10.1
# TB/s. Microbenchmarks read less (about 5.5 TB/s on an H100 PCIe, 114 SMs), so as a
# ceiling this errs on the fast side, as a floor must. The GPU check measures it
# (``measured_l2_gbs``), and :func:`measured_gpu` takes the measured figure.
HOPPER_L2_BW = 5120 * 1.98e9
# One SM's share of it: 64 bytes per clock from L2 into an SM (a lead as well), so a launch
# of fewer programs than SMs reads L2 at most that fast per program.
HOPPER_L2_BW_SM = 64 * 1.98e9


@dataclass(frozen=True)
class GPU:
    name: str
    hbm: float        # bytes/s, datasheet
    bf16: float       # dense bf16 FLOP/s, datasheet
    sms: int
    l2: float = 50e6  # bytes of L2, datasheet (H100 SXM and H200 SXM: 50 MB)
    l2_bw: float = HOPPER_L2_BW   # L2-to-SM bytes/s (a lead: see HOPPER_L2_BW)
    l2_bw_sm: float = HOPPER_L2_BW_SM   # the same into one SM


GPUS = {"H100": GPU("H100 SXM", 3.35e12, 989e12, 132),
        "H200": GPU("H200 SXM", 4.8e12, 989e12, 132)}


@dataclass
class Cost:
    """One launch, modelled."""
    kernel: str
    grid: tuple
    hbm: float = 0.0
    l2: float = 0.0
    flops: float = 0.0

    def programs(self) -> int:
        """Programs of the grid (0 where the library picks it: cuBLAS, ATen)."""
        n = 1
        for g in self.grid:
            n *= g
        return n

    def times_s(self, gpu: GPU) -> dict:
        """Seconds at each ceiling. A grid of fewer programs than SMs runs on that many:
        the matrix rate and the L2's bandwidth (``l2_bw_sm`` per SM) scale with them, HBM's
        does not (a few dozen SMs saturate it). A library's grid is taken to fill the GPU."""
        p = self.programs()
        active = gpu.sms if p <= 0 else min(p, gpu.sms)
        return {"HBM": self.hbm / gpu.hbm, "FLOP": self.flops / (gpu.bf16 * active / gpu.sms),
                "L2": self.l2 / min(gpu.l2_bw, active * gpu.l2_bw_sm)}

    def floor_s(self, gpu: GPU) -> float:
        return max(self.times_s(gpu).values())

    def bound(self, gpu: GPU) -> str:
        """Which ceiling sets the floor: ``"HBM"``, ``"FLOP"`` or ``"L2"``."""
        t = self.times_s(gpu)
        return max(t, key=t.get)


def _cdiv(a, b):
    return -(-a // b)


def _pad(n, block):
    return _cdiv(n, block) * block


def stencil_rows(BT: int, W: int) -> int:
    """Rows of ``[B * HW, h]`` a ``BT``-row block's 3x3 stencil reads: its own and ``W + 1``
    on each side. The nine shifted ``[BT, cols]`` loads of one column chunk overlap, so the
    taps after the first come from the SM's L1 (a few KB): L2 serves each row once."""
    return BT + 2 * W + 2


def resweep_misses(nbytes: float, footprint: float, l2: float, alternate: bool = True) -> float:
    """HBM bytes of one re-sweep of ``nbytes`` (summed over all programs) whose chunks each
    program touched ``footprint`` bytes ago, summed over the programs resident at once
    (LRU stack distance): a sweep in the opposite direction of the previous one
    (``alternate``) misses a fraction ``1 - l2 / footprint`` of its bytes once
    ``footprint`` exceeds the L2, a sweep in the same direction all of them."""
    if footprint <= l2:
        return 0.0
    return nbytes * (1.0 - l2 / footprint) if alternate else float(nbytes)


def order_misses(shared: float, sharers: int, gap: int, between: float, gpu: GPU) -> float:
    """HBM bytes re-read by ``sharers`` programs that each read the same rows (``shared``:
    their bytes over all the grid's row blocks), ``gap`` programs apart in dispatch order,
    the programs in between touching ``between`` bytes. Closer than one program per SM,
    they run together and the rows come from HBM once; farther apart, each later sharer
    reads them again once ``between`` exceeds the L2."""
    if gap < gpu.sms or between <= gpu.l2:
        return 0.0
    return (sharers - 1) * shared


# --------------------------------------------------------------------------- Triton plans


def visual_costs(case: Case, e: int, w: int, gpu: GPU, backward: bool) -> list[Cost]:
    """Per-launch costs of the visual op (``e``/``w``: bytes of x's and the weights' dtype)."""
    B, (H, W), D = case.batch, case.grid, case.dim
    h, T, P = D // 4, case.batch * H * W, case.tokens - H * W
    wdt = torch.bfloat16 if w == 2 else torch.float32
    if backward:
        plan = visual_bwd_plan(B, H, W, D, h, wdt, gpu.sms, True,
                               recompute_u=D < SAVE_U_MIN_DIM)
    else:
        plan = visual_fwd_plan(B, H, W, D, h, wdt, gpu.sms, True)
    out = []
    for st in plan:
        if st.step in ("dw", "reduce"):   # dWu = dy^T s and dWd^T = t^T du (and the sums);
            #                               the one reduction (DW_IN_DX)
            out.append(_atb_cost(st, T, D, h, e, w) if st.step == "dw" else _reduce_cost(st, w))
            continue
        m = st.meta
        BT, BH, BD = m["BLOCK_T"], m["BLOCK_H"], m["BLOCK_D"]
        Tp = _pad(T, BT)              # row blocks run over all images' grid tokens
        hp, Dp = _pad(h, BH), _pad(D, BD)
        nprog = 1
        for g in st.grid:
            nprog *= g
        c = Cost(st.kernel, st.grid)
        tok, hid = T * D * e, T * h * w
        if st.step == "down":
            c.hbm, c.flops = tok + hid + h * D * w, 2 * Tp * Dp * hp
            c.l2 = nprog * (BT * Dp * e + Dp * BH * w)
            n_t, n_h = _cdiv(T, BT), _cdiv(h, BH)     # a row block's x shared by its n_h
            if not m["CHUNK_FASTEST"]:
                c.hbm += order_misses(tok, n_h, n_t, n_t * BT * D * e, gpu)
        elif st.step == "dv":         # dv = (dy Wu) * gelu'(v), one [BT, BH] tile of depth D
            n_t, n_h = _cdiv(T, BT), _cdiv(h, BH)   # per program, in place over gelu'(v)
            c.hbm = tok + 2 * hid + D * h * w
            c.flops = 2 * Tp * Dp * hp
            # per tile: its rows of dy and Wu's columns over D, gelu'(v) read, dv written
            c.l2 = n_t * n_h * (BT * Dp * e + Dp * BH * w + 2 * BT * BH * w)
            if not m["CHUNK_FASTEST"]:                # a row block's dy shared by its n_h
                c.hbm += order_misses(tok, n_h, n_t, n_t * BT * D * e, gpu)
        elif st.step == "dwconv_t":   # du = dwconv^T(dv): dv in, du out (operand dtype);
            dwm = int(m["DWM"])       # with DWM also dWm from dv and u's taps, R slots
            c.hbm = (2 + dwm) * hid + dwm * st.grid[0] * h * 9 * 4
            c.flops = (1 + dwm) * 2 * 9 * Tp * hp
            # per (row block, h chunk): dv's taps (L1 after the first), du stored, u's taps
            c.l2 = _cdiv(T, BT) * _cdiv(h, BH) * (
                (stencil_rows(BT, W) + BT + dwm * stencil_rows(BT, W)) * BH * w)
        elif st.step == "fwd":        # S programs over the blocks: (u of the block and its
            keep = m["KEEP_Y"]        # halo,) s = gelu(dwconv(u)), then two sweeps; sweep 2
            blocks = _cdiv(T, BT)     # reads y back: the kept buffer (KEEP_Y) or the
            ysc = not keep            # program's scratch
            zsweep = BT * Dp * e + _cdiv(D, BD) * BT * hp * w + Dp * hp * w
            # x read, out written, u read (or written by the fused down phase), the per-
            # program scratch (s and the halo's u, reused block after block: written back once)
            rows = BT + halo_chunks(W, m) * m["BLOCK_E"]
            # (and y's scratch, when sweep 2 reads y from it: likewise written back once)
            c.hbm = (2 * tok + hid + 2 * B * P * D * e + D * h * w + 8 * T + keep * tok
                     + st.grid[0] * (rows * h * w + ysc * BT * D * e)
                     + m["FUSE_DOWN"] * h * D * w)
            # PARTS: each part of a block computes s again (its stencil), writes its
            # statistics and the last part reads them all back
            parts = m.get("PARTS", 1)
            c.flops = 2 * Tp * Dp * hp + parts * 2 * 9 * Tp * hp
            c.l2 = blocks * (zsweep + 3 * BT * Dp * e
                             + parts * (stencil_rows(BT, W) + BT) * hp * w
                             + (parts > 1) * 2 * parts * BT * 8)
            c.hbm += (parts > 1) * 2 * parts * T * 8
            # sweep 2 (reversed) re-reads the block's x and y after sweep 1 touched both
            res = _cdiv(min(st.grid[0], gpu.sms), parts)    # blocks resident at once
            c.hbm += resweep_misses(T * D * 2 * e, res * BT * D * 2 * e, gpu.l2, m["ALTERNATE"])
            if m["FUSE_DOWN"]:        # the down GEMM over the block and its halo
                ext = rows - BT
                c.flops += 2 * blocks * ext * Dp * hp
                c.l2 += blocks * (ext * (_cdiv(h, BH) * Dp * e + 2 * hp * w) + Dp * hp * w)
        elif st.step == "dy":         # per block: s, two sweeps recomputing z (dy written),
            BHV = m["BLOCK_HV"]       # then (DV) dv = (Wu^T dy) gelu'(v) and dWm, h in BHV
            dv = int(m["DV"])         # chunks (else the dv launch does)
            slots, blocks = st.grid[0], _cdiv(T, BT)     # S programs loop over the blocks
            keep = m["KEEP_Y"]        # y read instead of x and z recomputed, both sweeps
            c.hbm = (3 * tok + (3 + dv) * hid + (dv or not keep) * D * h * w + 8 * T
                     + slots * (2 * D + 9 * h * dv) * 4)
            if m["DW"]:               # dy and s only in a per-program scratch (the dx kernel
                c.hbm += slots * BT * (h * w + D * e) + 8 * T - tok - hid   # recomputes them)
            c.flops = (((0 if keep else 2) + dv) * 2 * Tp * Dp * hp
                       + (1 + 2 * dv) * 2 * 9 * Tp * hp)
            zs = 0 if keep else _cdiv(D, BD) * BT * hp * w + Dp * hp * w
            # (the stencils: s's, and per h chunk v's and dWm's taps over the same u rows)
            c.l2 = blocks * (2 * (2 * BT * Dp * e + zs)
                             + (1 + dv) * (stencil_rows(BT, W) + BT) * hp * w)
            if dv:                    # the dv phase: dy re-read per h chunk, Wu once per block
                c.l2 += blocks * (_cdiv(h, BHV) * BT * Dp * e + Dp * hp * w)
            else:                     # dy and gelu'(v) written, for the dv launch
                c.l2 += blocks * BT * (Dp * e + hp * w)
            # sweep 2 (reversed) re-reads the block's y (or x) and g, then each of the dv
            # phase's sweeps (one per BLOCK_HV columns of h, alternating) its dy rows
            res, alt = min(st.grid[0], gpu.sms), m["ALTERNATE"]
            c.hbm += resweep_misses(T * D * 2 * e, res * BT * (D * 2 * e + (not keep) * h * w),
                                    gpu.l2, alt)
            if dv:
                c.hbm += _cdiv(h, BHV) * resweep_misses(T * D * e, res * BT * D * e, gpu.l2, alt)
        elif st.step == "dx":         # per (row block, D chunk): dx = g + xs (dy + Wd^T du)
            blocks, n_d = _cdiv(T, BT), _cdiv(D, BD)    # grid: row programs x D chunks
            rows = st.grid[0] // n_d
            c.hbm = 3 * tok + hid + h * D * w + 2 * B * P * D * e
            if not m["CHUNK_FASTEST"]:                # a row block's du shared by its n_d
                c.hbm += order_misses(hid, n_d, rows, rows * BT * (h * w + 3 * BD * e), gpu)
            c.flops = 2 * Tp * Dp * hp
            c.l2 = blocks * n_d * (3 * BT * BD * e + BT * hp * w + hp * BD * w)
            if m["DW"]:               # dy recomputed (s from u, z = Wu s: x and the row
                HP = m["BLOCK_HP"]    # constants read, not dy), both weight gradients summed
                c.hbm += (hid + 16 * T + D * h * w + 2 * rows * D * h * 4
                          + st.grid[0] * BT * HP * w)            # + the s scratch, once
                # z = Wu s in BLOCK_H chunks (s read back from the scratch chunk by chunk);
                # the two weight-gradient products on the [.., BLOCK_HP] accumulators
                c.flops += 2 * 2 * Tp * Dp * HP + 2 * Tp * Dp * hp + n_d * 2 * 9 * Tp * HP
                c.l2 += blocks * n_d * ((stencil_rows(BT, W) + 3 * BT) * HP * w + BT * hp * w
                                        + HP * BD * w + 16 * BT)
        out.append(c)
    return out


def _atb_cost(st, M, I, J, ea, eb, colsum=False) -> Cost:
    """``_atb_kernel`` over ``a [M, I]`` (``ea`` bytes) and ``b [M, J]`` (``eb`` bytes):
    both read once from HBM, float32 partial slots written; every program loads its
    chunk's ``[rows, BLOCK_I]`` and ``[rows, BLOCK_J]`` tiles. A ``PAIR`` launch is two such
    products (its grid's third axis counts both halves' splits). With ``REDUCE`` the launch
    also sums: every slot read back once by its tile's last split, each output written once
    in the weights' dtype (``eb`` bytes), and the other partial buffers of the launch's
    ``work`` summed as :func:`_reduce_cost` sums them."""
    m = st.meta
    gi, gj = st.grid[:2]
    splits = m["SPLITS"]
    n = 2 if m.get("PAIR") else 1
    Mp = _pad(M, m["BLOCK_K"])
    c = Cost(st.kernel, st.grid)
    sizes = (I * J, I + J) if n == 2 else (I * J, I)      # each product, its column sums
    slots = n * splits * I * J * 4 + (splits * sizes[1] * 4 if colsum else 0)
    c.hbm = n * M * (I * ea + J * eb) + slots
    c.flops = n * 2 * Mp * gi * m["BLOCK_I"] * gj * m["BLOCK_J"]
    c.l2 = n * gi * gj * Mp * (m["BLOCK_I"] * ea + m["BLOCK_J"] * eb)
    if m.get("REDUCE"):
        outs = n * I * J + (sizes[1] if colsum else 0)
        c.hbm += slots + outs * eb + sum(s * k * 4 + k * eb for s, k in st.work)
        c.l2 += slots + outs * eb + sum(s * k * 4 + k * eb for s, k in st.work)
        c.flops += n * splits * I * J + sum(s * k for s, k in st.work)
    return c


def _reduce_cost(st, w) -> Cost:
    """``_reduce_partials_kernel``: every float32 slot read once, each output written once."""
    c = Cost(st.kernel, st.grid)
    c.hbm = c.l2 = sum(slots * n * 4 + n * w for slots, n in st.work)
    c.flops = sum(slots * n for slots, n in st.work)
    return c


def _rows_costs(plan, M, D, Hd, e, w, sweeps, gemms) -> list[Cost]:
    """Token-wise ops: row kernel (``sweeps`` token tensors read/written, ``gemms`` GEMM
    passes of M x D x hidden), the atb pair (both weights' split-K partials and every sum)."""
    out = []
    for st in plan:
        m = st.meta
        if st.kernel == "_atb_kernel":    # the pair: dy or g [M, D] with a, x with du
            colsum = "BLOCK_R" in plan[0].meta          # low-rank: bias gradients too
            out.append(_atb_cost(st, M, D, Hd, e, w, colsum))
            continue
        if st.step == "reduce":
            out.append(_reduce_cost(st, w))
            continue
        c = Cost(st.kernel, st.grid)
        BM, BH = m["BLOCK_M"], m.get("BLOCK_H", m.get("BLOCK_R"))
        Mp = _pad(M, BM)
        c.hbm = sweeps[0] * M * D * e + sweeps[1] * M * Hd * w + 2 * Hd * D * w
        c.flops = gemms * 2 * Mp * D * BH
        c.l2 = st.grid[0] * (gemms * (BM * D * e + BH * D * w))
        out.append(c)
    return out


def _text_fused_costs(plan, M, D, Hd, e, w) -> list[Cost]:
    """The text backward up to ``FUSED_DW_MAX_H``: the row kernel (``du``), the dx kernel
    that sums the parameter gradients (``dx``, the last program of each D chunk summing
    its slots). L2->SM counts every program's loads and stores of its tiles."""
    out = []
    for st in plan:
        m, c = st.meta, Cost(st.kernel, st.grid)
        BH = m["BLOCK_H"]
        if st.step == "du":       # u, then two sweeps over D (y each; dy and da in the second)
            BM, BN = m["BLOCK_M"], m["BLOCK_N"]
            Mp, Dp = _pad(M, BM), _pad(D, BN)
            # x, g read; a, du written; mean, rstd read, c1, c2 written; both weights
            c.hbm = 2 * M * D * e + 2 * M * Hd * w + 16 * M + 2 * Hd * D * w
            c.flops = 4 * 2 * Mp * Dp * BH                 # u, y twice, da
            # per program: x three times (u, sweep 1, sweep 2), g twice, W_d once and W_u
            # once per sweep (sweep 2's tile serves y and da); a, du, the row values
            c.l2 = st.grid[0] * (5 * BM * Dp * e + 3 * BH * Dp * w + 2 * BM * BH * w + 16 * BM)
        else:                     # dx: per (row block, D chunk) y, dy, dx and the four sums
            BT, BD = m["BLOCK_M"], m["BLOCK_D"]
            n_s, n_d = st.grid
            blocks = _cdiv(M, BT)
            Mp, Dp = blocks * BT, n_d * BD
            # x, g read, dx written; a, du read; mean, rstd, c1, c2 read; both weights;
            # the float32 slots of dW_u, dW_d, dw, db written once per row program
            # (and read back by each chunk's last program, which writes the four gradients)
            slots = n_s * (2 * D * Hd + 2 * D) * 4
            sums = slots + (2 * D * Hd + 2 * D) * w
            c.hbm = 3 * M * D * e + 2 * M * Hd * w + 16 * M + 2 * Hd * D * w + slots + sums
            c.flops = 4 * 2 * Mp * Dp * BH                 # y, du W_d, dy^T a, du^T x
            # per block: the x, g, dx tiles, a and du (every D chunk re-reads them), the row
            # values; per program: its slot, and its W_u and W_d tiles, loaded once (per
            # block with float32 operands, whose FMA products would spill them)
            tiles = 2 * BH * BD * w
            c.l2 = (blocks * n_d * (3 * BT * BD * e + 2 * BT * BH * w + 16 * BT
                                    + (tiles if w == 4 else 0))
                    + n_s * n_d * ((0 if w == 4 else tiles) + (2 * BD * BH + 2 * BD) * 4)
                    + sums)
        out.append(c)
    return out


def token_costs(case: Case, e: int, w: int, gpu: GPU, backward: bool) -> list[Cost]:
    M, D = case.batch * case.tokens, case.dim
    wdt = torch.bfloat16 if w == 2 else torch.float32
    if case.op == "heba_text":
        Hd = D // 4
        plan = text_plan(M, D, Hd, wdt, gpu.sms, True, backward)
        if backward and plan[0].step == "du":
            return _text_fused_costs(plan, M, D, Hd, e, w)
        # forward: x read per sweep (down, stats, out), out written; backward (h above
        # FUSED_DW_MAX_H): x, g read, dy written and read, dx written; a and du written
        sweeps, gemms = ((2, 0), 3) if not backward else ((5, 2), 5)
    else:
        Hd = case.rank
        plan = low_rank_plan(M, D, Hd, wdt, gpu.sms, True, backward)
        sweeps, gemms = ((2, 0), 2) if not backward else ((3, 2), 3)
    return _rows_costs(plan, M, D, Hd, e, w, sweeps, gemms)


def triton_costs(case, e, w, gpu, backward):
    fn = visual_costs if case.op == "heba_visual" else token_costs
    return fn(case, e, w, gpu, backward)


# --------------------------------------------------------------------------- CUDA plan

_CPP_DTYPES = {"Float": torch.float32, "Half": torch.float16, "BFloat16": torch.bfloat16,
               "Double": torch.float64}
_PLAN_FIELDS = 13        # ints per launch in heba::_cuda_launch_plan's answer
GEMM_TILE = 128          # the L2 rule's cuBLAS output tile (bf16 GEMMs: 128 x 128 and up)


@dataclass(frozen=True)
class CudaLaunch:
    """One launch of the CUDA backend as csrc/ops.cpp plans it: a heba kernel (name and
    dims from csrc/launch_dims.h), a cuBLAS GEMM (``[m, k] @ [k, n]``) or an ATen op
    (grid and block 0: chosen by ATen); bytes read and written, each tensor once."""
    kernel: str
    dtype: torch.dtype
    grid: tuple
    block: tuple
    m: int
    n: int
    k: int
    numel: int
    read: int
    written: int
    flops: int


def cuda_plan(op: str, backward: bool, shape, hidden: int, x_dtype=torch.bfloat16,
              w_dtype=torch.bfloat16, num_prefix_tokens: int = 0, grid=(), bias: bool = False,
              sms: int = 132) -> list[CudaLaunch]:
    """The launches of one ``heba::cuda_<op>_{fwd,bwd}`` call, in order, from the C++ plan
    ``heba::_cuda_launch_plan`` (host only, runs without a GPU). ``shape``: x's
    (``[B, N, D]`` batch-first for heba_visual, with ``grid = (H, W)``); ``hidden``: the
    bottleneck or the rank; ``bias``: low-rank with biases. Raises RuntimeError when the
    extension heba_kernels._C is not built.

    >>> [l.kernel for l in cuda_plan("low_rank", False, (2, 9, 32), 16)]
    ['_low_rank_fwd_kernel']
    """
    from heba_kernels import _extension
    ok, why = _extension.prebuilt()
    if not (ok or _extension.loaded()):
        raise RuntimeError(why)
    names, dtypes, f = torch.ops.heba._cuda_launch_plan(
        op, backward, list(shape), hidden, x_dtype, w_dtype, num_prefix_tokens, list(grid),
        bias, sms)
    out = []
    for i, (name, dt) in enumerate(zip(names, dtypes)):
        v = f[i * _PLAN_FIELDS:(i + 1) * _PLAN_FIELDS]
        out.append(CudaLaunch(name, _CPP_DTYPES[dt], tuple(v[0:3]), tuple(v[3:6]), *v[6:]))
    return out


def _case_cuda_plan(case: Case, e: int, w: int, gpu: GPU, backward: bool) -> list[CudaLaunch]:
    dt = {2: torch.bfloat16, 4: torch.float32}
    if case.op == "heba_visual":
        H, W = case.grid
        return cuda_plan(case.op, backward, case.shape(), case.dim // 4, dt[e], dt[w],
                         case.tokens - H * W, (H, W), sms=gpu.sms)
    hidden = case.rank if case.op == "low_rank" else case.dim // 4
    return cuda_plan(case.op, backward, case.shape(), hidden, dt[e], dt[w],
                     bias=case.op == "low_rank", sms=gpu.sms)


def cuda_costs(case: Case, e: int, w: int, gpu: GPU, backward: bool) -> list[Cost]:
    """Per-launch costs of the CUDA backend's op (``e``/``w``: bytes of x's and the
    weights' dtype), one :class:`Cost` per launch of :func:`cuda_plan` (low-rank with
    biases, as ``heba.nn.LowRankAdapter`` by default). HBM: the plan's bytes (every
    tensor a launch touches read or written once); FLOPs: ``2 m n k`` per GEMM, the
    stencil's taps and the fused low-rank kernel's projections (elementwise arithmetic
    not counted). L2->SM: a GEMM loads, per ``GEMM_TILE`` x ``GEMM_TILE`` output tile,
    its ``[tile, k]`` and ``[k, tile]`` operand panels; any other launch moves its HBM
    bytes once more (its row re-reads assumed to hit L1)."""
    out = []
    for ln in _case_cuda_plan(case, e, w, gpu, backward):
        c = Cost(ln.kernel, ln.grid, hbm=float(ln.read + ln.written), flops=float(ln.flops))
        if ln.kernel == "gemm":
            tm, tn = min(ln.m, GEMM_TILE), min(ln.n, GEMM_TILE)
            tiles = _cdiv(ln.m, tm) * _cdiv(ln.n, tn)
            c.l2 = float(tiles * (tm + tn) * ln.k * ln.dtype.itemsize)
        else:
            c.l2 = c.hbm
        out.append(c)
    return out


# --------------------------------------------------------------------------- ideal and eager


def ideal(case: Case, e: int) -> tuple[float, float]:
    """``(bytes, FLOPs)`` of forward + backward at the floor."""
    M, D = case.batch * case.tokens, case.dim
    hid = case.rank if case.op == "low_rank" else D // 4
    return 5 * M * D * e, 6 * 2 * M * D * hid


class _Counter(TorchDispatchMode):
    """Counts aten ops and the bytes of their tensor inputs and outputs (meta tensors)."""

    def __init__(self):
        super().__init__()
        self.ops, self.bytes = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.name().startswith(("aten::view", "aten::_unsafe_view", "aten::t.",
                                   "aten::detach", "aten::expand", "aten::permute",
                                   "aten::transpose", "aten::reshape", "aten::alias",
                                   "aten::unsqueeze", "aten::squeeze", "aten::slice",
                                   "aten::select", "aten::as_strided")):
            return out                 # views move no data and launch nothing
        self.ops += 1
        flat = list(args) + list((kwargs or {}).values()) + \
            (list(out) if isinstance(out, (tuple, list)) else [out])
        self.bytes += sum(t.numel() * t.element_size() for t in flat
                          if isinstance(t, torch.Tensor))
        return out


def eager(case: Case, dtype=torch.bfloat16) -> tuple[int, float]:
    """``(aten ops, bytes)`` of the reference backend's forward + backward on meta tensors."""
    import heba.nn
    from benchmarks.cases import SCALE
    if case.op == "low_rank":
        m = heba.nn.LowRankAdapter(case.dim, case.rank, backend="reference")
    else:
        m = heba.nn.HeBAAdapter(case.dim, modality="visual" if case.op == "heba_visual"
                                else "text", backend="reference")
    m = m.to("meta", dtype)
    x = torch.empty(case.shape(), device="meta", dtype=dtype, requires_grad=True)
    with _Counter() as cnt:
        out = m(x) if case.op == "low_rank" else m(x, scale=SCALE)
        out.backward(torch.empty_like(out))
    return cnt.ops, float(cnt.bytes)


# --------------------------------------------------------------------------- table


def rows(cases=CASES, gpus=("H100", "H200"), e=2, w=2):
    """One dict per (case, backend): modelled launches, bytes, FLOPs and floors (µs)."""
    out = []
    for case in cases:
        costs = triton_costs(case, e, w, GPUS["H200"], False) + \
            triton_costs(case, e, w, GPUS["H200"], True)
        ib, ifl = ideal(case, e)
        n_eager, eb = eager(case)
        row = dict(case=case.name, launches=len(costs), triton_launches=sum(
            not c.kernel.startswith("torch") for c in costs),
            hbm=sum(c.hbm for c in costs), l2=sum(c.l2 for c in costs),
            flops=sum(c.flops for c in costs), ideal_bytes=ib, ideal_flops=ifl,
            eager_ops=n_eager, eager_bytes=eb)
        for g in gpus:
            gpu = GPUS[g]
            row[f"floor_{g}"] = sum(c.floor_s(gpu) for c in costs) * 1e6
            row[f"ideal_{g}"] = max(ib / gpu.hbm, ifl / gpu.bf16) * 1e6
            row[f"eager_{g}"] = max(eb / gpu.hbm, ifl / gpu.bf16) * 1e6
        row.update(_cuda_row(case, e, w, gpus))
        out.append(row)
    return out


def _cuda_row(case, e, w, gpus) -> dict:
    """The CUDA backend's fields of a :func:`rows` row (``cuda_*``); ``cuda_why`` and no
    numbers where the extension is not built."""
    try:
        costs = cuda_costs(case, e, w, GPUS["H200"], False) + \
            cuda_costs(case, e, w, GPUS["H200"], True)
    except RuntimeError as err:
        return dict(cuda_why=str(err))
    row = dict(cuda_launches=len(costs),
               cuda_heba_launches=sum(c.kernel.startswith("_") for c in costs),
               cuda_hbm=sum(c.hbm for c in costs), cuda_l2=sum(c.l2 for c in costs),
               cuda_flops=sum(c.flops for c in costs))
    for g in gpus:
        row[f"cuda_floor_{g}"] = sum(c.floor_s(GPUS[g]) for c in costs) * 1e6
    return row


# SM counts by device name (torch.cuda.get_device_name), first match wins; others: 132.
# Only for rows that did not record their device's SM count (``sms``).
DEVICE_SMS = (("H100 PCIe", 114), ("H100", 132), ("H200", 132), ("A100", 108))
MODES = ("fwd", "fwdbwd")


def measured_gpu(row: dict, sms: int | None = None, l2: float | None = None) -> GPU | None:
    """A :class:`GPU` whose ceilings are a benchmark run's own measured floors (a row of
    benchmarks/test_adapters.py: ``measured_copy_gbs``, ``measured_matmul_tflops``,
    ``measured_l2_gbs``, ``device``, ``sms``, ``l2_bytes``); SMs from the argument, else the
    row's own count, else the device name, else 132; the L2 size from the argument, else the
    row's, else 50 MB; the L2-to-SM bandwidth the row's where it measured one (finite,
    positive), else :data:`HOPPER_L2_BW`. None where the run measured no finite, positive
    copy and matmul rates (a dry run on the CPU)."""
    hbm = float(row.get("measured_copy_gbs") or 0.0) * 1e9
    bf16 = float(row.get("measured_matmul_tflops") or 0.0) * 1e12
    if not (0 < hbm < float("inf") and 0 < bf16 < float("inf")):
        return None
    name = str(row.get("device") or "unknown")
    if sms is None:
        sms = row.get("sms") or next((n for key, n in DEVICE_SMS if key in name), 132)
    l2 = l2 or row.get("l2_bytes") or GPU.l2
    l2_bw = float(row.get("measured_l2_gbs") or 0.0) * 1e9
    if not 0 < l2_bw < float("inf"):
        l2_bw = GPU.l2_bw
    return GPU(f"{name} (measured)", hbm, bf16, sms, float(l2), l2_bw)


def modelled_floor_ms(case_name: str, mode: str, dtype: str, gpu: GPU, impl: str = "triton",
                      shape=None, cases=CASES) -> float | None:
    """The modelled floor in ms of the Triton backend on ``gpu`` for the case named
    ``case_name`` of ``cases``: the forward's launches for ``mode`` "fwd", forward +
    backward for "fwdbwd", bf16 tokens and weights. None where the model does not apply:
    another dtype or ``impl``, an unknown case, or a ``shape`` other than the case's."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    case = next((c for c in cases if c.name == case_name), None)
    if dtype != "bf16" or impl != "triton" or case is None:
        return None
    if shape is not None and tuple(shape) != case.shape():
        return None
    costs = triton_costs(case, 2, 2, gpu, False)
    if mode == "fwdbwd":
        costs = costs + triton_costs(case, 2, 2, gpu, True)
    return sum(c.floor_s(gpu) for c in costs) * 1e3


def markdown(rs, gpus=("H100", "H200")) -> str:
    head = ("| case (fwd+bwd, bf16) | backend | launches (Triton + torch) | HBM MB (x ideal) "
            "| GFLOP issued (x ideal) | L2->SM GB | "
            + " | ".join(f"modelled floor {g} µs (ideal / eager)" for g in gpus) + " |")
    lines = ["Modelled, not measured (benchmarks/roofline.py; datasheet bandwidth and dense "
             "bf16 rates, the L2's bandwidth a lead; the ideal and eager floors count HBM "
             "and FLOPs only).", "", head, "|" + "---|" * (6 + len(gpus))]
    for r in rs:
        floors = " | ".join(f"{r[f'floor_{g}']:.0f} ({r[f'ideal_{g}']:.0f} / "
                            f"{r[f'eager_{g}']:.0f})" for g in gpus)
        lines.append(
            f"| {r['case']} | triton | {r['launches']} ({r['triton_launches']} + "
            f"{r['launches'] - r['triton_launches']}) | {r['hbm'] / 1e6:.0f} "
            f"({r['hbm'] / r['ideal_bytes']:.2f}x) | {r['flops'] / 1e9:.1f} "
            f"({r['flops'] / r['ideal_flops']:.2f}x) | {r['l2'] / 1e9:.1f} | {floors} |")
        lines.append(f"| {r['case']} | reference (eager) | {r['eager_ops']} aten ops | "
                     f"{r['eager_bytes'] / 1e6:.0f} | - | - | "
                     + " | ".join("-" for _ in gpus) + " |")
        lines.append(_cuda_line(r, gpus))
    return "\n".join(lines)


def _cuda_line(r, gpus) -> str:
    if "cuda_launches" not in r:
        return (f"| {r['case']} | cuda | not modelled ({r['cuda_why']}) | - | - | - | "
                + " | ".join("-" for _ in gpus) + " |")
    n, heba = r["cuda_launches"], r["cuda_heba_launches"]
    floors = " | ".join(f"{r[f'cuda_floor_{g}']:.0f}" for g in gpus)
    return (f"| {r['case']} | cuda | {n} ({heba} + {n - heba}) | {r['cuda_hbm'] / 1e6:.0f} "
            f"({r['cuda_hbm'] / r['ideal_bytes']:.2f}x) | {r['cuda_flops'] / 1e9:.1f} "
            f"({r['cuda_flops'] / r['ideal_flops']:.2f}x) | {r['cuda_l2'] / 1e9:.1f} | {floors} |")


def launch_table(cases, gpu: GPU, e: int = 2, w: int = 2) -> str:
    """Per case, every Triton launch of the forward and the backward on ``gpu``: its grid,
    programs and waves (programs per SM, at one resident program per SM: a launch of 1.1
    waves runs a second, mostly empty round, which the floor does not price), HBM and
    L2->SM bytes, FLOPs, the floor and the ceiling that sets it."""
    out = [f"Per launch, modelled on the {gpu.name} ({gpu.sms} SMs), bf16:"]
    for case in cases:
        out += ["", f"{case.name} {list(case.shape())}:", "",
                "| pass | kernel | grid | programs | waves | HBM MB | L2->SM MB | GFLOP | "
                "floor µs | bound |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for backward in (False, True):
            for c in triton_costs(case, e, w, gpu, backward):
                n = c.programs()
                out.append(f"| {'bwd' if backward else 'fwd'} | {c.kernel} | {c.grid} | {n} | "
                           f"{n / gpu.sms:.2f} | {c.hbm / 1e6:.1f} | {c.l2 / 1e6:.1f} | "
                           f"{c.flops / 1e9:.2f} | {c.floor_s(gpu) * 1e6:.1f} | "
                           f"{c.bound(gpu)} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", default="H100,H200", help="comma-separated names of GPUS")
    ap.add_argument("--batch", type=int, default=0,
                    help="run every case at this batch instead of its own (16: the published "
                         "recipe's)")
    ap.add_argument("--launches", action="store_true",
                    help="also list every launch of each case on the last of --gpus")
    args = ap.parse_args(argv)
    gpus = tuple(g for g in args.gpus.split(",") if g)
    for g in gpus:
        if g not in GPUS:
            ap.error(f"--gpus: unknown GPU {g!r}; expected some of {', '.join(GPUS)}")
    if not gpus:
        ap.error("--gpus: expected at least one GPU name")
    if args.batch < 0:
        ap.error(f"--batch: expected a positive batch (or 0 for each case's own), got "
                 f"{args.batch}")
    cases = [dataclasses.replace(c, batch=args.batch) if args.batch else c for c in CASES]
    print(markdown(rows(cases, gpus=gpus), gpus))
    if args.launches:
        print("\n" + launch_table(cases, GPUS[gpus[-1]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
