"""The roofline model's launch plans are the launchers' own: a launch recorder over a real
forward + backward in the interpreter sees exactly the modelled launches."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import heba.nn
from benchmarks import roofline
from benchmarks.cases import CASES, Case
from heba_kernels import runtime
from heba_kernels.heba_text import text_plan
from heba_kernels.heba_visual import SAVE_U_MIN_DIM, visual_bwd_plan, visual_fwd_plan
from heba_kernels.low_rank import low_rank_plan
from tests.helpers import requires_triton_cpu


def _recorded(module, x, **kw):
    with runtime.record_launches() as rec:
        out = module(x, **kw)
        out.backward(torch.randn_like(out))
    return rec


def _names(plan):
    return [(st.kernel, tuple(st.grid)) for st in plan]


@requires_triton_cpu
@pytest.mark.parametrize("B,H,W,D", [(3, 3, 5, 40), (2, 4, 4, 24)], ids=["B3-H3-W5-D40",
                                                                      "B2-H4-W4-D24"])
def test_visual_plan_is_what_runs(B, H, W, D):
    torch.manual_seed(0)
    m = heba.nn.HeBAAdapter(D, modality="visual", grid=(H, W), backend="triton")
    x = torch.randn(B, 1 + H * W, D, requires_grad=True)
    rec = _recorded(m, x, scale=0.5)
    plan = visual_fwd_plan(B, H, W, D, D // 4, torch.float32, 1, False) + \
        visual_bwd_plan(B, H, W, D, D // 4, torch.float32, 1, False,
                        recompute_u=D < SAVE_U_MIN_DIM)
    assert rec == _names(plan)


@requires_triton_cpu
@pytest.mark.parametrize("op", ["heba_text", "low_rank"])
def test_token_plans_are_what_runs(op):
    torch.manual_seed(0)
    M, D, hid = 2 * 7, 32, 8
    if op == "heba_text":
        m = heba.nn.HeBAAdapter(D, modality="text", backend="triton")
        plan_fn, kw = text_plan, dict(scale=0.5)
    else:
        m = heba.nn.LowRankAdapter(D, hid, init="small", backend="triton")
        plan_fn, kw = low_rank_plan, {}
    hid = D // 4 if op == "heba_text" else hid
    rec = _recorded(m, torch.randn(2, 7, D, requires_grad=True), **kw)
    plan = plan_fn(M, D, hid, torch.float32, 1, False, False) + \
        plan_fn(M, D, hid, torch.float32, 1, False, True)
    assert rec == _names(plan)


def test_table_lists_every_case_and_says_modelled():
    cases = [Case("v", "heba_visual", 2, 17, 64, grid=(4, 4)), Case("t", "heba_text", 2, 9, 32),
             Case("l", "low_rank", 2, 9, 32, rank=16)]
    rs = roofline.rows(cases)
    md = roofline.markdown(rs)
    assert md.startswith("Modelled, not measured")
    for c in cases:
        assert f"| {c.name} | triton |" in md and f"| {c.name} | reference (eager) |" in md
    for r in rs:   # issued work never below the floor's
        assert r["hbm"] >= r["ideal_bytes"] and r["flops"] >= r["ideal_flops"] * 0.99, r
        # the H200's faster HBM, the same matrix rate and L2: never slower
        assert r["eager_ops"] > 0 and r["floor_H200"] <= r["floor_H100"]
        assert r["ideal_H200"] < r["ideal_H100"]


def test_unknown_gpu_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        roofline.main(["--gpus", "A1"])
    assert info.value.code == 2 and "unknown GPU 'A1'" in capsys.readouterr().err


def test_launch_table_at_the_published_batch(capsys):
    """``--batch 16 --launches``: the cases at the published recipe's batch, then every
    launch of each with its grid, programs, waves on the GPU's SMs, bytes, FLOPs and floor,
    launch by launch the costs the table sums."""
    assert roofline.main(["--gpus", "H200", "--batch", "16", "--launches"]) == 0
    out = capsys.readouterr().out
    assert "Per launch, modelled on the H200 SXM (132 SMs)" in out
    gpu = roofline.GPUS["H200"]
    for case in roofline.CASES:
        c16 = dataclasses.replace(case, batch=16)
        assert f"{case.name} {list(c16.shape())}:" in out
        for backward in (False, True):
            for c in roofline.triton_costs(c16, 2, 2, gpu, backward):
                n = c.programs()
                assert (f"| {'bwd' if backward else 'fwd'} | {c.kernel} | {c.grid} | {n} | "
                        f"{n / gpu.sms:.2f} | {c.hbm / 1e6:.1f} |") in out
    assert f"| {roofline.CASES[0].name} | triton |" in out


def test_bad_batch_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        roofline.main(["--batch", "-3"])
    assert info.value.code == 2 and "--batch: expected a positive batch" in \
        capsys.readouterr().err


class _Ops(TorchDispatchMode):
    """The ops dispatched outside heba's custom ops (each custom op counts as one)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.name())
        return func(*args, **(kwargs or {}))


