"""Launch-plan variants of the Triton visual adapter, timed beside the roofline model.

    python -m tools.gpu_check.tune --out tune.json [--size clip|tiny] [--budget S]

heba_kernels/heba_visual.py picks its launch plan from a few module-level choices,
each decided so far by the roofline model (benchmarks/roofline.py) alone. This tool
measures them: for the two visual cases of :mod:`benchmarks.cases` (ViT-B/16 at
the attention position ``[256, 197, 768]`` and the MLP position ``[256, 197, 3072]``,
bf16, forward + backward), then the same two at the published recipe's batch 16
(``-b16``: fewer row blocks than SMs, where the plans differ), it runs the shipped plan
and one variant per choice
flipped to its alternative at that width, by setting the module attribute for the
variant's run and restoring it afterwards:

* ``y-kept`` / ``y-recomputed``: ``KEEP_Y_MIN_DIM`` (the pre-LayerNorm ``y`` kept for
  backward, or read back from a per-program scratch and recomputed);
* ``down-fused`` / ``down-separate``: ``FUSE_DOWN_BELOW_DIM`` (the down projection
  inside the forward kernel, halo included, or its own launch);
* ``dw-in-dx`` / ``dw-split-k``: ``DW_IN_DX`` (the weight gradients summed by the dx
  kernel, ``FUSED_DW_MAX_H`` raised to the case's bottleneck where it is narrower, or by
  two split-K launches);
* ``dv-gemm`` / ``dv-in-dy``: ``DV_GEMM_MIN_DIM`` (``dv = (dy Wu) gelu'(v)`` a launch of its
  own, tiled as a GEMM, or a phase of the _dy kernel's blocks);
* ``u-recomputed`` / ``u-saved``: ``SAVE_U_MIN_DIM`` (the bottleneck ``u`` kept for
  backward, or recomputed there);
* ``rows-fastest``: ``CHUNKS_FASTEST`` (the down and dx kernels' programs that share a row
  block dispatched together, or row block fastest: the roofline's dispatch-order rule);
* ``sweeps-one-way``: ``ALTERNATE_SWEEPS`` (a program's repeated sweeps over its rows in
  alternating directions, or all from the first chunk: the roofline's re-sweep rule);
* ``dy-forward-blocks`` (from ``KEEP_Y_MIN_DIM`` up): ``RESWEEP_ROWS`` / ``RESWEEP_HV``
  (the _dy kernel's 32-row blocks and 128-column dv sweeps, or the other kernels' 128-row
  blocks with 32-column dv sweeps);
* ``fwd-rows-128`` (from ``KEEP_Y_MIN_DIM`` and ``BIG_BLOCK_MIN_DIM`` up):
  ``KEPT_Y_ROWS`` (the forward kernel's 64-row blocks, or 128 rows as the other kernels');
* ``fwd-cols-256`` (from ``KEEP_Y_MIN_DIM`` and ``FUSE_DOWN_BELOW_DIM`` up): ``FWD_COLS``
  (the forward kernel's 128-column chunks of D, or 256);
* ``tiles-128`` (from ``BIG_BLOCK_MIN_DIM`` up): ``WIDE_TILE_COLS`` (the down and dv
  launches' tiles 256 bottleneck columns wide with 16-bit operands, or 128);
* ``splits-per-sm-1``: ``ATB_PROGRAMS_PER_SM`` (the weight gradients' split-K launch
  aiming at 4 programs per SM, or 1: fewer float32 slots to write and sum);
* ``fwd-one-part`` (where ``y`` is kept and the down projection is a launch of its own):
  ``FWD_MAX_PARTS`` (a batch of fewer row blocks than SMs runs the forward kernel in parts
  of D, or whole blocks; the same plan wherever the blocks fill the GPU);
* ``block-rows-32`` / ``-64`` / ``-128``: ``_block_t`` with that many rows per program
  (shipped: 128 from ``BIG_BLOCK_MIN_DIM``, 64 below). A variant whose plan
  is the shipped one is listed as such and not run again.

Per variant, correctness first: the output and every gradient against the shipped
plan's on the same inputs, ``||a - b|| / ||b||`` within the bf16 tolerance of the
correctness sweep (:mod:`tools.gpu_check.sweep`, docs/semantics.md), fresh buffers
NaN-filled; the shipped plan itself against the float64 reference. A wrong variant
is reported as such and not timed. Then forward + backward is timed
(``triton.testing.do_bench``: CUDA events, median, after a warm-up that excludes
compilation), beside the model's floor for the same patched plan
(:func:`benchmarks.roofline.modelled_floor_ms`, with this GPU's SM count and its copy,
bf16 matmul and L2-to-SM read rates measured in the same run as ceilings:
:mod:`benchmarks.ceilings`), measured / modelled,
and the change against the shipped plan, measured and modelled.

``--budget S`` (or ``--deadline``, a unix time) bounds the run: no variant starts
when the longest one so far would not finish in time, and the rows say which were
not run. Rows are appended to ``<out>.jsonl`` as they come, after ``<out>.todo`` lists
every variant to run (a run killed midway keeps them, and the GPU check names the
variant it was running); ``<out>`` gets everything at the end, and ``<out>`` with ``.md`` for
``.json`` the tables (the GPU check's report shows them in a section of their own).
Exit status 1 when a variant is wrong or fails to run.

``--size tiny`` (the GPU check's dry run, on a CPU in Triton's interpreter): widths
48 and 80 on a 4x5 grid, the width thresholds scaled so that the two cases sit on
either side of every switch as D768 and D3072 do, and (interpreter only) the
rows per program taken from ``_block_t``; times are the host's wall clock, meaningless.
``HEBA_GPU_CHECK_INJECT_FAIL=tune`` perturbs the output of the first case's first
variant after the shipped plan by 5% (to show that a wrong variant is caught).

This module imports only the standard library at the top, so the report
(:mod:`tools.gpu_check.report`) can render its rows anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field

CASES = ("visual-attn-d768", "visual-mlp-d3072")      # of benchmarks.cases
SMALL_BATCH = 16         # the published recipe's: the cases again at it (``-b16``)
SIZES = ("clip", "tiny")
BLOCK_CAPS = (32, 64, 128)
# The dry run's widths and thresholds: the attention-like case (D48, h12) sits below every
# width switch and the MLP-like one (D80, h20, h padded to 32) above, as D768 and D3072 do
# (the switches that hold at every width, y kept and the down projection a launch of its
# own, at both).
TINY = (("visual-attn-tiny-d48", 48), ("visual-mlp-tiny-d80", 80))
TINY_SWITCHES = dict(KEEP_Y_MIN_DIM=0, FUSE_DOWN_BELOW_DIM=0, BIG_BLOCK_MIN_DIM=64,
                     DV_GEMM_MIN_DIM=64, FUSED_DW_MAX_H=16)
# Every attribute a variant or the dry run may set: all are checked restored after each run.
WATCHED = ("KEEP_Y_MIN_DIM", "FUSE_DOWN_BELOW_DIM", "DW_IN_DX", "FUSED_DW_MAX_H",
           "DV_GEMM_MIN_DIM", "WIDE_TILE_COLS", "BIG_BLOCK_MIN_DIM",
           "SAVE_U_MIN_DIM", "RESWEEP_ROWS", "RESWEEP_HV", "KEPT_Y_ROWS", "FWD_COLS",
           "FWD_MAX_PARTS", "ATB_PROGRAMS_PER_SM",
           "CHUNKS_FASTEST",
           "ALTERNATE_SWEEPS", "_block_t", "_config")
INJECT_FACTOR = 1.05


@dataclass
class Variant:
    """The shipped plan with ``patches`` (attribute of heba_kernels.heba_visual -> value)."""
    name: str
    change: str
    patches: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- variants


def capped_block_t(cap: int):
    """``_block_t`` with ``cap`` rows at every width, halved only where a block would be
    longer than all the tokens (the shipped rule, with its cap fixed)."""
    def block_t(T: int, D: int, sms: int) -> int:
        bt = cap
        while bt > 16 and bt // 2 >= T:
            bt //= 2
        return bt
    block_t.cap = cap
    return block_t


def variants(case) -> list:
    """The shipped plan and one variant per choice flipped at ``case``'s width, from the
    thresholds as they are now (the dry run's scaled ones inside :func:`patched`)."""
    from heba_kernels import heba_visual as hv
    D, h = case.dim, case.dim // 4
    hp = max(16, 1 << (h - 1).bit_length())
    out = [Variant("shipped", "the shipped plan")]

    def flip(attr, on, name_on, name_off, value_on, value_off, what):
        now = getattr(hv, attr)
        value = value_off if on else value_on
        out.append(Variant(name_off if on else name_on,
                           f"{attr} {now} -> {value}: {what[not on]} (shipped: {what[on]})",
                           {attr: value}))

    flip("KEEP_Y_MIN_DIM", D >= hv.KEEP_Y_MIN_DIM, "y-kept", "y-recomputed", D, D + 1,
         ("y recomputed", "y kept for backward"))
    flip("FUSE_DOWN_BELOW_DIM", D < hv.FUSE_DOWN_BELOW_DIM, "down-fused", "down-separate",
         D + 1, D, ("down projection a launch of its own", "down projection in the forward "
                    "kernel"))
    if hv.DW_IN_DX and hp <= hv.FUSED_DW_MAX_H:
        out.append(Variant("dw-split-k", "DW_IN_DX True -> False: weight gradients by split-K "
                           "launches (shipped: summed in the dx kernel)", {"DW_IN_DX": False}))
    else:
        cap = max(hp, hv.FUSED_DW_MAX_H)
        out.append(Variant("dw-in-dx", f"DW_IN_DX {hv.DW_IN_DX} -> True, FUSED_DW_MAX_H "
                           f"{hv.FUSED_DW_MAX_H} -> {cap}: weight gradients summed in the dx "
                           "kernel (shipped: split-K launches)",
                           {"DW_IN_DX": True, "FUSED_DW_MAX_H": cap}))
    flip("DV_GEMM_MIN_DIM", D >= hv.DV_GEMM_MIN_DIM, "dv-gemm", "dv-in-dy", D, D + 1,
         ("dv in the _dy kernel's blocks", "dv a launch of its own (128-row GEMM tiles, dWm "
          "in the dwconv launch)"))
    flip("SAVE_U_MIN_DIM", D >= hv.SAVE_U_MIN_DIM, "u-saved", "u-recomputed", D, D + 1,
         ("u recomputed in backward", "u kept for backward"))
    out.append(Variant("rows-fastest", "CHUNKS_FASTEST True -> False: the down and dx "
                       "kernels' programs row block fastest (shipped: a row block's chunks "
                       "consecutive)", {"CHUNKS_FASTEST": False}))
    out.append(Variant("sweeps-one-way", "ALTERNATE_SWEEPS True -> False: every sweep over a "
                       "program's rows from the first D chunk (shipped: alternating)",
                       {"ALTERNATE_SWEEPS": False}))
    if D >= hv.KEEP_Y_MIN_DIM:
        out.append(Variant("dy-forward-blocks", f"RESWEEP_ROWS {hv.RESWEEP_ROWS} -> 128, "
                           f"RESWEEP_HV {hv.RESWEEP_HV} -> 32: the _dy kernel on the other "
                           "kernels' 128-row blocks (shipped: blocks whose re-sweeps fit in "
                           "L2)",
                           {"RESWEEP_ROWS": 128, "RESWEEP_HV": 32}))
    if D >= hv.KEEP_Y_MIN_DIM and D >= hv.BIG_BLOCK_MIN_DIM:    # (below: 64 rows anyway)
        out.append(Variant("fwd-rows-128", f"KEPT_Y_ROWS {hv.KEPT_Y_ROWS} -> 128: the forward "
                           "kernel on 128-row blocks x 64 columns of D (shipped: blocks whose "
                           "second sweep mostly hits L2)", {"KEPT_Y_ROWS": 128}))
    if D >= hv.KEEP_Y_MIN_DIM and D >= hv.FUSE_DOWN_BELOW_DIM and hv.FWD_COLS != 256:
        out.append(Variant("fwd-cols-256", f"FWD_COLS {hv.FWD_COLS} -> 256: the forward "
                           "kernel's chunks 256 columns of D wide (shipped: 128; 256 spills "
                           "a few registers with some Triton releases and float32 tokens)",
                           {"FWD_COLS": 256}))
    if D >= hv.BIG_BLOCK_MIN_DIM and hv.WIDE_TILE_COLS != 128:
        out.append(Variant("tiles-128", f"WIDE_TILE_COLS {hv.WIDE_TILE_COLS} -> 128: the "
                           "down and dv launches' tiles 128 bottleneck columns wide (shipped: "
                           f"{hv.WIDE_TILE_COLS} with 16-bit operands)",
                           {"WIDE_TILE_COLS": 128}))
    if D >= hv.KEEP_Y_MIN_DIM and D >= hv.FUSE_DOWN_BELOW_DIM and hv.FWD_MAX_PARTS > 1:
        out.append(Variant("fwd-one-part", f"FWD_MAX_PARTS {hv.FWD_MAX_PARTS} -> 1: the "
                           "forward kernel on whole row blocks (shipped: parts of D where "
                           "the blocks are fewer than the SMs)", {"FWD_MAX_PARTS": 1}))
    if hv.ATB_PROGRAMS_PER_SM != 1:
        out.append(Variant("splits-per-sm-1", f"ATB_PROGRAMS_PER_SM {hv.ATB_PROGRAMS_PER_SM} "
                           "-> 1: the weight gradients' split-K launch with fewer token splits "
                           "(fewer float32 slots written and summed, fewer programs per SM)",
                           {"ATB_PROGRAMS_PER_SM": 1}))
    shipped_cap = 128 if D >= hv.BIG_BLOCK_MIN_DIM else 64
    for cap in BLOCK_CAPS:
        out.append(Variant(f"block-rows-{cap}", f"_block_t capped at {cap} rows per program "
                           f"(shipped: {shipped_cap})", {"_block_t": capped_block_t(cap)}))
    return out


def _interpreter_blocks(config):
    """``_config`` whose rows per program come from ``_block_t`` in the interpreter too
    (which otherwise runs 16-row blocks), so the dry run's block variants change the plan."""
    def wrapped(T, D, h, weight_dtype, sms, gpu):
        from heba_kernels import heba_visual as hv
        cfg = config(T, D, h, weight_dtype, sms, gpu)
        return cfg if gpu else dict(cfg, BLOCK_T=hv._block_t(T, D, sms))
    return wrapped


def dry_switches(gpu: bool) -> dict:
    """What the tiny size patches for the whole run: the scaled thresholds (and, in the
    interpreter, the rows per program from ``_block_t``)."""
    from heba_kernels import heba_visual as hv
    out = dict(TINY_SWITCHES)
    if not gpu:
        out["_config"] = _interpreter_blocks(hv._config)
    return out


@contextlib.contextmanager
def patched(patches: dict):
    """Set attributes of heba_kernels.heba_visual for the block (benchmarks.roofline's own
    copy of ``SAVE_U_MIN_DIM`` follows); every one is restored on the way out."""
    from benchmarks import roofline
    from heba_kernels import heba_visual as hv
    saved = []
    try:
        for name, value in patches.items():
            if not hasattr(hv, name):
                raise AttributeError(f"heba_kernels.heba_visual has no attribute {name!r} "
                                     f"(renamed? update tools/gpu_check/tune.py)")
            mods = [hv] + ([roofline] if name == "SAVE_U_MIN_DIM"
                           and hasattr(roofline, name) else [])
            for mod in mods:
                saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, value)
        yield
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)


