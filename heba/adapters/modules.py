"""The modules an adapted model holds: the wrappers put in its blocks, and the containers
that register the adapters under the published checkpoints' names.

* :class:`Wrapper`: a module standing in for another; attributes it lacks are the wrapped
  module's, so library code that reads ``block.attn`` or ``c_fc.weight.dtype`` through
  the wrapper keeps working.
* :class:`AdaptedOutput`: ``adapter(orig(...))``; the adapter held by reference only.
* :class:`HeBAAdapters` / :class:`HeBALayer`: ``visual_adapter.<i>.att_conv`` /
  ``mlp_conv`` (``text_adapter`` alike), ``<i>`` the 1-based block, slot 0 empty.
* :class:`LowRankAdapters` / :class:`LowRankHolder`: ``blocks.<i>.adapter`` (image
  tower) and ``text_blocks.<i>.adapter``, ``<i>`` the 0-based block it follows.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from heba.adapters.policy import ScalePolicy
from heba.nn import HeBAAdapter, LowRankAdapter

__all__ = ["Wrapper", "AdaptedOutput", "HeBALayer", "HeBAAdapters", "LowRankHolder",
           "LowRankAdapters"]


class Wrapper(nn.Module):
    """A module that stands in for another, registered as ``self.<wrapped>``.

    Attribute reads the wrapper cannot answer go to the wrapped module (open_clip reads
    ``block.mlp.c_fc.weight.dtype`` and ``resblocks[0].get_weight_dtype()``; timm reads
    ``blocks[i].attn``). Subclasses name the attribute with the class attribute
    ``wrapped`` (default ``"orig"``) and assign it in ``__init__``.

    >>> class Twice(Wrapper):
    ...     wrapped = "inner"
    ...     def __init__(self, inner):
    ...         super().__init__()
    ...         self.inner = inner
    ...     def forward(self, x):
    ...         return 2 * self.inner(x)
    >>> Twice(nn.Linear(3, 4)).out_features
    4
    """

    wrapped = "orig"

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self.wrapped:
                raise
            return getattr(super().__getattr__(self.wrapped), name)


class AdaptedOutput(Wrapper):
    """``adapter(orig(*args, **kwargs))``: a module's output passed through an adapter.

    ``orig`` is registered (it is the model's own module); the adapter is held
    by reference only, since it is registered in ``model.heba_adapters``.
    HeBA adapters get their scale from ``policy`` for their ``site`` (tower, 0-based
    block, 0 attention / 1 MLP); low-rank adapters need none. An output that is a tuple
    (a block returning ``(hidden_states, ...)``, as older transformers' do) has its first
    element adapted and the rest passed through.
    """

    def __init__(self, orig: nn.Module, adapter: nn.Module, policy: Optional[ScalePolicy],
                 site: tuple = (None, None, 0)):
        super().__init__()
        self.orig = orig
        self._adapter = (adapter,)  # a tuple hides it from nn.Module's registration
        self._policy = policy
        self.site = site

    @property
    def adapter(self) -> nn.Module:
        return self._adapter[0]

    def forward(self, *args, **kwargs):
        y = self.orig(*args, **kwargs)
        if isinstance(y, tuple):
            return (self.adapt(y[0]),) + tuple(y[1:])
        return self.adapt(y)

    def adapt(self, y):
        """The adapter (with its scale from the policy) on ``y``, an output of ``orig``
        computed elsewhere (a fused kernel that ran ``orig`` with its neighbours)."""
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
