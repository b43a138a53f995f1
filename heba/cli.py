"""``heba-train``: the command line of heba's training engine (:mod:`heba.train`).

    heba-train                                   # built-in demo: tiny CLIP, generated shapes
    heba-train --dataset eurosat --root /data --seeds 1 2 3         # base-to-novel, 3 seeds
    heba-train /data/my_folder --model ViT-B-16 --pretrained openai  # an ImageFolder tree
    heba-train cross-dataset --root /data --seeds 1 2 3             # ImageNet -> 10 targets
    heba-train domain-generalization --root /data --seeds 1 2 3     # ImageNet -> V2/S/A/R
    heba-train evaluate --checkpoint output/.../adapter_learner/model.pth.tar-30 \\
        --dataset eurosat --root /data --split base2novel           # a published checkpoint
    heba-train split --dataset eurosat --root /data --shots 16 --seed 1 --json split.json
    heba-train predict --run runs/demo photos/ --top-k 3 --out predictions.csv  # new images
    torchrun --nproc_per_node=4 -m heba.cli --dataset imagenet --root /data ...
    heba-train --backbone timm:vit_small_patch16_224 --dataset cifar10 --root /data  # AdapterTune
    heba-train --backbone hf:/models/clip-vit-base-patch16 --dataset eurosat --root /data

The recipe (``--recipe heba``, the default: the published HeBA settings, see
:mod:`heba.train.config`) gives every default; each option overrides one
field, and the resulting configuration is saved beside every checkpoint.
Without ``-o`` a run writes ``runs/<protocol or split>-<data set>-<method>``
(:func:`default_output`; the demo: ``runs/demo``). ``--dataset`` names a data set in
CoOp's layout for a CLIP backbone and a torchvision data set for a ``timm:`` one; a
name the backbone cannot read is refused with the list of those it can.
Bad input is reported in one line with exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys

COMMANDS = ("train", "evaluate", "split", "cross-dataset", "domain-generalization", "predict")
EPILOG = """\
A bare `heba-train` runs the built-in demo (HeBA adapters on a tiny CLIP shipped with the
package, generated images, one to two minutes on 2 CPU cores; it writes runs/demo).
`train` is the default command: `heba-train --dataset eurosat --root /data` is
`heba-train train --dataset eurosat --root /data`.
Run `heba-train <command> -h` for each command's options and their defaults."""
HELP_FORMAT = argparse.RawDescriptionHelpFormatter


def recipe_default(field: str, demo=None) -> str:
    """``(default: the recipe's: heba 30, heba-xd 10, adaptertune 50)`` for a Config field
    (one value when every recipe agrees; ``demo``: the bare demo's own value)."""
    from heba.train.config import RECIPES, Config
    base = Config()
    values = {name: over.get(field, getattr(base, field)) for name, over in RECIPES.items()}
    shown = {k: "none" if v is None else v for k, v in values.items()}
    if len(set(map(str, shown.values()))) == 1:
        text = f"the recipe's, {next(iter(shown.values()))}"
    else:
        text = "the recipe's: " + ", ".join(f"{k} {v}" for k, v in shown.items())
    if demo is not None:
        text += f"; the bare demo: {demo}"
    return f" (default: {text})".replace("%", "%%")


def clip_datasets() -> list:
    """The ``--dataset`` names of a CLIP backbone: CoOp's layout (:mod:`heba.data.coop`)."""
    from heba.data.coop import DATASETS
    return list(DATASETS)


def timm_datasets() -> list:
    """The ``--dataset`` names of a ``timm:NAME`` backbone (:mod:`heba.train.vision`)."""
    from heba.train.vision import DATASET_NAMES
    return [n for n in DATASET_NAMES if n != "imagefolder"]


def _data(p, positional=True):
    if positional:
        p.add_argument("folder", nargs="?", default=None,
                       help="ImageFolder root (root/<class>/<image>, or root/train + "
                            "root/test) (default: none; with no --dataset either, the built-in "
                            "demo's generated data)")
    p.add_argument("--dataset", default=None,
                   help="the data set under --root; its name depends on the backbone. CLIP "
                        "backbones (open_clip, hf:) read CoOp's layout: "
                        + ", ".join(clip_datasets()) + ". timm:NAME backbones read "
                        "torchvision's: " + ", ".join(timm_datasets()) + " (default: none)")
    p.add_argument("--root", default=None,
                   help="the folder holding the data set folders (default: none)")


