"""open_clip backbones: load a CLIP (QuickGELU for OpenAI weights), its transforms, attach adapters.

``load(cfg, allow_download)`` builds ``cfg.model`` (an open_clip name, or
``"tiny"``: the demo's tiny CLIP shipped with heba) with ``cfg.pretrained`` (a
tag, a local weights file, or ``"none"``: random, drawn from a fixed seed so a
checkpoint of a random model can be evaluated). No network unless
``allow_download``.

QuickGELU: OpenAI's CLIP weights were trained with QuickGELU
(``x * sigmoid(1.702 x)``); open_clip's ``ViT-B-16`` config uses GELU and only
warns when OpenAI weights are loaded into it. ``cfg.quick_gelu="auto"`` builds
QuickGELU whenever the pretrained tag is ``openai`` or its config says so, as
the published code's CLIP (``clip/model.py``) does; ``"on"`` / ``"off"`` force it.

Transforms (``cfg.augment``): ``"dassl"`` is the published pipeline (Dassl
``build_transform`` with ``random_resized_crop``, ``random_flip``, ``normalize``,
bicubic): train = RandomResizedCrop(size, scale (0.08, 1)) + RandomHorizontalFlip,
test = Resize(size) + CenterCrop(size); ``"openclip"``: open_clip's own.
"""

from __future__ import annotations

import logging
import os
import socket

import torch

from heba.train.backbones import Backbone
from heba.train.config import UsageError
from heba.train.preflight import one_line

__all__ = ["load", "attach", "wants_quick_gelu", "dassl_transforms", "NetworkGuard"]


class NetworkGuard:
    """Refuse every outgoing connection inside the block (remembering that one was tried)."""

    def __init__(self, allowed: bool):
        self.allowed, self.tripped, self._saved, self._hf = allowed, None, None, None

    def __enter__(self):
        if self.allowed:
            return self
        guard = self

        def refuse(*args, **kwargs):
            guard.tripped = args[1] if len(args) > 1 else (args[0] if args else "?")
            raise OSError("network access is disabled by heba-train (pass --allow-download)")

        self._saved = (socket.socket.connect, socket.create_connection, socket.getaddrinfo)
        socket.socket.connect = lambda self_, *a, **k: refuse(self_, *a, **k)
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        # huggingface_hub: answer from the local cache at once (no retries against the
        # refused socket), and keep its warnings quiet.
        try:
            from huggingface_hub import constants
            self._hf = (constants, constants.HF_HUB_OFFLINE)
            constants.HF_HUB_OFFLINE = True
        except Exception:
            pass
        logging.disable(logging.ERROR)
        return self

    def __exit__(self, *exc):
        if self._saved:
            socket.socket.connect, socket.create_connection, socket.getaddrinfo = self._saved
            logging.disable(logging.NOTSET)
            if self._hf is not None:
                self._hf[0].HF_HUB_OFFLINE = self._hf[1]
        return False


def wants_quick_gelu(name: str, pretrained, mode: str = "auto") -> bool:
    """Whether ``name`` with ``pretrained`` must be built with QuickGELU.

    >>> wants_quick_gelu("ViT-B-16", "openai"), wants_quick_gelu("ViT-B-16", "laion2b_s34b_b88k")
    (True, False)
    """
    if mode != "auto":
        return mode == "on"
    if pretrained in (None, "", "none") or name.endswith("-quickgelu"):
        return False
    if pretrained == "openai":
        return True
    import open_clip
    try:
        return bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))
    except Exception:
        return False


def dassl_transforms(size: int, mean, std):
    """``(train, eval)``: the published (Dassl) pipeline at ``size`` (module docstring)."""
    from torchvision import transforms as T
    bicubic = T.InterpolationMode.BICUBIC
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    train = T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=bicubic),
                       T.RandomHorizontalFlip()] + norm)
    test = T.Compose([T.Resize(size, interpolation=bicubic), T.CenterCrop(size)] + norm)
    return train, test


