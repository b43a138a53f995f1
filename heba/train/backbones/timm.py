"""timm backbones (``--backbone timm:NAME``): image classifiers with a new linear head.

A ``timm:NAME`` run is the published AdapterTune protocol (salimkhazem/adaptertune,
``src/models/timm_backbones.py``): ``timm.create_model(NAME, pretrained=True,
num_classes=N)`` (a new head of the data set's ``N`` classes, timm's own head
init, drawn after ``torch.manual_seed(seed)`` as the published ``set_seed``
does), then one of the published methods (``cfg.method``):

* ``adaptertune``: :func:`heba.timm.attach_adaptertune` (rank, every, alpha); adapters + head train;
* ``heba``: :func:`heba.timm.attach_heba` (HeBA's adapters in blocks ``start..end``) + head;
* ``head-only``: the head alone (published ``head_only``);
* ``full``: every parameter (published ``full_finetune``).

Weights (``cfg.pretrained``), never from the network unless ``allow_download``:

* ``published`` (default): the published rule for a bare name: the first, sorted,
  of ``timm.list_models(NAME + "*", pretrained=True)`` whose tag contains ``in1k``
  (else the first of all); ``vit_small_patch16_224`` -> ``.augreg_in1k``. A name
  with a tag (``vit_small_patch16_224.augreg_in21k_ft_in1k``) is used as given.
* ``timm``: timm's default tag of NAME. Any other word: that tag (``augreg_in1k``).
* a file (``.safetensors`` / ``.pth`` / ``.bin``): timm's loader (its classifier is
  dropped when the class count differs, as for hub weights).
* ``none``: random weights (tests).

``cfg.model_kwargs`` go to ``timm.create_model`` (``{"depth": 2, "img_size": 32}``).
The published code falls back to random weights when none can be loaded; here
that is an error (one line). Transforms: the published ones
(:func:`heba.data.vision.build_transforms` at the model's input size, ImageNet
mean and std for every model, as published).
"""

from __future__ import annotations

import os

import torch

from heba.train.backbones import Backbone
from heba.train.config import UsageError

__all__ = ["TASK", "DEFAULT_PRETRAINED", "load", "attach", "resolve_weights", "published_variant"]

TASK = "classify"                  # heba.train.classify runs it (a head, no text tower)
DEFAULT_PRETRAINED = "published"


def _timm():
    try:
        import timm
    except ImportError:
        raise UsageError("timm backbones need timm: pip install 'heba[timm]'") from None
    return timm


def arch_name(model: str) -> str:
    """``"timm:vit_small_patch16_224"`` -> ``"vit_small_patch16_224"``."""
    name = model.split(":", 1)[1] if model.startswith("timm:") else model
    if not name:
        raise UsageError("--backbone timm:NAME needs a model name (timm.list_models())")
    return name


def published_variant(name: str):
    """The tagged name the published ``_pick_pretrained_variant`` loads for a bare ``name``
    (None: timm has no pretrained weights for it).

    >>> published_variant("vit_small_patch16_224")          # doctest: +SKIP
    'vit_small_patch16_224.augreg_in1k'
    """
    cands = _timm().list_models(f"{name}*", pretrained=True)
    if not cands:
        return None
    return sorted([c for c in cands if "in1k" in c] or cands)[0]