def _model(p):
    g = p.add_argument_group("model and adapters")
    g.add_argument("--recipe", default=None,
                   help="the defaults of every field: heba (the published HeBA settings), "
                        "heba-xd (its cross-dataset settings) or adaptertune (default: heba; "
                        "adaptertune with --method adaptertune or a timm:NAME backbone)")
    g.add_argument("--method", choices=("heba", "adaptertune", "head-only", "full"),
                   default=None, help="the adapters; head-only and full are the published "
                                      "AdapterTune baselines (timm backbones)"
                                      + recipe_default("method"))
    g.add_argument("--model", "--backbone", dest="model", default=None,
                   help="open_clip model ('tiny' = the built-in demo model), timm:NAME (an "
                        "image classifier, the AdapterTune protocol) or hf:DIR (a local "
                        "transformers CLIP folder) (default: ViT-B-16; the bare demo: tiny)")
    g.add_argument("--model-kwargs", default=None,
                   help='timm: JSON keyword arguments of timm.create_model, e.g. {"depth": 2} '
                        "(default: none)")
    g.add_argument("--pretrained", default=None,
                   help="the weights: open_clip tag, a weights file or 'none' (default: "
                        "openai); tiny: 'builtin', 'none' or a file (default: builtin); timm: "
                        "published, timm, a tag, a file or none (default: published); hf: "
                        "folder or none (default: folder)")
    g.add_argument("--quick-gelu", choices=("auto", "on", "off"), default=None,
                   help="QuickGELU activations (auto: for the openai tag, as those weights were "
                        "trained; pass 'on' for an OpenAI weights file)"
                        + recipe_default("quick_gelu"))
    g.add_argument("--towers", choices=("both", "visual", "text"), default=None,
                   help="the towers that get adapters" + recipe_default("towers"))
    for name, what in (("start", "heba: first adapted layer (1-based)"),
                       ("end", "heba: last adapted layer (none: the last)"),
                       ("reduction", "heba: bottleneck reduction"),
                       ("rank", "adaptertune: low-rank width"),
                       ("every", "adaptertune: every k-th block")):
        g.add_argument(f"--{name}", type=int, default=None, help=what + recipe_default(name))
    g.add_argument("--alpha", type=float, default=None,
                   help="adaptertune: residual scale" + recipe_default("alpha"))
    g.add_argument("--base-scale", type=float, default=None,
                   help="heba: adapter output scale of base classes (slow)"
                        + recipe_default("base_scale"))
    g.add_argument("--novel-scale", type=float, default=None,
                   help="heba: adapter output scale declared for novel classes"
                        + recipe_default("novel_scale"))
    g.add_argument("--novel-eval", choices=("base", "novel"), default=None,
                   help="scale of novel classes at test: base (what the published code runs) "
                        "or novel (its declared --novel-scale)" + recipe_default("novel_eval"))
    g.add_argument("--scale-factor", type=float, default=None,
                   help="slow-fast factor: the fast scale is the base scale times this"
                        + recipe_default("scale_factor"))
    g.add_argument("--slow-fast-ratio", type=float, default=None,
                   help="probability of the base scale per adapter call while training"
                        + recipe_default("slow_fast_ratio"))
    g.add_argument("--slow-fast-draw", choices=("block", "call"), default=None,
                   help="draw the slow-fast scale once per block (published) or per adapter"
                        + recipe_default("slow_fast_draw"))
    g.add_argument("--split", choices=("base2novel", "all"), default=None,
                   help="base2novel: train on the base half of the classes, test base and "
                        "novel; all: every class" + recipe_default("split"))
    g.add_argument("--test-per-class", type=int, default=None,
                   help="cap on test images per class, >= 1 (default: every test image)")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=None,
                   help="autocast precision (auto: on CUDA the recipe's, heba: fp16 with "
                        "loss scaling as published, adaptertune: bf16; fp32 on the CPU)"
                        + recipe_default("precision"))
    g.add_argument("--eval-precision", choices=("train", "fp32"), default=None,
                   help="test-time precision: train (the run's) or fp32 (as the published "
                        "test(), which runs without autocast)" + recipe_default("eval_precision"))
    g.add_argument("--descriptions", default=None,
                   help="class descriptions: the published trainers/gpt3_prompts/<name>.py, "
                        "CuPL's JSON, or the folder of either (read, never executed) (default: "
                        "none: --ctx-init + the class name; the bare demo: its own templates)")
    g.add_argument("--template", action="append", default=None,
                   help="prompt template with {} for the class, repeatable; replaces the "
                        "descriptions rule (default: none)")
    g.add_argument("--ctx-init", default=None,
                   help="prompt start" + recipe_default("ctx_init"))


