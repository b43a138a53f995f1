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

The scale of the HeBA residual is a model-level policy (:class:`ScalePolicy`,
``model.heba_policy``): base scale while training (times ``scale_factor`` with
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

import math
import random
from typing import Optional

import torch
from torch import nn

from heba.nn import HeBAAdapter, LowRankAdapter

__all__ = [
    "ScalePolicy", "AdaptedOutput", "HeBALayer", "HeBAAdapters", "LowRankHolder",
    "LowRankAdapters", "attach_heba", "attach_adaptertune", "remove_adapters",
    "count_parameters", "adapter_state_dict", "towers", "encode_text", "get_adapters",
]


_M32 = 0xFFFFFFFF
_TOWER_IDS = {"visual": 0, "text": 1}


def _mul32(x, c: int):
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32`` (a Python int or an int64 tensor) with
    every intermediate below 2**49 (int64 overflow is undefined in C++, so the constant is
    split in 16-bit halves rather than relying on wrap-around)."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32(x):
    """A full-avalanche 32-bit integer hash (Chris Wellons' "lowbias32": xor-shift, multiply,
    xor-shift, multiply, xor-shift) of a Python int or an int64 tensor with values in
    ``[0, 2**32)``: integer ops only, so the same bits on the host, the CPU and any GPU."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32            # the constant is < 2**31: no int64 overflow
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def slow_fast_key(seed: int, tower: str, block: int, pos: int = 0) -> int:
    """The key of the slow-fast stream of one (seed, tower, block, position), computed once on
    the host (position 0: the block's draw; 1: its MLP adapter's own, with ``per_block=False``)."""
    k = _mix32((seed & _M32) ^ 0x9E3779B9)
    k = _mix32(k ^ ((seed >> 32) & _M32))
    return _mix32(k ^ ((pos << 24) | (_TOWER_IDS[tower] << 16) | block))


def slow_fast_bits(key, counter):
    """24 uniform random bits, draw number ``counter`` of the stream ``key`` (Python ints, or
    int64 tensors: the tensor form runs on the device, 17 element-wise kernels)."""
    return _mix32(key ^ (counter & _M32)) >> 8


class ScalePolicy:
    """The scale every HeBA adapter of a model uses, read by the adapters at each call.

    Slow-fast, as the published HeBA trainer does it (VLM-HeBA ``trainers/heba.py``,
    ``AdapterLearner.return_{text,visual}_adapter``, called once per block by
    ``clip/model.py`` ``ModifiedResidualAttentionBlock.forward``): one draw per block and
    tower forward, shared by that block's two adapters (``att_conv`` and ``mlp_conv``);
    the block's scale is ``base_scale * scale_factor`` with probability
    ``1 - slow_fast_ratio`` (published: ``torch.rand(1) > SLOW_FAST_RATIO``), else
    ``base_scale``. The published draws come from torch's global CPU generator; ours come
    from a counter-based stream of our own (torch's RNG is untouched):

    * Each tower keeps a forward counter (an int64 tensor on the model's device). At each
      training forward of a tower (its first adapted block's attention adapter asks
      first: blocks run in order) the scales of all its blocks are computed on the device
      from ``(seed, tower, block, counter)`` with an integer hash, and the counter is
      advanced in place. No host sync, nothing drawn on the host. The wirings
      (open_clip, timm, Hugging Face) tell the policy each adapter's (tower, block,
      position) when they register (:func:`_register`).
    * CUDA graphs: a captured step replays the hash kernels, which read the counter from
      memory, and the in-place increment, so every replay draws new scales, exactly those
      of the same step run eagerly. (A ``torch.Generator`` would need registering with
      every graph, ``CUDAGraph.register_generator_state``, and its Philox stream differs
      between the CPU and the GPU; the counter needs neither and is reproducible anywhere.)
    * Resume: the stream's whole state is ``(seed, counters)``: :meth:`state_dict` /
      :meth:`load_state_dict`.
    * Activation checkpointing: the scales of a forward are a tensor of their own, so
      :class:`heba.clip.fast.CheckpointedBlock` records the scale objects handed out in
      forward and hands the same ones out in the recomputation.

    Each block's scale reaches its adapters as a 0-d float32 tensor on the device
    (``heba.ops`` reads it from memory; the results equal those of the same Python
    float, bitwise). ``draws="host"`` computes the same stream on the host and hands out
    Python floats (same draws, for comparisons; not for CUDA graphs). Evaluation and
    ``slow_fast_ratio=1.0`` hand out Python floats: they are constants.

    Args:
        base_scale: training scale, and evaluation scale on base classes (0.025).
        novel_scale: evaluation scale on novel classes (0.010).
        scale_factor: slow-fast multiplier (2.25).
        slow_fast_ratio: probability of keeping the base scale per block and forward
            while training (0.8). 1.0 switches slow-fast off.
        seed: seed of the stream (an int; None draws one from the OS).
        draws: ``"device"`` (default) or ``"host"``.
        per_block: one draw per block shared by its two adapters (True, published);
            False draws for each adapter (attention, MLP) separately.

    ``mode`` ("base" or "novel") picks the evaluation scale.

    Example::

        >>> pol = ScalePolicy(seed=0, slow_fast_ratio=0.5)
        >>> pol.bind("text", 4)                    # the wiring does this
        >>> for _ in range(2):                     # two forwards of the text tower
        ...     s = [round(float(pol.scale(True, "text", i)), 5) for i in range(4)]
        >>> s                                      # the second forward's four blocks
        [0.05625, 0.025, 0.025, 0.025]
        >>> pol.state_dict()
        {'seed': 0, 'counters': [0, 2]}
    """

    def __init__(self, base_scale: float = 0.025, novel_scale: float = 0.010,
                 scale_factor: float = 2.25, slow_fast_ratio: float = 0.8,
                 seed: Optional[int] = None, draws: str = "device", per_block: bool = True):
        if not 0.0 <= slow_fast_ratio <= 1.0:
            raise ValueError(f"slow_fast_ratio must be in [0, 1], got {slow_fast_ratio}")
        if draws not in ("device", "host"):
            raise ValueError(f"draws must be 'device' or 'host', got {draws!r}")
        self.base_scale, self.novel_scale = float(base_scale), float(novel_scale)
        self.scale_factor, self.slow_fast_ratio = float(scale_factor), float(slow_fast_ratio)
        self.mode, self.draws, self.per_block = "base", draws, bool(per_block)
        self.seed = int(random.SystemRandom().getrandbits(63) if seed is None else seed)
        self._n_blocks: dict = {}         # tower -> blocks drawn per forward
        self._first: dict = {}            # tower -> (block, pos) of its first adapter call
        self._keys: dict = {}             # tower -> [n_blocks, 2] int64 keys (lists if "host")
        self._counters = torch.zeros(2, dtype=torch.long)   # forwards so far, per tower
        self._host_counters = [0, 0]
        self._current: dict = {}          # tower -> this forward's scales (tensor or floats)

    # -- the stream ----------------------------------------------------------------------------
    def bind(self, tower: str, n_blocks: int, first: tuple = (0, 0)) -> None:
        """Draw scales for blocks 0..n-1 (0-based) at each forward of ``tower``; ``first``:
        the (block, position) of the tower's first adapter call, which starts a forward."""
        if tower not in _TOWER_IDS:
            raise ValueError(f"tower must be 'visual' or 'text', got {tower!r}")
        self._n_blocks[tower] = int(n_blocks)
        self._first[tower] = tuple(first)
        keys = [[slow_fast_key(self.seed, tower, b, pos) for pos in (0, 1)]
                for b in range(n_blocks)]
        self._keys[tower] = keys if self.draws == "host" else torch.tensor(keys)
        self._current.pop(tower, None)

    @property
    def random(self) -> bool:
        """Whether training scales are random (slow-fast on)."""
        return self.slow_fast_ratio < 1.0

    def _threshold(self) -> int:
        # fast iff bits / 2**24 >= slow_fast_ratio, as an exact integer comparison
        return math.ceil(self.slow_fast_ratio * (1 << 24))

    def begin(self, tower: str, device: torch.device, training: bool) -> None:
        """Draw the scales of one forward of ``tower`` (all its blocks) and advance its counter.

        Called at the tower's first adapter call. Device-side: 20 element-wise kernels over
        ``[n_blocks, 2]``, no host sync; graph-capturable (the counter is read and advanced
        in device memory).
        """
        if not (training and self.random):
            self._current.pop(tower, None)
            return
        t = _TOWER_IDS[tower]
        if self.draws == "host":
            c = self._host_counters[t]
            hi, lo = self.base_scale * self.scale_factor, self.base_scale
            self._current[tower] = [[hi if slow_fast_bits(k, c) >= self._threshold() else lo
                                     for k in row] for row in self._keys[tower]]
            self._host_counters[t] = c + 1
            return
        if self._counters.device != device:   # the model moved: follow it (never in a capture)
            self._counters = self._counters.to(device)
        device = self._counters.device        # "cuda" -> "cuda:0", the cache keys' form
        if self._keys[tower].device != device:
            self._keys[tower] = self._keys[tower].to(device)
        bits = slow_fast_bits(self._keys[tower], self._counters[t])
        lo, hi = self._values(device)
        self._current[tower] = torch.where(bits >= self._threshold(), hi, lo)   # [n_blocks, 2]
        self._counters[t].add_(1)

    def _values(self, device):
        """``(base, base * factor)`` as 0-d float32 tensors on ``device``, rounded from the
        Python floats as the float path rounds them; made once per device and values (an
        upload inside a graph capture would copy from freed host memory)."""
        key = (device, self.base_scale, self.scale_factor)
        if getattr(self, "_value_cache", (None,))[0] != key:
            vals = torch.tensor([self.base_scale, self.base_scale * self.scale_factor],
                                dtype=torch.float32).to(device)
            self._value_cache = (key, (vals[0], vals[1]))
        return self._value_cache[1]

    def scale(self, training: bool, tower: Optional[str] = None, block: Optional[int] = None,
              pos: int = 0, device: Optional[torch.device] = None):
        """The scale for the adapter at ``pos`` (0: attention, 1: MLP) of ``block`` (0-based)
        of ``tower``, on ``device``: a Python float, or a 0-d float32 tensor on the device
        (the block's slow-fast draw of this forward; with ``per_block=False`` the
        adapter's own). The tower's first adapted site starts a new forward's draw."""
        if not training:
            return self.novel_scale if self.mode == "novel" else self.base_scale
        if not self.random:
            return self.base_scale
        if tower not in self._keys or block is None:
            raise ValueError(f"a random (slow-fast) training scale needs the adapter's tower "
                             f"and block, bound by the wiring (got tower={tower!r}, "
                             f"block={block!r}; bound: {sorted(self._keys)})")
        if (block, pos) == self._first.get(tower) or tower not in self._current:
            self.begin(tower, self._counters.device if device is None else device, True)
        return self._current[tower][block][pos if not self.per_block else 0]

    # -- evaluation mode, state ------------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        if mode not in ("base", "novel"):
            raise ValueError(f"mode must be 'base' or 'novel', got {mode!r}")
        self.mode = mode

    def state_dict(self) -> dict:
        """``{"seed", "counters"}``: the stream's whole state (reading the device counters is
        one host sync: call it when saving, not per step)."""
        counters = (list(self._host_counters) if self.draws == "host"
                    else [int(c) for c in self._counters.tolist()])
        return {"seed": self.seed, "counters": counters}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream saved by :meth:`state_dict` (counters written in place)."""
        counters = [int(c) for c in state["counters"]]
        if len(counters) != 2:
            raise ValueError(f"counters must be [visual, text], got {state['counters']!r}")
        if int(state["seed"]) != self.seed:
            self.seed = int(state["seed"])
            for tower, n in list(self._n_blocks.items()):
                self.bind(tower, n, self._first[tower])
        self._host_counters = list(counters)
        self._counters.copy_(torch.tensor(counters))
        self._current.clear()

    def __repr__(self):
        return (f"ScalePolicy(base_scale={self.base_scale}, novel_scale={self.novel_scale}, "
                f"scale_factor={self.scale_factor}, slow_fast_ratio={self.slow_fast_ratio}, "
                f"mode={self.mode!r}, draws={self.draws!r}, per_block={self.per_block})")


def _bind_sites(adapters: nn.Module, policy: ScalePolicy, replaced: list) -> None:
    """Tell ``policy`` each HeBA wrapper's (tower, 0-based block, position) from the
    container's published layout (``<tower>_adapter[i]`` = block ``i``, 1-based) and bind
    the towers, whatever the backbone (open_clip, timm, Hugging Face)."""
    sites = {}
    for tower in ("visual", "text"):
        slots = getattr(adapters, f"{tower}_adapter", None)
        if slots is None or not len(slots):
            continue
        adapted = [j - 1 for j, layer in enumerate(slots) if layer is not None]
        if not adapted:
            continue
        policy.bind(tower, len(slots) - 1, first=(adapted[0], 0))
        for b in adapted:
            sites[id(slots[b + 1].att_conv)] = (tower, b, 0)
            sites[id(slots[b + 1].mlp_conv)] = (tower, b, 1)
    for parent, name, _ in replaced:
        wrapper = getattr(parent, name)
        if isinstance(wrapper, AdaptedOutput) and id(wrapper.adapter) in sites:
            wrapper.site = sites[id(wrapper.adapter)]


class AdaptedOutput(nn.Module):
    """``adapter(orig(*args, **kwargs))``: a module's output passed through an adapter.

    ``orig`` is registered (it is the model's own module); the adapter is held
    by reference only, since it is registered in ``model.heba_adapters``.
    HeBA adapters get their scale from ``policy``; low-rank adapters need none.
    """

    def __init__(self, orig: nn.Module, adapter: nn.Module, policy: Optional[ScalePolicy]):
        super().__init__()
        self.orig = orig
        self._adapter = (adapter,)  # a tuple hides it from nn.Module's registration
        self._policy = policy
        self.site = (None, None, 0)   # (tower, 0-based block, 0 attention / 1 MLP): _register

    @property
    def adapter(self) -> nn.Module:
        return self._adapter[0]

    def __getattr__(self, name):
        # Everything else is the wrapped module's: open_clip reads e.g.
        # ``block.mlp.c_fc.weight.dtype`` (get_cast_dtype) and ``resblocks[0].get_weight_dtype()``.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "orig":
                raise
            return getattr(self.orig, name)

    def forward(self, *args, **kwargs):
        y = self.orig(*args, **kwargs)
        if isinstance(self.adapter, HeBAAdapter):
            return self.adapter(y, scale=self._policy.scale(self.training, *self.site,
                                                            device=y.device))
        return self.adapter(y)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter.__class__.__name__}({self.adapter.extra_repr()})"


class HeBALayer(nn.Module):
    """The two adapters of one block, named as in the published HeBA checkpoints."""

    def __init__(self, att_conv: HeBAAdapter, mlp_conv: HeBAAdapter):
        super().__init__()
        self.att_conv, self.mlp_conv = att_conv, mlp_conv


class HeBAAdapters(nn.Module):
    """All HeBA adapters of a model: ``visual_adapter[i]`` / ``text_adapter[i]`` for layer ``i``
    (1-based), each with ``att_conv`` and ``mlp_conv``.

    As in the published code, each container is a ModuleList of ``layers + 1``
    slots whose slot 0 and unadapted layers are empty (None), so the state-dict
    keys are the published ones (``visual_adapter.1.att_conv.down.weight`` for
    block 1) and ``[i]`` is block ``i``'s adapters.
    """

    method = "heba"

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        self.visual_adapter = nn.ModuleList()
        self.text_adapter = nn.ModuleList()


class LowRankHolder(nn.Module):
    def __init__(self, adapter: LowRankAdapter):
        super().__init__()
        self.adapter = adapter


class LowRankAdapters(nn.Module):
    """All AdapterTune adapters: ``blocks.<i>.adapter`` after visual block ``i`` (0-based,
    the published code's naming), ``text_blocks.<i>.adapter`` after text block ``i``."""

    method = "adaptertune"

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        self.blocks = nn.ModuleDict()
        self.text_blocks = nn.ModuleDict()


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


def _visual_grid(model: nn.Module):
    grid = getattr(model.visual, "grid_size", None)
    return None if grid is None else (int(grid[0]), int(grid[1]))


def _layer_range(n_layers: int, start: int, end: Optional[int]) -> range:
    end = n_layers if end is None else end
    if not (1 <= start <= end <= n_layers):
        raise ValueError(f"need 1 <= start <= end <= {n_layers} (1-based layers), "
                         f"got start={start}, end={end}")
    return range(start - 1, end)


def _check_block(block: nn.Module, idx: int, tower: str):
    for name in ("ln_1", "attn", "ln_2", "mlp"):
        if not hasattr(block, name):
            raise TypeError(f"{tower} block {idx} ({type(block).__name__}) has no attribute "
                            f"{name!r}: heba wires adapters by open_clip's block attribute names")
    if not isinstance(getattr(block.mlp, "c_fc", None), nn.Linear):
        raise TypeError(f"{tower} block {idx}: mlp.c_fc must be an nn.Linear")


def _freeze(model: nn.Module) -> dict:
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    return flags


def _register(model: nn.Module, adapters: nn.Module, policy, flags: dict, replaced: list):
    # New modules start in training mode; follow the model's mode instead.
    adapters.train(model.training)
    for parent, name, _ in replaced:
        getattr(parent, name).train(model.training)
    model.heba_adapters = adapters
    model.heba_policy = policy
    if policy is not None and isinstance(adapters, HeBAAdapters):
        _bind_sites(adapters, policy, replaced)
    # Not a module: what remove_adapters needs to undo everything.
    model.__dict__["_heba_undo"] = dict(flags=flags, replaced=replaced)


def get_adapters(model: nn.Module) -> nn.Module:
    adapters = getattr(model, "heba_adapters", None)
    if adapters is None:
        raise ValueError("this model has no heba adapters attached (attach_heba / "
                         "attach_adaptertune)")
    return adapters


def attach_heba(model: nn.Module, towers_: str = "both", start: int = 1,
                end: Optional[int] = None, reduction: int = 4,
                policy: Optional[ScalePolicy] = None, init: str = "kaiming",
                rescale_param_grad: bool = True, backend: str = "auto") -> HeBAAdapters:
    """Put HeBA adapters in blocks ``start..end`` (1-based) of the chosen towers; freeze the rest.

    Args:
        model: an open_clip ``CLIP`` (or ``CustomTextCLIP``) with ViT towers.
        towers_: ``"both"``, ``"visual"`` or ``"text"``.
        start, end: first and last adapted layer, 1-based, inclusive (default all).
        reduction: bottleneck ratio of every adapter (4: ``D -> D/4`` at the
            attention, ``4D -> D`` at the MLP).
        policy: the :class:`ScalePolicy` the adapters read; a default one if None.
        init, rescale_param_grad, backend: passed to every :class:`heba.nn.HeBAAdapter`.

    Returns the adapters' container, also at ``model.heba_adapters``.
    """
    if getattr(model, "heba_adapters", None) is not None:
        raise ValueError("adapters are already attached; remove_adapters(model) first")
    which = _which(towers_)
    policy = policy or ScalePolicy()
    tws = towers(model)
    config = dict(method="heba", towers=towers_, start=start, end=end, reduction=reduction,
                  init=init, rescale_param_grad=rescale_param_grad)
    for tower in which:
        if tower not in tws:
            raise TypeError(f"the model has no {tower} transformer tower")
        for i in _layer_range(len(tws[tower].resblocks), start, end):
            _check_block(tws[tower].resblocks[i], i, tower)
    adapters = HeBAAdapters(config)
    flags = _freeze(model)
    replaced = []
    for tower in which:
        tr = tws[tower]
        bf = getattr(tr, "batch_first", True)
        layers = _layer_range(len(tr.resblocks), start, end)
        device, dtype = _param_like(tr)
        for i in layers:
            block = tr.resblocks[i]
            dim = block.mlp.c_fc.in_features
            hidden = block.mlp.c_fc.out_features
            if tower == "visual":
                kw = dict(modality="visual", num_prefix_tokens=1, grid=_visual_grid(model))
            else:
                kw = dict(modality="text")
            common = dict(reduction=reduction, batch_first=bf, init=init,
                          rescale_param_grad=rescale_param_grad, backend=backend)
            att = HeBAAdapter(dim, **kw, **common).to(device=device, dtype=dtype)
            mlp = HeBAAdapter(hidden, **kw, **common).to(device=device, dtype=dtype)
            slots = getattr(adapters, f"{tower}_adapter")
            if not len(slots):
                slots.extend([None] * (len(tr.resblocks) + 1))    # slot 0 stays empty
            slots[i + 1] = HeBALayer(att, mlp)
            replaced.append((block, "ln_1", block.ln_1))
            block.ln_1 = AdaptedOutput(block.ln_1, att, policy)
            replaced.append((block.mlp, "c_fc", block.mlp.c_fc))
            block.mlp.c_fc = AdaptedOutput(block.mlp.c_fc, mlp, policy)
    _register(model, adapters, policy, flags, replaced)
    return adapters


def attach_adaptertune(model: nn.Module, towers_: str = "visual", rank: int = 16,
                       every: int = 1, alpha: float = 1.0, init: str = "zero",
                       backend: str = "auto") -> LowRankAdapters:
    """Put an AdapterTune :class:`heba.nn.LowRankAdapter` after every ``every``-th block.

    Blocks ``0, every, 2 * every, ...`` (0-based, ``i % every == 0``, as the published
    AdapterTune code) of the chosen towers get ``x = adapter(block(x))``; ``every=1``
    adapts every block. The published
    AdapterTune code adapts the image tower only (``towers_="visual"``, the default).
    """
    if getattr(model, "heba_adapters", None) is not None:
        raise ValueError("adapters are already attached; remove_adapters(model) first")
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    which = _which(towers_)
    tws = towers(model)
    config = dict(method="adaptertune", towers=towers_, rank=rank, every=every, alpha=alpha,
                  init=init)
    for tower in which:
        if tower not in tws:
            raise TypeError(f"the model has no {tower} transformer tower")
    adapters = LowRankAdapters(config)
    flags = _freeze(model)
    replaced = []
    for tower in which:
        tr = tws[tower]
        device, dtype = _param_like(tr)
        holder = adapters.blocks if tower == "visual" else adapters.text_blocks
        for i in range(0, len(tr.resblocks), every):
            block = tr.resblocks[i]
            dim = block.mlp.c_fc.in_features if hasattr(block, "mlp") else tr.width
            lr = LowRankAdapter(dim, rank, alpha=alpha, init=init, backend=backend)
            holder[str(i)] = LowRankHolder(lr.to(device=device, dtype=dtype))
            replaced.append((tr.resblocks, str(i), block))
            tr.resblocks[i] = AdaptedOutput(block, lr, None)
    _register(model, adapters, None, flags, replaced)
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


def adapter_state_dict(model: nn.Module) -> dict:
    """The adapters' weights only, under the published checkpoints' key names."""
    return {k: v.detach() for k, v in get_adapters(model).state_dict().items()}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    params = list(model.parameters())
    return (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


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


def _which(towers_: str):
    if towers_ not in ("both", "visual", "text"):
        raise ValueError(f"towers must be 'both', 'visual' or 'text', got {towers_!r}")
    return ("visual", "text") if towers_ == "both" else (towers_,)


def _param_like(module: nn.Module):
    p = next(module.parameters())
    return p.device, p.dtype
