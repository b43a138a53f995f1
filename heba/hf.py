"""Attach HeBA / AdapterTune adapters to a Hugging Face ``transformers`` CLIP, and take them off.

The same adapters, parameter names, scale policy and checkpoints as the
open_clip wiring (:mod:`heba.clip.wiring`), so adapters trained on one load on
the other when the shapes agree. A transformers ``CLIPEncoderLayer`` computes::

    x = x + self_attn(layer_norm1(x))
    x = x + mlp.fc2(mlp.activation_fn(mlp.fc1(layer_norm2(x))))

and HeBA goes where it goes in open_clip's block (docs/semantics.md), in layers
``start..end`` (1-based) of the chosen towers::

    x = x + self_attn(A_att(layer_norm1(x)))                          # A_att: width D
    x = x + mlp.fc2(mlp.activation_fn(A_mlp(mlp.fc1(layer_norm2(x)))))   # A_mlp: width 4D

``layer_norm1`` and ``mlp.fc1`` are wrapped (:class:`heba.clip.wiring.AdaptedOutput`);
the layers' own ``forward`` is untouched. Visual tokens: the class token
(``embeddings.class_embedding``, first) passes through, the rest is the
``image_size // patch_size`` square grid, row-major. Text tokens: per token, so
the causal attention and the end-of-text pooling are unaffected.
AdapterTune puts ``x = adapter(layer(x))`` after the layers ``i`` (0-based)
with ``i % every == 0`` (the published rule), image tower by default.

The container ``model.heba_adapters`` (``visual_adapter.<i>.att_conv.*`` for layer ``i``,
1-based as published,
``blocks.<i>.adapter.*``, ...) and ``model.heba_policy`` are those of
:mod:`heba.clip.wiring`; :func:`heba.clip.checkpoints.save_adapters` /
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

from heba.clip.wiring import (
    AdaptedOutput, HeBAAdapters, HeBALayer, LowRankAdapters, LowRankHolder, ScalePolicy,
    _freeze, _layer_range, _param_like, _register, _which, get_adapters,
)
from heba.clip.wiring import remove_adapters as _remove_adapters
from heba.nn import HeBAAdapter, LowRankAdapter

__all__ = ["attach_heba", "attach_adaptertune", "remove_adapters", "towers", "load_model",
           "require_transformers", "ScalePolicy", "get_adapters"]

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


def _check_layer(layer: nn.Module, idx: int, tower: str):
    for name in ("layer_norm1", "self_attn", "layer_norm2", "mlp"):
        if not hasattr(layer, name):
            raise TypeError(f"{tower} layer {idx} ({type(layer).__name__}) has no attribute "
                            f"{name!r}: heba wires adapters by CLIPEncoderLayer's names")
    if not isinstance(getattr(layer.mlp, "fc1", None), nn.Linear):
        raise TypeError(f"{tower} layer {idx}: mlp.fc1 must be an nn.Linear")


def _visual_kw(tower: nn.Module) -> dict:
    emb = tower.embeddings
    size, patch = emb.image_size, emb.patch_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    grid = (int(size[0]) // int(patch[0]), int(size[1]) // int(patch[1]))
    prefix = 1 if getattr(emb, "class_embedding", None) is not None else 0
    return dict(modality="visual", num_prefix_tokens=prefix, grid=grid)


def _selected(model: nn.Module, towers_: str) -> dict:
    tws = towers(model)
    for tower in _which(towers_):
        if tower not in tws:
            raise TypeError(f"the model has no {tower} tower")
    return {t: tws[t] for t in _which(towers_)}


def attach_heba(model: nn.Module, towers_: str = "both", start: int = 1,
                end: Optional[int] = None, reduction: int = 4,
                policy: Optional[ScalePolicy] = None, init: str = "kaiming",
                rescale_param_grad: bool = True, backend: str = "auto") -> HeBAAdapters:
    """Put HeBA adapters in layers ``start..end`` (1-based) of the chosen towers; freeze the rest.

    Args:
        model: a ``transformers.CLIPModel`` (or a single-tower CLIP model).
        towers_: ``"both"``, ``"visual"`` or ``"text"``.
        start, end: first and last adapted layer, 1-based, inclusive (default all).
        reduction: bottleneck ratio (4: ``D -> D/4`` at the attention, ``4D -> D`` at the MLP).
        policy: the :class:`ScalePolicy` the adapters read; a default one if None.
        init, rescale_param_grad, backend: passed to every :class:`heba.nn.HeBAAdapter`.

    Returns ``model.heba_adapters``, keyed as the open_clip wiring's.
    """
    if getattr(model, "heba_adapters", None) is not None:
        raise ValueError("adapters are already attached; remove_adapters(model) first")
    tws = _selected(model, towers_)
    for tower, tr in tws.items():
        for i in _layer_range(len(tr.encoder.layers), start, end):
            _check_layer(tr.encoder.layers[i], i, tower)
    policy = policy or ScalePolicy()
    config = dict(method="heba", towers=towers_, start=start, end=end, reduction=reduction,
                  init=init, rescale_param_grad=rescale_param_grad)
    common = dict(reduction=reduction, batch_first=True, init=init,
                  rescale_param_grad=rescale_param_grad, backend=backend)
    adapters = HeBAAdapters(config)
    built = []
    for tower, tr in tws.items():
        kw = _visual_kw(tr) if tower == "visual" else dict(modality="text")
        device, dtype = _param_like(tr)
        for i in _layer_range(len(tr.encoder.layers), start, end):
            fc1 = tr.encoder.layers[i].mlp.fc1
            att = HeBAAdapter(fc1.in_features, **kw, **common).to(device=device, dtype=dtype)
            mlp = HeBAAdapter(fc1.out_features, **kw, **common).to(device=device, dtype=dtype)
            slots = getattr(adapters, f"{tower}_adapter")
            if not len(slots):
                slots.extend([None] * (len(tr.encoder.layers) + 1))    # slot 0 stays empty
            slots[i + 1] = HeBALayer(att, mlp)
            built.append((tr.encoder.layers[i], att, mlp))
    flags = _freeze(model)
    replaced = []
    for layer, att, mlp in built:
        replaced.append((layer, "layer_norm1", layer.layer_norm1))
        layer.layer_norm1 = AdaptedOutput(layer.layer_norm1, att, policy)
        replaced.append((layer.mlp, "fc1", layer.mlp.fc1))
        layer.mlp.fc1 = AdaptedOutput(layer.mlp.fc1, mlp, policy)
    _register(model, adapters, policy, flags, replaced)
    return adapters


class _AdaptedLayer(AdaptedOutput):
    """``adapter(layer(...))`` for an encoder layer that returns a tensor or a tuple
    (older transformers return ``(hidden_states, ...)``): the hidden states are adapted."""

    def forward(self, *args, **kwargs):
        y = self.orig(*args, **kwargs)
        if isinstance(y, tuple):
            return (self.adapter(y[0]),) + tuple(y[1:])
        return self.adapter(y)


def attach_adaptertune(model: nn.Module, towers_: str = "visual", rank: int = 16,
                       every: int = 1, alpha: float = 1.0, init: str = "zero",
                       backend: str = "auto") -> LowRankAdapters:
    """Put an AdapterTune :class:`heba.nn.LowRankAdapter` after encoder layers ``i % every == 0``.

    ``x = adapter(layer(x))`` with ``adapter(x) = x + alpha * up(gelu(down(x)))``;
    the image tower only by default (the published AdapterTune adapts images).
    Adapters are ``blocks.<i>.adapter`` (image) / ``text_blocks.<i>.adapter`` (text)
    in ``model.heba_adapters``. Returns it.
    """
    if getattr(model, "heba_adapters", None) is not None:
        raise ValueError("adapters are already attached; remove_adapters(model) first")
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    tws = _selected(model, towers_)
    config = dict(method="adaptertune", towers=towers_, rank=rank, every=every, alpha=alpha,
                  init=init)
    adapters = LowRankAdapters(config)
    built = []
    for tower, tr in tws.items():
        device, dtype = _param_like(tr)
        holder = adapters.blocks if tower == "visual" else adapters.text_blocks
        layers = tr.encoder.layers
        for i in range(0, len(layers), every):
            dim = tr.config.hidden_size if hasattr(tr, "config") else layers[i].embed_dim
            lr = LowRankAdapter(dim, rank, alpha=alpha, init=init, backend=backend)
            holder[str(i)] = LowRankHolder(lr.to(device=device, dtype=dtype))
            built.append((layers, i, lr))
    flags = _freeze(model)
    replaced = []
    for layers, i, lr in built:
        replaced.append((layers, str(i), layers[i]))
        layers[i] = _AdaptedLayer(layers[i], lr, None)
    _register(model, adapters, None, flags, replaced)
    return adapters


def remove_adapters(model: nn.Module) -> None:
    """Undo :func:`attach_heba` / :func:`attach_adaptertune`: original modules, keys and flags."""
    _remove_adapters(model)
