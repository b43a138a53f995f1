"""The benchmark harness runs end to end (a CPU dry run at tiny shapes) and its report builds.

The numbers of a dry run mean nothing; this keeps the harness from rotting
between GPU runs.
"""

import json
import os
import subprocess
import sys

from benchmarks import report

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
    report.main([str(out), "--out", str(tmp_path)])
    md = (tmp_path / "cpu.md").read_text()
    assert "| lowrank-r16-d768 | fp32 | fwdbwd | eager (published, seq-first) |" in md
    assert "torch.compile" in md
