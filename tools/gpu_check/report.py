"""The GPU check's report: one markdown file from the stages' results (see tools.gpu_check.check).

The benchmark tables and plots are those of :mod:`benchmarks.report` and
:mod:`benchmarks.train_report`, the launch-plan variants' tables those of
:mod:`tools.gpu_check.tune`; this module adds the stage table, the versions,
the test summary, the correctness table and heba's performance targets.
"""

from __future__ import annotations

import math
import time

from benchmarks import report as ops_report, train_report
from tools.gpu_check import tune
from tools.gpu_check.sweep import DTYPES

OPS = ("heba_visual", "heba_text", "low_rank")
# heba's performance targets (design goals, not measurements), bf16 forward+backward,
# batch 256, ratios from the same run: (case, what, threshold): "vs compile" =
# torch.compile's ms / ours; "floor" = % of the copy or matmul floor.
TARGETS = [("visual-attn-d768", "vs compile", 3.5), ("visual-mlp-d3072", "floor", 100 / 1.3),
         ("text-d512", "vs compile", 3.5), ("lowrank-r16-d768", "vs compile", 3.0)]


def render(meta: dict, results: list) -> str:
    """The whole report. ``meta``: dry, budget, seconds, started; ``results``: stage dicts."""
    by = {r["name"]: r for r in results}
    parts = [_header(meta, results, by), _stages(results), _versions(by), _build(by),
             _info(by), _tests(by.get("tests")), _sweep(by), _bench_ops(by.get("bench-ops")),
             _bench_e2e(by.get("bench-e2e")), _tune(by.get("tune")), _tails(results)]
    return "\n\n".join(p for p in parts if p) + "\n"


def _header(meta, results, by):
    bad = [r["name"] for r in results if r["status"] in ("failed", "cut")]
    device = by.get("versions", {}).get("data", {}).get("gpu") or "no GPU (CPU)"
    mode = ("dry run on the CPU: tiny shapes, Triton's interpreter, no CUDA build, no "
            "sanitizer, no torch.compile contenders; the numbers mean nothing"
            if meta["dry"] else "full run")
    verdict = "PASSED" if not bad else f"FAILED (failed or cut: {', '.join(bad)})"
    return (f"# heba GPU check on {device}\n\n{meta['started']} · {mode} · "
            f"{meta['seconds']:.0f} s of a {meta['budget']:.0f} s budget · **{verdict}**")


def _stages(results):
    lines = ["## Stages", "", "| # | stage | status | s | limit s | note |",
             "|---|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        lines.append(f"| {i} | {r['name']} | {r['status']} | {r['seconds']:.1f} | "
                     f"{r['timeout']:.0f} | {_cell(r['note'])} |")
    return "\n".join(lines)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _status(r) -> str:
    """``status: note`` of a stage (just the status when it has no note)."""
    return f"{r['status']}: {_cell(r['note'])}" if r["note"] else r["status"]


def _versions(by):
    data = by.get("versions", {}).get("data") or {}
    if not data:
        return "## Versions\n\nnot available (the versions stage did not report)"
    rows = "\n".join(f"| {k} | {_cell(v)} |" for k, v in data.items())
    return f"## Versions\n\n| | |\n|---|---|\n{rows}"


def _build(by):
    r = by.get("build")
    if not r:
        return ""
    return f"## Build\n\n{_status(r)}"


def _info(by):
    out = (by.get("info") or {}).get("data", {}).get("output")
    return f"## heba.info\n\n```text\n{out}\n```" if out else ""


def _tests(r):
    if not r:
        return ""
    j = r.get("data", {}).get("junit")
    if not j:
        return f"## Tests\n\n{_status(r)}"
    lines = ["## Tests", "", f"{j['total']} tests: {j['passed']} passed, {j['failed']} failed, "
             f"{j['errors']} errors, {j['skipped']} skipped, {j['cut']} cut "
             f"(pytest-xdist {'on' if r['data'].get('xdist') else 'not installed: serial'})"]
    lines += _failures(j)
    return "\n".join(lines)


def _failures(j):
    lines = []
    if j["failures"]:
        lines += ["", "Failures:", ""]
        lines += [f"- `{f['test']}` ({f['kind']}): {_cell(f['message'])}" for f in j["failures"]]
    if j["skips"]:
        lines += ["", "| skipped | reason |", "|---|---|"]
        lines += [f"| {n} | {_cell(reason)} |" for reason, n in
                  sorted(j["skips"].items(), key=lambda kv: -kv[1])]
    return lines


def _sweep_rows(rows):
    order = {op: i for i, op in enumerate(OPS)}
    dt = {d: i for i, d in enumerate(DTYPES)}
    return sorted(rows, key=lambda r: (order.get(r["op"], 9), r["case"], r["backend"],
                                       dt.get(r["dtype"], 9)))


def sweep_table(rows) -> str:
    """The correctness table; backends that could not run are one line each."""
    skipped = sorted({(r["backend"], r.get("message", "")) for r in rows
                      if r["status"] == "skipped"})
    lines = [f"- {b}: not run here ({_cell(why)})" for b, why in skipped]
    run = [r for r in rows if r["status"] != "skipped"]
    if run:
        lines += ["", "| op | case | shape | backend | dtype | worst tensor | max rel err | tol "
                  "| result |", "|---|---|---|---|---|---|---|---|---|"]
    for r in _sweep_rows(run):
        err = f"{r['max_rel']:.2e}" if "max_rel" in r else ""
        tol = f"{r['tol']:.0e}" if "tol" in r else ""
        res = r["status"] if r["status"] == "pass" else f"**{r['status']}** {_cell(r['message'])}"
        lines.append(f"| {r['op']} | {r['case']} | {'x'.join(map(str, r['shape']))} | "
                     f"{r['backend']} | {r['dtype']} | {r.get('worst', '')} | {err} | {tol} | "
                     f"{res} |")
    return "\n".join(lines)


