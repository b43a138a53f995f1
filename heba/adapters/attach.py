"""Attach HeBA / AdapterTune adapters to any transformer backbone described by its :class:`Sites`.

Every library module (``heba.clip.wiring`` for open_clip, ``heba.timm``, ``heba.hf``)
only says where its blocks keep a few things; the wiring is this one:

* **HeBA**, in blocks ``start..end`` (1-based) of the chosen towers: the output of
  ``attn_input`` (the attention's input, a block's first norm) and of ``mlp_hidden``
  (the MLP's first ``nn.Linear``) go through a :class:`~heba.nn.HeBAAdapter`
  (docs/semantics.md, "Where HeBA sits in a CLIP transformer block")::

      x = x + attn(A_att(norm1(x)))                     # A_att: width D
      x = x + fc2(act(A_mlp(fc1(norm2(x)))))            # A_mlp: width 4D

* **AdapterTune**, after blocks ``i % every == 0`` (0-based, the published rule):
  ``x = adapter(block(x))`` with a :class:`~heba.nn.LowRankAdapter`.

The wrapped modules are replaced by :class:`~heba.adapters.AdaptedOutput` wrappers,
so a block's own ``forward`` is untouched. The adapters live in one container,
``model.heba_adapters``, under the published checkpoints' names; the scale policy is
``model.heba_policy``. Everything else is frozen. :func:`remove_adapters` puts the
original modules and ``requires_grad`` flags back, bit for bit.

A fourth library is one :class:`Sites` and two three-line functions; see
``heba/hf.py`` for the shortest one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from heba.adapters.modules import (AdaptedOutput, HeBAAdapters, HeBALayer, LowRankAdapters,
                                   LowRankHolder)
from heba.adapters.policy import TOWERS, ScalePolicy
from heba.nn import HeBAAdapter, LowRankAdapter

__all__ = ["Sites", "attach_heba", "attach_adaptertune", "remove_adapters", "get_adapters",
           "freeze", "count_parameters", "layer_range", "which_towers", "param_like",
           "check_unattached"]


@dataclass(frozen=True)
class Sites:
    """Where one model library's transformer blocks keep what the adapters wrap.

    Args:
        library: the library's name, for messages (``"open_clip"``).
        towers: ``model -> {"visual": tower, "text": tower}`` (the towers it has), raising
            TypeError naming what it looked for when it finds none.
        blocks: ``tower -> its residual blocks`` (an ``nn.ModuleList`` / ``nn.Sequential``).
        attn_input: dotted path, in a block, of the module whose output is the attention's
            input (``"ln_1"``).
        mlp_hidden: dotted path of the ``nn.Linear`` whose output is the MLP's hidden state
            (``"mlp.c_fc"``); its ``in_features`` / ``out_features`` size the two adapters.
        tokens: ``(model, tower name, tower) -> dict``: how that tower's tokens are laid out,
            as :class:`~heba.nn.HeBAAdapter` keyword arguments (``modality``,
            ``num_prefix_tokens``, ``grid``, ``batch_first``); may raise TypeError for a
            model HeBA cannot wire.
        width: ``(tower, block) -> D``, the residual width of an AdapterTune adapter.
        required: more attribute names every HeBA block must have (``("attn", "ln_2")``).
        check_block: ``(block, label) -> None``, a check of the library's own run before the
            attribute checks (raise TypeError naming ``label``, e.g. ``"visual block 3"``).
        block_wrapper: None (AdapterTune adapters follow their blocks through
            :class:`AdaptedOutput`, held in ``model.heba_adapters``), or
            ``(block, adapter or None) -> module``: every block is wrapped, the adapter
            registered in its wrapper (the published timm layout), and the container kept
            out of the module tree so that no tensor appears twice in the state dict.
        config: more entries of the container's ``config`` (``{"backbone": "timm"}``).
    """

    library: str
    towers: Callable[[nn.Module], dict]
    blocks: Callable[[nn.Module], nn.Module]
    attn_input: str
    mlp_hidden: str
    tokens: Callable[[nn.Module, str, nn.Module], dict]
    width: Callable[[nn.Module, nn.Module], int]
    required: tuple = ()
    check_block: Optional[Callable[[nn.Module, str], None]] = None
    block_wrapper: Optional[Callable[[nn.Module, Optional[nn.Module]], nn.Module]] = None
    config: dict = field(default_factory=dict)


# --- small shared pieces ---------------------------------------------------------------------

def which_towers(towers_: str) -> tuple:
    """``("visual", "text")`` for ``"both"``, else ``(towers_,)``; ValueError otherwise."""
    if towers_ not in ("both", *TOWERS):
        raise ValueError(f"towers must be 'both', 'visual' or 'text', got {towers_!r}")
    return TOWERS if towers_ == "both" else (towers_,)


def layer_range(n_layers: int, start: int, end: Optional[int]) -> range:
    """The 0-based indices of layers ``start..end`` (1-based, inclusive; ``end=None``: the last)."""
    end = n_layers if end is None else end
    if not (1 <= start <= end <= n_layers):
        raise ValueError(f"need 1 <= start <= end <= {n_layers} (1-based layers), "
                         f"got start={start}, end={end}")
    return range(start - 1, end)


def param_like(module: nn.Module) -> tuple:
    """``(device, dtype)`` of ``module``'s first parameter: where its adapters go."""
    p = next(module.parameters())
    return p.device, p.dtype


