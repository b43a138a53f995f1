"""Adapter checkpoints: the published HeBA / AdapterTune files, and heba's own.

Published HeBA checkpoints (``torch.save`` of a dict whose ``state_dict`` holds
the learner's tensors) name the adapters ``visual_adapter.<i>.att_conv.*``,
``visual_adapter.<i>.mlp_conv.*``, ``text_adapter.<i>.{att_conv,mlp_conv}.*``,
``<i>`` the 1-based block index (VLM-HeBA ``AdapterLearner._build_adapter`` makes
a ModuleList of ``layers + 1`` slots, slot 0 and unadapted layers None); they
also carry a ``tk_prompts`` buffer (the tokenized class prompts), which is
ignored here. The Dassl trainer writes them to
``<out>/adapter_learner/model.pth.tar-<epoch>`` (dict: ``state_dict``, ``epoch``,
``optimizer``, ``scheduler``, ``val_result``); :func:`find_checkpoint` finds
one from the run folder, and :func:`published_layout` reads which towers and
layers it adapts. Published
AdapterTune checkpoints name them ``blocks.<i>.adapter.{down,up}.{weight,bias}``,
``<i>`` the image-tower block the adapter follows. These are exactly the keys
of ``model.heba_adapters.state_dict()`` (see :mod:`heba.clip.wiring`), so a
checkpoint loads into a model wired the same way, strictly: an unknown,
missing or misshapen tensor is an error that names it.

heba's own checkpoints (:func:`save_adapters`) are a safetensors file with the
adapter weights only, beside a JSON file with the configuration, both written
atomically (temporary file, then ``os.replace``).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from heba.clip.wiring import get_adapters

__all__ = ["CheckpointError", "load_published_checkpoint", "extract_state_dict",
           "find_checkpoint", "published_layout", "read_published",
           "load_adapter_state", "save_adapters", "load_adapters", "atomic_write",
           "atomic_torch_save"]

# Keys of the published checkpoints that are not adapter weights.
IGNORED = ("tk_prompts",)


class CheckpointError(ValueError):
    """A checkpoint does not match the model it is loaded into."""


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
    out = {}
    for k, v in obj.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k.split(".")[-1] in IGNORED:
            continue
        out[k] = v
    return out


def load_adapter_state(model: nn.Module, state: Mapping[str, torch.Tensor],
                       source: str = "checkpoint") -> None:
    """Copy ``state`` into ``model.heba_adapters`` strictly, or raise :class:`CheckpointError`."""
    adapters = get_adapters(model)
    own = adapters.state_dict()
    unknown = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    if unknown or missing:
        kind = _method_of(state)
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
    :func:`heba.clip.attach_adaptertune`). Returns the loaded state dict.

    Example::

        model = open_clip.create_model("ViT-B-16", pretrained="openai")
        attach_heba(model)                                    # layers 1..12, both towers
        load_published_checkpoint(model, "output/base2new/.../model.pth.tar-5")
    """
    name = "checkpoint"
    if not isinstance(source, Mapping):
        name = os.fspath(source)
        try:
            source = torch.load(name, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {name} does not exist") from None
        except Exception as err:
            raise CheckpointError(f"cannot read checkpoint {name}: {type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''}") from None
    state = extract_state_dict(source)
    load_adapter_state(model, state, name)
    return state


def read_published(path: str) -> dict:
    """The adapter tensors of a published checkpoint file (``tk_prompts`` dropped)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}") from None
    return extract_state_dict(obj)


def find_checkpoint(path: str) -> tuple[str, str]:
    """``(kind, file)`` for a checkpoint path: ``"heba"`` (safetensors + JSON) or ``"published"``.

    ``path`` is a file, a heba run folder (``adapters.safetensors``), or a
    published run folder (``<out>`` or ``<out>/adapter_learner``: the
    ``model.pth.tar-<N>`` of largest ``N``, else ``model-best.pth.tar``).
    """
    if os.path.isfile(path):
        return ("heba" if path.endswith(".safetensors") else "published"), path
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    own = os.path.join(path, "adapters.safetensors")
    if os.path.isfile(own):
        return "heba", own
    folder = os.path.join(path, "adapter_learner")
    folder = folder if os.path.isdir(folder) else path
    tagged = [f for f in os.listdir(folder) if f.startswith("model.pth.tar-")
              and f.rsplit("-", 1)[1].isdigit()]
    if tagged:
        return "published", os.path.join(folder, max(tagged, key=lambda f: int(f.rsplit("-", 1)[1])))
    if os.path.isfile(os.path.join(folder, "model-best.pth.tar")):
        return "published", os.path.join(folder, "model-best.pth.tar")
    raise CheckpointError(f"{path} holds no checkpoint (adapters.safetensors, or "
                          f"adapter_learner/model.pth.tar-<epoch>)")


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


def _method_of(state) -> Optional[str]:
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


# --- heba's own checkpoints ------------------------------------------------------------------

def atomic_write(path: str, write) -> None:
    """``write(tmp_path)`` then ``os.replace(tmp_path, path)``: readers never see half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: str) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_adapters(path: str, model: nn.Module, config: dict) -> None:
    """Write the adapter weights to ``path`` (safetensors) and ``config`` to ``path`` + ``.json``.

    The JSON is written last, so a checkpoint whose JSON exists is complete.
    """
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous().cpu() for k, v in get_adapters(model).state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True)

    def write_json(tmp):
        with open(tmp, "w") as f:
            f.write(text + "\n")

    atomic_write(_config_path(path), write_json)


def read_config(path: str) -> dict:
    cfg = _config_path(path)
    if not os.path.exists(cfg):
        raise CheckpointError(f"checkpoint {path} has no configuration file {cfg}")
    with open(cfg) as f:
        return json.load(f)


def load_adapters(path: str, model: nn.Module) -> None:
    """Load a checkpoint written by :func:`save_adapters` into ``model``'s adapters."""
    from safetensors.torch import load_file
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = load_file(path)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    load_adapter_state(model, state, path)


def _config_path(path: str) -> str:
    root = path[:-len(".safetensors")] if path.endswith(".safetensors") else path
    return root + ".json"
