"""Attach AdapterTune / HeBA adapters to a timm Vision Transformer, and take them off again.

**AdapterTune** (salimkhazem/adaptertune, ``src/models/vit_adapter.py``): every block
of ``model.blocks`` is wrapped in an :class:`AdapterBlock` (``.block``: the timm
block, ``.adapter``: a :class:`heba.nn.LowRankAdapter` of width ``model.embed_dim``
or None), and block ``i`` (0-based) gets an adapter when ``i % every == 0``::

    x = block(x)
    x = x + alpha * up(gelu(down(x)))         # LowRankAdapter: x -> adapter(x)

The adapted model's ``state_dict`` is then exactly the published one
(``blocks.<i>.block.*``, ``blocks.<i>.adapter.{down,up}.{weight,bias}``, ``head.*``,
the rest of the backbone unchanged), so the published ``best.pt`` / ``last.pt``
``"model"`` entry loads into it, and :func:`load_published_checkpoint` does so
after checking the backbone. ``model.heba_adapters`` is the
:class:`heba.adapters.LowRankAdapters` container of the same adapter modules
(keys ``blocks.<i>.adapter.*``), kept out of the model's module tree so that no
tensor appears twice in its state dict.

**HeBA** at a timm :class:`~timm.models.vision_transformer.Block`'s attention
input and MLP hidden state, in blocks ``start..end`` (1-based)::

    x = x + ls1(attn(A_att(norm1(x))))                     # A_att: width D
    x = x + ls2(mlp.fc2(mlp.norm(mlp.act(A_mlp(mlp.fc1(norm2(x)))))))   # A_mlp: width 4D

with the class and register tokens (``model.num_prefix_tokens``) passed through
and the patch grid ``model.patch_embed.grid_size`` (non-square grids work). The
adapters, their container (``model.heba_adapters``: ``visual_adapter.<i>.att_conv``
/ ``mlp_conv`` for block ``i``, 1-based, the published layout) and the scale policy (:class:`heba.adapters.ScalePolicy`,
``model.heba_policy``) are those of every backbone (:mod:`heba.adapters`); this
module only names timm's sites (:data:`SITES`) and its quirks.

Both freeze the backbone and leave the classifier (``model.get_classifier()``)
trainable unless ``train_head=False``: a timm classification run trains a new
head with the adapters. :func:`remove_adapters` gives the original model back,
bit for bit. timm itself is imported only by :func:`attach_heba` (to recognise
its block classes); a missing timm gives one line naming the extra to install.

Example::

    >>> import timm, torch
    >>> from heba.timm import attach_adaptertune, remove_adapters
    >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
    ...                           patch_size=8, depth=2, num_classes=10)
    >>> attach_adaptertune(model, rank=4)          # doctest: +ELLIPSIS
    LowRankAdapters(...)
    >>> sorted(k for k in model.state_dict() if ".adapter." in k)[:2]
    ['blocks.0.adapter.down.bias', 'blocks.0.adapter.down.weight']
    >>> remove_adapters(model)
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Union

import torch
from torch import nn

from heba import adapters as core
from heba.adapters import (  # noqa: F401  (get_adapters: offered here as always)
    CheckpointError, HeBAAdapters, LowRankAdapters, ScalePolicy, Wrapper, check_frozen_state,
    check_unattached, get_adapters, load_adapter_state, published_model_state,
    read_checkpoint, remove_adapters,
)
from heba.nn import LowRankAdapter

__all__ = ["AdapterBlock", "attach_adaptertune", "attach_heba", "remove_adapters",
           "load_published_checkpoint", "ScalePolicy", "get_adapters", "require_timm",
           "published_model_state", "read_checkpoint", "SITES"]

INSTALL_HINT = "heba.timm needs timm, which is not installed: pip install 'heba[timm]'"

_ADAPTER_KEY = re.compile(r"^blocks\.(\d+)\.adapter\.(down|up)\.(weight|bias)$")
_WRAPPED_KEY = re.compile(r"^blocks\.(\d+)\.block\.(.+)$")


def require_timm():
    """Import timm, or raise ImportError with one line naming the extra to install."""
    try:
        import timm
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return timm


class AdapterBlock(Wrapper):
    """``x = block(x); x = adapter(x)`` (published ``AdapterBlock``: ``.block``, ``.adapter``).

    ``adapter`` is a :class:`heba.nn.LowRankAdapter` (``x + alpha * up(gelu(down(x)))``)
    or None (the block alone). Extra arguments (timm's ``attn_mask``) go to the block;
    other attributes are the block's (timm reads ``blocks[i].attn``).
    """

    wrapped = "block"

    def __init__(self, block: nn.Module, adapter: Optional[LowRankAdapter]):
        super().__init__()
        self.block = block
        self.adapter = adapter

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x = self.block(x, *args, **kwargs)
        return x if self.adapter is None else self.adapter(x)


# --- timm's sites ----------------------------------------------------------------------------

def towers(model: nn.Module) -> dict:
    """``{"visual": model}``: a timm ViT is one image tower, its blocks ``model.blocks``."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise TypeError(f"{type(model).__name__} has no timm transformer blocks "
                        f"(model.blocks, an nn.Sequential)")
    return {"visual": model}