def _sweep(by):
    r = by.get("sweep")
    lines = []
    if r:
        lines += ["## Correctness", "", "Every output and every gradient against the float64 "
                  "reference, ||out - ref|| / ||ref|| vs docs/semantics.md's tolerance.", "",
                  _status(r), "", sweep_table(r["data"].get("rows", []))]
    for tool in ("memcheck", "racecheck"):
        s = by.get(tool)
        if s:
            lines += ["", f"### compute-sanitizer {tool}", "", _status(s)]
            bad = [x for x in s.get("data", {}).get("rows", []) if x["status"] in ("FAIL", "error")]
            if bad:
                lines += ["", sweep_table(bad)]
    return "\n".join(lines)


def _bench_ops(r):
    if not r:
        return ""
    lines = ["## Op benchmarks", "", _status(r)]
    rows = r.get("data", {}).get("rows") or []
    if r.get("data", {}).get("junit"):
        lines += _failures(r["data"]["junit"])
    if rows:
        peaks = rows[0]
        l2 = peaks.get("measured_l2_gbs")
        l2 = l2 if isinstance(l2, (int, float)) and math.isfinite(l2) and l2 > 0 else None
        lines += ["", f"Floors measured in this run: copy {peaks['measured_copy_gbs']:.0f} GB/s, "
                  f"bf16 matmul {peaks['measured_matmul_tflops']:.0f} TFLOP/s"
                  + (f", L2->SM reads {l2:.0f} GB/s" if l2 else "") + ". "
                  "ms: CUDA-event median; vs eager / vs compile: their ms over this one's; "
                  "% of floor: the copy or matmul floor (the larger) over ms; % of modelled "
                  "floor: the Triton backend's floor modelled by benchmarks/roofline.py from the "
                  "launch plans, with this run's measured copy and matmul rates "
                  + ("and L2-to-SM read bandwidth as ceilings" if l2 else
                     "as ceilings (L2-to-SM: the model's Hopper figure, not measured here)")
                  + ", over ms (bf16 only); peak MB: beyond the inputs; saved MB: kept for "
                  "backward beyond x and the parameters.", "",
                  ops_report.table(rows), "", targets_table(rows), "",
                  "![op benchmarks](adapters.png)"]
    return "\n".join(lines)


def targets_table(rows) -> str:
    """heba's performance targets against this run's bf16 forward+backward rows, per fused backend."""
    idx = {(x["case"], x["impl"]): x for x in rows
           if x["dtype"] == "bf16" and x["mode"] == "fwdbwd"}
    lines = ["| target (bf16 fwd+bwd) | backend | measured | met |", "|---|---|---|---|"]
    for case, what, need in TARGETS:
        for impl in ("triton", "cuda"):
            if (case, impl) in idx:
                lines.append(_target_row(case, what, need, impl, idx[(case, impl)],
                                       idx.get((case, "compile"))))
    for (case, impl), mine in sorted(idx.items()):
        eager = idx.get((case, "eager"))
        if impl in ("triton", "cuda") and eager and eager["saved_for_backward_bytes"]:
            frac = mine["saved_for_backward_bytes"] / eager["saved_for_backward_bytes"]
            lines.append(f"| {case} saved-for-backward <= 1/3 of the reference's | {impl} | "
                         f"{frac:.2f} | {'yes' if frac <= 1 / 3 else 'no'} |")
    return "\n".join(lines)


def _target_row(case, what, need, impl, mine, comp) -> str:
    if what == "floor":
        goal = f"{case} >= {need:.0f}% of floor"
        val, txt = mine["pct_of_floor"], f"{mine['pct_of_floor']:.0f}% of floor"
    else:
        goal = f"{case} >= {need:.1f}x torch.compile"
        val = None if comp is None else comp["cuda_ms"] / mine["cuda_ms"]
        txt = "no torch.compile row" if comp is None else f"{val:.2f}x"
    met = "" if val is None else ("yes" if val >= need else "no")
    return f"| {goal} | {impl} | {txt} | {met} |"


def _bench_e2e(r):
    if not r:
        return ""
    lines = ["## Training step (end to end)", "", _status(r)]
    d = r.get("data", {})
    if d.get("junit"):
        lines += _failures(d["junit"])
    if d.get("steps") or d.get("batches"):
        lines += ["", train_report.table(d.get("steps", []), d.get("batches", [])), "",
                  "![training step](train.png)"]
    return "\n".join(lines)


def _tune(r):
    if not r:
        return ""
    lines = ["## Launch-plan variants (tune)", "", _status(r)]
    data = r.get("data", {}).get("tune") or {}
    if data.get("rows"):
        lines += ["", tune.markdown(data)]
    return "\n".join(lines)


def _tails(results):
    bad = [r for r in results if r["status"] in ("failed", "cut")]
    if not bad:
        return ""
    lines = ["## Output of the stages that failed or were cut (last lines; all in gpu_check.log)"]
    for r in bad:
        lines += ["", f"### {r['name']}", "", "```text", r.get("tail") or "(no output)", "```"]
    return "\n".join(lines)


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")
