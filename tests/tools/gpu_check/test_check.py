"""scripts/gpu_check.sh runs end to end on the CPU (HEBA_GPU_CHECK_DRY_RUN=1) and reports.

One dry run with a failing test and a wrong sweep output injected, one stage cut
by its timeout and open_clip hidden: the report must show every stage, fill its
tables, and report the failures, the cut and the skip with their reasons
instead of hiding them. The numbers of a dry run mean nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tools.gpu_check import check as gpu_check
from tools.gpu_check import report as check_report

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PYTHON=sys.executable, HEBA_GPU_CHECK_DRY_RUN="1",
               HEBA_HIDE_OPEN_CLIP="1", HEBA_GPU_CHECK_INJECT_FAIL="tests,sweep",
               # info is cut on purpose; the rest get room for a slow, busy CI machine
               HEBA_GPU_CHECK_TIMEOUTS="info=1,tests=180,sweep=300,bench-ops=300",
               HEBA_GPU_CHECK_BUDGET="900",
               HEBA_GPU_CHECK_TESTS="tests/heba/test_ops_validation.py tests/heba/clip/test_wiring.py",
               HEBA_GPU_CHECK_BENCH_K="lowrank-r16 and bf16 and fwdbwd and not compile")
    proc = subprocess.run(["bash", SCRIPT, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    md = (out / "gpu_check.md").read_text()
    data = json.loads((out / "gpu_check.json").read_text())
    return proc, out, md, data


def test_dry_run_reports_every_stage(dry_run):
    proc, out, md, data = dry_run
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]   # failures injected
    status = {s["name"]: s["status"] for s in data["stages"]}
    assert status == {"versions": "passed", "build": "skipped", "info": "cut", "tests": "failed",
                      "sweep": "failed", "memcheck": "skipped", "racecheck": "skipped",
                      "bench-ops": "passed", "bench-e2e": "skipped"}, status
    for name, state in status.items():
        assert f"| {name} | {state} |" in md, name
    assert "**FAILED (failed or cut: info, tests, sweep)**" in md
    assert "dry run: no CUDA build" in md and "dry run: no sanitizer" in md
    assert "stopped at its limit of 1 s" in md and "### info" in md     # the cut, with its output
    assert sorted(os.listdir(out)) == ["adapters.png", "bench_adapters.json", "gpu_check.json",
                                       "gpu_check.log", "gpu_check.md", "junit_tests.xml"]


def test_dry_run_tests_and_sweep_report_failures(dry_run):
    _, _, md, data = dry_run
    assert "test_injected_failure" in md and "injected failure" in md
    assert "| 1 | needs open_clip (pip install open_clip_torch) |" in md    # the hidden module
    # the stage runs tests/heba/test_ops_validation.py plus one injected failure: every other test passes
    counts = re.search(r"(\d+) passed, 1 failed", md)
    assert counts and int(counts.group(1)) >= 10, md[:2000]
    sweep = next(s for s in data["stages"] if s["name"] == "sweep")
    rows = sweep["data"]["rows"]
    assert sweep["status"] == "failed" and "1 fail" in sweep["note"], sweep["note"]
    ran = [r for r in rows if r["status"] != "skipped"]
    assert {r["op"] for r in ran if r["status"] == "pass"} == set(check_report.OPS)
    assert {r["dtype"] for r in ran} == {"fp32", "bf16", "fp16", "autocast-bf16"}
    bad = [r for r in ran if r["status"] != "pass"]
    assert len(bad) == 1 and bad[0]["errors"]["out"] > 1e-2, bad        # the perturbed output
    assert "| heba_visual | tiny d32 4x4 | 2x17x32 | triton | fp32 | out |" in md
    assert "**FAIL** out: 5.00e-02 > 1e-04" in md
    assert "- cuda: not run here (the cuda backend runs on CUDA tensors" in md


def test_dry_run_benchmark_tables(dry_run):
    _, _, md, _ = dry_run
    assert "| lowrank-r16-d768 | bf16 | fwdbwd | eager (published, seq-first) |" in md
    assert "| lowrank-r16-d768 | bf16 | fwdbwd | heba triton |" in md
    assert "| % of modelled floor |" in md and "% of modelled floor: the Triton backend's" in md
    # a dry run measures no ceiling: the L2-to-SM figure is left out and said to be the model's
    assert "L2->SM reads" not in md and "(L2-to-SM: the model's Hopper figure, not" in md
    assert "| lowrank-r16-d768 >= 3.0x torch.compile | triton | no torch.compile row |" in md
    assert "bench-e2e | skipped" in md and "open_clip is not installed here (hidden by" in md


def test_bad_arguments_fail_in_one_line(tmp_path):
    for args, msg in (([], "--out DIR is required"),
                      (["--out", str(tmp_path), "--wheels", str(tmp_path)], "holds no .whl"),
                      (["--bogus"], "unknown argument '--bogus'")):
        proc = subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, capture_output=True, text=True,
                              env=dict(os.environ, PYTHON=sys.executable), timeout=60)
        assert proc.returncode == 2 and msg in proc.stderr, (args, proc.stderr)


def test_e2e_ids_and_goals():
    ids = [f"benchmarks/test_train_step.py::test_train_step[{m}-{i}]"
           for m in ("heba", "adaptertune-r16") for i in ("eager", "compile", "heba-triton")]
    got = gpu_check._e2e_ids(ids, ["heba"], ["heba-triton", "eager"])
    assert got == [ids[2], ids[0]], got
    rows = [dict(case="text-d512", impl=i, dtype="bf16", mode="fwdbwd", cuda_ms=ms,
                 pct_of_floor=50.0, saved_for_backward_bytes=s)
            for i, ms, s in (("eager", 8.0, 900), ("compile", 4.0, 600), ("triton", 1.0, 200))]
    table = check_report.targets_table(rows)
    assert "| text-d512 >= 3.5x torch.compile | triton | 4.00x | yes |" in table
    assert "| text-d512 saved-for-backward <= 1/3 of the reference's | triton | 0.22 | yes |" \
        in table


def test_bench_ops_names_the_measured_ceilings():
    row = dict(case="text-d512", impl="triton", dtype="bf16", mode="fwdbwd", cuda_ms=1.0,
               pct_of_floor=50.0, peak_mem_bytes=4e6, saved_for_backward_bytes=1e6,
               shape=[512, 77, 512], device="NVIDIA H200", measured_copy_gbs=4301.4,
               measured_matmul_tflops=702.6, measured_l2_gbs=7012.3)
    stage = dict(name="bench-ops", status="passed", note="", data=dict(rows=[row]))
    md = check_report._bench_ops(stage)
    assert ("Floors measured in this run: copy 4301 GB/s, bf16 matmul 703 TFLOP/s, L2->SM "
            "reads 7012 GB/s. ") in md, md
    assert "measured copy and matmul rates and L2-to-SM read bandwidth as ceilings" in md
    for bad in (float("nan"), None, 0.0):
        md = check_report._bench_ops(dict(stage, data=dict(rows=[dict(row, measured_l2_gbs=bad)])))
        assert "bf16 matmul 703 TFLOP/s. ms:" in md and "L2->SM" not in md, (bad, md)
