"""Recipes as data: every knob of a run, the published defaults, and how they are overridden.

A run's configuration is a :class:`Config` (a flat dataclass, saved as JSON
beside every checkpoint). ``RECIPES`` holds each recipe's defaults as plain
data; the command line overrides single fields (``--epochs 10``), and
``Config.from_dict`` reads a saved one back.

``heba`` is the published HeBA recipe (VLM-HeBA ``configs/trainers/HeBA/base2new.yaml``
on Dassl's defaults, ``trainers/heba.py``), field by field:

==========================  =========================  ===================================
field                       published value            where
==========================  =========================  ===================================
epochs                      30                         OPTIM.MAX_EPOCH
batch_size, drop_last       16, True                   DATALOADER.TRAIN_X.BATCH_SIZE;
                                                       Dassl drops the last partial batch
lr, momentum, weight_decay  0.0075, 0.9, 5e-4          OPTIM.LR; Dassl's SGD defaults
                                                       (dampening 0, no Nesterov)
schedule                    ``epoch``: cosine over     OPTIM.LR_SCHEDULER cosine =
                            epochs, stepped once per   CosineAnnealingLR(T_max=epochs),
                            epoch, no warm-up          update_lr() at the epoch's last batch
augment                     ``dassl``: random resized  INPUT.TRANSFORMS; RRCROP_SCALE;
                            crop (0.08, 1) bicubic +   test: resize shorter side, centre
                            horizontal flip            crop (bicubic)
precision                   fp16 autocast over fp32    TRAINER.HeBA.PREC "amp"
                            weights, loss scaling
eval_precision              fp32 published; heba       Dassl's test() runs the model
                            default ``train`` (the     without autocast; ``fp32`` does
                            run's precision, faster)   so (and keeps the backbone fp32)
candidates                  ``batch``: the batch's     CustomCLIP.forward, NEG_SAMPLING_RATIO
                            unique classes + up to 5
                            negatives per unique class
                            (all classes when there
                            are no more than the batch)
prompts                     one random prompt per      CustomCLIP.forward (training);
                            class per step; the mean   the mean of all (padded) prompts
                            of all at evaluation       at evaluation
ctx_init                    "a photo of a"             TEXT_CTX_INIT; prompt = ctx_init +
                                                       " " + class + ", " + description
label_smoothing             0.1                        LabelSmoothingCrossEntropy(eps=0.1)
start, end, reduction       1, 12 (all), 4             ADAPTER_START / _END
base_scale                  0.025                      ADAPTER_SCALE_BASE
novel_scale, novel_eval     0.010 declared, but        ADAPTER_SCALE_NOVEL; use_novel_scale
                            ``base``: novel classes    is never set, so novel classes are
                            are evaluated at 0.025     evaluated at ADAPTER_SCALE_BASE
scale_factor, slow_fast     2.25, 0.8                  ADAPTER_SCALE_FACTOR, SLOW_FAST_RATIO
quick_gelu                  ``auto``: QuickGELU for    OpenAI's CLIP is built with QuickGELU
                            OpenAI weights
==========================  =========================  ===================================

slow_fast_draw ``block``: the slow-fast scale is drawn once per block and shared by its
two adapters, as the published ``return_*_adapter(index)`` does (``call``: per adapter).

Where heba's engine differs, by design: the random streams are heba's own (seeded by (seed, epoch, rank), so a resumed run
is the uninterrupted one); the distributions are the published ones.

``adaptertune`` is the published AdapterTune recipe (salimkhazem/adaptertune
``configs/base.yaml``, ``src/train/{optim,sched,trainer}.py``), the defaults of
every ``timm:NAME`` run (full training sets, a new linear head trained with the
adapters; :mod:`heba.train.classify`) and of ``--method adaptertune`` on a CLIP:

==========================  =========================  ===================================
field                       published value            where
==========================  =========================  ===================================
optimizer, lr, weight_decay AdamW, 1e-3, 0.05          train.opt / lr / weight_decay
                                                       (torch AdamW's betas and eps)
epochs, batch_size          50, 128 (last partial      train.epochs, data.batch_size;
                            batch kept)                DataLoader(shuffle=True)
schedule, warmup_epochs     ``step``: cosine per step  train.sched cosine, warmup_epochs:
                            after 5 linear warm-up     LambdaLR, (s + 1) / warmup_steps,
                            epochs                     then 0.5 (1 + cos(pi progress))
grad_clip                   1.0                        clip_grad_norm_ before every step
precision                   fp32                       system.precision
label_smoothing             0.0                        train.label_smoothing
rank, every, alpha          16, 1, 1.0 (init zero)     method.adapter_*
seed, val_split             42; 10% of the training    seed; data.val_split (one seeded
                            set held out               randperm, heba.data.vision)
==========================  =========================  ===================================

(``scripts/run_full_experiments.sh`` overrides the batch to 1024 and scales
the learning rate linearly, ``1e-3 * 1024 / 2048``: pass ``--batch-size 1024
--lr 5e-4`` for those runs.) The published trainer evaluates the validation
split after every epoch, saves ``best.pt`` at the best validation top-1, and
reports the test top-1 / top-5 of the *last* epoch's model; heba does the same
(the best validation epoch is recorded in the summary).

Example::

    >>> cfg = make_config("heba", epochs=5)
    >>> cfg.epochs, cfg.lr, cfg.schedule
    (5, 0.0075, 'epoch')
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit status 2."""