def freeze(model: nn.Module) -> dict:
    """Turn off ``requires_grad`` everywhere; returns the flags as they were, by name."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    return flags


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    params = list(model.parameters())
    return (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def get_adapters(model: nn.Module) -> nn.Module:
    """``model.heba_adapters``, or ValueError saying none are attached."""
    adapters = getattr(model, "heba_adapters", None)
    if adapters is None:
        raise ValueError("this model has no heba adapters attached (attach_heba / "
                         "attach_adaptertune)")
    return adapters


def check_unattached(model: nn.Module) -> None:
    """ValueError if adapters are already attached to ``model``."""
    if model.__dict__.get("_heba_undo") is not None or \
            getattr(model, "heba_adapters", None) is not None:
        raise ValueError("adapters are already attached; remove_adapters(model) first")


def _selected(model: nn.Module, sites: Sites, towers_: str) -> dict:
    which = which_towers(towers_)
    tws = sites.towers(model)
    for tower in which:
        if tower not in tws:
            raise TypeError(f"the model has no {tower} tower")
    return {t: tws[t] for t in which}


def _resolve(block: nn.Module, path: str) -> tuple:
    """``(parent, name)`` of the dotted ``path`` in ``block`` (``"mlp.c_fc"``: block.mlp, "c_fc")."""
    *parents, name = path.split(".")
    parent = block
    for p in parents:
        parent = getattr(parent, p)
    return parent, name


def _check_block(sites: Sites, block: nn.Module, label: str) -> None:
    if sites.check_block is not None:
        sites.check_block(block, label)
    for path in (*sites.required, sites.attn_input, sites.mlp_hidden):
        obj = block
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            raise TypeError(f"{label} ({type(block).__name__}) has no attribute {path!r}: heba "
                            f"wires adapters by {sites.library}'s block attribute names")
    if not isinstance(getattr(*_resolve(block, sites.mlp_hidden)), nn.Linear):
        raise TypeError(f"{label}: {sites.mlp_hidden} must be an nn.Linear")


def _register(model: nn.Module, adapters: nn.Module, policy, flags: dict, replaced: list,
              in_tree: bool = True) -> None:
    # New modules start in training mode; follow the model's mode instead.
    adapters.train(model.training)
    for parent, name, _ in replaced:
        getattr(parent, name).train(model.training)
    if in_tree:
        model.heba_adapters = adapters
    else:
        model.__dict__["heba_adapters"] = adapters
    model.heba_policy = policy
    # Not a module: what remove_adapters needs to undo everything.
    model.__dict__["_heba_undo"] = dict(flags=flags, replaced=replaced)


def _wrap(replaced: list, parent: nn.Module, name: str, make) -> None:
    orig = getattr(parent, name)
    replaced.append((parent, name, orig))
    setattr(parent, name, make(orig))    # ModuleList / Sequential setattr by str index works


# --- HeBA ------------------------------------------------------------------------------------

def attach_heba(model: nn.Module, sites: Sites, towers_: str = "both", start: int = 1,
                end: Optional[int] = None, reduction: int = 4,
                policy: Optional[ScalePolicy] = None, init: str = "kaiming",
                rescale_param_grad: bool = True, backend: str = "auto") -> HeBAAdapters:
    """Put HeBA adapters in blocks ``start..end`` (1-based) of the chosen towers; freeze the rest.

    Args:
        model: a model of the library ``sites`` describes.
        sites: where its blocks keep the attention input and the MLP hidden state.
        towers_: ``"both"``, ``"visual"`` or ``"text"``.
        start, end: first and last adapted layer, 1-based, inclusive (default all).
        reduction: bottleneck ratio of every adapter (4: ``D -> D/4`` at the
            attention, ``4D -> D`` at the MLP).
        policy: the :class:`ScalePolicy` the adapters read; a default one if None.
        init, rescale_param_grad, backend: passed to every :class:`heba.nn.HeBAAdapter`.

    Returns the adapters' container, also at ``model.heba_adapters``. Nothing is
    changed when a check fails.
    """
    check_unattached(model)
    tws = _selected(model, sites, towers_)
    for tower, tr in tws.items():
        for i in layer_range(len(sites.blocks(tr)), start, end):
            _check_block(sites, sites.blocks(tr)[i], f"{tower} block {i}")
    layouts = {tower: sites.tokens(model, tower, tr) for tower, tr in tws.items()}
    policy = policy or ScalePolicy()
    config = dict(method="heba", **sites.config, towers=towers_, start=start, end=end,
                  reduction=reduction, init=init, rescale_param_grad=rescale_param_grad)
    adapters = HeBAAdapters(config)
    for tower, tr in tws.items():
        blocks = sites.blocks(tr)
        device, dtype = param_like(blocks)
        slots = getattr(adapters, f"{tower}_adapter")
        slots.extend([None] * (len(blocks) + 1))                # 1-based: slot 0 stays empty
        for i in layer_range(len(blocks), start, end):
            fc = getattr(*_resolve(blocks[i], sites.mlp_hidden))
            kw = dict(layouts[tower], reduction=reduction, init=init,
                      rescale_param_grad=rescale_param_grad, backend=backend)
            att = HeBAAdapter(fc.in_features, **kw).to(device=device, dtype=dtype)
            mlp = HeBAAdapter(fc.out_features, **kw).to(device=device, dtype=dtype)
            slots[i + 1] = HeBALayer(att, mlp)
    flags = freeze(model)
    replaced = []
    for tower, tr in tws.items():
        _wrap_heba(sites, tower, sites.blocks(tr), getattr(adapters, f"{tower}_adapter"),
                   policy, replaced)
    _register(model, adapters, policy, flags, replaced)
    return adapters


def _wrap_heba(sites: Sites, tower: str, blocks, slots, policy: ScalePolicy,
               replaced: list) -> None:
    """Wrap each adapted block's two sites and bind the tower's blocks to ``policy``."""
    adapted = [j - 1 for j, layer in enumerate(slots) if layer is not None]
    policy.bind(tower, len(blocks), first=(adapted[0], 0))
    for b in adapted:
        layer = slots[b + 1]
        for pos, path, adapter in ((0, sites.attn_input, layer.att_conv),
                                   (1, sites.mlp_hidden, layer.mlp_conv)):
            _wrap(replaced, *_resolve(blocks[b], path),
                  lambda orig, a=adapter, s=(tower, b, pos): AdaptedOutput(orig, a, policy, s))


# --- AdapterTune -----------------------------------------------------------------------------

def attach_adaptertune(model: nn.Module, sites: Sites, towers_: str = "visual", rank: int = 16,
                       every: int = 1, alpha: float = 1.0, init: str = "zero",
                       backend: str = "auto") -> LowRankAdapters:
    """Put an AdapterTune :class:`heba.nn.LowRankAdapter` after every ``every``-th block.

    Blocks ``0, every, 2 * every, ...`` (0-based, ``i % every == 0``, as the published
    AdapterTune code) of the chosen towers get ``x = adapter(block(x))``; ``every=1``
    adapts every block. The published AdapterTune code adapts the image tower only
    (``towers_="visual"``, the default). The adapters are built in block order, each
    right after the previous one, as the published code builds them, so under the same
    seed they start from the same numbers. Nothing is changed when a check fails.
    """
    check_unattached(model)
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    tws = _selected(model, sites, towers_)
    config = dict(method="adaptertune", **sites.config, towers=towers_, rank=rank,
                  every=every, alpha=alpha, init=init)
    adapters = LowRankAdapters(config)
    built = []
    for tower, tr in tws.items():
        blocks = sites.blocks(tr)
        device, dtype = param_like(blocks)
        holder = adapters.blocks if tower == "visual" else adapters.text_blocks
        for i in range(0, len(blocks), every):
            lr = LowRankAdapter(sites.width(tr, blocks[i]), rank, alpha=alpha, init=init,
                                backend=backend)
            holder[str(i)] = LowRankHolder(lr.to(device=device, dtype=dtype))
            built.append((blocks, i, lr))
    flags = freeze(model)
    replaced = []
    if sites.block_wrapper is None:
        for blocks, i, lr in built:
            _wrap(replaced, blocks, str(i), lambda orig, a=lr: AdaptedOutput(orig, a, None))
    else:
        for blocks in dict.fromkeys(b for b, _, _ in built):
            mine = {i: lr for b, i, lr in built if b is blocks}
            for i in range(len(blocks)):
                _wrap(replaced, blocks, str(i),
                      lambda orig, a=mine.get(i): sites.block_wrapper(orig, a))
    _register(model, adapters, None, flags, replaced, in_tree=sites.block_wrapper is None)
    return adapters


def remove_adapters(model: nn.Module) -> None:
    """Undo :func:`attach_heba` / :func:`attach_adaptertune`: original modules, keys and flags."""
    undo = model.__dict__.pop("_heba_undo", None)
    if undo is None:
        raise ValueError("this model has no heba adapters attached")
    for parent, name, orig in reversed(undo["replaced"]):
        setattr(parent, name, orig)      # ModuleList / Sequential setattr by str index works
    del model.heba_adapters
    del model.heba_policy
    for name, p in model.named_parameters():
        p.requires_grad_(undo["flags"][name])
