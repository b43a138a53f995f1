"""Correctness sweep: every op x every fused backend x {fp32, bf16, fp16, autocast} x shapes.

    python -m tools.gpu_check.sweep --out sweep.json [--size clip|small|tiny] [--jobs N]

Each check runs the public ``heba.ops`` function on one backend, forward and
backward with a random upstream gradient, and compares the output and every
gradient (x and each parameter) with the float64 reference on the same
(rounded) inputs by ``||out - ref|| / ||ref||`` against docs/semantics.md's tolerance for
the dtype (under autocast, the autocast dtype's). Non-finite values where the
reference is finite fail whatever the error. Fused buffers are NaN-filled
(``HEBA_DEBUG_NAN_FILL=1``) so an unwritten tile fails too.

Sizes: ``clip`` (ViT-B/16 and ViT-L/14 widths, 14x14 / 16x16 / 24x24 grids,
77 text tokens, ranks 16 and 64, plus odd shapes), ``small`` (the odd shapes
only: for compute-sanitizer) and ``tiny`` (the CPU dry run, Triton's
interpreter). ``--jobs N`` runs N processes side by side (Triton compiles on the
host), each appending rows to a JSON-lines file as it goes, so a sweep cut by a
timeout keeps what it checked. Exit status 1 when any check fails.
``HEBA_GPU_CHECK_INJECT_FAIL=sweep`` perturbs the first check's output by 5%
(to show that the sweep and its report catch a wrong kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

DTYPES = ("fp32", "bf16", "fp16", "autocast-bf16")
SCALE = 0.7


@dataclass(frozen=True)
class Check:
    """One (op, shape) of the sweep; ``kwargs`` go to the ``heba.ops`` function."""
    op: str
    name: str
    shape: tuple
    dim: int
    rank: int = 0
    bias: bool = True
    kwargs: dict = field(default_factory=dict)


def _visual(name, B, H, W, D, P=1, batch_first=True):
    N = P + H * W
    shape = (B, N, D) if batch_first else (N, B, D)
    return Check("heba_visual", name, shape, D, kwargs=dict(
        scale=SCALE, num_prefix_tokens=P, grid=(H, W), batch_first=batch_first))


def _text(name, shape):
    return Check("heba_text", name, tuple(shape), shape[-1], kwargs=dict(scale=SCALE))


def _low_rank(name, shape, rank, bias=True):
    return Check("low_rank", name, tuple(shape), shape[-1], rank=rank, bias=bias,
                 kwargs=dict(alpha=1.0))


ODD = [   # non-powers of two, non-square and 1xW grids, prefix 0 and 2, seq-first, no bias
    _visual("odd d40 5x7 P2 seq-first", 3, 5, 7, 40, P=2, batch_first=False),
    _visual("odd d72 1x9 P0", 1, 1, 9, 72, P=0),
    _text("odd d72 seq-first [13,3,72]", (13, 3, 72)),
    _text("odd d100 [3,5,7,100]", (3, 5, 7, 100)),
    _low_rank("odd d100 r7 [3,5,7,100]", (3, 5, 7, 100), 7),
    _low_rank("odd d40 r3 no bias", (11, 40), 3, bias=False),
]

CLIP = [
    _visual("B/16 attn d768 14x14", 4, 14, 14, 768),
    _visual("B/16 mlp d3072 14x14", 2, 14, 14, 3072),
    _visual("L/14 attn d1024 16x16", 2, 16, 16, 1024),
    _visual("L/14 mlp d4096 16x16", 2, 16, 16, 4096),
    _visual("L/14@336 attn d1024 24x24", 2, 24, 24, 1024),
    _visual("L/14@336 mlp d4096 24x24", 1, 24, 24, 4096),
    _visual("B/16 attn d768 14x14 seq-first", 3, 14, 14, 768, batch_first=False),
    # Throughput batches, where the plans pick their large row blocks on a big GPU (64
    # rows, the one-launch forward's halo and the dx kernel's weight gradients at the
    # attention position; 128 rows at the MLP position): small batches take 16-row blocks.
    _visual("B/16 attn d768 14x14 B96", 96, 14, 14, 768),
    _visual("B/16 mlp d3072 14x14 B96", 96, 14, 14, 3072),
    _text("B/16 text d512 x77", (4, 77, 512)),
    _text("B/16 text mlp d2048 x77", (2, 77, 2048)),
    _text("L/14 text d768 x77", (4, 77, 768)),
    _text("L/14 text mlp d3072 x77", (2, 77, 3072)),
    _low_rank("B/16 r16 d768", (4, 197, 768), 16),
    _low_rank("B/16 r64 d768", (4, 197, 768), 64),
    _low_rank("L/14 r16 d1024", (2, 257, 1024), 16),
    _low_rank("L/14 r64 d1024", (2, 257, 1024), 64),
    _low_rank("B/16 text r16 d512 x77", (4, 77, 512), 16),
] + ODD

TINY = [
    _visual("tiny d32 4x4", 2, 4, 4, 32),
    _visual("odd d40 3x5 P2 seq-first", 2, 3, 5, 40, P=2, batch_first=False),
    _text("tiny d32 x9", (2, 9, 32)),
    _text("odd d24 seq-first [5,3,24]", (5, 3, 24)),
    _low_rank("tiny d32 r16", (2, 9, 32), 16),
    _low_rank("odd d20 r3 no bias", (3, 5, 20), 3, bias=False),
]

SIZES = {"clip": CLIP, "small": ODD, "tiny": TINY}


def _params(check: Check, device, dtype, seed):
    from tests.helpers import low_rank_params, text_params, visual_params
    if check.op == "heba_visual":
        return visual_params(check.dim, device=device, dtype=dtype, seed=seed)
    if check.op == "heba_text":
        return text_params(check.dim, device=device, dtype=dtype, seed=seed)
    return low_rank_params(check.dim, check.rank, device=device, dtype=dtype, seed=seed,
                           bias=check.bias)


def _fwd_bwd(fn, x, params, g):
    """Output and gradients {"x", param...} of ``fn(x, **params)`` for upstream ``g``."""
    import torch
    x = x.detach().clone().requires_grad_(True)
    params = {k: (None if v is None else v.detach().clone().requires_grad_(True))
              for k, v in params.items()}
    leaves = {k: v for k, v in params.items() if v is not None}
    out = fn(x, **params)
    grads = torch.autograd.grad(out, [x, *leaves.values()], g.to(out.dtype))
    return out.detach(), dict(zip(["x", *leaves], grads))


def _compare(name, actual, expected, tol):
    """(relative error, problem or None) of one tensor against its float64 reference."""
    import torch
    from tests.helpers import rel_err
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape:
        return float("inf"), f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    bad = ~torch.isfinite(a) & torch.isfinite(e)
    if bad.any():
        return float("inf"), f"{name}: {int(bad.sum())} non-finite values"
    err = rel_err(a, e)
    return err, (None if err <= tol else f"{name}: {err:.2e} > {tol:.0e}")


def run_check(check: Check, backend: str, dtype_name: str, device, seed: int, inject=False):
    """One sweep row: errors of the output and every gradient, pass or fail."""
    import torch
    from heba import ops
    from tests.helpers import TOL, tokens
    auto = dtype_name.startswith("autocast")
    dtype = torch.float32 if auto else {"fp32": torch.float32, "bf16": torch.bfloat16,
                                        "fp16": torch.float16}[dtype_name]
    tol = TOL[torch.bfloat16 if auto else dtype]
    op = getattr(ops, check.op)
    x = tokens(*check.shape, device=device, dtype=dtype, seed=seed)
    params = _params(check, device, dtype, seed)
    g = tokens(*check.shape, device=device, dtype=dtype, seed=seed + 7)

    def fused(xx, **pp):
        if auto:
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                return op(xx, **pp, **check.kwargs, backend=backend)
        return op(xx, **pp, **check.kwargs, backend=backend)

    out, grads = _fwd_bwd(fused, x, params, g)
    if inject:
        out = out * 1.05
    p64 = {k: (None if v is None else v.double()) for k, v in params.items()}
    rout, rgrads = _fwd_bwd(lambda xx, **pp: op(xx, **pp, **check.kwargs, backend="reference"),
                            x.double(), p64, g.double())
    problems = [f"out dtype {out.dtype} != x dtype {x.dtype}"] if out.dtype != x.dtype else []
    return verdict([("out", out, rout)] + [(f"d{k}", grads[k], rgrads[k]) for k in rgrads],
                   tol, problems)


def verdict(pairs, tol, problems=()) -> dict:
    """The result fields of ``(name, actual, expected)`` pairs compared as the sweep compares
    them: ``status`` pass or FAIL, ``tol``, every error, the worst one and what failed
    (``problems``: failures found before the comparison)."""
    errors, problems = {}, list(problems)
    for name, a, e in pairs:
        errors[name], problem = _compare(name, a, e, tol)
        if problem:
            problems.append(problem)
    worst = max(errors, key=errors.get)
    return dict(status="FAIL" if problems else "pass", tol=tol, errors=errors, worst=worst,
                max_rel=errors[worst], message="; ".join(problems))


def _row(check, backend, dtype_name, **extra):
    return dict(op=check.op, case=check.name, shape=list(check.shape), rank=check.rank,
                backend=backend, dtype=dtype_name, **extra)


def run_shard(checks, device, out_path, shard, of, deadline, backends):
    """Run every ``shard``-th (check, backend, dtype) and append one JSON line per row."""
    import torch
    from heba.backends import backend_status
    inject = "sweep" in os.environ.get("HEBA_GPU_CHECK_INJECT_FAIL", "").split(",")
    failed = False
    with open(out_path, "a") as f:
        for i, check in enumerate(checks):
            if i % of != shard:
                continue
            for backend in backends:
                ok, why = backend_status(backend, device)
                for dtype_name in DTYPES:
                    if not ok:
                        row = _row(check, backend, dtype_name, status="skipped", message=why)
                    elif deadline and time.time() > deadline:
                        row = _row(check, backend, dtype_name, status="cut",
                                   message="the stage's time budget was spent")
                    else:
                        t0 = time.perf_counter()
                        try:
                            res = run_check(check, backend, dtype_name, device, seed=i,
                                            inject=inject and i == 0 and not failed)
                        except Exception as err:  # a crash is a failed check, with its reason
                            res = dict(status="error", message=f"{type(err).__name__}: "
                                                               f"{str(err)[:300]}")
                        if device != "cpu":
                            torch.cuda.synchronize()
                        row = _row(check, backend, dtype_name, seconds=time.perf_counter() - t0,
                                   **res)
                    failed |= row["status"] in ("FAIL", "error")
                    f.write(json.dumps(row) + "\n")
                    f.flush()
    return failed


def read_rows(path):
    """The rows of a JSON-lines file (an empty list if it is missing)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file for the rows")
    ap.add_argument("--size", choices=sorted(SIZES), default="clip")
    ap.add_argument("--device", default=None, help="default: cuda if visible, else cpu")
    ap.add_argument("--jobs", type=int, default=1, help="processes side by side")
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="unix time after which no check starts (rows say 'cut')")
    ap.add_argument("--backends", default=None,
                    help="comma-separated (default: every backend but auto and reference)")
    ap.add_argument("--shard", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HEBA_DEBUG_NAN_FILL", "1")
    checks = SIZES[args.size]
    if args.backends is None:
        from heba.backends import BACKENDS
        args.backends = ",".join(b for b in BACKENDS if b not in ("auto", "reference"))
    backends = [b for b in args.backends.split(",") if b]
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.shard is not None:               # a worker: one shard, rows appended to --out
        shard, of = map(int, args.shard.split("/"))
        return int(run_shard(checks, args.device, args.out, shard, of, args.deadline, backends))
    lines = args.out + ".jsonl"
    if os.path.exists(lines):
        os.remove(lines)
    jobs = max(1, min(args.jobs, len(checks)))
    base = [sys.executable, "-m", "tools.gpu_check.sweep", "--out", lines, "--size",
            args.size, "--device", args.device, "--deadline", str(args.deadline),
            "--backends", args.backends]
    if jobs == 1:
        failed = run_shard(checks, args.device, lines, 0, 1, args.deadline, backends)
        codes = [int(failed)]
    else:
        procs = [subprocess.Popen(base + ["--shard", f"{i}/{jobs}"]) for i in range(jobs)]
        codes = [p.wait() for p in procs]
    rows = read_rows(lines)
    with open(args.out, "w") as f:
        json.dump({"size": args.size, "device": args.device, "rows": rows,
                   "worker_exit_codes": codes}, f, indent=1)
    bad = [r for r in rows if r["status"] in ("FAIL", "error")]
    print(f"sweep ({args.size}, {args.device}): {len(rows)} rows, "
          f"{sum(r['status'] == 'pass' for r in rows)} pass, {len(bad)} fail, "
          f"{sum(r['status'] == 'skipped' for r in rows)} skipped, "
          f"{sum(r['status'] == 'cut' for r in rows)} cut")
    for r in bad:
        print(f"  {r['status']}: {r['op']} {r['case']} {r['backend']} {r['dtype']}: {r['message']}")
    return int(bool(bad) or any(codes))


if __name__ == "__main__":
    sys.exit(main())