def _train_opts(p):
    g = p.add_argument_group("training")
    g.add_argument("--shots", type=int, default=None,
                   help="training images per class" + recipe_default("shots"))
    g.add_argument("--seed", type=int, default=None,
                   help="the seed of the few-shot draw, the adapters and the data order"
                        + recipe_default("seed"))
    g.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run the protocol once per seed (<output>/seed<S>) and write per-seed "
                        "+ mean +- std (default: one run with --seed)")
    g.add_argument("--epochs", type=int, default=None,
                   help="training epochs" + recipe_default("epochs", demo=10))
    g.add_argument("--batch-size", type=int, default=None,
                   help="training batch size" + recipe_default("batch_size"))
    g.add_argument("--no-drop-last", dest="drop_last", action="store_const", const=False,
                   default=None, help="keep the last partial batch, i.e. drop_last False "
                                      "(published HeBA: dropped)" + recipe_default("drop_last"))
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate" + recipe_default("lr"))
    g.add_argument("--momentum", type=float, default=None,
                   help="SGD momentum" + recipe_default("momentum"))
    g.add_argument("--weight-decay", type=float, default=None,
                   help="weight decay" + recipe_default("weight_decay"))
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default=None,
                   help="sgd (HeBA, Dassl's) or adamw (AdapterTune)" + recipe_default("optimizer"))
    g.add_argument("--warmup-epochs", type=int, default=None,
                   help="linear warm-up epochs of the per-step cosine (--schedule step)"
                        + recipe_default("warmup_epochs"))
    g.add_argument("--grad-clip", type=float, default=None,
                   help="max gradient norm, 0: off" + recipe_default("grad_clip"))
    g.add_argument("--val-split", type=float, default=None,
                   help="timm: held-out fraction of the training set"
                        + recipe_default("val_split"))
    g.add_argument("--schedule", choices=("epoch", "step"), default=None,
                   help="cosine stepped per epoch (published HeBA) or per step (AdapterTune, "
                        "with --warmup-epochs)" + recipe_default("schedule"))
    g.add_argument("--label-smoothing", type=float, default=None,
                   help="label smoothing of the loss" + recipe_default("label_smoothing"))
    g.add_argument("--candidates", choices=("batch", "all"), default=None,
                   help="the candidate-set loss: batch (the batch's classes + negatives, "
                        "published) or all (every class)" + recipe_default("candidates"))
    g.add_argument("--neg-per-class", type=int, default=None,
                   help="negatives per unique class of a batch" + recipe_default("neg_per_class"))
    g.add_argument("--augment", choices=("dassl", "openclip"), default=None,
                   help="dassl: random resized crop (0.08, 1) + flip (published); openclip: "
                        "the model's own training transform" + recipe_default("augment"))
    g.add_argument("--eval-every", type=int, default=0,
                   help="evaluate every N epochs, 0: at the end only (default: %(default)s)")
    g.add_argument("--no-eval-before", "--skip-zero-shot", dest="no_eval_before",
                   action="store_true",
                   help="skip the evaluation before training (the zero-shot accuracy); a run "
                        "evaluates after its last epoch (and every --eval-every N epochs)")
    g.add_argument("--output", "-o", default=None,
                   help="run folder (default: runs/<protocol or split>-<data set>-<method>, "
                        "e.g. runs/base2novel-eurosat-heba, runs/cross-dataset-imagenet-heba, "
                        "runs/classification-cifar10-adaptertune; the bare demo: runs/demo, "
                        "where it replaces only its own previous run)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --output after its last saved epoch (a finished "
                        "run: report its accuracy, train nothing)")
    g.add_argument("--overwrite", action="store_true",
                   help="delete the run in --output and start over (not with --resume)")
    g.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    f = p.add_argument_group("speed and memory (results are the same up to rounding)")
    f.add_argument("--no-cuda-graphs", action="store_true",
                   help="run each step eagerly instead of replaying a CUDA graph (GPU only)")
    f.add_argument("--no-cast-once", action="store_true",
                   help="keep the frozen backbone fp32 and let autocast cast it every step")
    f.add_argument("--checkpoint-blocks", type=int, default=0, metavar="K",
                   help="recompute every K-th frozen block in backward, 0: none "
                        "(default: %(default)s)")