@dataclass
class Config:
    """Every knob of a training run (see the module docstring for the published values)."""

    recipe: str = "heba"
    method: str = "heba"                  # heba | adaptertune | head-only | full (timm)
    # backbone
    model: str = "ViT-B-16"               # open_clip name, "tiny", "timm:NAME" or "hf:DIR"
    pretrained: Optional[str] = "openai"
    quick_gelu: str = "auto"              # auto (on for OpenAI weights) | on | off
    # adapters
    towers: str = "both"
    start: Optional[int] = 1
    end: Optional[int] = None
    reduction: Optional[int] = 4
    rank: Optional[int] = None
    every: Optional[int] = None
    alpha: Optional[float] = None
    base_scale: float = 0.025
    novel_scale: float = 0.010
    novel_eval: str = "base"              # base (as the published code runs) | novel (declared)
    scale_factor: float = 2.25
    slow_fast_ratio: float = 0.8
    slow_fast_draw: str = "block"         # block (published: one draw per block) | call
    # data
    source: str = "demo"                  # demo | folder | coop
    dataset: Optional[str] = None         # CoOp name (source coop) or ImageFolder path (folder)
    root: Optional[str] = None            # CoOp root (source coop)
    split: str = "base2novel"             # base2novel | all
    shots: int = 16
    seed: int = 1
    test_per_class: Optional[int] = None
    augment: str = "dassl"                # dassl | openclip
    # prompts
    ctx_init: str = "a photo of a"
    descriptions: Optional[str] = None    # .py (published), .json (CuPL / ours) or a folder
    templates: Optional[list] = None      # prompt templates with {} (instead of descriptions)
    # optimisation
    epochs: int = 30
    batch_size: int = 16
    drop_last: bool = True
    lr: float = 0.0075
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "epoch"               # epoch (published) | step (cosine per step)
    label_smoothing: float = 0.1
    candidates: str = "batch"             # batch (published) | all
    neg_per_class: int = 5
    precision: str = "auto"               # auto: gpu_precision on CUDA, fp32 on the CPU
    gpu_precision: str = "fp16"           # fp16 with loss scaling (published "amp") | bf16
    eval_precision: str = "train"         # train (the run's precision) | fp32 (published test())
    test_batch_size: int = 128
    # AdapterTune's optimisation (recipe adaptertune) and timm classification runs
    optimizer: str = "sgd"                # sgd (Dassl's, HeBA) | adamw (AdapterTune)
    warmup_epochs: int = 0                # linear warm-up of the per-step cosine
    grad_clip: float = 0.0                # max gradient norm (0: off)
    val_split: float = 0.1                # classification: held-out part of the training set
    model_kwargs: Optional[dict] = None   # timm.create_model keyword arguments
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """A saved configuration; unknown keys (a checkpoint's epoch, accuracy) are dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: str, **more) -> None:
        from heba.train.run_folder import atomic_write
        text = json.dumps(dict(self.to_dict(), **more), indent=2, sort_keys=True) + "\n"

        def write(tmp):
            with open(tmp, "w") as f:
                f.write(text)

        atomic_write(path, write)


# The published HeBA recipe is the dataclass's defaults; the others are overrides.
RECIPES: dict[str, dict] = {
    "heba": {},
    # configs/trainers/HeBA/x2d.yaml's OPTIM / DATALOADER values (its TRAINER section is
    # LWEIB's, which a HeBA config cannot merge; the adapter settings stay HeBA's).
    "heba-xd": dict(batch_size=64, lr=0.0065, epochs=10),
    # salimkhazem/adaptertune configs/base.yaml (module docstring)
    "adaptertune": dict(method="adaptertune", towers="visual", start=None, end=None,
                        reduction=None, rank=16, every=1, alpha=1.0, slow_fast_ratio=1.0,
                        epochs=50, batch_size=128, drop_last=False, optimizer="adamw",
                        lr=1e-3, weight_decay=0.05, schedule="step", warmup_epochs=5,
                        grad_clip=1.0, precision="fp32", gpu_precision="bf16",
                        label_smoothing=0.0, seed=42),
}

# Fields a checkpoint must share with the run that loads it, and with one that resumes it.
MODEL_FIELDS = ("method", "model", "towers", "start", "end", "reduction", "rank", "every",
                "alpha", "model_kwargs")
RESUME_FIELDS = MODEL_FIELDS + ("pretrained", "source", "dataset", "root", "split", "shots",
                                "seed", "epochs", "batch_size", "lr", "schedule", "candidates",
                                "optimizer", "warmup_epochs", "val_split")
# head-only and full: the published AdapterTune baselines (timm classification only).
CHOICES = dict(method=("heba", "adaptertune", "head-only", "full"),
               quick_gelu=("auto", "on", "off"), optimizer=("sgd", "adamw"),
               novel_eval=("base", "novel"), source=("demo", "folder", "coop", "vision"),
               split=("base2novel", "all"), augment=("dassl", "openclip"),
               schedule=("epoch", "step"), candidates=("batch", "all"),
               slow_fast_draw=("block", "call"),
               precision=("auto", "fp32", "bf16", "fp16"), gpu_precision=("fp16", "bf16"),
               eval_precision=("train", "fp32"),
               towers=("both", "visual", "text"))


def make_config(recipe: str = "heba", **overrides) -> Config:
    """The recipe's defaults with ``overrides`` (None values are ignored); checked."""
    if recipe not in RECIPES:
        raise UsageError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    values = dict(RECIPES[recipe], recipe=recipe)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = Config(**values)
    except TypeError as err:
        raise UsageError(str(err)) from None
    check(cfg)
    return cfg


