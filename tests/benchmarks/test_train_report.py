"""The training-step benchmark runs end to end (a CPU dry run on a tiny CLIP) and its report builds.

The numbers of a dry run mean nothing; this keeps the harness from rotting
between GPU runs. HeBA (the recipe the benchmark is about: adapted text tower,
slow-fast on) with the published eager step, torch.compile of it and of heba's step, heba's
step at the published batch and one throughput batch, and heba's step fed by its loader.
"""

import json
import os
import subprocess
import sys

import pytest
pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")

from benchmarks import train_report  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_train_step_dry_run_and_report(tmp_path):
    out = tmp_path / "train.json"
    env = dict(os.environ, HEBA_BENCH_DRY_RUN="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_train_step.py", "--benchmark-only",
         "-q", "-p", "no:cacheprovider", "-k",
         # (max-autotune is left out: a dry run compiles with dynamo's eager backend, no mode,
         # so it would repeat the default compile)
         "(test_train_step and not adaptertune and (eager-b16 or -compile-b16 or -heba-b16 or "
         "heba-b128 or ckpt-b16 or loader-b16)) or "
         "(test_max_batch and heba-plain)",
         f"--benchmark-json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    infos = [b["extra_info"] for b in data["benchmarks"]]
    impls = {(r["impl"], r["batch"]) for r in infos if "cuda_ms" in r}
    assert {("eager", 4), ("compile", 4), ("heba", 4), ("heba", 6), ("heba-ckpt", 4),
            ("heba-compile", 4), ("heba-loader", 4)} <= impls, impls
    for r in infos:
        if "cuda_ms" in r:
            assert r["method"] == "heba" and r["classes"] == 10, r
            assert r["batch"] == {"16": 4, "128": 6}[r["batch_name"]], r
            assert r["cuda_ms"] > 0 and r["images_per_s"] > 0 and r["loss_rel_to_eager"] < 2e-2
            assert "kernels_per_step" in r and "launch_calls_per_step" in r
            # the recorder counts every contender on the CPU: a CLIP step launches hundreds
            assert 100 < r["launches"] <= r["dispatches"] and r["launches_eager"] > 100, r
            if r["impl"].startswith("heba"):
                assert r["text_len"] == 16, r        # the bank's longest prompt (9), to 8s
        else:
            assert r["max_batch"] == 8, r                 # the dry run's limit: no OOM on a CPU
    md = train_report.main([str(out), "--out", str(tmp_path)])
    assert "| heba | 4 | published eager step" in md and "torch.compile of it (default)" in md
    assert "| heba | 4 | heba + checkpointing |" in md and "| 8 |" in md
    assert "| heba | 6 | heba-train step" in md and "torch.compile of heba's step" in md
    assert "heba-train step + its loader" in md
    assert (tmp_path / "train-cpu.png").stat().st_size > 0