def _check_block(block: nn.Module, label: str) -> None:
    require_timm()
    from timm.layers import Mlp
    from timm.models.vision_transformer import Block
    if not isinstance(block, Block) or type(block).forward is not Block.forward:
        raise TypeError(f"{label} is a {type(block).__name__}: HeBA wires only timm's "
                        f"pre-norm vision_transformer.Block (norm1 -> attn, norm2 -> mlp)")
    if not isinstance(block.mlp, Mlp):
        raise TypeError(f"{label}: mlp is a {type(block.mlp).__name__}; HeBA needs "
                        f"timm.layers.Mlp (fc1 -> act -> fc2)")


def _tokens(model: nn.Module, tower: str, tr: nn.Module) -> dict:
    if getattr(model, "dynamic_img_size", False):
        raise TypeError("dynamic_img_size=True models are not supported: HeBA's 3x3 stencil "
                        "needs the fixed patch grid")
    if not isinstance(getattr(model, "patch_drop", nn.Identity()), nn.Identity):
        raise TypeError("patch_drop_rate > 0 drops grid tokens: HeBA needs the full patch grid")
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None or len(grid) != 2:
        raise TypeError(f"{type(model).__name__} has no patch_embed.grid_size (H, W)")
    return dict(modality="visual", batch_first=True, grid=(int(grid[0]), int(grid[1])),
                num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)))


def _width(model: nn.Module, block: nn.Module) -> int:
    dim = getattr(model, "embed_dim", None)
    if not isinstance(dim, int):
        raise TypeError(f"{type(model).__name__} has no int embed_dim (the adapters' width)")
    return dim


SITES = core.Sites(
    library="timm", towers=towers, blocks=lambda model: model.blocks,
    attn_input="norm1", mlp_hidden="mlp.fc1", check_block=_check_block, tokens=_tokens,
    width=_width, block_wrapper=AdapterBlock, config=dict(backbone="timm"))


def _head(model: nn.Module, train_head: bool) -> Optional[nn.Module]:
    if not train_head:
        return None
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        raise TypeError(f"{type(model).__name__} has no classifier (get_classifier()); "
                        f"pass train_head=False")
    return head


def _unfreeze(head: Optional[nn.Module]) -> None:
    for p in head.parameters() if head is not None else ():
        p.requires_grad_(True)


def attach_adaptertune(model: nn.Module, rank: int = 16, every: int = 1, alpha: float = 1.0,
                       init: str = "zero", backend: str = "auto",
                       train_head: bool = True) -> LowRankAdapters:
    """Wrap every block of a timm ViT as the published AdapterTune code does; freeze the rest.

    Args:
        model: a timm model with ``model.blocks`` (nn.Sequential) and ``model.embed_dim``.
        rank: adapter rank r (published default 16).
        every: blocks ``i`` (0-based) with ``i % every == 0`` get an adapter (1: all).
        alpha: residual scale (1.0). init: ``"zero"`` (identity at start) or ``"small"``.
        backend: passed to every :class:`heba.nn.LowRankAdapter`.
        train_head: leave ``model.get_classifier()`` trainable (the published recipe).

    Returns ``model.heba_adapters`` (:func:`heba.adapters.attach_adaptertune`).
    """
    check_unattached(model)
    head = _head(model, train_head)
    adapters = core.attach_adaptertune(model, SITES, towers_="visual", rank=rank, every=every,
                                       alpha=alpha, init=init, backend=backend)
    _unfreeze(head)
    return adapters


def attach_heba(model: nn.Module, start: int = 1, end: Optional[int] = None,
                reduction: int = 4, policy: Optional[ScalePolicy] = None,
                init: str = "kaiming", rescale_param_grad: bool = True,
                backend: str = "auto", train_head: bool = True) -> HeBAAdapters:
    """Put HeBA visual adapters after ``norm1`` and ``mlp.fc1`` of timm blocks ``start..end``.

    Args:
        model: a timm ``VisionTransformer`` (pre-norm ``Block`` s with ``Mlp``).
        start, end: first and last adapted block, 1-based, inclusive (default all).
        reduction: bottleneck ratio (4: ``D -> D/4`` at the attention, ``4D -> D`` at the MLP).
        policy: the :class:`ScalePolicy` the adapters read; a default one if None.
        init, rescale_param_grad, backend: passed to every :class:`heba.nn.HeBAAdapter`.
        train_head: leave ``model.get_classifier()`` trainable.

    The first ``model.num_prefix_tokens`` tokens (class, registers) bypass the
    adapters; the rest are the ``patch_embed.grid_size`` grid, row-major.
    Returns ``model.heba_adapters``.
    """
    check_unattached(model)
    head = _head(model, train_head)
    adapters = core.attach_heba(model, SITES, towers_="visual", start=start, end=end,
                                reduction=reduction, policy=policy, init=init,
                                rescale_param_grad=rescale_param_grad, backend=backend)
    _unfreeze(head)
    return adapters