@requires_triton_cpu
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
@pytest.mark.parametrize("op", ["heba_visual", "heba_text", "low_rank"])
def test_fused_ops_launch_nothing_beside_their_plan(op, autocast):
    # No torch sum, cast, multiplication or zero-filled gradient around the kernels: a
    # forward + backward dispatches the two custom ops (whose launches the plans list)
    # and detaches only; under autocast the float32 weights go in as they are (the
    # kernels round them) and their gradients come out float32, so no casts either.
    torch.manual_seed(0)
    if op == "heba_visual":
        m, x, kw = heba.nn.HeBAAdapter(24, grid=(4, 4), backend="triton"), \
            torch.randn(2, 17, 24), dict(scale=0.5)
    elif op == "heba_text":
        m, x, kw = heba.nn.HeBAAdapter(32, modality="text", backend="triton"), \
            torch.randn(2, 7, 32), dict(scale=0.5)
    else:
        m, x, kw = heba.nn.LowRankAdapter(32, 8, init="small", backend="triton"), \
            torch.randn(2, 7, 32), {}
    x.requires_grad_(True)
    g = torch.randn_like(x)
    with _Ops() as seen, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        m(x, **kw).backward(g)
    others = [o for o in seen.ops if not o.startswith("heba::") and o != "aten::detach"]
    assert others == [] and len([o for o in seen.ops if o.startswith("heba::")]) == 2, seen.ops
    assert all(p.grad.dtype == torch.float32 for p in m.parameters())


# an odd GPU: its rates, SM count and L2 bandwidth differ from every entry of roofline.GPUS
ODD = roofline.GPU("odd", 2.7e12, 6.1e14, 100, l2_bw=7.3e12)


def _launch_floors_ms(case, gpu, backward):
    """Each launch's max(HBM bytes / bandwidth, FLOPs / rate, L2->SM bytes / L2 bandwidth),
    the rate and the L2's bandwidth of the SMs its programs occupy, summed, in ms."""
    out = 0.0
    for c in roofline.triton_costs(case, 2, 2, gpu, backward):
        n = math.prod(c.grid)
        active = min(n, gpu.sms)
        out += max(c.hbm / gpu.hbm, c.flops / (gpu.bf16 * active / gpu.sms),
                   c.l2 / min(gpu.l2_bw, active * gpu.l2_bw_sm))
    return 1e3 * out


def test_small_grids_run_on_fewer_sms():
    """A launch of fewer programs than SMs gets their share of the matrix rate and of the
    L2's bandwidth (one SM's at most each), the whole HBM bandwidth; a library's grid
    (0 programs: cuBLAS, ATen) the whole GPU."""
    g = roofline.GPU("g", 1e12, 1e14, 100, l2_bw=5e12, l2_bw_sm=1e11)
    c = roofline.Cost("k", (10,), hbm=1e6, l2=1e9, flops=1e9)
    assert c.times_s(g) == pytest.approx({"HBM": 1e-6, "FLOP": 1e-4, "L2": 1e-3})
    assert c.floor_s(g) == pytest.approx(1e-3) and c.bound(g) == "L2"
    big = roofline.Cost("k", (400,), hbm=1e6, l2=1e9, flops=1e9)
    assert big.times_s(g) == pytest.approx({"HBM": 1e-6, "FLOP": 1e-5, "L2": 2e-4})
    lib = roofline.Cost("gemm", (0, 0, 0), hbm=1e9, l2=1e9, flops=1e9)
    assert lib.times_s(g) == pytest.approx({"HBM": 1e-3, "FLOP": 1e-5, "L2": 2e-4})
    assert lib.bound(g) == "HBM"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_modelled_floor_is_the_sum_of_launch_floors(case):
    fwd = _launch_floors_ms(case, ODD, False)
    both = fwd + _launch_floors_ms(case, ODD, True)
    got_fwd = roofline.modelled_floor_ms(case.name, "fwd", "bf16", ODD)
    got_both = roofline.modelled_floor_ms(case.name, "fwdbwd", "bf16", ODD, shape=case.shape())
    assert got_fwd == pytest.approx(fwd, rel=1e-12) and got_both == pytest.approx(both, rel=1e-12)
    assert 0 < got_fwd < got_both
    fast = roofline.GPU("fast", 2 * ODD.hbm, 2 * ODD.bf16, ODD.sms,   # every ceiling doubled
                        l2_bw=2 * ODD.l2_bw, l2_bw_sm=2 * ODD.l2_bw_sm)
    assert roofline.modelled_floor_ms(case.name, "fwdbwd", "bf16", fast) == \
        pytest.approx(got_both / 2, rel=1e-12)