# The lowest value of each integer field (None: not set, not checked); HINTS complete the message.
INT_MIN = dict(epochs=1, batch_size=1, shots=1, test_batch_size=1, seed=0, neg_per_class=0,
               rank=1, every=1, reduction=1, start=1, end=1, test_per_class=1,
               warmup_epochs=0)
HINTS = dict(test_per_class=" (leave it out to test on every image)")
# Each float field's range, in words (None: not set, not checked).
NUMBERS = dict(lr=(lambda x: x >= 0, "a number >= 0"),
               momentum=(lambda x: 0 <= x < 1, "in [0, 1)"),
               weight_decay=(lambda x: x >= 0, "a number >= 0"),
               label_smoothing=(lambda x: 0 <= x < 1, "in [0, 1)"),
               scale_factor=(lambda x: x > 0, "a positive number"),
               grad_clip=(lambda x: x >= 0, "a number >= 0 (0: off)"),
               val_split=(lambda x: 0 <= x < 1, "a fraction in [0, 1)"),
               base_scale=(lambda x: True, "a finite number"),
               novel_scale=(lambda x: True, "a finite number"),
               alpha=(lambda x: True, "a finite number"))


def flag(name: str) -> str:
    """The command-line flag of a field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def check(cfg: Config) -> None:
    """Raise :class:`UsageError` (one line naming the flag) for a value no run can use: the
    one check of every field (:func:`make_config` and :mod:`heba.train.preflight` call it)."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise UsageError(f"{name} must be one of {', '.join(allowed)}, "
                             f"got {getattr(cfg, name)!r}")
    for name, low in INT_MIN.items():
        v = getattr(cfg, name, None)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise UsageError(f"{flag(name)} must be an integer >= {low}{HINTS.get(name, '')}, "
                             f"got {v!r}")
    if cfg.start is not None and cfg.end is not None and cfg.end < cfg.start:
        raise UsageError(f"--end ({cfg.end}) must be >= --start ({cfg.start})")
    for name, (ok, what) in NUMBERS.items():
        v = getattr(cfg, name, None)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                              or not math.isfinite(v) or not ok(v)):
            raise UsageError(f"{flag(name)} must be {what}, got {v!r}")
    _check_scale_policy(cfg)
    _check_combinations(cfg)


