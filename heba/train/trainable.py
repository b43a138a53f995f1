"""A classifier run's trained tensors on disk: what is saved, how it is read back.

heba's classifier checkpoint is one safetensors file of every tensor the run
trains (:func:`trainable_state`: HeBA's container keys + ``head.*``; AdapterTune's
published ``blocks.<i>.adapter.*`` + ``head.*``; ``full``: the whole state dict)
and its JSON (config, epoch, accuracy, class names). A published AdapterTune
``best.pt`` / ``last.pt`` is read by :func:`load_published_classifier`.

Example::

    >>> from torch import nn
    >>> sorted(trainable_state(nn.Linear(2, 3), "full"))
    ['bias', 'weight']
"""

from __future__ import annotations

import json

import torch

from heba.clip.checkpoints import CheckpointError, config_path
from heba.train import run_folder as rf


def head_prefix(model) -> str:
    """The state-dict prefix of ``model``'s classifier head (``"head."``)."""
    head = model.get_classifier()
    return next(n for n, m in model.named_modules() if m is head) + "."


def trainable_state(model, method: str) -> dict:
    """Every tensor a run trains, by name: HeBA's container keys + ``head.*``; otherwise the
    model's own state-dict names of the trainable parameters (AdapterTune: the published
    ``blocks.<i>.adapter.*`` + ``head.*``); ``full``: the whole state dict."""
    if method == "full":
        return dict(model.state_dict())
    if method == "heba":
        pre = head_prefix(model)
        out = dict(model.heba_adapters.state_dict())
        out.update({pre + k: v for k, v in model.get_classifier().state_dict().items()})
        return out
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, method: str, state: dict, name: str) -> None:
    """Load :func:`trainable_state` ``state`` into ``model`` (wired as the run was); checked."""
    own = trainable_state(model, method)
    missing, unknown = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unknown or bad:
        raise CheckpointError(f"{name} does not fit the model: missing {missing[:4]}, "
                              f"unexpected {unknown[:4]}, other shapes {bad[:4]}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k].to(v.dtype))


def load_trainable_file(model, method: str, path: str) -> None:
    """:func:`load_trainable` from heba's safetensors file ``path``."""
    from safetensors.torch import load_file
    load_trainable(model, method, load_file(path), path)


def trainable_writers(model, method: str, meta: dict) -> dict:
    """``{"adapters.safetensors": write(path), "adapters.json": write(path)}``: the
    :func:`trainable_state` (taken now) and ``meta``; one file each."""
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous().cpu() for k, v in trainable_state(model, method).items()}
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    return {rf.CKPT_NAME: lambda path: save_file(state, path, metadata={"format": "pt"}),
            rf.CKPT_JSON: lambda path: rf.write_text(path, text)}


def save_trainable(path: str, model, method: str, meta: dict) -> None:
    """``path`` (safetensors) + ``path.json``: :func:`trainable_state` and ``meta``; JSON last."""
    writers = trainable_writers(model, method, meta)
    rf.atomic_write(path, writers[rf.CKPT_NAME])
    rf.atomic_write(config_path(path), writers[rf.CKPT_JSON])


def load_published_classifier(model, file: str, cfg, backend: str) -> None:
    """A published AdapterTune checkpoint: adapters + head (checked backbone), or everything
    (``cfg.method == "full"``)."""
    from heba import timm as heba_timm
    from heba.adapters.published import check_frozen_state
    if cfg.method == "full":
        state = heba_timm.published_model_state(heba_timm.read_checkpoint(file)[1], file)
        check_frozen_state(model.state_dict(), state, file, check="shapes")   # names the key
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise CheckpointError(f"{file} does not fit {cfg.model}: "
                                  f"{str(err).splitlines()[0]}") from None
        return
    heba_timm.load_published_checkpoint(model, file, alpha=cfg.alpha or 1.0, backend=backend)
