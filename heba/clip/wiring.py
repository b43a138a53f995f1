"""Attach HeBA / AdapterTune adapters to an open_clip CLIP model, and take them off again.

Where the adapters go (docs/semantics.md, "Where HeBA sits in a CLIP transformer block"),
in every residual block from layer ``start`` to ``end`` (1-based) of a tower::

    x = x + attn(A_attn(ln_1(x)))                 # A_attn: width D
    x = x + mlp.c_proj(mlp.gelu(A_mlp(mlp.c_fc(ln_2(x)))))   # A_mlp: width 4D

The wiring goes by the block's attribute names (``ln_1``, ``mlp.c_fc``), never
by its class: ``ln_1`` and ``mlp.c_fc`` are replaced by :class:`AdaptedOutput`
wrappers that call the original module and then the adapter, so the block's
own ``forward`` is untouched and any block with these names (open_clip's
default and custom blocks, batch-first or not) is adapted the same way.
AdapterTune's low-rank residuals go after every ``every``-th block
(``x = adapter(block(x))``), through the same kind of wrapper around the block.

The adapters themselves live in one module, ``model.heba_adapters``
(:class:`HeBAAdapters` or :class:`LowRankAdapters`), whose ``state_dict`` keys
are those of the published checkpoints (``visual_adapter.<i>.att_conv.down.weight``,
``blocks.<i>.adapter.up.bias``); the wrappers only hold a reference to theirs,
so every parameter is registered once. Everything else is frozen.
:func:`remove_adapters` puts the original modules and ``requires_grad`` flags
back: the model is then the one that went in, bit for bit.

The wiring itself is :mod:`heba.adapters` (shared with timm and Hugging Face);
this module only names open_clip's sites (:data:`SITES`). The scale of the HeBA
residual is a model-level policy (:class:`ScalePolicy`, ``model.heba_policy``): base scale while training (times ``scale_factor`` with
probability ``1 - slow_fast_ratio``, one draw per block and tower forward shared
by the block's two adapters, drawn on the device: the "slow-fast" scale), base
or novel scale at evaluation.

Example::

    >>> import open_clip, torch
    >>> from heba.clip import attach_heba, remove_adapters, count_parameters
    >>> model = open_clip.CLIP(embed_dim=32,
    ...     vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
    ...     text_cfg=dict(context_length=16, vocab_size=100, width=64, heads=2, layers=2))
    >>> attach_heba(model)                       # doctest: +ELLIPSIS
    HeBAAdapters(...)
    >>> count_parameters(model)[0] < count_parameters(model)[1]
    True
    >>> remove_adapters(model)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from heba import adapters as core
from heba.adapters import (  # noqa: F401  (the names this module has always offered)
    AdaptedOutput, HeBAAdapters, HeBALayer, LowRankAdapters, LowRankHolder, ScalePolicy,
    adapter_state_dict, count_parameters, get_adapters, remove_adapters,
)
from heba.nn import HeBAAdapter  # noqa: F401  (tests patch HeBAAdapter.forward through here)

__all__ = [
    "ScalePolicy", "AdaptedOutput", "HeBALayer", "HeBAAdapters", "LowRankHolder",
    "LowRankAdapters", "attach_heba", "attach_adaptertune", "remove_adapters",
    "count_parameters", "adapter_state_dict", "towers", "encode_text", "get_adapters", "SITES",
]


def towers(model: nn.Module) -> dict:
    """``{"visual": transformer, "text": transformer}`` of an open_clip CLIP / CustomTextCLIP."""
    out = {}
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(getattr(visual, "transformer", None), "resblocks"):
        out["visual"] = visual.transformer
    if hasattr(getattr(model, "transformer", None), "resblocks"):
        out["text"] = model.transformer                      # open_clip.CLIP
    elif hasattr(getattr(getattr(model, "text", None), "transformer", None), "resblocks"):
        out["text"] = model.text.transformer                 # open_clip.CustomTextCLIP
    if not out:
        raise TypeError(f"{type(model).__name__} has no open_clip transformer towers "
                        f"(visual.transformer.resblocks / transformer.resblocks)")
    return out


def _tokens(model: nn.Module, tower: str, tr: nn.Module) -> dict:
    bf = getattr(tr, "batch_first", True)
    if tower == "text":
        return dict(modality="text", batch_first=bf)
    grid = getattr(model.visual, "grid_size", None)
    grid = None if grid is None else (int(grid[0]), int(grid[1]))
    return dict(modality="visual", num_prefix_tokens=1, grid=grid, batch_first=bf)


def _width(tr: nn.Module, block: nn.Module) -> int:
    return block.mlp.c_fc.in_features if hasattr(block, "mlp") else tr.width


SITES = core.Sites(
    library="open_clip", towers=towers, blocks=lambda tr: tr.resblocks,
    attn_input="ln_1", mlp_hidden="mlp.c_fc", required=("attn", "ln_2", "mlp"),
    tokens=_tokens, width=_width)


def attach_heba(model: nn.Module, towers_: str = "both", start: int = 1,
                end: Optional[int] = None, reduction: int = 4,
                policy: Optional[ScalePolicy] = None, init: str = "kaiming",
                rescale_param_grad: bool = True, backend: str = "auto") -> HeBAAdapters:
    """HeBA in blocks ``start..end`` (1-based) of an open_clip ``CLIP`` / ``CustomTextCLIP``'s
    chosen towers (:func:`heba.adapters.attach_heba`, which documents the arguments)."""
    return core.attach_heba(model, SITES, towers_=towers_, start=start, end=end,
                            reduction=reduction, policy=policy, init=init,
                            rescale_param_grad=rescale_param_grad, backend=backend)


def attach_adaptertune(model: nn.Module, towers_: str = "visual", rank: int = 16,
                       every: int = 1, alpha: float = 1.0, init: str = "zero",
                       backend: str = "auto") -> LowRankAdapters:
    """AdapterTune after blocks ``i % every == 0`` of an open_clip model's chosen towers
    (:func:`heba.adapters.attach_adaptertune`)."""
    return core.attach_adaptertune(model, SITES, towers_=towers_, rank=rank, every=every,
                                   alpha=alpha, init=init, backend=backend)


def encode_text(model: nn.Module, text: torch.Tensor, normalize: bool = False,
                length: Optional[int] = None) -> torch.Tensor:
    """``model.encode_text(text)``, running the text tower only up to the last end-of-text token.

    Text features are pooled at the end-of-text token (the largest token id of
    each row, open_clip's ``argmax`` pooling), attention is causal and the text
    adapters act per token, so no token after the batch's last end-of-text
    position can change the result: the context is sliced to ``max eot + 1``
    tokens (and the causal mask and positional embedding with it). With
    77-token prompts whose longest is 20 tokens this is ~4x less text-tower work.
    Models this does not hold for (no causal mask, other pooling, a CLS
    token) go through ``model.encode_text`` unchanged.

    ``length``: run this many tokens instead of reading ``max eot + 1`` from the
    data (that read is a host sync on a GPU); it must exceed every row's
    end-of-text position (not checked, which would sync).
    """
    if not _truncatable(model):
        return model.encode_text(text, normalize=normalize)
    n = int(text.argmax(dim=-1).max().item()) + 1 if length is None else length
    text = text[:, :n]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype)                 # [B, n, D]
    x = x + model.positional_embedding[:n].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return nn.functional.normalize(x, dim=-1) if normalize else x


def _truncatable(model) -> bool:
    return (getattr(model, "text_pool_type", None) == "argmax"
            and isinstance(getattr(model, "attn_mask", None), torch.Tensor)
            and hasattr(model, "token_embedding") and hasattr(model, "transformer"))