def snapshot() -> dict:
    """The watched attributes as they are now (compared by identity)."""
    from benchmarks import roofline
    from heba_kernels import heba_visual as hv
    out = {f"heba_visual.{n}": getattr(hv, n, None) for n in WATCHED}
    out["roofline.SAVE_U_MIN_DIM"] = getattr(roofline, "SAVE_U_MIN_DIM", None)
    return out


def _changed(before: dict) -> list:
    now = snapshot()
    return [k for k in before if now[k] is not before[k] and now[k] != before[k]]


# --------------------------------------------------------------------------- one case


def cases(size: str) -> list:
    """The visual cases of benchmarks/cases.py and the same at ``SMALL_BATCH`` (``clip``),
    or the dry run's tiny two."""
    import dataclasses
    from benchmarks.cases import CASES as BENCH, Case
    if size == "tiny":
        return [Case(name, "heba_visual", 4, 1 + 4 * 5, D, grid=(4, 5)) for name, D in TINY]
    found = {c.name: c for c in BENCH if c.op == "heba_visual" and c.name in CASES}
    missing = [n for n in CASES if n not in found]
    if missing:
        raise ValueError(f"benchmarks/cases.py has no visual case {', '.join(missing)} "
                         f"(renamed? update CASES in tools/gpu_check/tune.py)")
    big = [found[n] for n in CASES]
    return big + [dataclasses.replace(c, name=f"{c.name}-b{SMALL_BATCH}", batch=SMALL_BATCH)
                  for c in big]