def _runtime(p):
    g = p.add_argument_group("where it runs")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when visible, else the CPU (default: %(default)s)")
    g.add_argument("--backend", default="auto",
                   help="kernels: auto (the fastest that runs here), reference, triton or cuda "
                        "(checked before anything runs) (default: %(default)s)")
    g.add_argument("--workers", default="auto",
                   help="data loader worker processes: an integer, or auto: 0 on a CPU, this "
                        "process's share of the cores less one on a GPU, at most 16 "
                        "(default: %(default)s)")
    g.add_argument("--pipeline", choices=("fast", "published"), default="fast",
                   help="training images: fast (decoded once, uint8 crop + flip per sample, "
                        "normalised on the device) or published (PIL per sample); the same "
                        "boxes and flips, pixels within 1/255 (default: %(default)s)")
    g.add_argument("--check-images", choices=("fast", "full"), default="fast",
                   help="before training: fast (header + end-of-image marker of every file) or "
                        "full (decode every image) (default: %(default)s)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the idle cores)")
    g.add_argument("--allow-download", action="store_true",
                   help="let open_clip / timm download weights (never without this flag)")


TRAIN_COMMANDS = (("train", "train (several --seeds: the base-to-novel protocol)"),
                  ("cross-dataset", "train on ImageNet, all classes; test on 10 other data sets"),
                  ("domain-generalization", "train on ImageNet; test on ImageNet-V2/-Sketch/-A/-R"))


def build_parser():
    parser = Parser(
        prog="heba-train", description="Few-shot HeBA / AdapterTune adapters on a frozen CLIP.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}",
                                help="the command (default: train)")
    from heba.train.protocols import CROSS_TARGETS, DG_TARGETS
    for name, helptext in TRAIN_COMMANDS:
        p = sub.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:]
                           + ".", formatter_class=HELP_FORMAT)
        _data(p, positional=name == "train")
        _model(p)
        _train_opts(p)
        _runtime(p)
        if name != "train":
            p.add_argument("--targets", nargs="+", default=None,
                           help="the data sets tested on (default: "
                                + " ".join(CROSS_TARGETS if name == "cross-dataset"
                                           else DG_TARGETS) + ")")
    _evaluate_parser(sub)
    _split_parser(sub)
    from heba.train.predict import add_predict_parser
    add_predict_parser(sub)
    return parser


def _evaluate_parser(sub):
    e = sub.add_parser("evaluate", help="evaluate a checkpoint (heba's or the published one)",
                       description="Evaluate a checkpoint on its data set's test split.",
                       formatter_class=HELP_FORMAT)
    _data(e)
    _model(e)
    _runtime(e)
    e.add_argument("--checkpoint", required=True,
                   help="adapters.safetensors or its run folder; a published model.pth.tar-<N>, "
                        "or the published run folder (<out>/adapter_learner)")
    e.add_argument("--shots", type=int, default=None,
                   help="the few-shot draw's shots (default: the checkpoint's)")
    e.add_argument("--seed", type=int, default=None,
                   help="the few-shot draw's seed (default: the checkpoint's)")
    e.add_argument("--output", "-o", default=None,
                   help="append the result to metrics.jsonl in this folder (default: none)")


def _split_parser(sub):
    s = sub.add_parser("split", help="write the exact split a run would use, as JSON",
                       description="Write the images a CoOp-layout run would use, as JSON "
                                   "(the same file a run writes as split_<subsample>.json).",
                       formatter_class=HELP_FORMAT)
    _data(s, positional=False)
    s.add_argument("--shots", type=int, required=True, help="training images per class")
    s.add_argument("--seed", type=int, required=True, help="the seed of the few-shot draw")
    s.add_argument("--subsample", choices=("all", "base", "new"), default="all",
                   help="the classes: all, base (the half a base-to-novel run trains and tests "
                        "as base) or new (its novel half) (default: %(default)s)")
    s.add_argument("--json", required=True, help="the file to write")


