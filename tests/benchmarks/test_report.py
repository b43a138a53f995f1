"""The benchmark harness runs end to end (a CPU dry run at tiny shapes) and its report builds.

The numbers of a dry run mean nothing; this keeps the harness from rotting
between GPU runs.
"""

import json
import math
import os
import subprocess
import sys

from benchmarks import report, roofline
from benchmarks.cases import CASES

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_dry_run_and_report(tmp_path):
    out = tmp_path / "run.json"
    env = dict(os.environ, HEBA_BENCH_DRY_RUN="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_adapters.py", "--benchmark-only", "-q",
         "-p", "no:cacheprovider", "-k", "lowrank-r16 and fp32 and fwdbwd",
         f"--benchmark-json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    impls = {b["extra_info"]["impl"] for b in data["benchmarks"]}
    assert {"eager", "compile"} <= impls, impls
    for b in data["benchmarks"]:
        info = b["extra_info"]
        assert info["cuda_ms"] > 0 and info["saved_for_backward_bytes"] >= 0
        # every ceiling is recorded; a dry run measures none
        for key in ("measured_copy_gbs", "measured_matmul_tflops", "measured_l2_gbs"):
            assert math.isnan(info[key]), (key, info[key])
    report.main([str(out), "--out", str(tmp_path)])
    md = (tmp_path / "cpu.md").read_text()
    assert "| lowrank-r16-d768 | fp32 | fwdbwd | eager (published, seq-first) |" in md
    assert "torch.compile" in md


def _cells(md, prefix):
    """The cells of the header and of the one row starting with ``prefix``, by column name."""
    lines = md.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    row = [ln for ln in lines if ln.startswith(prefix)]
    assert len(row) == 1, (prefix, md)
    return dict(zip(head, (c.strip() for c in row[0].strip("|").split("|"))))


def test_table_has_the_modelled_floor_of_triton_rows():
    case = next(c for c in CASES if c.name == "lowrank-r16-d768")
    run = dict(measured_copy_gbs=3012.5, measured_matmul_tflops=701.25, device="NVIDIA H200",
               peak_mem_bytes=4e6, saved_for_backward_bytes=1e6, shape=list(case.shape()),
               case=case.name, pct_of_floor=40.0)
    gpu = roofline.GPU("run", 3012.5e9, 701.25e12, 132)
    floor_ms = 1e3 * sum(max(c.hbm / gpu.hbm, c.flops / gpu.bf16)
                         for bwd in (False, True)
                         for c in roofline.triton_costs(case, 2, 2, gpu, bwd))
    ms = floor_ms / 0.437
    rows = [dict(run, impl="eager", dtype="bf16", mode="fwdbwd", cuda_ms=3 * ms),
            dict(run, impl="triton", dtype="bf16", mode="fwdbwd", cuda_ms=ms),
            dict(run, impl="triton", dtype="fp32", mode="fwdbwd", cuda_ms=2 * ms),
            dict(run, impl="triton", dtype="bf16", mode="fwd", cuda_ms=ms,
                 measured_copy_gbs=float("nan"))]          # a dry run's rates: no ceilings
    md = report.table(rows)
    col = "% of modelled floor"
    pre = f"| {case.name} |"
    assert _cells(md, f"{pre} bf16 | fwdbwd | heba triton |")[col] == f"{100 * floor_ms / ms:.0f}%"
    assert _cells(md, f"{pre} bf16 | fwdbwd | eager (published, seq-first) |")[col] == "n/a"
    assert _cells(md, f"{pre} fp32 | fwdbwd | heba triton |")[col] == "n/a"
    assert _cells(md, f"{pre} bf16 | fwd | heba triton |")[col] == "n/a"
    assert md.splitlines()[1] == "|---" * 11 + "|"


def test_modelled_floor_takes_the_measured_l2_bandwidth():
    """A row's ``measured_l2_gbs`` is the model's L2-to-SM ceiling: at 100 GB/s, L2 sets it."""
    case = next(c for c in CASES if c.name == "lowrank-r16-d768")
    run = dict(measured_copy_gbs=3012.5, measured_matmul_tflops=701.25, device="NVIDIA H200",
               peak_mem_bytes=4e6, saved_for_backward_bytes=1e6, shape=list(case.shape()),
               case=case.name, pct_of_floor=40.0, impl="triton", dtype="bf16", mode="fwdbwd")
    gpu = roofline.GPU("run", 3012.5e9, 701.25e12, 132, l2_bw=100e9)
    costs = [c for bwd in (False, True) for c in roofline.triton_costs(case, 2, 2, gpu, bwd)]
    floor_ms = 1e3 * sum(max(c.hbm / gpu.hbm, c.flops / gpu.bf16, c.l2 / gpu.l2_bw)
                         for c in costs)
    assert floor_ms > 1e3 * sum(max(c.hbm / gpu.hbm, c.flops / gpu.bf16) for c in costs)
    ms = floor_ms / 0.437
    pre = f"| {case.name} | bf16 | fwdbwd | heba triton |"
    md = report.table([dict(run, cuda_ms=ms, measured_l2_gbs=100.0)])
    assert _cells(md, pre)["% of modelled floor"] == "44%"
    md = report.table([dict(run, cuda_ms=ms, measured_l2_gbs=float("nan"))])  # not measured
    assert _cells(md, pre)["% of modelled floor"] != "44%"
