"""The classification task's data and configuration: which backbones, which data sets, what
the command line means for them (the published AdapterTune protocol, :mod:`heba.train.classify`).

Example::

    >>> is_classification("timm:vit_small_patch16_224"), is_classification("ViT-B-16")
    (True, False)
    >>> data_source({"source": "coop", "dataset": "cifar10"})["source"]
    'vision'
"""

from __future__ import annotations

import json
from typing import Optional

from heba.train import backbones
from heba.train.config import Config, UsageError

# The command line's data set names -> heba.data.vision's.
DATASET_NAMES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "svhn": "SVHN",
                 "oxford_pets": "OxfordIIITPet", "food101": "Food101",
                 "flowers102": "Flowers102", "fgvc_aircraft": "FGVCAircraft",
                 "tiny_imagenet": "TinyImageNet", "imagenet_r": "ImageNetR",
                 "imagefolder": "ImageFolder",
                 # the published configs/datasets/<name>.yaml names
                 "pets": "OxfordIIITPet", "flowers": "Flowers102", "fgvc": "FGVCAircraft",
                 "tinyimagenet": "TinyImageNet"}
TOPK = (1, 5)                      # published metrics.topk, those <= the class count
HEBA_ADAPTER_FIELDS = ("start", "end", "reduction", "slow_fast_ratio", "rank", "every", "alpha")


def is_classification(model: str) -> bool:
    """Whether ``--backbone model`` is run by the classification recipe (a ``timm:`` classifier)."""
    return getattr(backbones.library(model), "TASK", "clip") == "classify"


def topk(num_classes: int) -> tuple:
    """The published top-k accuracies a data set of ``num_classes`` classes reports."""
    return tuple(k for k in TOPK if k <= num_classes)


def build_data(cfg):
    """The :class:`heba.data.vision.VisionData` of ``cfg`` (PIL images; transforms set later)."""
    from heba.data.vision import load_vision_dataset
    name = DATASET_NAMES.get(str(cfg.dataset).lower(), cfg.dataset)
    try:
        data = load_vision_dataset(name, cfg.root, seed=cfg.seed, val_split=cfg.val_split,
                                   transforms=(None, None))
    except (FileNotFoundError, ValueError, ImportError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"--dataset {cfg.dataset} --root {cfg.root}: {msg}") from None
    if len(data.train) == 0 or len(data.test) == 0 or data.num_classes < 2:
        raise UsageError(f"{cfg.dataset} under {cfg.root}: {len(data.train)} training and "
                         f"{len(data.test)} test images of {data.num_classes} classes; "
                         f"need both and at least 2 classes")
    return data


def set_transforms(data, train_tf, eval_tf) -> None:
    data.train.transform, data.val.transform, data.test.transform = train_tf, eval_tf, eval_tf


def eval_transform(lib, model):
    """The published test transform of ``model``'s input size (``lib``: its backbone module)."""
    from heba.data.vision import build_transforms
    return build_transforms(lib.input_size(model))[1]


def data_source(over: dict) -> dict:
    """``over`` with the command line's data (``--dataset`` / a folder) as ``source="vision"``."""
    over = dict(over)
    if over.get("source") == "folder":
        over.update(source="vision", root=over["dataset"], dataset="imagefolder")
    elif over.get("source") == "coop":
        over["source"] = "vision"
    if over.get("source") == "vision":
        known, name = DATASET_NAMES, over.get("dataset")
        if str(name).lower() not in known:
            from heba.data.coop import DATASETS as COOP
            hint = (f"; {name} is a data set in CoOp's layout: train a CLIP backbone on it"
                    if name in COOP else "")
            raise UsageError(f"--dataset {name}: a timm backbone trains on "
                             f"{', '.join(n for n in known if n != 'imagefolder')} (under "
                             f"--root DIR) or an ImageFolder path{hint}")
    return over


def classifier_config(over: dict, recipe: Optional[str]) -> Config:
    """The :class:`Config` of a ``timm:NAME`` command line (default recipe ``adaptertune``).

    ``--method heba`` takes HeBA's adapter settings (the ``heba`` recipe's) unless given;
    ``--model-kwargs`` is JSON.
    """
    from heba.train.config import RECIPES, make_config
    over = data_source(over)
    if over.get("source") != "vision":
        raise UsageError(f"--backbone {over.get('model')}: give --dataset NAME --root DIR or "
                         f"an ImageFolder path (no built-in demo data for a classifier)")
    over = _model_kwargs(over)
    recipe = recipe or "adaptertune"
    if over.get("method") == "heba" and recipe in RECIPES and \
            RECIPES[recipe].get("method") != "heba":
        heba_defaults = Config()
        for f in HEBA_ADAPTER_FIELDS:
            over.setdefault(f, getattr(heba_defaults, f))
        over.setdefault("towers", "visual")
    over.setdefault("pretrained", backbones.library(over["model"]).DEFAULT_PRETRAINED)
    return make_config(recipe, **over)


def _model_kwargs(over: dict) -> dict:
    """``--model-kwargs`` parsed: a JSON object."""
    kw = over.get("model_kwargs")
    if isinstance(kw, str):
        try:
            over["model_kwargs"] = json.loads(kw)
        except json.JSONDecodeError as err:
            raise UsageError(f"--model-kwargs is not JSON: {err}") from None
        if not isinstance(over["model_kwargs"], dict):
            raise UsageError(f"--model-kwargs must be a JSON object, got {kw}")
    return over