def test_modelled_floor_does_not_apply():
    name = CASES[0].name
    assert roofline.modelled_floor_ms(name, "fwdbwd", "fp32", ODD) is None
    assert roofline.modelled_floor_ms("no-such-case", "fwd", "bf16", ODD) is None
    for impl in ("eager", "eager-cl", "compile", "cuda"):
        assert roofline.modelled_floor_ms(name, "fwd", "bf16", ODD, impl=impl) is None
    assert roofline.modelled_floor_ms(name, "fwd", "bf16", ODD, shape=(1, 2, 3)) is None
    with pytest.raises(ValueError, match="mode: expected one of fwd, fwdbwd, got 'bwd'"):
        roofline.modelled_floor_ms(name, "bwd", "bf16", ODD)


def test_measured_gpu_takes_the_run_rates():
    row = dict(measured_copy_gbs=3012.5, measured_matmul_tflops=701.25, device="NVIDIA H100 PCIe")
    gpu = roofline.measured_gpu(row)
    assert (gpu.hbm, gpu.bf16, gpu.sms) == (3012.5e9, 701.25e12, 114)
    assert roofline.measured_gpu(dict(row, device="NVIDIA H200")).sms == 132
    assert roofline.measured_gpu(dict(row, device="cpu")).sms == 132
    assert roofline.measured_gpu(row, sms=78).sms == 78
    for bad in (float("nan"), 0.0, None, float("inf")):
        assert roofline.measured_gpu(dict(row, measured_copy_gbs=bad)) is None
        assert roofline.measured_gpu(dict(row, measured_matmul_tflops=bad)) is None


def test_measured_gpu_prefers_the_rows_own_sm_count():
    """A row that recorded its device's SMs (benchmarks/test_adapters.py does) is modelled
    with them, whatever its name says; the argument still wins."""
    row = dict(measured_copy_gbs=3012.5, measured_matmul_tflops=701.25, device="NVIDIA H100 PCIe",
               sms=98)
    assert roofline.measured_gpu(row).sms == 98
    assert roofline.measured_gpu(row, sms=78).sms == 78
    assert roofline.measured_gpu(dict(row, sms=None)).sms == 114


# --------------------------------------------------------------------------- CUDA plan

def _cuda_built():
    from heba_kernels import _extension
    ok, why = _extension.prebuilt()
    return ok or _extension.loaded(), why


CUDA_BUILT, CUDA_WHY = _cuda_built()
requires_cuda_plan = pytest.mark.skipif(
    not CUDA_BUILT, reason=f"heba::_cuda_launch_plan needs heba_kernels._C built: {CUDA_WHY}")


def _min_gemm_flops(case, backward):
    """The projections' FLOPs: 2 forward, 4 backward, each 2 M D hidden; the CUDA
    low-rank backward recomputes its down projection (one more), its forward at rank
    <= 64 is the fused kernel's (no GEMM)."""
    M, D = case.batch * case.tokens, case.dim
    hid = case.rank if case.op == "low_rank" else D // 4
    if case.op == "low_rank":
        n = 5 if backward else (0 if hid <= 64 else 2)
    else:
        n = 4 if backward else 2
    return n * 2 * M * D * hid


