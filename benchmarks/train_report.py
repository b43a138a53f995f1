"""Turn a pytest-benchmark JSON of benchmarks/test_train_step.py into a markdown table and a plot.

    python -m benchmarks.train_report benchmarks/results/train.json [--out benchmarks/results]

Writes ``train-<gpu>.md`` (images/s, ms/step, peak GB, speed-up vs the eager
baseline and vs torch.compile, largest batch with and without checkpointing)
and ``train-<gpu>.png`` (images/s per contender) beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict

from benchmarks.report import bar_chart

IMPL_ORDER = ["eager", "compile", "heba", "heba-reference", "heba-triton", "heba-cuda",
              "heba-ckpt"]
IMPL_LABEL = {"eager": "eager autocast (fp32 backbone, reference adapters)",
              "compile": "torch.compile of eager",
              "heba": "heba default (cast once, auto backend, truncation, graphs)",
              "heba-reference": "heba, reference backend", "heba-triton": "heba, triton backend",
              "heba-cuda": "heba, cuda backend", "heba-ckpt": "heba default + checkpointing"}


def load(path):
    with open(path) as f:
        data = json.load(f)
    infos = [b.get("extra_info", {}) for b in data["benchmarks"]]
    steps = [r for r in infos if "cuda_ms" in r]
    batches = [r for r in infos if "max_batch" in r]
    device = (steps or batches or [{"device": "unknown"}])[0]["device"]
    return device, steps, batches


def table(steps, batches) -> str:
    by_method = defaultdict(dict)
    for r in steps:
        by_method[r["method"]][r["impl"]] = r
    maxb = {(r["method"], r["impl"]): r["max_batch"] for r in batches}
    lines = ["| method | contender | img/s | ms/step | peak GB | vs eager | vs compile "
             "| graphs | text len | max batch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method, impls in by_method.items():
        eager = impls.get("eager", {}).get("cuda_ms")
        comp = impls.get("compile", {}).get("cuda_ms")
        for impl in IMPL_ORDER:
            r = impls.get(impl)
            if r is None:
                continue
            ms = r["cuda_ms"]
            ve = f"{eager / ms:.2f}x" if eager else "n/a"
            vc = f"{comp / ms:.2f}x" if comp else "n/a"
            mb = maxb.get((method, impl), "")
            lines.append(f"| {method} | {IMPL_LABEL.get(impl, impl)} | {r['images_per_s']:.1f} | "
                         f"{ms:.2f} | {r['peak_mem_bytes'] / 1e9:.2f} | {ve} | {vc} | "
                         f"{'on' if r.get('graphs') else 'off'} | {r.get('text_len', '')} | "
                         f"{mb} |")
    return "\n".join(lines)


def plot(steps, path, device):
    methods = sorted({r["method"] for r in steps})
    if not methods:
        return

    def images_per_s(method, impl):
        r = [x for x in steps if (x["method"], x["impl"]) == (method, impl)]
        return r[0]["images_per_s"] if r else 0.0
    bar_chart(path, methods, IMPL_ORDER, images_per_s, group_label=str, series_label=str,
              ylabel="images / s (one training step, CUDA events)",
              title=f"frozen CLIP ViT-B/16 training step, bf16, {device}", group_width=3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("--out", default=None, help="folder for train-<gpu>.md and train-<gpu>.png")
    args = ap.parse_args(argv)
    device, steps, batches = load(args.json)
    out = args.out or os.path.dirname(os.path.abspath(args.json))
    stem = "train-" + re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-")
    md = (f"# heba training step on {device}\n\n" + table(steps, batches) + "\n\n"
          "ms/step: CUDA-event median of one full step (forward, backward, optimizer); peak GB: "
          "torch.cuda.max_memory_allocated over one step, weights and optimizer included.\n")
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(md)
    plot(steps, os.path.join(out, f"{stem}.png"), device)
    print(md)
    return md


if __name__ == "__main__":
    main()
