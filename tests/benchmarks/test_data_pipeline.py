"""The data-pipeline benchmark runs (a dry run: 4 images per size, one tiny heba-train run) and
records per-core rates and heba-train's end-to-end throughput."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_dry_run_records_every_contender(tmp_path):
    out = tmp_path / "data.json"
    env = dict(os.environ, HEBA_BENCH_DRY_RUN="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_data_pipeline.py", "-q",
         "-p", "no:cacheprovider", f"--benchmark-json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {b["name"]: b["extra_info"] for b in json.loads(out.read_text())["benchmarks"]}
    for pipe in ("today", "published", "fast"):
        for size in ("500x375", "1024x768"):
            info = rows[f"test_train_pipeline[{pipe}-{size}]"]
            assert info["img_per_s_per_core"] > 0 and info["images"] == 4
    assert "decoded once" in rows["test_train_pipeline[fast-500x375]"]["note"]
    assert {f"test_image_check[{m}-500x375]" for m in ("fast", "full")} <= set(rows)
    assert {f"test_collate_and_transfer[{w}]" for w in
            ("collate-float32", "collate-uint8", "normalise-uint8")} <= set(rows)
    e2e = rows["test_heba_train_end_to_end[fast-full]"]
    assert e2e["pipeline"] == "fast" and e2e["evaluations"] == 2 and e2e["test_images"] == 8
    assert e2e["train_samples"] == 4 and e2e["train_img_per_s"] > 0 and e2e["run_img_per_s"] > 0
    assert e2e["command"].startswith("heba-train FOLDER --model tiny") and "--pipeline fast" in \
        e2e["command"] and "decoded once" in e2e["note"]
