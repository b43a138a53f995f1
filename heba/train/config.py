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

``adaptertune`` is room for AdapterTune's own protocol (issue: timm ViTs);
today it holds the low-rank adapter's knobs on the same engine.

Example::

    >>> cfg = make_config("heba", epochs=5)
    >>> cfg.epochs, cfg.lr, cfg.schedule
    (5, 0.0075, 'epoch')
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit status 2."""


@dataclass
class Config:
    """Every knob of a training run (see the module docstring for the published values)."""

    recipe: str = "heba"
    method: str = "heba"                  # heba | adaptertune
    # backbone
    model: str = "ViT-B-16"               # open_clip name, or "tiny" (the built-in demo model)
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
    test_batch_size: int = 128
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """A saved configuration; unknown keys (a checkpoint's epoch, accuracy) are dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: str, **more) -> None:
        from heba.clip.checkpoints import atomic_write
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
    "adaptertune": dict(method="adaptertune", towers="visual", start=None, end=None,
                        reduction=None, rank=16, every=1, alpha=1.0, slow_fast_ratio=1.0,
                        epochs=10, schedule="step", gpu_precision="bf16"),
}

# Fields a checkpoint must share with the run that loads it, and with one that resumes it.
MODEL_FIELDS = ("method", "model", "towers", "start", "end", "reduction", "rank", "every",
                "alpha")
RESUME_FIELDS = MODEL_FIELDS + ("pretrained", "source", "dataset", "root", "split", "shots",
                                "seed", "epochs", "batch_size", "lr", "schedule", "candidates")
CHOICES = dict(method=("heba", "adaptertune"), quick_gelu=("auto", "on", "off"),
               novel_eval=("base", "novel"), source=("demo", "folder", "coop"),
               split=("base2novel", "all"), augment=("dassl", "openclip"),
               schedule=("epoch", "step"), candidates=("batch", "all"),
               slow_fast_draw=("block", "call"),
               precision=("auto", "fp32", "bf16", "fp16"), gpu_precision=("fp16", "bf16"),
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


def check(cfg: Config) -> None:
    """Raise :class:`UsageError` (one line) for a value no run can use."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise UsageError(f"{name} must be one of {', '.join(allowed)}, "
                             f"got {getattr(cfg, name)!r}")
    for name in ("epochs", "batch_size", "shots"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {cfg.seed}")
    if cfg.neg_per_class < 0:
        raise UsageError(f"--neg-per-class must be >= 0, got {cfg.neg_per_class}")
    if cfg.method == "adaptertune" and None in (cfg.rank, cfg.every, cfg.alpha):
        raise UsageError("--method adaptertune needs --rank, --every and --alpha (the "
                         "adaptertune recipe sets them: --recipe adaptertune)")
    if cfg.method == "heba" and None in (cfg.start, cfg.reduction):
        raise UsageError("--method heba needs --start and --reduction (--recipe heba)")
    if cfg.source == "coop" and (not cfg.dataset or not cfg.root):
        raise UsageError("--dataset NAME needs --root DIR (the folder holding the data sets)")
    if cfg.descriptions and not os.path.exists(cfg.descriptions):
        raise UsageError(f"--descriptions {cfg.descriptions}: no such file or folder")
