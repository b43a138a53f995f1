"""The published HeBA and AdapterTune checkpoint formats.

Published HeBA checkpoints (``torch.save`` of a dict whose ``state_dict`` holds
the learner's tensors) name the adapters ``visual_adapter.<i>.att_conv.*``,
``visual_adapter.<i>.mlp_conv.*``, ``text_adapter.<i>.{att_conv,mlp_conv}.*``,
``<i>`` the 1-based block index (VLM-HeBA ``AdapterLearner._build_adapter`` makes
a ModuleList of ``layers + 1`` slots, slot 0 and unadapted layers None); they
also carry a ``tk_prompts`` buffer (the tokenized class prompts), which is
ignored here. The Dassl trainer writes them to
``<out>/adapter_learner/model.pth.tar-<epoch>`` (dict: ``state_dict``, ``epoch``,
``optimizer``, ``scheduler``, ``val_result``); :func:`published_layout` reads which
towers and layers one adapts. Published AdapterTune checkpoints name them
``blocks.<i>.adapter.{down,up}.{weight,bias}``, ``<i>`` the image-tower block the
adapter follows, inside ``{"model": the adapted timm state_dict, "optimizer",
"epoch"}`` (:func:`published_model_state`). These are exactly the keys of
``model.heba_adapters.state_dict()`` (:mod:`heba.adapters.modules`), whatever the
backbone, so a checkpoint loads into a model wired the same way, strictly: an
unknown, missing or misshapen tensor is an error that names it.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from heba.adapters.attach import get_adapters

__all__ = ["CheckpointError", "IGNORED", "read_checkpoint", "read_published",
           "extract_state_dict", "published_model_state", "published_layout", "method_of",
           "load_adapter_state", "load_published_checkpoint", "adapter_state_dict",
           "check_frozen_state"]

# Keys of the published checkpoints that are not adapter weights.
IGNORED = ("tk_prompts",)


class CheckpointError(ValueError):
    """A checkpoint does not match the model it is loaded into."""


def read_checkpoint(source: Union[str, os.PathLike, Mapping]) -> tuple[str, Any]:
    """``(name, object)`` of a ``torch.save`` file read on the CPU (tensors only), or of an
    already loaded dict (named ``"checkpoint"``); :class:`CheckpointError` naming the file
    when it is missing or does not read."""
    if isinstance(source, Mapping):
        return "checkpoint", source
    name = os.fspath(source)
    try:
        with warnings.catch_warnings():       # torch's pickle-protocol note is not ours to relay
            warnings.simplefilter("ignore")
            return name, torch.load(name, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {name} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {name} is a folder, not a checkpoint file") from None
    except Exception as err:
        # torch's own message may advise weights_only=False (code execution on load): never
        # relayed; a file that holds more than tensors is no checkpoint heba reads
        raise CheckpointError(f"cannot read checkpoint {name}: it is not a heba or published "
                              f"checkpoint (heba's adapters.safetensors, or a torch.save file "
                              f"of tensors: a Dassl model.pth.tar-<N>, an AdapterTune last.pt / "
                              f"best.pt); reading it failed with {type(err).__name__}") from None


def read_published(path: str) -> dict:
    """The adapter tensors of a published checkpoint file (``tk_prompts`` dropped)."""
    return extract_state_dict(read_checkpoint(path)[1])


def _unprefixed(key: str) -> str:
    """``key`` without the ``module.`` prefix DistributedDataParallel adds."""
    return key[len("module."):] if key.startswith("module.") else key


def extract_state_dict(obj: Any) -> dict:
    """The tensors of a published checkpoint: its ``state_dict`` (or ``model``) entry, or itself.

    A ``module.`` prefix (DistributedDataParallel) is stripped; ``tk_prompts``
    and any other ``IGNORED`` name are dropped.
    """
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("not an adapter checkpoint: expected a dict of tensors, or a dict "
                              "with a 'state_dict' entry holding one")
    return {_unprefixed(k): v for k, v in obj.items() if k.split(".")[-1] not in IGNORED}


def published_model_state(obj: Any, name: str) -> dict:
    """The whole model state of a published AdapterTune checkpoint (its ``model`` entry, or
    itself), ``module.`` prefixes stripped; :class:`CheckpointError` if it is not one."""
    state = obj.get("model", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(state, Mapping) or not state or \
            not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{name} is not a published AdapterTune checkpoint: expected "
                              f"{{'model': timm state_dict, 'optimizer', 'epoch'}}")
    return {_unprefixed(k): v for k, v in state.items()}


def published_layout(state: Mapping[str, torch.Tensor]) -> dict:
    """``{"towers", "start", "end"}`` a published HeBA state dict adapts (1-based layers).

    >>> published_layout({"visual_adapter.3.att_conv.norm.bias": None,
    ...                   "visual_adapter.5.mlp_conv.norm.bias": None})
    {'towers': 'visual', 'start': 3, 'end': 5}
    """
    layers = {"visual": set(), "text": set()}
    for k in state:
        tower, _, rest = k.partition("_adapter.")
        if tower in layers and rest.split(".")[0].isdigit():
            layers[tower].add(int(rest.split(".")[0]))
    used = [t for t in ("visual", "text") if layers[t]]
    if not used:
        raise CheckpointError("not a HeBA checkpoint: no visual_adapter.<i> / text_adapter.<i> "
                              "keys")
    every = set().union(*(layers[t] for t in used))
    return dict(towers="both" if len(used) == 2 else used[0], start=min(every), end=max(every))


def method_of(state: Mapping) -> Optional[str]:
    """``"heba"`` / ``"adaptertune"``: the method whose adapter names ``state`` holds (or None)."""
    keys = list(state)
    if any(k.startswith(("visual_adapter.", "text_adapter.")) for k in keys):
        return "heba"
    if any(k.startswith(("blocks.", "text_blocks.")) for k in keys):
        return "adaptertune"
    return None


def _names(items, limit=8):
    items = list(items)
    s = ", ".join(items[:limit])
    return s + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def load_adapter_state(model: nn.Module, state: Mapping[str, torch.Tensor],
                       source: str = "checkpoint") -> None:
    """Copy ``state`` into ``model.heba_adapters`` strictly, or raise :class:`CheckpointError`."""
    adapters = get_adapters(model)
    own = adapters.state_dict()
    unknown = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    if unknown or missing:
        kind = method_of(state)
        hint = ""
        if kind and kind != adapters.method:
            hint = (f" (it holds {kind} adapters, the model is wired with "
                    f"{adapters.method})")
        msg = [f"{source} does not match the model's adapters{hint}:"]
        if unknown:
            msg.append(f"{len(unknown)} unknown key(s): {_names(unknown)}")
        if missing:
            msg.append(f"{len(missing)} missing key(s): {_names(missing)}")
        raise CheckpointError(" ".join(msg))
    bad = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
           if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(f"{source}: shape mismatch for {len(bad)} tensor(s): "
                              f"{_names(bad)}")
    with torch.no_grad():
        adapters.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def load_published_checkpoint(model: nn.Module, source: Union[str, os.PathLike, Mapping]) -> dict:
    """Load a published HeBA or AdapterTune checkpoint (a path or a loaded dict) into ``model``.

    ``model`` must be wired the way the checkpoint was trained (the same
    method, towers and layers; :func:`heba.clip.attach_heba` /
    :func:`heba.clip.attach_adaptertune`, or their timm / Hugging Face peers).
    Returns the loaded state dict.

    Example::

        model = open_clip.create_model("ViT-B-16", pretrained="openai")
        attach_heba(model)                                    # layers 1..12, both towers
        load_published_checkpoint(model, "output/base2new/.../model.pth.tar-5")
    """
    name, obj = read_checkpoint(source)
    state = extract_state_dict(obj)
    load_adapter_state(model, state, name)
    return state


def adapter_state_dict(model: nn.Module) -> dict:
    """The adapters' weights only, under the published checkpoints' key names."""
    return {k: v.detach() for k, v in get_adapters(model).state_dict().items()}


def check_frozen_state(own: Mapping, theirs: Mapping, name: str, check: str = "values") -> None:
    """:class:`CheckpointError` unless ``theirs`` (a checkpoint's frozen tensors) has ``own``'s
    names and shapes and, with ``check="values"``, its values: a checkpoint of another
    backbone or of other pretrained weights never loads silently."""
    unknown, missing = sorted(set(theirs) - set(own)), sorted(set(own) - set(theirs))
    if unknown or missing:
        raise CheckpointError(
            f"{name} is not of this backbone: {len(unknown)} tensor(s) the model lacks "
            f"({', '.join(unknown[:3])}), {len(missing)} it misses ({', '.join(missing[:3])})")
    shapes = [k for k in own if tuple(own[k].shape) != tuple(theirs[k].shape)]
    if shapes:
        k = shapes[0]
        raise CheckpointError(f"{name} is not of this backbone: {len(shapes)} tensor(s) differ "
                              f"in shape, e.g. {k} {tuple(theirs[k].shape)} vs model "
                              f"{tuple(own[k].shape)}")
    if check == "values":
        diff = [k for k in own if not torch.equal(own[k].detach().cpu(),
                                                  theirs[k].to(own[k].dtype).cpu())]
        if diff:
            raise CheckpointError(f"{name} is not of this backbone's weights: {len(diff)} of "
                                  f"{len(own)} frozen tensors differ, e.g. {diff[0]} "
                                  f"(check='shapes' skips the value check)")