def plan(case, sms: int, gpu: bool) -> list:
    """The forward's and backward's launches of ``case`` as the launchers take them now."""
    import torch
    from heba_kernels import heba_visual as hv
    B, (H, W), D = case.batch, case.grid, case.dim
    h = D // 4
    return (hv.visual_fwd_plan(B, H, W, D, h, torch.bfloat16, sms, gpu)
            + hv.visual_bwd_plan(B, H, W, D, h, torch.bfloat16, sms, gpu,
                                 recompute_u=D < hv.SAVE_U_MIN_DIM))


def _plan_json(steps) -> list:
    return [dict(step=s.step, kernel=s.kernel, grid=list(s.grid),
                 meta={k: (v if isinstance(v, (bool, int, float, str)) else str(v))
                       for k, v in s.meta.items()}) for s in steps]


def modelled_us(case, gpu_model):
    """(floor in µs, why not) of the plan as patched now, by benchmarks.roofline."""
    try:
        from benchmarks import roofline
        ms = roofline.modelled_floor_ms(case.name, "fwdbwd", "bf16", gpu_model, cases=[case])
    except Exception as err:   # the model's own bug or a renamed function: said, not fatal
        return None, f"{type(err).__name__}: {str(err)[:200]}"
    return (None, "the model does not apply") if ms is None else (ms * 1e3, "")


