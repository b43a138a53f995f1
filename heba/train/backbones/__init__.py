"""Backbones by model library: the one seam between the training engine and a model.

A backbone module (``openclip``; ``timm`` for ``timm:NAME``, ``hf`` for
``hf:DIR``) provides two functions, and the engine uses nothing else (a
module with ``TASK = "classify"``, timm's, is run by :mod:`heba.train.classify`
and its ``load`` takes ``num_classes``):

``load(cfg, allow_download) -> Backbone``
    the frozen model, its train / eval transforms and its tokenizer (None for
    an image-only model); bad input raises :class:`heba.train.config.UsageError`.
``attach(model, cfg, backend) -> model``
    wires the adapters ``cfg`` describes (``model.heba_adapters``, with the
    published checkpoints' state-dict keys) and freezes the rest.

The engine then calls ``model.encode_image(images) -> [B, E]`` and, for a
model with a text tower, ``heba.clip.wiring.encode_text(model, tokens) -> [K, E]``
and ``model.logit_scale``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

from heba.train.config import UsageError

# "<prefix>:<name>" -> the module that loads it; a bare name is an open_clip model.
LIBRARIES = {"openclip": "heba.train.backbones.openclip", "timm": "heba.train.backbones.timm",
             "hf": "heba.train.backbones.hf"}


@dataclass
class Backbone:
    model: Any
    train_transform: Optional[Callable]
    eval_transform: Optional[Callable]
    tokenizer: Optional[Callable]


def library(model_name: str):
    """The backbone module for ``--model`` (``timm:vit_base`` -> the ``timm`` library's)."""
    prefix = model_name.split(":", 1)[0] if ":" in model_name else "openclip"
    if prefix not in LIBRARIES:
        raise UsageError(f"--model {model_name}: unknown backbone library {prefix!r} "
                         f"(known: {', '.join(sorted(LIBRARIES))})")
    return importlib.import_module(LIBRARIES[prefix])


def load(cfg, allow_download: bool = False) -> Backbone:
    return library(cfg.model).load(cfg, allow_download)


def attach(model, cfg, backend: str = "auto"):
    return library(cfg.model).attach(model, cfg, backend)
