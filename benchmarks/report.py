"""Turn a pytest-benchmark JSON of benchmarks/test_adapters.py into a markdown table and a plot.

    python -m benchmarks.report benchmarks/results/run.json [--out benchmarks/results]

Writes ``<gpu>.md`` (times, ratios vs the eager reference and vs torch.compile,
peak memory, bytes saved for backward) and ``<gpu>.png`` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict

IMPL_ORDER = ["eager", "eager-cl", "compile", "triton", "cuda"]
IMPL_LABEL = {"eager": "eager (published, seq-first)", "eager-cl": "eager channels-last",
              "compile": "torch.compile", "triton": "heba triton", "cuda": "heba cuda"}


def load(path):
    with open(path) as f:
        data = json.load(f)
    rows = [b["extra_info"] for b in data["benchmarks"] if "cuda_ms" in b.get("extra_info", {})]
    device = rows[0]["device"] if rows else "unknown"
    return device, rows


def table(rows) -> str:
    by_key = defaultdict(dict)
    for r in rows:
        by_key[(r["case"], r["dtype"], r["mode"])][r["impl"]] = r
    lines = ["| case | dtype | mode | impl | ms | vs eager | vs compile | % of floor "
             "| peak MB | saved MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (case, dtype, mode), impls in by_key.items():
        eager = impls.get("eager", {}).get("cuda_ms")
        comp = impls.get("compile", {}).get("cuda_ms")
        for impl in IMPL_ORDER:
            r = impls.get(impl)
            if r is None:
                continue
            ms = r["cuda_ms"]
            ve = f"{eager / ms:.2f}x" if eager else "n/a"
            vc = f"{comp / ms:.2f}x" if comp else "n/a"
            lines.append(f"| {case} | {dtype} | {mode} | {IMPL_LABEL[impl]} | {ms:.3f} | {ve} | "
                         f"{vc} | {r['pct_of_floor']:.0f}% | {r['peak_mem_bytes'] / 1e6:.0f} | "
                         f"{r['saved_for_backward_bytes'] / 1e6:.0f} |")
    return "\n".join(lines)


def plot(rows, path, device):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({(r["case"], r["mode"]) for r in rows if r["dtype"] == "bf16"})
    if not keys:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys)), 4))
    width = 0.8 / len(IMPL_ORDER)
    for i, impl in enumerate(IMPL_ORDER):
        vals = []
        for case, mode in keys:
            r = [x for x in rows if (x["case"], x["mode"], x["dtype"], x["impl"])
                 == (case, mode, "bf16", impl)]
            vals.append(r[0]["cuda_ms"] if r else 0.0)
        ax.bar([k + i * width for k in range(len(keys))], vals, width, label=IMPL_LABEL[impl])
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))])
    ax.set_xticklabels([f"{c}\n{m}" for c, m in keys], fontsize=7)
    ax.set_ylabel("ms (CUDA events, median)")
    ax.set_yscale("log")
    ax.set_title(f"heba adapters, bf16, {device}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("--out", default=None, help="folder for <gpu>.md and <gpu>.png")
    args = ap.parse_args(argv)
    device, rows = load(args.json)
    out = args.out or os.path.dirname(os.path.abspath(args.json))
    stem = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-")
    md = f"# heba adapter benchmarks on {device}\n\n" + table(rows) + "\n"
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(md)
    plot(rows, os.path.join(out, f"{stem}.png"), device)
    print(md)


if __name__ == "__main__":
    main()
