"""Turn a pytest-benchmark JSON of benchmarks/test_train_step.py into a markdown table and a plot.

    python -m benchmarks.train_report benchmarks/results/train.json [--out benchmarks/results]

Writes ``train-<gpu>.md`` (per batch: images/s, ms/step, peak GB, kernels and launch calls
per step from the profiler (GPU), launches and dispatches of one step from the dispatch
recorder (every device), speed-up vs the published eager step and vs the best
torch.compile mode at the same batch, largest batch with and without checkpointing) and
``train-<gpu>.png`` (images/s per contender)
beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict

from benchmarks.report import bar_chart

IMPL_ORDER = ["eager", "compile", "compile-ro", "heba", "heba-reference", "heba-triton",
              "heba-cuda", "heba-ckpt", "heba-compile", "heba-compile-max", "heba-loader"]
IMPL_LABEL = {"eager": "published eager step (autocast, fp32 backbone, reference adapters)",
              "compile": "torch.compile of it (default)",
              "compile-ro": "torch.compile of it (reduce-overhead)",
              "heba": "heba-train step (cast once, auto backend, static, one CUDA graph)",
              "heba-reference": "heba, reference backend", "heba-triton": "heba, triton backend",
              "heba-cuda": "heba, cuda backend", "heba-ckpt": "heba + checkpointing",
              "heba-compile": "torch.compile of heba's step, reference backend (default)",
              "heba-compile-max": "torch.compile of heba's step, reference backend "
                                  "(max-autotune)",
              "heba-loader": "heba-train step + its loader (fast pipeline, JPEGs)"}


def load(path):
    with open(path) as f:
        data = json.load(f)
    infos = [b.get("extra_info", {}) for b in data["benchmarks"]]
    steps = [r for r in infos if "cuda_ms" in r]
    batches = [r for r in infos if "max_batch" in r]
    device = (steps or batches or [{"device": "unknown"}])[0]["device"]
    return device, steps, batches


def _count(x):
    return "n/a" if x is None else f"{x:.0f}"


def _rows(steps):
    """``{(method, batch): {impl: row}}`` in the benchmark's order."""
    out = defaultdict(dict)
    for r in steps:
        out[(r["method"], r.get("batch_name", str(r.get("batch", ""))))][r["impl"]] = r
    return out


def table(steps, batches) -> str:
    maxb = {(r["method"], r["impl"]): r["max_batch"] for r in batches}
    lines = ["| method | batch | contender | img/s | ms/step | peak GB | kernels/step "
             "| launch calls/step | launches/step (recorder) | eager step launches | dispatches "
             "| vs eager | vs best compile | graphs | text len | max batch |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (method, batch), impls in _rows(steps).items():
        eager = impls.get("eager", {}).get("cuda_ms")
        comps = [impls[c]["cuda_ms"] for c in ("compile", "compile-ro", "heba-compile",
                                                 "heba-compile-max") if c in impls]
        comp = min(comps) if comps else None
        for impl in IMPL_ORDER:
            r = impls.get(impl)
            if r is None:
                continue
            ms = r["cuda_ms"]
            ve = f"{eager / ms:.2f}x" if eager else "n/a"
            vc = f"{comp / ms:.2f}x" if comp else "n/a"
            lines.append(f"| {method} | {r.get('batch', batch)} | {IMPL_LABEL.get(impl, impl)} | "
                         f"{r['images_per_s']:.1f} | {ms:.2f} | {r['peak_mem_bytes'] / 1e9:.2f} | "
                         f"{_count(r.get('kernels_per_step'))} | "
                         f"{_count(r.get('launch_calls_per_step'))} | "
                         f"{_count(r.get('launches'))} | {_count(r.get('launches_eager'))} | "
                         f"{_count(r.get('dispatches'))} | {ve} | {vc} | "
                         f"{'on' if r.get('graphs') else 'off'} | {r.get('text_len', '')} | "
                         f"{maxb.get((method, impl), '') if batch in ('16', 16) else ''} |")
    return "\n".join(lines)


def plot(steps, path, device):
    methods = sorted({r["method"] for r in steps})
    if not methods:
        return

    def images_per_s(method, impl):     # the published batch
        r = [x for x in steps if (x["method"], x["impl"]) == (method, impl)
             and x.get("batch_name", "16") == "16"]
        return r[0]["images_per_s"] if r else 0.0
    bar_chart(path, methods, IMPL_ORDER, images_per_s, group_label=str, series_label=str,
              ylabel="images / s (one training step, CUDA events)",
              title=f"published HeBA step, frozen CLIP ViT-B/16, batch 16, bf16, {device}",
              group_width=3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("--out", default=None, help="folder for train-<gpu>.md and train-<gpu>.png")
    args = ap.parse_args(argv)
    device, steps, batches = load(args.json)
    out = args.out or os.path.dirname(os.path.abspath(args.json))
    stem = "train-" + re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-")
    md = (f"# heba training step on {device}\n\n" + table(steps, batches) + "\n\n"
          "ms/step: CUDA-event median of one full step (draws, forward, backward, optimizer); "
          "peak GB: torch.cuda.max_memory_allocated over one step, weights and optimizer "
          "included; kernels/step: GPU kernels the torch profiler records (a replayed graph's "
          "each count); launch calls/step: the host's kernel and graph launch calls (both "
          "GPU only); launches/step (recorder): ATen ops that launch a kernel + heba's Triton "
          "launches over one step, counted by benchmarks/launch_count.py on any device (a "
          "replayed graph launches none; a compiled step: what it dispatches under the "
          "recorder, its own kernels are the profiler's kernels/step); eager step launches: "
          "the same step without the CUDA graph; "
          "dispatches: every op the dispatcher saw.\n")
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(md)
    plot(steps, os.path.join(out, f"{stem}.png"), device)
    print(md)
    return md


if __name__ == "__main__":
    main()