class Inputs:
    """One case's tokens, weights and upstream gradient (bf16), and its kwargs."""

    def __init__(self, case, device, seed=0):
        import torch
        from tests.helpers import visual_params
        from tools.gpu_check.sweep import SCALE
        gen = torch.Generator(device=device).manual_seed(seed)
        shape = case.shape()
        self.x = torch.randn(shape, generator=gen, device=device).to(torch.bfloat16)
        self.g = torch.randn(shape, generator=gen, device=device).to(torch.bfloat16)
        self.params = visual_params(case.dim, device=device, dtype=torch.bfloat16, seed=seed)
        H, W = case.grid
        # The sweep's scale (not the benchmarks' 0.025, under which out and dx would be
        # almost x and g: a wrong adapter term would hide); the work is the same.
        self.kwargs = dict(scale=SCALE, num_prefix_tokens=case.tokens - H * W, grid=(H, W),
                           batch_first=True)

    def step(self, backend="triton", leaves=None):
        """One forward + backward: ``(out, {"x": dx, name: dparam})``."""
        import torch
        from heba import ops
        x, params = leaves or self.leaves()
        out = ops.heba_visual(x, **params, **self.kwargs, backend=backend)
        grads = torch.autograd.grad(out, [x, *params.values()], self.g.to(out.dtype))
        return out.detach(), dict(zip(["x", *params], grads))

    def leaves(self, dtype=None):
        x = self.x.detach().to(dtype or self.x.dtype).requires_grad_(True)
        params = {k: v.detach().to(dtype or v.dtype).requires_grad_(True)
                  for k, v in self.params.items()}
        return x, params