def _check_scale_policy(cfg: Config) -> None:
    """The slow-fast fields are the adapter library's to check (:class:`ScalePolicy`); here
    its message becomes the command line's one line, before any model is built."""
    from heba.adapters import ScalePolicy
    try:
        ScalePolicy.from_config(cfg)
    except ValueError as err:
        name, _, rest = str(err).partition(" ")
        raise UsageError(f"{flag(name)} {rest}") from None


def combination_warnings(cfg: Config) -> list:
    """One line per setting that ``cfg`` quietly makes do something else than it says (the
    run goes ahead; each recipe logs them as warnings after its checks).

    >>> combination_warnings(make_config("adaptertune", epochs=3))  # doctest: +ELLIPSIS
    ['--warmup-epochs 5 with --epochs 3: the warm-up is longer than the run, ...']
    """
    out = []
    if cfg.warmup_epochs and cfg.schedule != "step":
        out.append(f"--warmup-epochs {cfg.warmup_epochs} has no effect with --schedule "
                   f"{cfg.schedule} (the warm-up is the per-step cosine's: --schedule step)")
    elif cfg.warmup_epochs >= cfg.epochs > 0:
        longer = "longer than" if cfg.warmup_epochs > cfg.epochs else "as long as"
        out.append(f"--warmup-epochs {cfg.warmup_epochs} with --epochs {cfg.epochs}: the "
                   f"warm-up is {longer} the run, so the learning rate only rises, up to "
                   f"{cfg.lr * cfg.epochs / cfg.warmup_epochs:.3g} (--lr {cfg.lr:g}), and "
                   f"never follows the cosine")
    return out


def _check_combinations(cfg: Config) -> None:
    if cfg.method in ("head-only", "full") and not str(cfg.model).startswith("timm:"):
        raise UsageError(f"--method {cfg.method} is a timm classification baseline "
                         f"(--backbone timm:NAME); {cfg.model} takes heba or adaptertune")
    if cfg.source in ("coop", "vision") and (not cfg.dataset or not cfg.root):
        raise UsageError("--dataset NAME needs --root DIR (the folder holding the data sets)")
    if cfg.descriptions and not os.path.exists(cfg.descriptions):
        raise UsageError(f"--descriptions {cfg.descriptions}: no such file or folder")