def resolve_weights(name: str, pretrained) -> tuple[str, dict]:
    """``(model name for timm.create_model, its keyword arguments)`` for ``--pretrained``."""
    timm = _timm()
    if not timm.is_model(name):
        base = name.split(".")[0]
        close = timm.list_models(f"*{base[:12]}*")[:5]
        raise UsageError(f"unknown timm model {name!r}" + (
            f" (did you mean {', '.join(close)}?)" if close else "; see timm.list_models()"))
    pre = "none" if pretrained in (None, "", "none") else pretrained
    if pre == "none":
        return name, dict(pretrained=False)
    if os.path.isfile(pre):
        return name, dict(pretrained=True, pretrained_cfg_overlay=dict(file=os.path.abspath(pre)))
    if pre == "published" and "." not in name:
        tagged = published_variant(name)
        if tagged is None:
            raise UsageError(f"timm has no pretrained weights for {name}: pass --pretrained "
                             f"FILE or --pretrained none")
        return tagged, dict(pretrained=True)
    if pre in ("published", "timm"):
        return name, dict(pretrained=True)
    if "." in name:
        raise UsageError(f"--pretrained {pre!r}: {name} already names its weights (a tag); "
                         f"use --pretrained published, a file, or none")
    tagged = f"{name}.{pre}"
    if tagged not in timm.list_models(f"{name}*", pretrained=True):
        tags = [m.split(".", 1)[1] for m in timm.list_models(f"{name}.*", pretrained=True)]
        raise UsageError(f"--pretrained {pre!r} is neither a file nor a timm tag of {name} "
                         f"({', '.join(tags) or 'none'}; or published, timm, none)")
    return tagged, dict(pretrained=True)


def _create(name, kwargs, cfg, num_classes, allow_download):
    from heba.train.backbones.openclip import NetworkGuard
    timm = _timm()
    guard = NetworkGuard(allow_download)
    try:
        with guard:
            return timm.create_model(name, num_classes=num_classes, **kwargs,
                                     **(cfg.model_kwargs or {}))
    except UsageError:
        raise
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        if guard.tripped is not None or (kwargs.get("pretrained") and not allow_download
                                         and "pretrained_cfg_overlay" not in kwargs
                                         and isinstance(err, (OSError, RuntimeError))):
            raise UsageError(f"timm weights of {name} are not in the local cache and "
                             f"downloading is off: pass --allow-download, or --pretrained "
                             f"FILE ({type(err).__name__}: {first[:120]})") from None
        raise UsageError(f"cannot build timm model {name} ({cfg.model_kwargs or {}}): "
                         f"{type(err).__name__}: {first}") from None


def input_size(model) -> int:
    """The side of the square images ``model`` takes (its patch embedding's, else its config's)."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        from timm.data import resolve_model_data_config
        size = resolve_model_data_config(model)["input_size"][1:]
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def load(cfg, allow_download: bool = False, num_classes: int = 1000) -> Backbone:
    """The timm model of ``cfg`` with a new ``num_classes`` head and the published transforms.

    The global RNG is the caller's (seed it first: the head's init, and the whole model
    with ``--pretrained none``, are drawn from it).
    """
    from heba.data.vision import build_transforms
    if cfg.model_kwargs is not None and not isinstance(cfg.model_kwargs, dict):
        raise UsageError(f"--model-kwargs must be a JSON object, got {cfg.model_kwargs!r}")
    name, kwargs = resolve_weights(arch_name(cfg.model), cfg.pretrained)
    model = _create(name, kwargs, cfg, num_classes, allow_download)
    train_tf, eval_tf = build_transforms(input_size(model))
    return Backbone(model.eval(), train_tf, eval_tf, None)


def _freeze_all_but_head(model, full: bool):
    for p in model.parameters():
        p.requires_grad_(full)
    if not full:
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        if not isinstance(head, torch.nn.Module) or not list(head.parameters()):
            raise UsageError(f"{type(model).__name__} has no classifier to train "
                             f"(get_classifier())")
        for p in head.parameters():
            p.requires_grad_(True)


def attach(model, cfg, backend: str = "auto"):
    """Wire ``cfg.method`` (module docstring); the head stays trainable. Returns ``model``."""
    from heba import timm as heba_timm
    from heba.adapters import ScalePolicy
    try:
        if cfg.method == "adaptertune":
            heba_timm.attach_adaptertune(model, rank=cfg.rank, every=cfg.every, alpha=cfg.alpha,
                                         backend=backend)
        elif cfg.method == "heba":
            policy = ScalePolicy.from_config(cfg)
            heba_timm.attach_heba(model, start=cfg.start, end=cfg.end, reduction=cfg.reduction,
                                  policy=policy, backend=backend)
        else:
            _freeze_all_but_head(model, full=cfg.method == "full")
    except (TypeError, ValueError) as err:
        raise UsageError(f"--method {cfg.method} on {cfg.model}: {err}") from None
    return model
