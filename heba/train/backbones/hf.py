"""Hugging Face CLIP backbones (``--backbone hf:DIR``): the CLIP few-shot protocol on transformers.

``DIR`` is a local model folder (``config.json``, the weights, the tokenizer files;
what ``CLIPModel.save_pretrained`` + ``CLIPTokenizer.save_pretrained`` write).
Nothing is downloaded: the folder is read with ``local_files_only=True``.
``cfg.pretrained``: ``folder`` (default: the folder's weights) or ``none``
(the folder's config with random weights, drawn from a fixed seed).

The model is wrapped in :class:`HFCLIP`, which gives the engine the open_clip
interface it uses (``encode_image``, ``encode_text``, ``logit_scale``), so a
run is the same run as on open_clip: the same prompts, candidates, loss and
evaluation (:mod:`heba.train.step`, :mod:`heba.train.evaluate`). The adapters
are wired by :mod:`heba.hf` (the open_clip wiring's names and checkpoints).

Transforms: the published (Dassl) pipeline (``cfg.augment="dassl"``) or
open_clip's (``"openclip"``), at the vision config's ``image_size``, with the
folder's ``preprocessor_config.json`` mean and std (OpenAI CLIP's without one).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from heba.train.backbones import Backbone
from heba.train.config import UsageError

__all__ = ["TASK", "DEFAULT_PRETRAINED", "HFCLIP", "load", "attach"]

TASK = "clip"
DEFAULT_PRETRAINED = "folder"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class HFCLIP(nn.Module):
    """A ``transformers.CLIPModel`` behind open_clip's interface.

    ``encode_image(images [B,3,H,W]) -> [B, E]`` (pooled class token, visual
    projection), ``encode_text(tokens [K, L]) -> [K, E]`` (pooled end-of-text
    token, text projection), ``logit_scale`` (the model's, log-space).
    ``heba_adapters`` / ``heba_policy``: those :mod:`heba.hf` wired on ``clip``.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    @property
    def logit_scale(self):
        return self.clip.logit_scale

    @property
    def heba_adapters(self):
        return getattr(self.clip, "heba_adapters", None)

    @property
    def heba_policy(self):
        return getattr(self.clip, "heba_policy", None)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        out = self.clip.vision_model(pixel_values=images)
        x = self.clip.visual_projection(out.pooler_output)
        return nn.functional.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        out = self.clip.text_model(input_ids=tokens)
        x = self.clip.text_projection(out.pooler_output)
        return nn.functional.normalize(x, dim=-1) if normalize else x

    def forward(self, images, tokens):
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp()


def folder_of(model: str) -> str:
    path = model.split(":", 1)[1] if model.startswith("hf:") else model
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"--backbone hf:{path}: not a Hugging Face model folder (no "
                         f"config.json; save one with CLIPModel.save_pretrained)")
    return path


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError("hf: backbones need transformers: pip install 'heba[hf]'") from None
    return transformers


def _build(path: str, pretrained) -> nn.Module:
    tf = _transformers()
    pre = pretrained or "folder"
    if pre not in ("folder", "none"):
        raise UsageError(f"--pretrained {pre!r}: an hf: backbone takes 'folder' (its weights) "
                         f"or 'none' (random)")
    try:
        if pre == "none":
            torch.manual_seed(0)           # a random model is the same model every time
            return tf.CLIPModel(tf.CLIPConfig.from_pretrained(path, local_files_only=True))
        from heba.hf import load_model
        shown = tf.utils.logging.is_progress_bar_enabled()
        tf.utils.logging.disable_progress_bar()      # "Loading weights" bars: not ours to show
        try:
            return load_model(path)
        finally:
            if shown:
                tf.utils.logging.enable_progress_bar()
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise UsageError(f"cannot load a CLIPModel from {path}: {type(err).__name__}: "
                         f"{first[:200]}") from None


def make_tokenizer(path: str, context: int):
    """texts -> ``[N, context]`` token ids (padded, truncated), open_clip's tokenizer contract."""
    tf = _transformers()
    files = set(os.listdir(path))
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files:
        raise UsageError(f"{path} has no tokenizer files (tokenizer.json, or vocab.json + "
                         f"merges.txt: save one with CLIPTokenizer.save_pretrained)")
    try:
        tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:
        raise UsageError(f"{path} has no usable tokenizer files (save one with "
                         f"CLIPTokenizer.save_pretrained): {type(err).__name__}") from None

    def tokenize(texts):
        return tok(list(texts), padding="max_length", truncation=True, max_length=context,
                   return_tensors="pt")["input_ids"]

    return tokenize


def _mean_std(path: str):
    pre = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(pre):
        with open(pre) as f:
            d = json.load(f)
        if d.get("image_mean") and d.get("image_std"):
            return tuple(d["image_mean"]), tuple(d["image_std"])
    return OPENAI_MEAN, OPENAI_STD


def load(cfg, allow_download: bool = False) -> Backbone:
    """The frozen HF CLIP of ``cfg.model = "hf:DIR"``, its transforms and tokenizer."""
    path = folder_of(cfg.model)
    clip = _build(path, cfg.pretrained).float().eval()
    vc, tc = clip.config.vision_config, clip.config.text_config
    size = vc.image_size if isinstance(vc.image_size, int) else vc.image_size[0]
    mean, std = _mean_std(path)
    from heba.train.backbones.openclip import dassl_transforms
    if cfg.augment == "openclip":
        from open_clip import image_transform
        train_tf = image_transform(size, is_train=True, mean=mean, std=std)
        eval_tf = image_transform(size, is_train=False, mean=mean, std=std)
    else:
        train_tf, eval_tf = dassl_transforms(size, mean, std)
    tokenizer = make_tokenizer(path, tc.max_position_embeddings)
    return Backbone(HFCLIP(clip), train_tf, eval_tf, tokenizer)


def attach(model: HFCLIP, cfg, backend: str = "auto"):
    """Wire the adapters ``cfg`` describes on ``model.clip`` (:mod:`heba.hf`); returns ``model``."""
    from heba import hf
    from heba.adapters import ScalePolicy
    if cfg.method not in ("heba", "adaptertune"):
        raise UsageError(f"--method {cfg.method} is a timm classification baseline; an hf: "
                         f"CLIP takes heba or adaptertune")
    try:
        if cfg.method == "heba":
            policy = ScalePolicy.from_config(cfg)
            hf.attach_heba(model.clip, towers_=cfg.towers, start=cfg.start, end=cfg.end,
                           reduction=cfg.reduction, policy=policy, backend=backend)
        else:
            hf.attach_adaptertune(model.clip, towers_=cfg.towers, rank=cfg.rank,
                                  every=cfg.every, alpha=cfg.alpha, backend=backend)
    except (ValueError, TypeError) as err:
        raise UsageError(f"--method {cfg.method} on {cfg.model}: {err}") from None
    return model