def parse_args(argv=None):
    """The command line as a namespace; a rejected one is one line on stderr and
    ``SystemExit(2)`` (:class:`Parser`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["train"] + argv
    _COMMAND[0] = argv[0]
    return build_parser().parse_args(argv)


CONFIG_ARGS = ("method", "model", "pretrained", "quick_gelu", "towers", "start", "end",
               "reduction", "rank", "every", "alpha", "base_scale", "novel_scale", "novel_eval",
               "scale_factor", "slow_fast_ratio", "slow_fast_draw", "split", "shots", "seed", "test_per_class",
               "augment", "ctx_init", "descriptions", "epochs", "batch_size", "drop_last", "lr",
               "momentum", "weight_decay", "schedule", "label_smoothing", "candidates",
               "neg_per_class", "precision", "eval_precision", "model_kwargs", "optimizer",
               "warmup_epochs", "grad_clip", "val_split")


def config_overrides(args, source_default=None) -> dict:
    """The fields the command line sets (None: the recipe's default), data source resolved.

    ``source_default``: the data set when ``--dataset`` is not given (the transfer
    protocols train on ImageNet)."""
    from heba.train.config import UsageError
    over = {k: getattr(args, k) for k in CONFIG_ARGS if getattr(args, k, None) is not None}
    folder = getattr(args, "folder", None)
    if folder and args.dataset:
        raise UsageError("give an ImageFolder path or --dataset NAME, not both")
    dataset = args.dataset or (source_default if args.root else None)
    if dataset:
        over.update(source="coop", dataset=dataset, root=_abs(args.root))
    elif folder:
        over.update(source="folder", dataset=os.path.abspath(folder))
    elif args.root:
        raise UsageError("--root needs --dataset NAME")
    if over.get("descriptions"):
        over["descriptions"] = os.path.abspath(over["descriptions"])
    if args.template:
        over["templates"] = list(args.template)
    return over


def _abs(path):
    return os.path.abspath(os.path.expanduser(path)) if path else path


def make_train_config(args, source_default=None):
    """The run's :class:`Config`: the recipe, the demo's and the data's defaults, the options."""
    from heba.data.demo import TEMPLATES
    from heba.train.config import UsageError, make_config
    over = config_overrides(args, source_default)
    from heba.train import backbones, vision
    if vision.is_classification(over.get("model", "")):       # timm:NAME
        return vision.classifier_config(over, args.recipe)
    if over.get("model_kwargs"):
        raise UsageError("--model-kwargs is for timm:NAME backbones")
    if over.get("source") == "coop":
        check_clip_dataset(over["dataset"], over.get("model", "ViT-B-16"))
    demo = "source" not in over
    method = over.get("method", "heba")
    recipe = args.recipe or ("adaptertune" if method == "adaptertune" else "heba")
    model = over.setdefault("model", "tiny" if demo else "ViT-B-16")
    over.setdefault("pretrained", "builtin" if model == "tiny" else
                    getattr(backbones.library(model), "DEFAULT_PRETRAINED", "openai"))
    if demo:
        over.setdefault("epochs", 10)               # the demo: about a minute on 2 CPU cores
        if not over.get("descriptions"):
            over.setdefault("templates", list(TEMPLATES))
    return make_config(recipe, **over)


def default_output(cfg, command: str = "train") -> str:
    """The run folder when ``-o`` is not given: ``runs/demo`` for the demo, else
    ``runs/<protocol or split>-<data set>-<method>``, so that protocols, data sets and methods
    never share a folder.

    >>> from heba.train.config import make_config
    >>> default_output(make_config("heba", source="coop", dataset="eurosat", root="/data"))
    'runs/base2novel-eurosat-heba'
    """
    from heba.train import vision
    if cfg.source == "demo":
        return "runs/demo"
    if vision.is_classification(cfg.model):
        kind = "classification"
    else:
        kind = command if command != "train" else cfg.split
    data = cfg.root if cfg.dataset == "imagefolder" else cfg.dataset
    data = os.path.basename(os.path.normpath(str(data)))
    return f"runs/{kind}-{data}-{cfg.method}"


def check_clip_dataset(name: str, model: str) -> None:
    """``--dataset`` of a CLIP backbone names a data set in CoOp's layout (one line if not)."""
    from heba.train.config import UsageError
    if name not in clip_datasets():
        hint = (f"; {name} is a torchvision data set: train a timm:NAME backbone on it"
                if name.lower() in timm_datasets() else "")
        raise UsageError(f"--dataset {name}: a CLIP backbone ({model}) reads one of CoOp's "
                         f"data sets: {', '.join(clip_datasets())}{hint}")


def run_options(args, demo: bool, default: str = None):
    """The :class:`RunOptions` of the command line; ``default``: the folder without ``-o``
    (:func:`default_output`; the demo's ``runs/demo`` when not given)."""
    from heba.train.context import RunOptions
    # The bare demo writes runs/demo and replaces only a previous demo run there
    # (heba.train.preflight); a real run's folder is never replaced without --overwrite.
    output = args.output or default or ("runs/demo" if demo else "runs/heba")
    return RunOptions(output=output, overwrite=args.overwrite, resume=args.resume,
                      demo_default=demo and args.output is None,
                      device=args.device, backend=args.backend, workers=args.workers,
                      threads=args.threads, allow_download=args.allow_download, quiet=args.quiet,
                      eval_every=args.eval_every, eval_before=not args.no_eval_before,
                      cuda_graphs=not args.no_cuda_graphs, cast_once=not args.no_cast_once,
                      checkpoint_blocks=args.checkpoint_blocks, pipeline=args.pipeline,
                      check_images=args.check_images)


def run(args):
    """The command's work: a split, a checkpoint's evaluation, a run or a protocol."""
    if args.command == "split":
        return _split(args)
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command == "predict":
        from heba.train.predict import run_predict
        return run_predict(args)
    from heba.train import protocols, vision
    from heba.train.config import UsageError
    from heba.train.recipe import TrainRecipe
    source = {"cross-dataset": "imagenet", "domain-generalization": "imagenet"}.get(args.command)
    cfg = make_train_config(args, source)
    opts = run_options(args, cfg.source == "demo", default_output(cfg, args.command))
    seeds = args.seeds or [cfg.seed]
    if vision.is_classification(cfg.model):
        if args.command != "train":
            raise UsageError(f"{args.command} is a CLIP protocol; a timm backbone trains with "
                             f"`heba-train train` (several --seeds: one run per seed)")
        return protocols.classification(cfg, opts, args.seeds)
    if args.command == "train":
        if args.seeds:
            return protocols.base2novel(cfg, opts, seeds)
        return TrainRecipe(cfg, opts).run()
    targets = args.targets or (protocols.CROSS_TARGETS if args.command == "cross-dataset"
                               else protocols.DG_TARGETS)
    return protocols.transfer(cfg, opts, seeds, targets, args.command.replace("-", "_"))


def _evaluate(args):
    """``heba-train evaluate``: the checkpoint's recipe evaluates it; ``-o`` keeps the line."""
    from heba.train.evaluate import evaluate_checkpoint
    over = config_overrides(args)
    for k in ("shots", "seed"):
        if getattr(args, k) is not None:
            over[k] = getattr(args, k)
    acc = evaluate_checkpoint(args.checkpoint, over, run_options_eval(args))
    if args.output:
        import json
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(dict(event="evaluate", checkpoint=args.checkpoint, **acc)) + "\n")
    return acc


