"""Attach HeBA / AdapterTune adapters to a Hugging Face ``transformers`` CLIP, and take them off.

The same adapters, parameter names, scale policy and checkpoints as every
backbone (:mod:`heba.adapters`, which does the wiring; this module only names
the sites, :data:`SITES`), so adapters trained on open_clip load here when the
shapes agree. A transformers ``CLIPEncoderLayer`` computes::

    x = x + self_attn(layer_norm1(x))
    x = x + mlp.fc2(mlp.activation_fn(mlp.fc1(layer_norm2(x))))

and HeBA goes where it goes in open_clip's block (docs/semantics.md), in layers
``start..end`` (1-based) of the chosen towers::

    x = x + self_attn(A_att(layer_norm1(x)))                          # A_att: width D
    x = x + mlp.fc2(mlp.activation_fn(A_mlp(mlp.fc1(layer_norm2(x)))))   # A_mlp: width 4D

``layer_norm1`` and ``mlp.fc1`` are wrapped (:class:`heba.adapters.AdaptedOutput`);
the layers' own ``forward`` is untouched. Visual tokens: the class token
(``embeddings.class_embedding``, first) passes through, the rest is the
``image_size // patch_size`` square grid, row-major. Text tokens: per token, so
the causal attention and the end-of-text pooling are unaffected.
AdapterTune puts ``x = adapter(layer(x))`` after the layers ``i`` (0-based)
with ``i % every == 0`` (the published rule), image tower by default.

The container ``model.heba_adapters`` (``visual_adapter.<i>.att_conv.*`` for layer ``i``,
1-based as published,
``blocks.<i>.adapter.*``, ...) and ``model.heba_policy`` are those of
:mod:`heba.adapters`; :func:`heba.clip.checkpoints.save_adapters` /
``load_adapters`` / ``load_published_checkpoint`` work on an HF-wired model as
they do on an open_clip one. Wrapped layers change the model's own state-dict
keys (``...layer_norm1.orig.weight``): call :func:`remove_adapters` before
``save_pretrained``. With ``output_hidden_states=True`` transformers records each
layer's output before an AdapterTune adapter (its hooks sit on the layer).

transformers is imported only by :func:`load_model`; a missing one gives one
line naming the extra to install.

Example::

    >>> import torch, transformers
    >>> from heba.hf import attach_heba, remove_adapters
    >>> cfg = transformers.CLIPConfig(
    ...     text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
    ...                      num_attention_heads=2, vocab_size=100, max_position_embeddings=16),
    ...     vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
    ...                        num_attention_heads=2, image_size=32, patch_size=8),
    ...     projection_dim=32)
    >>> model = transformers.CLIPModel(cfg).eval()
    >>> attach_heba(model)                          # doctest: +ELLIPSIS
    HeBAAdapters(...)
    >>> remove_adapters(model)
"""

from __future__ import annotations

import os
from typing import Optional

from torch import nn

from heba import adapters as core
from heba.adapters import (  # noqa: F401  (offered here as always)
    HeBAAdapters, LowRankAdapters, ScalePolicy, get_adapters, remove_adapters,
)

__all__ = ["attach_heba", "attach_adaptertune", "remove_adapters", "towers", "load_model",
           "require_transformers", "ScalePolicy", "get_adapters", "SITES"]

INSTALL_HINT = ("heba.hf needs transformers, which is not installed: "
                "pip install 'heba[hf]'")


def require_transformers():
    """Import transformers, or raise ImportError with one line naming the extra to install."""
    try:
        import transformers
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return transformers


def load_model(path: str, **kwargs) -> nn.Module:
    """``transformers.CLIPModel`` from a local model folder, never from the network."""
    transformers = require_transformers()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path} does not exist (a local folder with "
                                f"config.json and the weights is needed)")
    return transformers.CLIPModel.from_pretrained(path, local_files_only=True, **kwargs)


def _tower_kind(module: nn.Module) -> Optional[str]:
    emb = getattr(module, "embeddings", None)
    layers = getattr(getattr(module, "encoder", None), "layers", None)
    if emb is None or not isinstance(layers, nn.ModuleList):
        return None
    if hasattr(emb, "patch_embedding"):
        return "visual"
    if hasattr(emb, "token_embedding"):
        return "text"
    return None


def towers(model: nn.Module) -> dict:
    """``{"visual": vision transformer, "text": text transformer}`` of an HF CLIP model.

    Works for ``CLIPModel`` (``vision_model`` / ``text_model``) and for the
    single-tower ``CLIPVisionModel`` / ``CLIPTextModel`` (and their
    ``...WithProjection`` variants); each tower holds ``embeddings`` and
    ``encoder.layers``.
    """
    out = {}
    for cand in (getattr(model, "vision_model", None), getattr(model, "text_model", None),
                 model):
        kind = _tower_kind(cand) if isinstance(cand, nn.Module) else None
        if kind and kind not in out:
            out[kind] = cand
    if not out:
        raise TypeError(f"{type(model).__name__} has no Hugging Face CLIP towers "
                        f"(vision_model / text_model with embeddings and encoder.layers)")
    return out


def _tokens(model: nn.Module, tower: str, tr: nn.Module) -> dict:
    if tower == "text":
        return dict(modality="text", batch_first=True)
    emb = tr.embeddings
    size, patch = emb.image_size, emb.patch_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    grid = (int(size[0]) // int(patch[0]), int(size[1]) // int(patch[1]))
    prefix = 1 if getattr(emb, "class_embedding", None) is not None else 0
    return dict(modality="visual", num_prefix_tokens=prefix, grid=grid, batch_first=True)


def _width(tr: nn.Module, layer: nn.Module) -> int:
    return tr.config.hidden_size if hasattr(tr, "config") else layer.embed_dim


SITES = core.Sites(
    library="CLIPEncoderLayer", towers=towers, blocks=lambda tr: tr.encoder.layers,
    attn_input="layer_norm1", mlp_hidden="mlp.fc1", required=("self_attn", "layer_norm2", "mlp"),
    tokens=_tokens, width=_width)


def attach_heba(model: nn.Module, towers_: str = "both", start: int = 1,
                end: Optional[int] = None, reduction: int = 4,
                policy: Optional[ScalePolicy] = None, init: str = "kaiming",
                rescale_param_grad: bool = True, backend: str = "auto") -> HeBAAdapters:
    """HeBA in layers ``start..end`` (1-based) of a ``transformers.CLIPModel`` (or a
    single-tower CLIP model)'s chosen towers (:func:`heba.adapters.attach_heba`, which
    documents the arguments). Returns ``model.heba_adapters``, keyed as open_clip's."""
    return core.attach_heba(model, SITES, towers_=towers_, start=start, end=end,
                            reduction=reduction, policy=policy, init=init,
                            rescale_param_grad=rescale_param_grad, backend=backend)


def attach_adaptertune(model: nn.Module, towers_: str = "visual", rank: int = 16,
                       every: int = 1, alpha: float = 1.0, init: str = "zero",
                       backend: str = "auto") -> LowRankAdapters:
    """AdapterTune after encoder layers ``i % every == 0``, image tower by default
    (:func:`heba.adapters.attach_adaptertune`). Older transformers layers return
    ``(hidden_states, ...)``: the hidden states are adapted."""
    return core.attach_adaptertune(model, SITES, towers_=towers_, rank=rank, every=every,
                                   alpha=alpha, init=init, backend=backend)