def _tiny(cfg, pre):
    from heba.clip import synthetic, tiny
    if pre not in (None, "builtin") and not os.path.isfile(pre):
        raise UsageError(f"--pretrained {pre}: no such file (the tiny model takes "
                         f"'builtin', 'none' or a weights file)")
    model, tok = tiny.load_tiny_clip(pretrained=pre == "builtin")
    if pre not in (None, "builtin"):
        _load_weights_file(model, pre)
    size = tiny.CONFIG["vision_cfg"]["image_size"]
    train_tf, eval_tf = _transforms(cfg, size, synthetic.MEAN, synthetic.STD, None)
    return Backbone(model.eval(), train_tf, eval_tf, tok)


def _transforms(cfg, size, mean, std, openclip_tfs):
    if cfg.augment == "dassl" or openclip_tfs is None:
        return dassl_transforms(size, mean, std)
    return openclip_tfs


def load(cfg, allow_download: bool = False) -> Backbone:
    """The frozen CLIP of ``cfg`` with its transforms and tokenizer (module docstring)."""
    import open_clip
    name, pre = cfg.model, cfg.pretrained
    pre = None if pre in (None, "", "none") else pre
    torch.manual_seed(0)          # a random model ("none") is the same model every time
    if name == "tiny":
        return _tiny(cfg, pre)
    if name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if name.lower() in m.lower()][:5]
        raise UsageError(f"unknown model {name!r}" + (f" (did you mean {', '.join(close)}?)"
                                                      if close else
                                                      "; see open_clip.list_models()"))
    if pre is not None and not os.path.isfile(pre):
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pre not in tags:
            raise UsageError(f"--pretrained {pre!r} is neither a file nor a tag of {name} "
                             f"({', '.join(tags) or 'none'})")
    quick = wants_quick_gelu(name, pre, cfg.quick_gelu)
    guard = NetworkGuard(allow_download)
    try:
        with guard:
            model, train_tf, eval_tf = open_clip.create_model_and_transforms(
                name, pretrained=pre, force_quick_gelu=quick)
            tok = open_clip.get_tokenizer(name)
    except Exception as err:
        if guard.tripped is not None or (not allow_download and pre is not None
                                         and not os.path.isfile(pre)):
            raise UsageError(f"{name} / {pre} is not in the local cache and downloading is "
                             f"off: pass --allow-download, or --pretrained /path/to/file")
        raise UsageError(f"cannot build {name} with pretrained={pre}: "
                         f"{type(err).__name__}: {one_line(err)}") from None
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    train_tf, eval_tf = _transforms(cfg, size, mean, std, (train_tf, eval_tf))
    return Backbone(model.eval(), train_tf, eval_tf, tok)


def _load_weights_file(model, path):
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        result = model.load_state_dict({k: v.float() if v.is_floating_point() else v
                                        for k, v in state.items()}, strict=False)
    except Exception as err:
        raise UsageError(f"cannot load weights {path}: {type(err).__name__}: "
                         f"{one_line(err)}") from None
    if result.missing_keys or result.unexpected_keys:
        raise UsageError(f"cannot load weights {path} into the tiny model: "
                         f"{len(result.missing_keys)} missing tensor(s) "
                         f"({_few(result.missing_keys)}), {len(result.unexpected_keys)} "
                         f"unexpected ({_few(result.unexpected_keys)})")


def _few(names, k=3):
    return ", ".join(list(names)[:k]) + (", ..." if len(names) > k else "") if names else "none"


def attach(model, cfg, backend: str = "auto"):
    """Wire the adapters ``cfg`` describes (the same for training, resuming, evaluating)."""
    from heba.clip.wiring import ScalePolicy, attach_adaptertune, attach_heba
    try:
        if cfg.method == "heba":
            policy = ScalePolicy.from_config(cfg)
            attach_heba(model, towers_=cfg.towers, start=cfg.start, end=cfg.end,
                        reduction=cfg.reduction, policy=policy, backend=backend)
        else:
            attach_adaptertune(model, towers_=cfg.towers, rank=cfg.rank, every=cfg.every,
                               alpha=cfg.alpha, backend=backend)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    return model