# --- the published AdapterTune checkpoint -------------------------------------------------

def _head_prefix(model: nn.Module) -> str:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    for n, m in model.named_modules():
        if m is head and n:
            return n + "."
    return "head."


def _split(state: Mapping, head: str):
    """(adapters, head, backbone) of a timm state dict, backbone keys in the plain model's names."""
    adapters, heads, backbone = {}, {}, {}
    for k, v in state.items():
        if _ADAPTER_KEY.match(k):
            adapters[k] = v
        elif k.startswith(head):
            heads[k[len(head):]] = v
        else:
            m = _WRAPPED_KEY.match(k)
            backbone[f"blocks.{m.group(1)}.{m.group(2)}" if m else k] = v
    return adapters, heads, backbone


def _every_of(indices: list, n_blocks: int, name: str) -> int:
    every = indices[1] - indices[0] if len(indices) > 1 else n_blocks
    if not indices or indices != list(range(0, n_blocks, every)):
        raise CheckpointError(f"{name}: adapters after blocks {indices} are not the published "
                              f"placement (blocks i % every == 0 of {n_blocks})")
    return every


def load_published_checkpoint(model: nn.Module, source: Union[str, os.PathLike, Mapping],
                              alpha: float = 1.0, check: str = "values",
                              backend: str = "auto") -> dict:
    """Load a published AdapterTune ``best.pt`` / ``last.pt`` (path or loaded dict) into ``model``.

    The file is ``{"model": the adapted timm state_dict, "optimizer": ..., "epoch": ...}``.
    The adapters (``blocks.<i>.adapter.*``) and the head (``model.get_classifier()``)
    are loaded; every other tensor (the frozen backbone) is checked against the
    model's own: same names and shapes, and with ``check="values"`` (default)
    the same values, so a checkpoint of another backbone or other pretrained
    weights never loads silently. A plain model is first wired with
    :func:`attach_adaptertune`, rank and ``every`` read from the file (``alpha``,
    which the file does not hold, as given); a model already wired must match
    it. A checkpoint without adapters (the published head-only baseline) loads
    its head only.

    Returns the checkpoint dict (``optimizer``, ``epoch`` for a resume).

    Example::

        model = timm.create_model("vit_small_patch16_224", pretrained=True, num_classes=10)
        ckpt = load_published_checkpoint(model, "results/cifar10_vit_small_adapter_tune_s0/best.pt")
    """
    if check not in ("values", "shapes"):
        raise ValueError(f"check must be 'values' or 'shapes', got {check!r}")
    _check_timm_like(model)
    name, obj = read_checkpoint(source)
    state = published_model_state(obj, name)
    head = _head_prefix(model)
    adapters, heads, backbone = _split(state, head)
    attached = getattr(model, "heba_adapters", None)
    if attached is not None and attached.method != "adaptertune":
        raise CheckpointError(f"{name} holds AdapterTune adapters; the model is wired with "
                              f"{attached.method}: remove_adapters(model) first")
    own_adapters, own_head, own_backbone = _split(model.state_dict(), head)
    check_frozen_state(own_backbone, backbone, name, check)
    bad = sorted(k for k in set(heads) | set(own_head)
                 if k not in heads or k not in own_head or heads[k].shape != own_head[k].shape)
    if bad:
        got = {k: tuple(v.shape) for k, v in heads.items()}
        want = {k: tuple(v.shape) for k, v in own_head.items()}
        raise CheckpointError(f"{name}: head {got} does not fit the model's head {want} (create "
                              f"the model with the checkpoint's num_classes)")
    if adapters and attached is None:
        idx = sorted({int(_ADAPTER_KEY.match(k).group(1)) for k in adapters})
        rank = int(adapters[f"blocks.{idx[0]}.adapter.down.weight"].shape[0])
        attach_adaptertune(model, rank=rank, every=_every_of(idx, len(model.blocks), name),
                           alpha=alpha, backend=backend)
        try:
            load_adapter_state(model, dict(adapters), name)
        except CheckpointError:
            remove_adapters(model)              # refused: the model is left as it came
            raise
    elif attached is not None:
        load_adapter_state(model, dict(adapters), name)
    with torch.no_grad():
        model.get_classifier().load_state_dict(heads, strict=True)
    return dict(obj)


def _check_timm_like(model: nn.Module):
    if not isinstance(getattr(model, "blocks", None), nn.Sequential) or \
            not hasattr(model, "get_classifier"):
        raise TypeError(f"{type(model).__name__} is not a timm ViT (model.blocks, "
                        f"get_classifier())")
