"""The HeBA paper's three protocols over several seeds: JSON + markdown tables in the run folder.

* **base-to-novel** (``base2novel``): per seed, train on the base half of a
  data set's classes, test base and novel; per seed and mean +- std of base,
  novel and their harmonic mean (the paper's HM is that of the mean accuracies).
* **cross-dataset** (``cross_dataset``): per seed, train on ImageNet, all
  classes, 16 shots; test on every target data set, all its classes
  (published targets: the other 10); the mean over targets.
* **domain generalization** (``domain_generalization``): the same ImageNet
  model tested on ImageNet-V2, -Sketch, -A and -R (test only).
* **classification** (``classification``, a timm backbone): one AdapterTune run
  per seed; test top-1 / top-5 per seed, mean +- std (published: seeds 0, 1, 2).

Every seed's run is an ordinary run folder (``<output>/seed<S>``, resumable);
the protocol writes ``<output>/<protocol>.json``, ``<output>/<protocol>.md`` and a figure
of them, ``<output>/<protocol>.png`` (:mod:`heba.train.plots`).
std is the population standard deviation over seeds (``np.std``, ddof 0), as the
published ``parse_test_res.py`` reports it (0 for one seed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics

from heba.train import data as run_data
from heba.train import run_folder
from heba.train.classify import ClassifyRecipe
from heba.train.config import Config, UsageError
from heba.train.context import RunOptions
from heba.train.metrics import format_acc, harmonic_mean
from heba.train.plots import write_protocol_plot
from heba.train.preflight import check_images
from heba.train.prompts import make_bank
from heba.train.recipe import TrainRecipe, check_output
from heba.train.run_folder import atomic_write
from heba.train.vision import build_data

CROSS_TARGETS = ("caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                 "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
DG_TARGETS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def mean_std(values) -> tuple[float, float]:
    """Mean and population std (VLM-HeBA ``parse_test_res.py``: ``np.mean``, ``np.std``).

    >>> mean_std([1.0, 2.0, 3.0])
    (2.0, 0.816496580927726)
    """
    values = list(values)
    return statistics.fmean(values), statistics.pstdev(values)


def seed_opts(opts: RunOptions, seed: int) -> RunOptions:
    """A seed's options: its folder ``<output>/seed<S>``. Under ``--resume``, a seed the
    interrupted protocol had not started yet starts (a finished one reports its accuracy)."""
    o = dataclasses.replace(opts, output=os.path.join(opts.output, f"seed{seed}"))
    if o.resume and not run_folder.inspect(o.output).holds_run:
        o = dataclasses.replace(o, resume=False)
    return o


def check_seeds(seeds, opts: RunOptions, cfg: Config):
    """Distinct seeds, and what every seed's run does with its folder, before any seed runs."""
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds must be distinct integers >= 0, got {list(seeds)}")
    if opts.resume and not any(run_folder.inspect(os.path.join(opts.output, f"seed{s}"))
                               .holds_run for s in seeds):
        raise UsageError(f"--resume: no seed folder of {opts.output} holds a run to resume")
    for s in seeds:
        check_output(dataclasses.replace(cfg, seed=s), seed_opts(opts, s))


def base2novel(cfg: Config, opts: RunOptions, seeds, log=print) -> dict:
    """Train and test base-to-novel once per seed; returns and writes the table."""
    if cfg.split != "base2novel":
        raise UsageError("several --seeds run the base-to-novel protocol: drop --split all")
    check_seeds(seeds, opts, cfg)
    runs = [dataclasses.replace(cfg, seed=s) for s in seeds]
    for c in runs:                      # every seed's data checked before anything is written
        d = run_data.build(c)
        check_images([d.train] + [ds for _, ds in d.evals.values()])
    rows = {}
    for c in runs:
        log(f"== base-to-novel, {c.dataset or 'demo'}, seed {c.seed}")
        acc = TrainRecipe(c, seed_opts(opts, c.seed), log).run()["accuracy"]
        if acc is not None:
            rows[c.seed] = {k: acc[k] for k in ("base", "novel", "hm")}
    if not rows:                        # not rank 0 under torchrun
        return {}
    cols = ("base", "novel", "hm")
    summary = {k: mean_std(r[k] for r in rows.values()) for k in cols}
    b, n = summary["base"][0], summary["novel"][0]
    result = dict(protocol="base2novel", dataset=cfg.dataset or "demo", recipe=cfg.recipe,
                  seeds=list(rows), per_seed=rows,
                  mean={k: v[0] for k, v in summary.items()},
                  std={k: v[1] for k, v in summary.items()},
                  hm_of_means=harmonic_mean(b, n))
    write_table(opts.output, "base2novel", result, cols, log)
    return result