@requires_cuda_plan
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_cuda_costs_follow_the_cpp_plan(case, backward):
    import math
    for e, w in ((2, 2), (4, 2), (4, 4)):
        costs = roofline.cuda_costs(case, e, w, ODD, backward)
        plan = roofline._case_cuda_plan(case, e, w, ODD, backward)
        assert len(costs) == len(plan) > 0
        assert [c.kernel for c in costs] == [p.kernel for p in plan]
        for c, p in zip(costs, plan):
            assert all(math.isfinite(v) and v >= 0 for v in (c.hbm, c.l2, c.flops)), c
            assert c.hbm == p.read + p.written > 0 and c.grid == p.grid
            assert c.l2 >= (c.hbm if p.kernel != "gemm" else p.m * p.k * p.dtype.itemsize)
        # the projections; and the low-rank backward's two bias sums, GEMVs on a ones vector
        gemm = sum(c.flops for c, p in zip(costs, plan) if p.kernel == "gemm" and p.n > 1)
        gemv = [p for p in plan if p.kernel == "gemm" and p.n == 1]
        assert gemm == _min_gemm_flops(case, backward), (case.name, backward)
        M = case.batch * case.tokens
        assert [(p.m, p.k) for p in gemv] == (
            [(case.dim, M), (case.rank, M)] if case.op == "low_rank" and backward else [])
        assert all(p.flops == 2 * p.m * p.n * p.k for p in plan if p.kernel == "gemm")
    # the elementwise kernels' grids are capped at 32 blocks per SM (csrc/launch_dims.h)
    few = roofline.cuda_costs(case, 2, 2, roofline.GPU("one SM", 1e12, 1e14, 1), backward)
    many = roofline.cuda_costs(case, 2, 2, ODD, backward)
    assert [c.kernel for c in few] == [c.kernel for c in many]
    for a, b in zip(few, many):
        if a.kernel in ("_visual_stencil_kernel", "_visual_stencil_kernel[mirror]",
                        "_scaled_add_kernel", "_low_rank_bwd_kernel_gelu"):
            assert a.grid == (min(b.grid[0], 32), 1, 1) and b.grid[0] > 32, (a, b)


@requires_cuda_plan
def test_cuda_plan_example_and_dtypes():
    plan = roofline.cuda_plan("heba_visual", True, (2, 17, 32), 8, torch.float32, torch.bfloat16,
                              1, (4, 4), sms=3)
    assert [p.kernel for p in plan if p.kernel.startswith("_")] == [
        "_residual_ln_bwd_kernel", "_visual_stencil_bwd_kernel_dv",
        "_visual_stencil_kernel[mirror]", "_scaled_add_kernel", "_reduce_partials_kernel"]
    ln = plan[[p.kernel for p in plan].index("_residual_ln_bwd_kernel")]
    assert ln.grid == (6, 1, 1) and ln.block == (128, 1, 1)          # 2 blocks per SM
    assert {p.dtype for p in plan if p.kernel == "gemm"} == {torch.bfloat16}
    assert [p.kernel for p in roofline.cuda_plan("low_rank", False, (2, 9, 32), 16)] == \
        ["_low_rank_fwd_kernel"]


@requires_cuda_plan
def test_table_has_cuda_rows():
    cases = [Case("v", "heba_visual", 2, 17, 64, grid=(4, 4)), Case("t", "heba_text", 2, 9, 32),
             Case("l", "low_rank", 2, 9, 32, rank=16)]
    rs = roofline.rows(cases)
    md = roofline.markdown(rs)
    for c, r in zip(cases, rs):
        n = len(roofline.cuda_costs(c, 2, 2, roofline.GPUS["H200"], False)) + \
            len(roofline.cuda_costs(c, 2, 2, roofline.GPUS["H200"], True))
        assert r["cuda_launches"] == n and 0 < r["cuda_heba_launches"] < n
        assert f"| {c.name} | cuda | {n} ({r['cuda_heba_launches']} + " in md
        assert r["cuda_hbm"] >= r["ideal_bytes"] and r["cuda_floor_H200"] < r["cuda_floor_H100"]
    assert "not modelled" not in md


def test_table_without_the_extension_says_why(monkeypatch):
    def unbuilt(*args, **kwargs):
        raise RuntimeError("heba_kernels._C was not built at install")
    monkeypatch.setattr(roofline, "cuda_plan", unbuilt)
    md = roofline.markdown(roofline.rows([Case("t", "heba_text", 2, 9, 32)]))
    assert "| t | cuda | not modelled (heba_kernels._C was not built at install) |" in md


