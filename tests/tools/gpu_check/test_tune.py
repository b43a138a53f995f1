"""The opt-in ``tune`` stage (tools/gpu_check/tune.py) on the CPU, in Triton's interpreter.

One dry run of every launch-plan variant at tiny shapes, with one variant's output
perturbed on purpose (``HEBA_GPU_CHECK_INJECT_FAIL=tune``): every variant must run
(or be named as the shipped plan), the patched attributes of heba_visual must be the
same objects afterwards, the wrong variant must be reported and not timed, and the
report must name every variant. A stage run with no time left must say which
variants it did not run. At the ViT-B/16 widths the variants are checked on the
plans alone (pure Python): each flips its choice and changes the plan a GPU runs.
The times of a dry run mean nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from benchmarks import roofline
from heba_kernels import heba_visual as hv
from tests.helpers import requires_triton_cpu
from tools.gpu_check import check as gpu_check
from tools.gpu_check import report as check_report
from tools.gpu_check import tune

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
# The variants the tiny run makes: the attention-like case sits below every width switch,
# the MLP-like one above, so each switch is flipped both ways across the two.
EXPECTED = {
    "visual-attn-tiny-d48": ["shipped", "y-recomputed", "down-fused", "dw-in-dx", "dv-gemm",
                             "u-recomputed", "rows-fastest", "sweeps-one-way",
                             "dy-forward-blocks", "fwd-cols-256", "fwd-one-part",
                             "splits-per-sm-1", "block-rows-32", "block-rows-64",
                             "block-rows-128"],
    "visual-mlp-tiny-d80": ["shipped", "y-recomputed", "down-fused", "dw-in-dx", "dv-in-dy",
                            "u-recomputed", "rows-fastest", "sweeps-one-way", "dy-forward-blocks",
                            "fwd-rows-128", "fwd-cols-256", "tiles-128", "fwd-one-part",
                            "splits-per-sm-1", "block-rows-32", "block-rows-64",
                            "block-rows-128"],
}
# (tiles-128 and fwd-cols-256: the tiny widths, 20, 48 and 80 columns, fit one chunk either
# way)
SAME = {("visual-attn-tiny-d48", "block-rows-64"), ("visual-mlp-tiny-d80", "block-rows-128"),
        ("visual-mlp-tiny-d80", "tiles-128"), ("visual-mlp-tiny-d80", "fwd-cols-256"),
        ("visual-attn-tiny-d48", "fwd-cols-256"), ("visual-attn-tiny-d48", "fwd-one-part"),
        ("visual-mlp-tiny-d80", "fwd-one-part"),   # (the tiny blocks: one part either way;
        ("visual-attn-tiny-d48", "splits-per-sm-1"),  # the interpreter's plans: two splits
        ("visual-mlp-tiny-d80", "splits-per-sm-1")}   # per tile either way)
INJECTED = ("visual-attn-tiny-d48", "y-recomputed")   # the first variant after the shipped plan


def _attributes():
    return {n: getattr(hv, n) for n in tune.WATCHED} | {"roofline": roofline.SAVE_U_MIN_DIM}


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "tune.json"
    before = _attributes()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEBA_GPU_CHECK_INJECT_FAIL", "tune")
        t0 = time.time()
        rc = tune.main(["--out", str(out), "--size", "tiny", "--device", "cpu"])
    after = _attributes()
    data = json.loads(out.read_text())
    return rc, before, after, data, out, time.time() - t0


@requires_triton_cpu
def test_every_variant_runs_and_attributes_are_restored(dry):
    rc, before, after, data, out, _ = dry
    assert rc == 1                                        # the injected variant is wrong
    assert all(after[k] is before[k] for k in before), \
        {k: (before[k], after[k]) for k in before if after[k] is not before[k]}
    assert data["restored"] and data["dry"] and data["size"] == "tiny"
    rows = data["rows"]
    got = {case: [r["variant"] for r in rows if r["case"] == case] for case in EXPECTED}
    assert got == EXPECTED, got
    shipped = {r["case"]: r for r in rows if r["variant"] == "shipped"}
    for r in rows:
        key = (r["case"], r["variant"])
        want = "same" if key in SAME else "FAIL" if key == INJECTED else "pass"
        assert r["status"] == want, r
        assert r["restored"] and r["launches"] >= 4 and r["modelled_us"] > 0, r
        if r["variant"] != "shipped":          # every variant's plan differs from the shipped
            assert (r["plan"] == shipped[r["case"]]["plan"]) == (key in SAME), key
        if want == "pass":
            assert r["measured_us"] > 0 and r["pct_of_floor"] > 0, r
            assert "dry run" in r["timing"], r
    for case in EXPECTED:
        assert shipped[case]["checked_against"] == "float64 reference"
        assert data["fastest"][case]["variant"] in EXPECTED[case]
    md = (out.parent / "tune.md").read_text()
    assert "**Dry run**" in md and "mean nothing" in md
    for case, names in EXPECTED.items():
        assert f"### {case} [4x21x" in md and f"Fastest for {case}: " in md
        for name in names:
            assert f"| {name} | " in md, name


@requires_triton_cpu
def test_wrong_variant_is_reported_and_not_timed(dry):
    _, _, _, data, out, _ = dry
    bad = [r for r in data["rows"] if r["status"] in ("FAIL", "error")]
    assert [(r["case"], r["variant"]) for r in bad] == [INJECTED], bad
    row = bad[0]
    assert row["injected"] and row["checked_against"] == "shipped plan"
    assert "measured_us" not in row and "vs_shipped_pct" not in row
    # the output scaled by 1.05: 5% of its norm off, up to the rounding of the bf16 output
    msg = re.fullmatch(r"not timed: out: (\S+) > 2e-02", row["message"])
    assert msg and float(msg.group(1)) == pytest.approx(0.05, rel=0.01), row["message"]
    assert row["errors"]["dx"] <= row["tol"]              # only the output was perturbed
    assert data["fastest"]["visual-attn-tiny-d48"]["variant"] != "y-recomputed"
    stage = dict(name="tune", status="failed", seconds=1.0, timeout=150.0, note="1 wrong",
                 data={"tune": data}, tail="", commands=[])
    md = check_report.render(dict(dry=True, budget=280, seconds=1.0, started="now"), [stage])
    assert "## Launch-plan variants (tune)" in md
    assert "| y-recomputed | KEEP_Y_MIN_DIM 0 -> 49: y recomputed (shipped: y kept for backward) " \
           "| 6 |  |" in md
    assert f"**WRONG** {row['message']}" in md


def test_no_time_left_reports_every_variant_not_run():
    before = _attributes()
    data = tune.run("tiny", "cpu", deadline=time.time() - 1.0)
    assert all(_attributes()[k] is before[k] for k in before)
    assert len(data["rows"]) == sum(map(len, EXPECTED.values())) and not data["fastest"]
    assert {r["status"] for r in data["rows"]} == {"not run"}
    assert {r["message"] for r in data["rows"]} == {"the time budget ran out before it started"}
    md = tune.markdown(data)
    assert "Not run (32): visual-attn-tiny-d48 shipped, visual-attn-tiny-d48 y-recomputed," in md
    assert "Fastest for visual-mlp-tiny-d80: none timed." in md


def test_a_stopped_run_names_the_variant_it_was_running():
    todo = [dict(case="c", shape=[1], variant=v, change="x") for v in ("shipped", "a", "b")]
    rows = tune.stopped([dict(todo[0], status="pass", measured_us=2.0)], todo, "killed")
    assert [(r["variant"], r["status"], r.get("message")) for r in rows] == [
        ("shipped", "pass", None), ("a", "not run", "killed"),
        ("b", "not run", "not started: the run stopped before it")]
    assert "Not run (2): c a, c b." in tune.markdown({"rows": rows})


def test_stage_is_opt_in_and_reports_a_cut(tmp_path):
    """``--stages tune`` through scripts/gpu_check.sh with 1 s left to start variants in
    (its limit 21 s, less the 20 s the stage keeps to finish): the stage is cut and the
    report names the variants it did not run; the default stage list leaves it out."""
    assert "tune" not in [s.name for s in gpu_check.STAGES if s.default]
    assert [s.name for s in gpu_check.STAGES if not s.default] == ["tune"]
    env = dict(os.environ, PYTHON=sys.executable, HEBA_GPU_CHECK_DRY_RUN="1",
               HEBA_GPU_CHECK_TIMEOUTS="tune=21")
    proc = subprocess.run(["bash", SCRIPT, "--out", str(tmp_path), "--stages", "tune"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    (stage,) = data["stages"]
    rows = stage["data"]["tune"]["rows"]
    assert stage["name"] == "tune" and stage["status"] == "cut", stage["note"]
    skipped = [r for r in rows if r["status"] == "not run"]
    assert skipped and len(rows) == sum(map(len, EXPECTED.values())), rows
    assert all(r["message"] == "the time budget ran out before it started" for r in skipped)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| 1 | tune | cut |" in md and "## Launch-plan variants (tune)" in md
    assert f"Not run ({len(skipped)}): " in md
    assert sorted(os.listdir(tmp_path)) == ["gpu_check.json", "gpu_check.log", "gpu_check.md",
                                            "tune.json"]


ATTN = ["y-recomputed", "down-fused", "dw-in-dx", "dv-gemm", "u-recomputed", "rows-fastest",
        "sweeps-one-way", "dy-forward-blocks", "fwd-cols-256", "fwd-one-part", "splits-per-sm-1"]
MLP = ["y-recomputed", "down-fused", "dw-in-dx", "dv-in-dy", "u-recomputed", "rows-fastest",
       "sweeps-one-way", "dy-forward-blocks", "fwd-rows-128", "fwd-cols-256", "tiles-128",
       "fwd-one-part", "splits-per-sm-1"]


@pytest.mark.parametrize("case,shape,variants,same", [
    ("visual-attn-d768", (256, 197, 768), ATTN, ("fwd-one-part", "block-rows-64")),
    ("visual-mlp-d3072", (256, 197, 3072), MLP, ("fwd-one-part", "block-rows-128")),
    # the published batch: the forward in parts of D (49 blocks on 132 SMs); the wide
    # tiles already off there
    ("visual-attn-d768-b16", (16, 197, 768), ATTN, ("block-rows-64",)),
    ("visual-mlp-d3072-b16", (16, 197, 3072), MLP, ("tiles-128", "block-rows-128"))],
    ids=["visual-attn-d768", "visual-mlp-d3072", "visual-attn-d768-b16",
         "visual-mlp-d3072-b16"])
def test_clip_variants_flip_the_plan_a_gpu_runs(case, shape, variants, same):
    """At the benchmark shapes and the published batch on a 132-SM GPU (plans and model
    only, no launch): every variant changes the plan but those listed the same (the shipped
    cap; at B256 the forward's parts, one anyway), and the model prices each."""
    (c,) = [x for x in tune.cases("clip") if x.name == case]
    assert c.shape() == shape
    before = _attributes()
    vs = tune.variants(c)
    assert [v.name for v in vs] == ["shipped", *variants, "block-rows-32", "block-rows-64",
                                    "block-rows-128"]
    gpu = roofline.GPUS["H200"]
    shipped_plan, floors = tune.plan(c, gpu.sms, True), {}
    for v in vs:
        with tune.patched(v.patches):
            steps = tune.plan(c, gpu.sms, True)
            floors[v.name], why = tune.modelled_us(c, gpu)
        assert floors[v.name] and not why, (v.name, why)
        assert (steps == shipped_plan) == (v.name in ("shipped", *same)), v.name
    assert all(_attributes()[k] is before[k] for k in before)
    assert floors["shipped"] == pytest.approx(roofline.modelled_floor_ms(
        case, "fwdbwd", "bf16", gpu, cases=[c]) * 1e3)


def test_patches_are_restored_when_a_variant_raises():
    before = _attributes()
    with pytest.raises(ZeroDivisionError):
        with tune.patched({"KEEP_Y_MIN_DIM": 1, "SAVE_U_MIN_DIM": 7,
                           "_block_t": tune.capped_block_t(32)}):
            assert hv.KEEP_Y_MIN_DIM == 1 and roofline.SAVE_U_MIN_DIM == 7
            1 / 0
    assert all(_attributes()[k] is before[k] for k in before)
    with pytest.raises(AttributeError, match="heba_visual has no attribute 'NO_SUCH'"):
        with tune.patched({"KEEP_Y_MIN_DIM": 1, "NO_SUCH": 1}):
            pass
    assert all(_attributes()[k] is before[k] for k in before)


def test_bad_arguments_fail_in_one_line(tmp_path, capsys):
    for args, msg in ((["--out", str(tmp_path / "no" / "t.json")], "does not exist"),
                      (["--out", str(tmp_path / "t.json"), "--variants", "bogus"],
                       "--variants: unknown ['bogus']"),
                      (["--out", str(tmp_path / "t.json"), "--budget", "-1"], "--budget")):
        with pytest.raises(SystemExit) as info:
            tune.main(args)
        assert info.value.code == 2 and msg in capsys.readouterr().err, args
    assert not os.listdir(tmp_path)
