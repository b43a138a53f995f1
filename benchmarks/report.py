"""Turn a pytest-benchmark JSON of benchmarks/test_adapters.py into a markdown table and a plot.

    python -m benchmarks.report benchmarks/results/run.json [--out benchmarks/results]

Writes ``<gpu>.md`` (times, ratios vs the eager reference and vs torch.compile,
percent of the measured floor and of the floor modelled by :mod:`benchmarks.roofline`,
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


def _roofline():
    """benchmarks.roofline, imported only when a table is built (it needs torch and Triton,
    this module only the standard library); None where it cannot be imported."""
    try:
        from benchmarks import roofline
    except ImportError:
        return None
    return roofline


def modelled_pct(r, model) -> str:
    """The row's modelled floor (benchmarks/roofline.py, with the run's measured copy and
    matmul rates and, where the run measured it, L2-to-SM read bandwidth as ceilings) over its
    measured ms, or "n/a" where the model does not apply."""
    gpu = model.measured_gpu(r) if model else None
    floor = None if gpu is None else model.modelled_floor_ms(
        r["case"], r["mode"], r["dtype"], gpu, impl=r["impl"], shape=r.get("shape"))
    return "n/a" if floor is None else f"{100.0 * floor / r['cuda_ms']:.0f}%"


def table(rows) -> str:
    by_key = defaultdict(dict)
    for r in rows:
        by_key[(r["case"], r["dtype"], r["mode"])][r["impl"]] = r
    model = _roofline()
    lines = ["| case | dtype | mode | impl | ms | vs eager | vs compile | % of floor "
             "| % of modelled floor | peak MB | saved MB |", "|---" * 11 + "|"]
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
                         f"{vc} | {r['pct_of_floor']:.0f}% | {modelled_pct(r, model)} | "
                         f"{r['peak_mem_bytes'] / 1e6:.0f} | "
                         f"{r['saved_for_backward_bytes'] / 1e6:.0f} |")
    return "\n".join(lines)


def bar_chart(path, groups, series, value, *, group_label, series_label, ylabel, title,
              log=False, group_width=1.6):
    """A grouped bar chart saved to ``path``: one group per ``groups`` entry, one bar per
    ``series`` entry, heights ``value(group, series)`` (0 where missing)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6, group_width * len(groups)), 4))
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        ax.bar([k + i * width for k in range(len(groups))], [value(g, name) for g in groups],
               width, label=series_label(name))
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(groups))])
    ax.set_xticklabels([group_label(g) for g in groups], fontsize=7)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(rows, path, device):
    keys = sorted({(r["case"], r["mode"]) for r in rows if r["dtype"] == "bf16"})
    if not keys:
        return

    def ms(key, impl):
        r = [x for x in rows if (x["case"], x["mode"], x["dtype"], x["impl"])
             == (*key, "bf16", impl)]
        return r[0]["cuda_ms"] if r else 0.0
    bar_chart(path, keys, IMPL_ORDER, ms, group_label=lambda k: f"{k[0]}\n{k[1]}",
              series_label=IMPL_LABEL.get, ylabel="ms (CUDA events, median)",
              title=f"heba adapters, bf16, {device}", log=True)


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