def run_options_eval(args):
    from heba.train.context import RunOptions
    return RunOptions(device=args.device, backend=args.backend, workers=args.workers,
                      threads=args.threads, allow_download=args.allow_download,
                      check_images=args.check_images)


def _split(args):
    from heba.data import coop
    from heba.train.config import UsageError
    if not args.dataset or not args.root:
        raise UsageError("split needs --dataset NAME --root DIR")
    parent = os.path.dirname(os.path.abspath(args.json))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if os.path.isdir(args.json):
        raise UsageError(f"--json {args.json} is a folder: give the file to write")
    if not os.path.isdir(parent):
        raise UsageError(f"--json {args.json}: {parent} is a file, not a folder")
    split = coop.build_split(args.dataset, _abs(args.root), args.shots, args.seed,
                             args.subsample)
    coop.write_split_json(split, args.json)
    print(f"{args.json}: {len(split.train)} train, {len(split.val)} val, {len(split.test)} "
          f"test images, {len(split.classnames)} classes")
    return split


def main(argv=None) -> int:
    """Run the command; every failure is one line on stderr, never a traceback.

    Exit status: 0 done; 2 bad input (the command line, a value, a file, a folder in use);
    1 a run that could not go on (a write failed, training diverged); 130 / 143 stopped by
    SIGINT / SIGTERM (``--resume`` continues the run)."""
    try:
        args = parse_args(argv)
    except SystemExit as stop:                  # -h (0) or a rejected command line (2)
        return stop.code if isinstance(stop.code, int) else 2
    from heba.clip.checkpoints import CheckpointError
    from heba.data.coop import DataError
    from heba.train import run_folder as rf
    from heba.train.config import UsageError
    from heba.train.loop import Diverged
    restore = rf.handle_signals()
    try:
        from heba.train.preflight import check_command_writes
        check_command_writes(args)
        run(args)
    except (UsageError, CheckpointError, DataError) as err:
        print(f"heba-train: error: {error_line(err)}", file=sys.stderr)
        return 2
    except (OSError, Diverged) as err:          # a write failed (the disk is full, ...)
        print(f"heba-train: error: {error_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:            # SIGINT, or SIGTERM (run_folder.Interrupted)
        signum = getattr(err, "signum", 2)
        print(f"heba-train: stopped by {_signal_name(signum)}{_resume_hint(args)}",
              file=sys.stderr)
        return 128 + signum
    finally:
        rf.unlock_all()
        restore()
        _cleanup_distributed()
    return 0


def _signal_name(signum: int) -> str:
    import signal
    return signal.Signals(signum).name


def _resume_hint(args) -> str:
    if args.command in ("split", "evaluate"):
        return ""
    return ("; every committed epoch is kept: run the same command with --resume to "
            "continue")


def error_line(err) -> str:
    """The message of a bad-input error on one line.

    An error raised in a DataLoader worker arrives wrapped ("Caught DataError in
    DataLoader worker process 0. Original Traceback ..."): its last line is the message.
    An ``OSError`` names the file and the cause by its name (a write's is already
    ``cannot write PATH: cause``, :func:`heba.clip.checkpoints.write_error`)."""
    if isinstance(err, OSError) and not isinstance(err, _write_error_type()):
        cause = os.strerror(err.errno).lower() if err.errno else " ".join(str(err).split())
        return f"{err.filename}: {cause}" if isinstance(err.filename, str) else cause
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "worker" in lines[0]:
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return " ".join(lines)


def _write_error_type():
    from heba.clip.checkpoints import WriteError
    return WriteError


class Parser(argparse.ArgumentParser):
    """argparse with heba-train's error format: one line ``heba-train: error: ...`` and exit
    status 2, with a hint where there is one (``did you mean --epochs?``)."""

    def error(self, message):
        print(f"heba-train: error: {message}{_hint(self, message)}", file=sys.stderr)
        self.exit(2)


def _hint(parser, message: str) -> str:
    """``; did you mean X?`` for a misspelt option or an invalid choice (difflib)."""
    import difflib
    import re
    m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if m:
        words, choices = [m.group(1)], re.findall(r"'([^']*)'", m.group(2)) or \
            [c.strip() for c in m.group(2).split(",")]
    elif message.startswith("unrecognized arguments: "):
        words = [w.split("=", 1)[0] for w in message.split(": ", 1)[1].split()
                 if w.startswith("-")]
        choices = _option_strings(parser, _COMMAND[0])
    else:
        return ""
    for word in words:
        close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
        if close:
            return f"; did you mean {close[0]}?"
    return ""


def _option_strings(parser, command) -> list:
    """Every option of ``parser`` and of its sub-command ``command`` (if any)."""
    names = [o for a in parser._actions for o in a.option_strings]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            names += _option_strings(action.choices[command], None)
    return names


_COMMAND = [None]       # the sub-command being parsed (for the hint's option names)


def _cleanup_distributed():
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass


if __name__ == "__main__":
    sys.exit(main())