def transfer(cfg: Config, opts: RunOptions, seeds, targets, name: str, log=print) -> dict:
    """Train on ``cfg``'s data set (all classes) per seed, test on each target; the table."""
    if cfg.source != "coop":
        raise UsageError(f"{name} needs --root DIR holding imagenet and the targets")
    cfg = dataclasses.replace(cfg, split="all")
    check_seeds(seeds, opts, cfg)
    runs = [dataclasses.replace(cfg, seed=s) for s in seeds]
    for c in runs:
        d = run_data.build(c)
        check_images([d.train] + [ds for _, ds in d.evals.values()])
    # every target readable, its images too, before anything is written
    check_images([run_data.target(t, cfg.root, cfg.seed, None, cfg.test_per_class)[1]
                  for t in targets])
    rows = {}
    for c in runs:
        log(f"== {name}: train on {c.dataset}, seed {c.seed}")
        recipe = TrainRecipe(c, seed_opts(opts, c.seed), log)
        recipe.setup()
        try:
            acc = recipe.train()
            if acc is not None:
                rows[c.seed] = dict({c.dataset: acc["all"]}, **_targets(recipe, targets, log))
        finally:
            recipe.cleanup()
    if not rows:
        return {}
    cols = (cfg.dataset,) + tuple(targets)
    for r in rows.values():
        r["average"] = statistics.fmean(r[t] for t in targets)
    cols += ("average",)
    result = dict(protocol=name, source=cfg.dataset, recipe=cfg.recipe, seeds=list(rows),
                  targets=list(targets), per_seed=rows,
                  mean={k: mean_std(r[k] for r in rows.values())[0] for k in cols},
                  std={k: mean_std(r[k] for r in rows.values())[1] for k in cols})
    write_table(opts.output, name, result, cols, log)
    return result


def classification(cfg: Config, opts: RunOptions, seeds, log=print) -> dict:
    """One classifier run per seed (``<output>/seed<S>``) and ``classification.json`` / ``.md``;
    no seeds: one run in ``<output>``."""
    if not seeds:
        return ClassifyRecipe(cfg, opts, log).run()
    check_seeds(seeds, opts, cfg)       # and every seed folder's plan, first
    runs = [dataclasses.replace(cfg, seed=s) for s in seeds]
    for c in runs:                      # every seed's data checked before anything is written
        build_data(c)
    rows = {}
    for c in runs:
        log(f"== classification, {c.dataset}, seed {c.seed}")
        acc = ClassifyRecipe(c, seed_opts(opts, c.seed), log).run()["accuracy"]
        if acc is not None:
            rows[c.seed] = acc
    if not rows:
        return {}
    cols = tuple(k for k in ("top-1", "top-5") if all(k in r for r in rows.values()))
    ms = {k: mean_std(r[k] for r in rows.values()) for k in cols}
    result = dict(protocol="classification", dataset=cfg.dataset, recipe=cfg.recipe,
                  seeds=list(rows), per_seed=rows, mean={k: v[0] for k, v in ms.items()},
                  std={k: v[1] for k, v in ms.items()})
    write_table(opts.output, "classification", result, cols, log)
    return result


def _targets(recipe: TrainRecipe, targets, log) -> dict:
    """The trained model's accuracy on each target (its classes, its own prompts)."""
    out = {}
    for t in targets:
        names, ds = run_data.target(t, recipe.cfg.root, recipe.cfg.seed, recipe.eval_transform,
                                    recipe.cfg.test_per_class)
        bank = make_bank(names, recipe.cfg, recipe.tokenizer, recipe.device, dataset=t)
        out[t] = recipe.evaluate({"all": (names, ds)}, {"all": bank})["all"]
        log(f"  {t}: {format_acc({'all': out[t]})}")
    return out


def write_table(folder: str, name: str, result: dict, cols, log) -> None:
    """``<folder>/<name>.json`` and ``<name>.md``: per seed, then mean +- std."""
    os.makedirs(folder, exist_ok=True)
    text = json.dumps(result, indent=2) + "\n"
    json_path = os.path.join(folder, f"{name}.json")
    atomic_write(json_path, lambda tmp: open(tmp, "w").write(text))
    head = "| seed | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    body = "".join(f"| {s} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |\n"
                   for s, r in result["per_seed"].items())
    body += "| mean +- std | " + " | ".join(
        f"{result['mean'][c]:.2f} +- {result['std'][c]:.2f}" for c in cols) + " |\n"
    what = result.get("dataset") or f"{result.get('source')} -> targets"
    md = f"# {name}: {what} ({result['recipe']} recipe, seeds {result['seeds']})\n\n" + head + body
    if "hm_of_means" in result:
        md += f"\nHM of the mean base and novel accuracies: {result['hm_of_means']:.2f}\n"
    atomic_write(os.path.join(folder, f"{name}.md"), lambda tmp: open(tmp, "w").write(md))
    log(md)
    write_protocol_plot(json_path, log)     # <name>.png: per seed and mean +- std
