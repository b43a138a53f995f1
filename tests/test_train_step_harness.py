"""The training-step benchmark runs end to end (a CPU dry run on a tiny CLIP) and its report builds.

The numbers of a dry run mean nothing; this keeps the harness from rotting
between GPU runs. AdapterTune only, to stay fast: HeBA takes the same code path.
"""

import json
import os
import subprocess
import sys

import pytest
pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")

from benchmarks import train_report  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_dry_run_and_report(tmp_path):
    out = tmp_path / "train.json"
    env = dict(os.environ, HEBA_BENCH_DRY_RUN="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_train_step.py", "--benchmark-only",
         "-q", "-p", "no:cacheprovider", "-k", "adaptertune", f"--benchmark-json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    infos = [b["extra_info"] for b in data["benchmarks"]]
    impls = {r["impl"] for r in infos if "cuda_ms" in r}
    assert {"eager", "compile", "heba", "heba-reference", "heba-ckpt"} <= impls, impls
    for r in infos:
        if "cuda_ms" in r:
            assert r["cuda_ms"] > 0 and r["images_per_s"] > 0 and r["loss_rel_to_eager"] < 2e-2
            if r["impl"].startswith("heba"):
                assert r["text_len"] == 8 and r["padded_prompts"] == 16, r   # dry run: 10 prompts
        else:
            assert r["max_batch"] == 8, r                 # the dry run's limit: no OOM on a CPU
    md = train_report.main([str(out), "--out", str(tmp_path)])
    assert "| adaptertune-r16 | eager autocast" in md and "torch.compile of eager" in md
    assert "| adaptertune-r16 | heba default + checkpointing |" in md and "| 8 |" in md
    assert (tmp_path / "train-cpu.png").stat().st_size > 0
