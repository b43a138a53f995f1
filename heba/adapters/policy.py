"""The HeBA scale policy: base, novel and slow-fast scales, drawn on the device.

The slow-fast stream is a counter-based integer hash of (seed, tower, block,
forward counter): the same bits on the host, the CPU and any GPU, graph-capturable,
and resumable from ``(seed, counters)``. See :class:`ScalePolicy`.
"""

from __future__ import annotations

import math
import random
from typing import Optional

import torch

__all__ = ["ScalePolicy", "slow_fast_key", "slow_fast_bits", "TOWERS"]

_M32 = 0xFFFFFFFF
_TOWER_IDS = {"visual": 0, "text": 1}
TOWERS = tuple(_TOWER_IDS)      # the two towers an adapted model may have, in wiring order


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


def _one_launch(device: torch.device) -> bool:
    """Whether a tower's draws run as one Triton launch on ``device`` (heba's Triton backend
    runs there: a CUDA GPU, or the CPU in Triton's interpreter)."""
    from heba.backends import backend_status
    return backend_status("triton", device)[0]


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
      position) when they attach (:func:`heba.adapters.attach_heba`).
    * CUDA graphs: a captured step replays the hash kernels, which read the counter from
      memory, and the in-place increment, so every replay draws new scales, exactly those
      of the same step run eagerly. (A ``torch.Generator`` would need registering with
      every graph, ``CUDAGraph.register_generator_state``, and its Philox stream differs
      between the CPU and the GPU; the counter needs neither and is reproducible anywhere.)
    * Resume: the stream's whole state is ``(seed, counters)``: :meth:`state_dict` /
      :meth:`load_state_dict`.
    * Activation checkpointing: the scales of a forward are a tensor of their own, so
      the trainer's checkpointed blocks record the scale objects handed out in
      forward and hand the same ones out in the recomputation.

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
        if (isinstance(slow_fast_ratio, bool) or not isinstance(slow_fast_ratio, (int, float))
                or not 0.0 <= slow_fast_ratio <= 1.0):
            raise ValueError(f"slow_fast_ratio must be a probability in [0, 1], "
                             f"got {slow_fast_ratio!r}")
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

    @classmethod
    def from_config(cls, cfg, draws: str = "device") -> "ScalePolicy":
        """The policy a run's configuration describes: any object with the attributes
        ``base_scale``, ``novel_scale``, ``scale_factor``, ``slow_fast_ratio``, ``seed`` and
        ``slow_fast_draw`` (``"block"``: one draw per block, published; anything else, e.g.
        ``"call"``: one per adapter). A missing attribute takes the constructor's default.

        >>> from types import SimpleNamespace
        >>> ScalePolicy.from_config(SimpleNamespace(seed=3, slow_fast_ratio=1.0)).random
        False
        """
        draw = getattr(cfg, "slow_fast_draw", "block")
        kwargs = {name: getattr(cfg, name) for name in
                  ("base_scale", "novel_scale", "scale_factor", "slow_fast_ratio", "seed")
                  if hasattr(cfg, name)}
        return cls(**kwargs, draws=draws, per_block=draw == "block")

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

        Called at the tower's first adapter call. Device-side, no host sync, graph-capturable
        (the counter is read and advanced in device memory): one Triton launch
        (:mod:`heba_kernels.slow_fast`) where heba's Triton backend runs, else 20 element-wise
        kernels over ``[n_blocks, 2]``; the same draws either way.
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
        if _one_launch(device):               # the same draws in one launch, not 20
            from heba_kernels.slow_fast import draw_scales
            self._current[tower] = draw_scales(self._keys[tower], self._counters, t,
                                               self._values(device)[2], self._threshold())
            return
        bits = slow_fast_bits(self._keys[tower], self._counters[t])
        lo, hi, _ = self._values(device)
        self._current[tower] = torch.where(bits >= self._threshold(), hi, lo)   # [n_blocks, 2]
        self._counters[t].add_(1)

    def _values(self, device):
        """``(base, base * factor, both)``: 0-d float32 tensors on ``device`` and the ``[2]``
        tensor they view, rounded from the Python floats as the float path rounds them; made
        once per device and values (an upload inside a graph capture would copy from freed
        host memory)."""
        key = (device, self.base_scale, self.scale_factor)
        if getattr(self, "_value_cache", (None,))[0] != key:
            vals = torch.tensor([self.base_scale, self.base_scale * self.scale_factor],
                                dtype=torch.float32).to(device)
            self._value_cache = (key, (vals[0], vals[1], vals))
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