def test_resweep_rule():
    """LRU stack distance: a re-sweep whose footprint fits the L2 hits; past it a sweep in
    the previous one's direction misses every byte, one in the opposite direction the
    fraction the L2 cannot hold."""
    mb = 1e6
    assert roofline.resweep_misses(300 * mb, 50 * mb, 50 * mb) == 0.0
    assert roofline.resweep_misses(300 * mb, 50 * mb, 50 * mb, alternate=False) == 0.0
    assert roofline.resweep_misses(300 * mb, 200 * mb, 50 * mb, alternate=False) == 300 * mb
    assert roofline.resweep_misses(300 * mb, 200 * mb, 50 * mb) == pytest.approx(225 * mb)
    assert roofline.resweep_misses(300 * mb, 60 * mb, 50 * mb) == pytest.approx(50 * mb)


@pytest.mark.parametrize("case", [c for c in CASES if c.op == "heba_visual"],
                         ids=lambda c: c.name)
@pytest.mark.parametrize("gpu", sorted(roofline.GPUS), ids=str)
def test_dy_kernel_resweeps_stay_in_l2(case, gpu):
    """The visual _dy kernel re-reads its block's dy rows once per BLOCK_HV bottleneck
    columns: the plan's blocks keep the resident programs' rows within the L2 (else every
    sweep would come from HBM), and its modelled bytes within 5% of no misses at all."""
    g = roofline.GPUS[gpu]
    B, (H, W), D = case.batch, case.grid, case.dim
    dy = next(st for st in visual_bwd_plan(B, H, W, D, D // 4, torch.bfloat16, g.sms, True,
                                           recompute_u=D < SAVE_U_MIN_DIM) if st.step == "dy")
    resident = min(dy.grid[0], g.sms)
    assert resident * dy.meta["BLOCK_T"] * D * 2 <= g.l2
    cost = next(c for c in roofline.visual_costs(case, 2, 2, g, True) if c.kernel == dy.kernel)
    big = roofline.GPU("huge L2", g.hbm, g.bf16, g.sms, l2=1e15)
    ideal = next(c for c in roofline.visual_costs(case, 2, 2, big, True) if c.kernel == dy.kernel)
    assert ideal.hbm <= cost.hbm <= 1.05 * ideal.hbm


def test_measured_gpu_takes_the_l2_size():
    row = dict(measured_copy_gbs=3000.0, measured_matmul_tflops=700.0, device="NVIDIA H200")
    assert roofline.measured_gpu(row).l2 == roofline.GPU.l2 == 50e6
    assert roofline.measured_gpu(dict(row, l2_bytes=60 * 2 ** 20)).l2 == 60 * 2 ** 20
    assert roofline.measured_gpu(dict(row, l2_bytes=60 * 2 ** 20), l2=1e6).l2 == 1e6


def test_l2_layout_switches_are_priced(monkeypatch):
    """The visual kernels' L2 layout, priced both ways at the MLP position (ViT-B/16,
    B256): the programs sharing a row block dispatched apart, or every sweep one way,
    cost HBM bytes (x re-read per bottleneck chunk, du per D chunk, dy per dv sweep)."""
    import heba_kernels.heba_visual as hv
    (case,) = [c for c in CASES if c.name == "visual-mlp-d3072"]
    g = roofline.GPUS["H200"]

    def hbm():
        return sum(c.hbm for bw in (False, True) for c in roofline.visual_costs(case, 2, 2, g, bw))

    shipped = hbm()
    monkeypatch.setattr(hv, "CHUNKS_FASTEST", False)
    apart = hbm()
    monkeypatch.setattr(hv, "CHUNKS_FASTEST", True)
    monkeypatch.setattr(hv, "ALTERNATE_SWEEPS", False)
    one_way = hbm()
    T, D = case.batch * 196, case.dim
    # x re-read by 2 more bottleneck chunks (256 columns), dy by the dv launch's 2 more, du
    # by 23 more D chunks
    assert apart - shipped == pytest.approx((2 * T * D + 2 * T * D + 23 * T * D // 4) * 2)
    assert one_way > shipped