def compare(actual, expected, tol) -> dict:
    """Errors of the output and every gradient, pass or FAIL (the sweep's comparison)."""
    from tools.gpu_check.sweep import verdict
    return verdict([("out", actual[0], expected[0])]
                   + [(f"d{k}", actual[1][k], expected[1][k]) for k in expected[1]], tol)


@contextlib.contextmanager
def nan_filled():
    """``HEBA_DEBUG_NAN_FILL=1`` for the block (an unwritten tile then fails the check)."""
    old = os.environ.get("HEBA_DEBUG_NAN_FILL")
    os.environ["HEBA_DEBUG_NAN_FILL"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HEBA_DEBUG_NAN_FILL", None)
        else:
            os.environ["HEBA_DEBUG_NAN_FILL"] = old


def bench_us(fn, device) -> float:
    """Median µs of ``fn``: CUDA events after warm-up on a GPU (the first call, which
    compiles, is outside the timing), a host clock elsewhere."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    import triton.testing
    return 1e3 * float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


# --------------------------------------------------------------------------- the run


class Clock:
    """The run's deadline: a variant starts only when the longest so far would still finish.
    ``lost``: why nothing more can run on this device (its CUDA context is gone), or ""."""

    def __init__(self, deadline: float):
        self.deadline, self.longest, self.lost = deadline, 0.0, ""

    def allows(self) -> bool:
        return not self.deadline or time.time() + self.longest < self.deadline

    def took(self, seconds: float):
        self.longest = max(self.longest, seconds)


def _row(case, v, **extra):
    return dict(case=case.name, shape=list(case.shape()), variant=v.name, change=v.change,
                **extra)


def run_case(case, vs, device, model_gpu, clock, emit, inject=False):
    """The variants ``vs`` of one case; ``emit(row)`` for each, in order. Returns the rows."""
    import torch
    from heba_kernels._triton_common import plan_device
    from tests.helpers import TOL
    sms, gpu = plan_device(device)
    tol = TOL[torch.bfloat16]
    rows, base, shipped, inputs = [], None, None, None
    shipped_plan = plan(case, sms, gpu)
    injected = False
    for v in vs:
        before = snapshot()
        if not clock.allows():
            rows.append(emit(_row(case, v, status="not run",
                                  message="the time budget ran out before it started")))
            continue
        if clock.lost or (v.name != "shipped" and base is None):
            why = clock.lost or "the shipped plan did not pass: nothing to compare with"
            rows.append(emit(_row(case, v, status="not run", message=why)))
            continue
        t0 = time.time()
        row = _row(case, v)
        try:
            with patched(v.patches):
                steps = plan(case, sms, gpu)
                row.update(launches=len(steps), plan=_plan_json(steps))
                floor, why = modelled_us(case, model_gpu)
                row.update(modelled_us=floor, model_note=why)
                if v.name != "shipped" and steps == shipped_plan:
                    row.update(status="same", message="the shipped plan: not run again")
                else:
                    inputs = inputs or Inputs(case, device)
                    row.update(_check_and_time(inputs, base, device, tol,
                                               inject and not injected and v.name != "shipped"))
                    injected |= row.get("injected", False)
        except Exception as err:       # a variant that cannot run is a result, with its reason
            row.update(status="error", message=f"{type(err).__name__}: {str(err)[:400]}")
            if device.type == "cuda":
                try:
                    torch.cuda.synchronize()
                except Exception:
                    clock.lost = (f"the CUDA context was lost after {case.name} {v.name} "
                                  f"failed (rerun with --variants without it)")
        row["seconds"] = time.time() - t0
        clock.took(row["seconds"])
        changed = _changed(before)
        if changed:                      # a patch that outlived its variant: stop here
            raise RuntimeError(f"{v.name}: {', '.join(changed)} not restored")
        row["restored"] = True
        if v.name == "shipped":
            base = row.pop("_outputs", None)
            shipped = row
        row.pop("_outputs", None)
        _versus(row, shipped)
        rows.append(emit(row))
    return rows


def _check_and_time(inputs, base, device, tol, inject):
    """Correctness (shipped: against float64; a variant: against the shipped plan's), then
    the time of a correct one."""
    import torch
    out = {}
    with nan_filled():
        t0 = time.perf_counter()
        got = inputs.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
    if inject:
        got = (got[0] * INJECT_FACTOR, got[1])
        out["injected"] = True
    if base is None:                     # the shipped plan: against the float64 reference
        ref = inputs.step("reference", inputs.leaves(torch.float64))
        out.update(compare(got, ref, tol), checked_against="float64 reference")
        del ref
    else:
        out.update(compare(got, base, tol), checked_against="shipped plan")
    if out["status"] != "pass":
        out["message"] = "not timed: " + out["message"]
        return out
    if device.type == "cuda":
        out["measured_us"] = bench_us(lambda: inputs.step(), device)
        out["timing"] = "CUDA-event median (triton.testing.do_bench), warm"
    else:                                 # the interpreter: the check's own run, wall clock
        out["measured_us"] = first * 1e6
        out["timing"] = "host wall clock in Triton's interpreter (dry run: meaningless)"
    if base is None:
        out["_outputs"] = got
    return out


def _versus(row, shipped):
    """Measured and modelled change against the shipped plan, and measured / modelled."""
    m, f = row.get("measured_us"), row.get("modelled_us")
    if m and f:
        row["measured_over_modelled"] = m / f
        row["pct_of_floor"] = 100.0 * f / m
    if shipped is None or row is shipped:
        return
    if m and shipped.get("measured_us"):
        row["vs_shipped_pct"] = 100.0 * (m / shipped["measured_us"] - 1)
    if f and shipped.get("modelled_us"):
        row["model_vs_shipped_pct"] = 100.0 * (f / shipped["modelled_us"] - 1)


def measure_peaks(device) -> dict:
    """This GPU's ceilings for the model, as benchmarks/test_adapters.py measures them
    (:func:`benchmarks.ceilings.measure_ceilings`: copy bandwidth, bf16 matmul rate and
    L2-to-SM read bandwidth, timed by :func:`bench_us`): its floors become this GPU's."""
    from benchmarks.ceilings import measure_ceilings
    return measure_ceilings(device, lambda fn: bench_us(fn, device) / 1e3)


def model_gpu(device):
    """The roofline model's GPU: this one's SMs and measured rates; in the interpreter the
    H200's datasheet rates at the interpreter's SM count (the plans it runs)."""
    from dataclasses import replace
    from benchmarks import roofline
    from heba_kernels._triton_common import plan_device
    sms, gpu = plan_device(device)
    if not gpu:
        return replace(roofline.GPUS["H200"], name="H200 SXM datasheet (dry run)", sms=sms)
    peaks = measure_peaks(device)
    return roofline.measured_gpu({"measured_copy_gbs": peaks["copy_gbs"],
                                  "measured_matmul_tflops": peaks["matmul_tflops"],
                                  "measured_l2_gbs": peaks["l2_gbs"],
                                  "device": peaks["device"]}, sms=sms, l2=peaks["l2_bytes"])


def run(size, device, deadline=0.0, only=None, inject=False, emit=None,
        announce=None) -> dict:
    """Every case and variant; the result as written to tune.json. ``emit(row)`` is called
    for each row as it comes, ``announce(todo)`` first with every (case, variant) to run."""
    import torch
    from dataclasses import asdict
    from heba_kernels._triton_common import plan_device
    device = torch.device(device)
    emit = emit or (lambda row: row)
    start = snapshot()
    clock = Clock(deadline)
    _, gpu = plan_device(device)
    base = dry_switches(gpu) if size == "tiny" else {}
    work = []
    for case in cases(size):
        with patched(base):
            work.append((case, [v for v in variants(case) if only is None
                                or v.name == "shipped" or v.name in only]))
    if announce:
        announce([_row(case, v) for case, vs in work for v in vs])
    mgpu = model_gpu(device)
    rows = []
    for case, vs in work:
        with patched(base):
            rows += run_case(case, vs, device, mgpu, clock, emit, inject=inject and not rows)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    changed = _changed(start)
    return dict(size=size, device=str(device), dry=not gpu,
                device_name=torch.cuda.get_device_name(device) if gpu else "cpu",
                model_gpu=asdict(mgpu), restored=not changed, not_restored=changed,
                rows=rows, fastest=fastest(rows))


def fastest(rows) -> dict:
    """Per case, the variant with the least measured time (correct ones only)."""
    out = {}
    for r in rows:
        if r.get("status") == "pass" and r.get("measured_us"):
            best = out.get(r["case"])
            if best is None or r["measured_us"] < best["measured_us"]:
                out[r["case"]] = dict(variant=r["variant"], measured_us=r["measured_us"],
                                      vs_shipped_pct=r.get("vs_shipped_pct", 0.0))
    return out


# --------------------------------------------------------------------------- markdown


def _us(v) -> str:
    if v is None:
        return ""
    return f"{v:.3f}" if v < 1 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _pct(v, word=True) -> str:
    """A change of time: ``+3.2%``, or in words ``slower than shipped by 3.2%``."""
    if v is None:
        return ""
    if not word:
        return f"{v:+.1f}%"
    return f"{'faster' if v < 0 else 'slower'} than shipped by {abs(v):.1f}%"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def verdict(r) -> str:
    s = r.get("status")
    if r.get("variant") == "shipped" and s == "pass":
        return "shipped (checked against the float64 reference)"
    if s == "pass":
        return _pct(r.get("vs_shipped_pct")) or "correct"
    if s == "same":
        return "same plan as shipped"
    if s == "FAIL":
        return f"**WRONG** {_cell(r.get('message', ''))}"
    if s == "error":
        return f"**error** {_cell(r.get('message', ''))}"
    return f"not run: {_cell(r.get('message', ''))}"


def markdown(data: dict) -> str:
    """The tables of a tune.json: per case, one row per variant, and the fastest."""
    rows = data.get("rows", [])
    g = data.get("model_gpu") or {}
    if data.get("dry"):
        timing = ("**Dry run**: tiny shapes in Triton's interpreter; the times are the host's "
                  "wall clock and mean nothing.")
    else:
        timing = (f"Measured on {data.get('device_name', 'the GPU')}: forward + backward, "
                  "CUDA-event median (triton.testing.do_bench) after a warm-up that excludes "
                  "compilation.")
    lines = [timing, "", "Each variant is the shipped plan with one choice of "
             "heba_kernels/heba_visual.py flipped (the attribute set for its run, then "
             "restored). Correct: output and every gradient within the bf16 tolerance of the "
             "shipped plan's (||a - b|| / ||b||), the shipped plan's within it of the float64 "
             "reference; a wrong variant is not timed. Modelled floor: benchmarks/roofline.py "
             f"for the same plan on {g.get('name', '?')} ({g.get('sms', '?')} SMs, "
             f"{g.get('hbm', 0) / 1e9:.0f} GB/s, {g.get('bf16', 0) / 1e12:.0f} TFLOP/s"
             + (f", L2->SM reads {g['l2_bw'] / 1e9:.0f} GB/s" if g.get("l2_bw") else "")
             + "); "
             "% of floor: floor / measured; modelled vs shipped: the model's change."]
    if data.get("restored") is False:
        lines += ["", f"**Attributes not restored after the run**: {data.get('not_restored')}"]
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case]
        shape = "x".join(map(str, mine[0].get("shape", [])))
        lines += ["", f"### {case} [{shape}], bf16, forward + backward", "",
                  "| variant | what changed | launches | measured µs | modelled floor µs "
                  "| % of floor | modelled vs shipped | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in mine:
            pct = r.get("pct_of_floor")
            lines.append(
                f"| {r['variant']} | {_cell(r['change'])} | {r.get('launches', '')} | "
                f"{_us(r.get('measured_us'))} | {_us(r.get('modelled_us'))} | "
                f"{'' if pct is None else f'{pct:.0f}%'} | "
                f"{_pct(r.get('model_vs_shipped_pct'), word=False)} | {verdict(r)} |")
        lines += ["", fastest_line(case, data.get("fastest", {}).get(case))]
    skipped = [f"{r['case']} {r['variant']}" for r in rows if r["status"] == "not run"]
    if skipped:
        lines += ["", f"Not run ({len(skipped)}): " + ", ".join(skipped) + "."]
    return "\n".join(lines)


def fastest_line(case, best) -> str:
    if not best:
        return f"Fastest for {case}: none timed."
    if best["variant"] == "shipped":
        return f"Fastest for {case}: the shipped plan ({_us(best['measured_us'])} µs)."
    return (f"Fastest for {case}: `{best['variant']}` ({_us(best['measured_us'])} µs, "
            f"{_pct(best['vs_shipped_pct'])}).")


def stopped(rows, todo, why) -> list:
    """``rows`` completed from ``todo`` after the run stopped midway (killed at its limit,
    or crashed): the first variant without a row is the one it was running (``why``),
    the others after it were not started."""
    done = {(r["case"], r["variant"]) for r in rows}
    out, first = list(rows), True
    for t in todo:
        if (t["case"], t["variant"]) not in done:
            out.append(dict(t, status="not run", message=why if first else
                            "not started: the run stopped before it"))
            first = False
    return out


def counts(rows) -> dict:
    return {s: sum(r.get("status") == s for r in rows)
            for s in ("pass", "same", "FAIL", "error", "not run")}


# --------------------------------------------------------------------------- command line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file for the rows")
    ap.add_argument("--size", choices=SIZES, default=None,
                    help="clip (default on a GPU) or tiny (default elsewhere)")
    ap.add_argument("--budget", type=float, default=0.0,
                    help="seconds for the run (default: no limit)")
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="unix time after which no variant starts")
    ap.add_argument("--variants", default=None,
                    help="comma-separated names to run (the shipped plan always runs)")
    ap.add_argument("--device", default=None, help="default: cuda if visible, else cpu")
    args = ap.parse_args(argv)
    if args.budget < 0:
        ap.error(f"--budget: expected seconds >= 0, got {args.budget}")
    only = None
    if args.variants is not None:
        only = {v for v in args.variants.split(",") if v}
        known = {"shipped", "y-kept", "y-recomputed", "down-fused", "down-separate",
                 "dw-in-dx", "dw-split-k", "u-saved", "u-recomputed"} | \
            {f"block-rows-{c}" for c in BLOCK_CAPS}
        if only - known:
            ap.error(f"--variants: unknown {sorted(only - known)}; expected some of "
                     f"{','.join(sorted(known))}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        ap.error(f"--out: the folder {out_dir} does not exist")
    deadline = args.deadline
    if args.budget:
        deadline = min(deadline or float("inf"), time.time() + args.budget)
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or ("clip" if device.startswith("cuda") else "tiny")
    inject = "tune" in os.environ.get("HEBA_GPU_CHECK_INJECT_FAIL", "").split(",")
    lines, todo = args.out + ".jsonl", args.out + ".todo"
    for path in (lines, todo):
        if os.path.exists(path):
            os.remove(path)

    def announce(rows):
        with open(todo, "w") as f:
            json.dump(rows, f)

    def emit(row):
        with open(lines, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print(f"{row['case']} {row['variant']}: {row['status']} "
              f"{_us(row.get('measured_us'))} {row.get('message', '')}".rstrip(), flush=True)
        return row

    data = run(size, device, deadline=deadline, only=only, inject=inject, emit=emit,
               announce=announce)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1, default=str)
    md = os.path.splitext(args.out)[0] + ".md"
    with open(md, "w") as f:
        f.write(markdown(data) + "\n")
    n = counts(data["rows"])
    print(f"\ntune ({size}, {device}): {len(data['rows'])} variants, {n['pass']} timed, "
          f"{n['same']} same as shipped, {n['FAIL']} wrong, {n['error']} errors, "
          f"{n['not run']} not run; tables: {md}")
    return int(bool(n["FAIL"] or n["error"]) or not data["restored"])


if __name__ == "__main__":
    sys.exit(main())
