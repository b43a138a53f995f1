"""The training step's speed and memory: a frozen backbone cast once, CUDA graphs, checkpointing.

What makes a plain adapter step slow, and what this module does about it:

* **Per-step weight casts.** Under ``torch.autocast`` every matmul of an fp32
  backbone casts its weight to bf16 again at every step (~150M parameters for
  ViT-B/16). The backbone is frozen (no optimizer, no master copy needed), so
  :func:`prepare_frozen` casts it once; autocast's casts then become no-ops.
  The adapters stay fp32 master weights (the optimizer updates them in fp32);
  their low-precision compute comes from autocast (heba's fused backends cast
  the adapter weights per call). LayerNorm parameters and ``logit_scale`` stay
  fp32 (autocast runs ``layer_norm`` in fp32; a bf16 ``logit_scale`` would be
  off by up to 0.4% after ``exp``).
* **Copies in the frozen attention.** torch's ``nn.MultiheadAttention`` forward
  copies q, k and v out of the packed projection; :func:`prepare_frozen` runs the
  frozen ones as :class:`LeanAttention` (views only, the same math): the
  published ViT-B/16 step launches 336 fewer kernels (``python -m
  benchmarks.step_launches``).
* **Casts around the frozen LayerNorms.** open_clip's LayerNorms compute in float32
  from a bf16 ``x`` through casts (CUDA autocast's, or their own), 4 launches per
  LayerNorm per step beside its 2; :func:`prepare_frozen` runs the frozen ones as
  :class:`LeanLayerNorm` (torch's mixed-dtype kernel, no cast): 204 launches fewer in
  the published ViT-B/16 step on a GPU. A CPU count does not see them: CPU autocast
  does not cast ``layer_norm``.
* **QuickGELU in three launches.** The activation of OpenAI's weights is 3 elementwise
  launches forward and 5 backward in eager PyTorch; :func:`prepare_frozen` runs it as
  :class:`LeanQuickGELU`, one fused launch each way where heba's Triton backend runs.
* **The residual sum and the next LayerNorm apart.** A block's attention output joins the
  residual stream and ``ln_2`` reads the sum: :class:`LeanResidualBlock` does both in one
  launch each way where Triton runs (2 launches fewer per block per step), and
  :class:`LeanTransformer` does the same for a block's MLP output and the next block's
  ``ln_1`` (2 fewer per pair of neighbouring blocks). timm's ViT blocks (AdapterTune's
  backbone, or HeBA's on timm) likewise, with their plain LayerNorms run in the stream's
  dtype instead of through CUDA autocast's float32 casts
  (:class:`LeanTimmBlock`, 10 launches fewer per block on a GPU; :class:`LeanTimmStack`
  between blocks).
* **Launch overhead.** :class:`GraphedStep` captures forward and backward of a
  step with static shapes (:class:`heba.train.step.AdapterStep`: static
  candidate slots, one text length) once per input shape as a CUDA graph and
  replays it; :func:`graphs_reason` says when a run cannot use one.
* **Memory.** :func:`checkpoint_frozen_blocks` recomputes the frozen blocks'
  activations in backward (``torch.utils.checkpoint``, non-reentrant), and
  :func:`find_max_batch` finds the largest batch that fits by bisection.

Example (CPU: every call is eager)::

    >>> import torch
    >>> w = torch.randn(3, requires_grad=True)
    >>> step = GraphedStep(lambda x: ((x * w).sum(),), [w])
    >>> loss, = step(torch.randn(3))
    >>> w.grad.shape, step.replays
    (torch.Size([3]), 0)
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module
from torch.utils.checkpoint import checkpoint

from heba.adapters import AdaptedOutput, Wrapper, get_adapters
from heba.backends import backend_status
from heba.clip.wiring import towers

__all__ = ["prepare_frozen", "LeanAttention", "route_frozen_attention",
           "unroute_frozen_attention", "LeanLayerNorm", "route_frozen_norms",
           "unroute_frozen_norms", "LeanQuickGELU", "route_frozen_activations",
           "unroute_frozen_activations", "LeanResidualBlock", "LeanTimmBlock",
           "route_frozen_blocks", "unroute_frozen_blocks", "LeanTransformer", "LeanTimmStack",
           "route_frozen_transformers", "unroute_frozen_transformers", "GraphedStep",
           "policy_graphs_reason", "graphs_reason",
           "CheckpointedBlock", "checkpoint_frozen_blocks", "uncheckpoint_frozen_blocks",
           "find_max_batch"]


# --- 1. cast the frozen backbone once ---------------------------------------------------------

def prepare_frozen(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Cast the frozen backbone of ``model`` to ``dtype`` once; keep trainable weights fp32.

    Cast: every frozen floating parameter and buffer outside ``model.heba_adapters``,
    except LayerNorm parameters and 0-d scalars (``logit_scale``, ``logit_bias``),
    which stay float32. Kept float32: every adapter parameter and anything else
    with ``requires_grad`` (the optimizer's master weights). Run the step under
    ``torch.autocast(device, dtype)`` (heba-train does): the adapters then
    compute in ``dtype`` and the LayerNorms in float32, as with an fp32 backbone.
    The frozen attention modules then run without copies
    (:func:`route_frozen_attention`), the frozen open_clip LayerNorms without casts
    (:func:`route_frozen_norms`), its QuickGELU fused (:func:`route_frozen_activations`)
    and each block's attention residual fused with its next LayerNorm, in open_clip's and
    timm's ViT blocks (:func:`route_frozen_blocks`), and each block's MLP residual with the
    next block's first LayerNorm, in open_clip's and timm's ViT stacks
    (:func:`route_frozen_transformers`).

    Not undone by ``remove_adapters``; cast back with ``model.float()``,
    :func:`unroute_frozen_attention`, :func:`unroute_frozen_norms`,
    :func:`unroute_frozen_activations`, :func:`unroute_frozen_blocks` and
    :func:`unroute_frozen_transformers` if needed.
    Returns ``model``.
    """
    adapters = get_adapters(model)          # raises if no adapters are attached
    for p in adapters.parameters():
        p.data = p.data.float()
    keep = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm)
            for p in m.parameters(recurse=False)}
    keep |= {id(p) for p in adapters.parameters()}
    for p in model.parameters():
        if id(p) in keep or p.requires_grad or not p.is_floating_point() or p.dim() == 0:
            if p.requires_grad and p.is_floating_point():
                p.data = p.data.float()
            continue
        p.data = p.data.to(dtype)
    keep_buffers = {id(b) for b in adapters.buffers()}
    for m in model.modules():
        for name, b in list(m.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point() and id(b) not in keep_buffers:
                setattr(m, name, b.to(dtype))   # e.g. the text tower's causal mask (0 / -inf)
    route_frozen_attention(model)
    route_frozen_norms(model)
    route_frozen_activations(model)
    route_frozen_blocks(model)
    route_frozen_transformers(model)
    return model


# --- 1b. frozen self-attention without copies -------------------------------------------------

class LeanAttention(nn.MultiheadAttention):
    """A frozen ``nn.MultiheadAttention`` whose self-attention runs without copies.

    torch's own forward (``F.multi_head_attention_forward``) makes q, k and v
    contiguous after the packed in-projection and selects them out of one tensor:
    in an open_clip block, 9 ``clone`` and 3 ``select_backward`` launches per
    step (forward + backward). Here, for ``x`` of ``[N, L, E]`` (``[L, N, E]``
    unless ``batch_first``)::

        qkv = linear(x, in_proj_weight, in_proj_bias)       # [N, L, 3E]
        q, k, v = qkv.view(N, L, 3, H, E // H).unbind(2)    # views, [N, L, H, Dh]
        o = sdpa(q, k, v, attn_mask)                        # on [N, H, L, Dh] views
        out = linear(o as [N, L, E], out_proj.weight, out_proj.bias)

    the same math as torch's forward, whose attention is the same
    ``scaled_dot_product_attention``. Backward stacks the three gradients into
    ``[N, L, 3, H, Dh]``, already the layout of ``qkv``: no ``clone`` is left.

    Taken for self-attention (``query is key is value``, batched) with
    ``need_weights=False`` (as open_clip calls it), no ``key_padding_mask``, no
    ``is_causal`` hint, no dropout while training, and an ``attn_mask`` of
    ``[L, L]`` or ``[N * H, L, L]``, float (added to the scores) or bool (True: not
    attended, as torch's). Anything else goes to torch's forward unchanged.

    Under bf16 the two differ by rounding only: here the in-projection bias is
    added inside one ``addmm``; torch's forward, on the transposed batch-first
    input, adds it to a bf16 ``bmm`` product in a second rounding.

    :func:`route_frozen_attention` switches a module's class to this one in place:
    the same object, parameters and ``state_dict`` keys, and
    ``isinstance(m, nn.MultiheadAttention)`` still holds.
    """

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if (query is not key or key is not value or query.dim() != 3 or query.is_nested
                or key_padding_mask is not None or need_weights or is_causal
                or (self.training and self.dropout > 0) or not _routable(self)
                or query.shape[-1] != self.embed_dim
                or not _mask_fits(attn_mask, query, self.num_heads, self.batch_first)):
            return super().forward(query, key, value, key_padding_mask, need_weights,
                                   attn_mask, average_attn_weights, is_causal)
        if attn_mask is not None and attn_mask.dtype == torch.bool:   # as torch's forward
            attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill_(
                attn_mask, float("-inf"))
        return _lean_self_attention(self, query, attn_mask), None


def _mask_fits(mask, x, heads: int, batch_first: bool) -> bool:
    """Whether ``mask`` is None or a float / bool ``[L, L]`` or ``[N * heads, L, L]``."""
    if mask is None:
        return True
    n, l = (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])
    shapes = ((l, l), (n * heads, l, l))
    return (mask.is_floating_point() or mask.dtype == torch.bool) and tuple(mask.shape) in shapes


def _lean_self_attention(mha: nn.MultiheadAttention, x, attn_mask):
    """:class:`LeanAttention`'s math: ``x`` ``[N, L, E]`` (``[L, N, E]`` unless batch-first)."""
    h, e = mha.num_heads, mha.embed_dim
    lead = x.shape[:2]                                      # (N, L) or (L, N)
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).view(*lead, 3, h, e // h)
    order = (0, 2, 1, 3) if mha.batch_first else (1, 2, 0, 3)
    q, k, v = (t.permute(order) for t in qkv.unbind(2))     # [N, H, L, Dh] views
    if attn_mask is not None and attn_mask.dim() == 3:
        attn_mask = attn_mask.reshape(q.shape[0], h, *attn_mask.shape[1:])   # [N, H, L, L]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask)  # [N, H, L, Dh]
    o = o.transpose(1, 2) if mha.batch_first else o.permute(2, 0, 1, 3)
    return F.linear(o.reshape(*lead, e), mha.out_proj.weight, mha.out_proj.bias)


def _routable(m: nn.Module) -> bool:
    """Packed q/k/v projection, no bias_k / bias_v, no add_zero_attn."""
    return (m._qkv_same_embed_dim and m.in_proj_weight is not None and m.bias_k is None
            and m.bias_v is None and not m.add_zero_attn)


def route_frozen_attention(model: nn.Module) -> int:
    """Run every frozen ``nn.MultiheadAttention`` of ``model`` as :class:`LeanAttention`.

    Frozen: no parameter of the module requires grad (adapters and anything
    trainable stay as they are). Only modules of exactly torch's class with a packed
    in-projection and no ``bias_k`` / ``bias_v`` / ``add_zero_attn`` are routed.
    Parameters, buffers and ``state_dict`` keys are unchanged. Returns how many
    modules were routed; :func:`unroute_frozen_attention` undoes it.

    Example::

        >>> mha = nn.MultiheadAttention(8, 2, batch_first=True).requires_grad_(False)
        >>> route_frozen_attention(nn.Sequential(mha)), type(mha).__name__
        (1, 'LeanAttention')
    """
    return _route(model, LeanAttention, lambda m: (
        type(m) is nn.MultiheadAttention and _routable(m)
        and not any(p.requires_grad for p in m.parameters())))


def unroute_frozen_attention(model: nn.Module) -> int:
    """Undo :func:`route_frozen_attention`; returns how many modules went back."""
    return _unroute(model, LeanAttention)


def _route(model: nn.Module, lean: type, accept: Callable[[nn.Module], bool],
           skip: frozenset = frozenset()) -> int:
    """Give every module of ``model`` that ``accept`` takes (and whose id is not in
    ``skip``) the class ``lean`` (for a mixin, :func:`_with_mixin` of the module's class),
    its own class kept for :func:`_unroute` and for the lean forward's fallback; returns
    how many."""
    n = 0
    for m in model.modules():
        if id(m) not in skip and accept(m):
            m._heba_original_class = type(m)
            m.__class__ = _with_mixin(lean, type(m)) if getattr(lean, "_heba_mixin", False) \
                else lean
            n += 1
    return n


def _with_mixin(mixin: type, cls: type) -> type:
    """``cls`` with ``mixin``'s methods first (one class per pair, made once): a routed module
    keeps every method of its own class."""
    key = (mixin, cls)
    if key not in _MIXED:
        _MIXED[key] = type(f"{mixin.__name__}[{cls.__name__}]", (mixin, cls), {})
    return _MIXED[key]


_MIXED: dict = {}


def _new_routed(mixin: type, cls: type) -> nn.Module:
    """An empty module of :func:`_with_mixin` ``(mixin, cls)``, for unpickling: the pair is
    made anew in the loading process (its name is no attribute of this module)."""
    return object.__new__(_with_mixin(mixin, cls))


def _unroute(model: nn.Module, lean: type) -> int:
    """Give every module routed to ``lean`` its own class back; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, lean) and "_heba_original_class" in m.__dict__:
            m.__class__ = m._heba_original_class
            del m._heba_original_class
            n += 1
    return n


# --- 1c. frozen LayerNorms without casts --------------------------------------------------------

# LayerNorm classes that compute in float32 and return x's dtype (open_clip's, by module and
# name, so that this module does not import open_clip): the ones LeanLayerNorm may stand for.
# A plain nn.LayerNorm is not among them: under CUDA autocast it returns float32.
_CAST_BACK_NORMS = {("open_clip.transformer", "LayerNorm"),
                    ("open_clip.transformer", "LayerNormFp32")}


class LeanLayerNorm(nn.LayerNorm):
    """A frozen open_clip LayerNorm (``LayerNorm`` or ``LayerNormFp32``) without its casts.

    Both compute the norm in float32 and return ``x``'s dtype: for a bfloat16 / float16
    ``x`` that costs a cast of ``x`` to float32 (written in ``LayerNormFp32``; done by
    CUDA autocast, whose float32 list has ``layer_norm``, in ``LayerNorm``) and a cast of
    the output back, and the two casts of the gradient in the backward: 4 launches per
    LayerNorm per step beside its 2 (51 LayerNorms in a ViT-B/16 CLIP). Here, for such an
    ``x`` with float32 (or no) affine parameters, ``F.layer_norm`` takes ``x`` as it is,
    autocast off: torch's mixed-dtype kernel reads ``x`` in its dtype, accumulates in
    float32 and writes ``x``'s dtype, forward and backward. Any other input runs the
    original class's forward. Parameters and ``state_dict`` keys are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        affine = [t for t in (self.weight, self.bias) if t is not None]
        if (x.dtype in (torch.bfloat16, torch.float16) and x.device.type in ("cpu", "cuda")
                and all(t.dtype == torch.float32 for t in affine)):
            with torch.autocast(x.device.type, enabled=False):
                return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return self._heba_original_class.forward(self, x)


def route_frozen_norms(model: nn.Module) -> int:
    """Run every frozen open_clip LayerNorm of ``model`` as :class:`LeanLayerNorm`.

    Frozen: no parameter of the module requires grad. Only open_clip's ``LayerNorm`` and
    ``LayerNormFp32`` are routed (a plain ``nn.LayerNorm`` returns float32 under CUDA
    autocast, which the lean one would not). Returns how many modules were routed;
    :func:`unroute_frozen_norms` undoes it.
    """
    def accept(m):
        cls = type(m)
        return ((cls.__module__, cls.__name__) in _CAST_BACK_NORMS
                and issubclass(cls, nn.LayerNorm)
                and not any(p.requires_grad for p in m.parameters()))
    return _route(model, LeanLayerNorm, accept)


def unroute_frozen_norms(model: nn.Module) -> int:
    """Undo :func:`route_frozen_norms`; returns how many modules went back."""
    return _unroute(model, LeanLayerNorm)


# --- 1d. the frozen QuickGELU fused ------------------------------------------------------------

class LeanQuickGELU(nn.Module):
    """open_clip's ``QuickGELU`` (``x * sigmoid(1.702 x)``, the activation of OpenAI's CLIP
    weights) as one fused launch each way (:mod:`heba_kernels.quick_gelu`) wherever heba's
    Triton backend runs on ``x``'s device (a CUDA GPU, or the CPU in Triton's interpreter);
    elsewhere the original forward. Eager PyTorch takes 3 launches forward and 5 backward,
    each over the MLP's whole hidden tensor: 144 launches per published ViT-B/16 step
    (24 MLPs) and, at batch 16, about 4 GB of HBM traffic. In 16-bit the fused op rounds once
    where eager rounds after each of its three ops (closer to the float32 value)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.float16, torch.bfloat16) and \
                backend_status("triton", x.device)[0]:
            from heba_kernels.quick_gelu import quick_gelu
            return quick_gelu(x)
        return self._heba_original_class.forward(self, x)


def route_frozen_activations(model: nn.Module) -> int:
    """Run every open_clip ``QuickGELU`` of ``model`` outside its adapters as
    :class:`LeanQuickGELU` (it has no parameters; the adapters' own activations are left
    alone). Returns how many modules were routed; :func:`unroute_frozen_activations` undoes
    it."""
    adapters = getattr(model, "heba_adapters", None)
    inside = frozenset(id(m) for m in adapters.modules()) if adapters is not None else frozenset()
    return _route(model, LeanQuickGELU, lambda m: (
        (type(m).__module__, type(m).__name__) == ("open_clip.transformer", "QuickGELU")),
        skip=inside)


def unroute_frozen_activations(model: nn.Module) -> int:
    """Undo :func:`route_frozen_activations`; returns how many modules went back."""
    return _unroute(model, LeanQuickGELU)


# --- 1e. the residual sum and the MLP's LayerNorm fused ---------------------------------------

class _RoutedBlock(nn.Module):
    """The lean blocks' base: a mixin over the block's own class (:func:`_with_mixin`), and
    pickled as that pair (``torch.save`` of a whole routed model)."""

    _heba_mixin = True

    def __reduce_ex__(self, protocol):
        mixin = type(self).__bases__[0]          # the (mixin, own class) pair's mixin
        return _new_routed, (mixin, self._heba_original_class), self.__dict__.copy()


def _add_norm(x: torch.Tensor, a: torch.Tensor, norm: nn.Module):
    """``(s, norm(s))`` for ``s = x + a``: one fused launch each way
    (:mod:`heba_kernels.add_layer_norm`) when ``a`` matches ``x``, else eager."""
    if a.dtype == x.dtype and a.shape == x.shape:
        from heba_kernels.add_layer_norm import add_layer_norm
        return add_layer_norm(x, a, norm.weight, norm.bias, norm.eps)
    s = x + a
    return s, norm(s)


class LeanResidualBlock(_RoutedBlock):
    """open_clip's ``ResidualAttentionBlock`` (self-attention) with the attention's residual
    sum and the frozen ``ln_2`` that reads it as one fused launch each way
    (:mod:`heba_kernels.add_layer_norm`), wherever heba's Triton backend runs on ``x``'s
    device; the same math as the block's own forward::

        s = x + ls_1(attention(ln_1(x)))
        out = s + ls_2(mlp(ln_2(s)))

    ``ln_1``, the attention and the MLP are the block's own modules (an adapter wrapped
    around ``ln_1`` or ``mlp.c_fc`` runs as before). Eager PyTorch launches the sum and the
    norm separately and sums the norm's input gradient with the residual's in one more
    launch: 2 launches fewer per block per step (48 in the published ViT-B/16 step), and the
    residual stream read and written once less each way. Falls back to the block's own
    forward for cross-attention, a trainable ``ln_2``, mixed dtypes (an fp32 stream under
    autocast) or where Triton does not run. A routed block's class is this one's methods
    over the block's own class (``isinstance(block, LeanResidualBlock)``), so every method of
    open_clip's block stays."""

    def forward(self, q_x: torch.Tensor, k_x: Optional[torch.Tensor] = None,
                v_x: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None):
        if k_x is None and v_x is None and self.splits(q_x):
            s, m = self.split_forward(q_x, None, attn_mask)
            return s + m
        return super().forward(q_x, k_x, v_x, attn_mask)

    def splits(self, x: torch.Tensor) -> bool:
        """Whether :meth:`split_forward` runs on ``x`` (self-attention; else the block's own
        forward)."""
        return _fusable_norm(self.ln_2, x)

    def split_forward(self, x: torch.Tensor, pending: Optional[torch.Tensor],
                      attn_mask: Optional[torch.Tensor] = None):
        """``(s, m)``, the block's output ``s + m`` in two terms, the stream ``x + pending``
        coming in likewise (``pending`` None: ``x`` alone): :class:`LeanTransformer` sums
        each block's ``m`` inside the next block's ``ln_1``, as ``ln_2`` sums ``s`` here."""
        x, h = self._norm_1(x, pending)
        a = self.ls_1(self.attention(q_x=h, attn_mask=attn_mask))
        s, h = _add_norm(x, a, self.ln_2)
        return s, self.ls_2(self.mlp(h))

    def _norm_1(self, x: torch.Tensor, pending: Optional[torch.Tensor]):
        """``(t, ln_1(t))`` for ``t = x + pending``: the sum inside the fused LayerNorm where
        ``ln_1`` (or the LayerNorm an adapter wraps, the adapter then run on its output)
        can run there."""
        if pending is None:
            return x, self.ln_1(x)
        ln, wrapper = _unwrapped(self.ln_1)
        if not _fusable_norm(ln, x):
            x = x + pending
            return x, self.ln_1(x)
        x, h = _add_norm(x, pending, ln)
        return x, (h if wrapper is None else wrapper.adapt(h))


def _unwrapped(norm: nn.Module):
    """``(the norm, None)``, or ``(its original, the wrapper)`` for an adapter wrapped around
    it (HeBA's attention position: :class:`heba.adapters.AdaptedOutput`)."""
    return (norm.orig, norm) if isinstance(norm, AdaptedOutput) else (norm, None)


class LeanTransformer(_RoutedBlock):
    """open_clip's ``Transformer`` (a tower's stack of blocks) with each routed block's MLP
    residual sum fused with the next block's ``ln_1``, one launch each way where heba's Triton
    backend runs; the same math as the stack's own forward::

        for block in resblocks:
            x = block(x)            # ... s = x + attention(ln_1(x)) ...; x = s + m

    Block ``i`` returns ``s`` and its MLP branch ``m`` apart
    (:meth:`LeanResidualBlock.split_forward`); block ``i + 1`` sums them inside its ``ln_1``
    (an adapter wrapped around ``ln_1`` then runs on the fused norm's output), as its
    ``ln_2`` sums the attention's residual. Eager PyTorch launches that sum and later the sum
    of the stream's two gradients: 2 launches fewer per pair of neighbouring blocks per step
    (44 in the published ViT-B/16 step), and the stream read and written once less each way.
    The last block's sum stays. A block that is not a routed open_clip block, has hooks, or
    whose fused path does not apply (:meth:`LeanResidualBlock.splits`) gets the summed
    stream and runs as itself. Falls back to the stack's own forward with gradient
    checkpointing on or a sequence-first layout. Modules, parameters and ``state_dict``
    keys are unchanged."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None):
        if self.grad_checkpointing or not getattr(self, "batch_first", False):
            return super().forward(x, attn_mask=attn_mask)
        return _chained(self.resblocks, x, LeanResidualBlock,
                        lambda b, x, p: b.split_forward(x, p, attn_mask),
                        lambda b, x: b(x, attn_mask=attn_mask))


def _chained(blocks, x: torch.Tensor, lean: type, split: Callable, call: Callable):
    """Run ``blocks`` on ``x``, each block of class ``lean`` without hooks that
    :meth:`splits` ``x`` by ``split(block, x, pending) -> (s, m)`` (the stream coming in as
    ``x + pending``), any other by ``call(block, x)`` on the summed stream."""
    pending = None
    for block in blocks:
        if isinstance(block, lean) and not _hooked(block) and block.splits(x):
            x, pending = split(block, x, pending)
            continue
        if pending is not None:
            x, pending = x + pending, None
        x = call(block, x)
    return x if pending is None else x + pending


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooked(m: nn.Module) -> bool:
    """``m`` has hooks, its own or every module's (``nn.modules.module``'s global ones), that
    only a call of ``m`` runs, not a call of its methods."""
    return any(getattr(m, k, None) or getattr(torch_module, "_global" + k, None)
               for k in _HOOK_DICTS)


def route_frozen_transformers(model: nn.Module) -> int:
    """Run every open_clip ``Transformer`` of ``model`` as :class:`LeanTransformer` and every
    timm ``VisionTransformer``'s ``blocks`` as :class:`LeanTimmStack` (their blocks fuse
    across their boundaries where they are routed, see :func:`route_frozen_blocks`).
    Returns how many; :func:`unroute_frozen_transformers` undoes it."""
    n = _route(model, LeanTransformer, lambda m: (
        (type(m).__module__, type(m).__name__) == ("open_clip.transformer", "Transformer")
        and all(hasattr(m, k) for k in ("resblocks", "grad_checkpointing"))))
    stacks = {id(m.blocks) for m in model.modules()
              if (type(m).__module__, type(m).__name__)
              == ("timm.models.vision_transformer", "VisionTransformer")
              and type(getattr(m, "blocks", None)) is nn.Sequential}
    return n + _route(model, LeanTimmStack, lambda m: id(m) in stacks)


def unroute_frozen_transformers(model: nn.Module) -> int:
    """Undo :func:`route_frozen_transformers`; returns how many went back."""
    return _unroute(model, LeanTransformer) + _unroute(model, LeanTimmStack)


def _fusable_norm(ln: nn.Module, x: torch.Tensor, classes=None) -> bool:
    """``ln``, a LayerNorm of ``classes`` (module, name) pairs (open_clip's, by default; or its
    lean stand-in) over ``x``'s last dimension with frozen parameters, can run inside the
    fused op on ``x``."""
    from heba_kernels.add_layer_norm import MAX_DIM
    cls = getattr(ln, "_heba_original_class", type(ln))
    return ((cls.__module__, cls.__name__) in (classes or _CAST_BACK_NORMS)
            and isinstance(ln, nn.LayerNorm)
            and ln.normalized_shape == (x.shape[-1],) and x.shape[-1] <= MAX_DIM
            and not any(p.requires_grad for p in ln.parameters())
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and backend_status("triton", x.device)[0])


# timm's LayerNorms: plain ones (under CUDA autocast they return float32, which the next
# Linear casts back; inside a timm ViT block nothing else reads them)
_TIMM_NORMS = {("timm.layers.norm", "LayerNorm"), ("torch.nn.modules.normalization", "LayerNorm")}


class LeanTimmBlock(_RoutedBlock):
    """timm's ViT ``Block`` (AdapterTune's backbone, or HeBA's on timm) with its LayerNorms in
    the residual stream's dtype and its attention's residual sum fused with ``norm2``,
    wherever heba's Triton backend runs on ``x``'s device; the same math as the block's own
    forward::

        s = x + drop_path1(ls1(attn(norm1(x))))
        out = s + drop_path2(ls2(mlp(norm2(s))))

    Under CUDA autocast timm's LayerNorms compute in float32 through casts (autocast's
    float32 list has ``layer_norm``): 4 launches per norm (x to float32, the output back to
    bf16 by the next Linear, and the same for the gradients) and float32 copies of the
    residual stream. Here ``norm1`` runs torch's mixed-dtype kernel on x as it is (the value
    the attention's first Linear receives is the same: it rounds the float32 output to bf16
    either way) and ``norm2`` runs inside :mod:`heba_kernels.add_layer_norm` with the sum
    before it: 10 launches fewer per block per step on a GPU (2 on a CPU, whose autocast does
    not cast ``layer_norm``). An adapter wrapped around ``norm1`` (HeBA's attention
    position) runs on that norm's output, here in the stream's dtype (the block's own
    forward hands it float32 under CUDA autocast; the attention's Linear then receives the
    same values up to one more bf16 rounding of the adapter's output). Falls back to the
    block's own forward with an attention mask, trainable norms, mixed dtypes or where
    Triton does not run."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False):
        if attn_mask is None and not is_causal and self.splits(x):
            s, m = self.split_forward(x, None)
            return s + m
        if attn_mask is None and not is_causal:
            return super().forward(x)           # the forward of any timm release
        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)

    def _norms(self):
        """``(norm1's LayerNorm, the adapter wrapped around it or None, norm2)``."""
        return (*_unwrapped(self.norm1), self.norm2)

    def splits(self, x: torch.Tensor) -> bool:
        """Whether :meth:`split_forward` runs on ``x`` (no mask; else the block's own forward)."""
        n1, _, n2 = self._norms()
        return _fusable_norm(n1, x, _TIMM_NORMS) and _fusable_norm(n2, x, _TIMM_NORMS)

    def split_forward(self, x: torch.Tensor, pending: Optional[torch.Tensor]):
        """``(s, m)``, the block's output ``s + m`` in two terms, the stream ``x + pending``
        coming in likewise, summed inside the fused ``norm1`` (:class:`LeanTimmStack`; as
        :meth:`LeanResidualBlock.split_forward`)."""
        n1, wrapper, n2 = self._norms()
        if pending is None:
            with torch.autocast(x.device.type, enabled=False):
                h = F.layer_norm(x, n1.normalized_shape, n1.weight, n1.bias, n1.eps)
        else:
            x, h = _add_norm(x, pending, n1)
        if wrapper is not None:
            h = wrapper.adapt(h)
        a = self.drop_path1(self.ls1(self.attn(h)))
        s, h = _add_norm(x, a, n2)
        return s, self.drop_path2(self.ls2(self.mlp(h)))


class LeanTimmStack(_RoutedBlock):
    """A timm ``VisionTransformer``'s ``blocks`` (an ``nn.Sequential``) with each
    :class:`LeanTimmBlock`'s MLP residual sum fused with the next block's ``norm1``, as
    :class:`LeanTransformer` does for open_clip's stacks (the same rules for blocks that do
    not split: AdapterTune's adapters after the blocks make every block one). timm runs its
    blocks one by one itself with a mask or gradient checkpointing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _chained(self, x, LeanTimmBlock, lambda b, x, p: b.split_forward(x, p),
                        lambda b, x: b(x))


def route_frozen_blocks(model: nn.Module) -> int:
    """Run every open_clip self-attention ``ResidualAttentionBlock`` of ``model`` as
    :class:`LeanResidualBlock` and every timm ViT ``Block`` (timm's ``Attention`` and
    ``Mlp``) as :class:`LeanTimmBlock` (modules, parameters and ``state_dict`` keys
    unchanged; whether the norms are frozen is checked at every call). Returns how many
    blocks were routed; :func:`unroute_frozen_blocks` undoes it."""
    n = _route(model, LeanResidualBlock, lambda m: (
        (type(m).__module__, type(m).__name__)
        == ("open_clip.transformer", "ResidualAttentionBlock")
        and not hasattr(m, "ln_1_kv")
        and all(hasattr(m, k) for k in ("ln_1", "ln_2", "ls_1", "ls_2", "mlp", "attention"))))
    return n + _route(model, LeanTimmBlock, lambda m: (
        (type(m).__module__, type(m).__name__) == ("timm.models.vision_transformer", "Block")
        and all(hasattr(m, k) for k in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp",
                                        "ls2", "drop_path2"))
        and (type(m.attn).__name__, type(m.mlp).__name__) == ("Attention", "Mlp")))


def unroute_frozen_blocks(model: nn.Module) -> int:
    """Undo :func:`route_frozen_blocks`; returns how many blocks went back."""
    return _unroute(model, LeanResidualBlock) + _unroute(model, LeanTimmBlock)


# --- 2. CUDA graphs of the step ----------------------------------------------------------------

def _on_side_stream(fn: Callable):
    """``fn()`` on a side stream, as CUDA graphs want their warm-up steps (cuBLAS
    workspaces, Triton autotuning, optimizer state are created outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return out


def _make_room(graphs: dict, max_graphs: int) -> None:
    """Drop the oldest captured graphs until one more fits under ``max_graphs``."""
    while len(graphs) >= max_graphs:
        graphs.pop(next(iter(graphs)))


def policy_graphs_reason(policy, training: bool = True) -> Optional[str]:
    """Why a HeBA scale policy keeps a training step from being a CUDA graph (None: it does
    not). Device-side slow-fast draws replay correctly (new draws per replay); host-side
    random draws would be frozen at their captured values."""
    if policy is not None and training and policy.random and policy.draws == "host":
        return ("the HeBA slow-fast scale is drawn on the host (ScalePolicy(draws='host')); a "
                "graph would replay the scales drawn at capture (draws='device' allows graphs)")
    return None


def graphs_reason(opts, device, world, precision, model, step,
                  optimizer=None) -> Optional[str]:
    """Why the training step cannot be a CUDA graph here (None when it can)."""
    if not opts.cuda_graphs:
        return "--no-cuda-graphs"
    if device.type != "cuda":
        return "not on a GPU"
    if world > 1:
        # torch can capture DDP's NCCL all-reduce (NCCL >= 2.9.6) only with DDP built on a
        # side stream, >= 11 eager DDP steps before the capture and
        # TORCH_NCCL_ASYNC_ERROR_HANDLING=0 set before init_process_group (torch's CUDA
        # graphs notes, "Usage with DistributedDataParallel"); not verified on a multi-GPU
        # machine yet, so DDP steps stay eager.
        return "DistributedDataParallel"
    if precision == "fp16" and not getattr(optimizer, "_step_supports_amp_scaling", False):
        # GradScaler.step reads found_inf on the host unless the optimizer unscales and
        # skips by itself (fused SGD / Adam: _step_supports_amp_scaling)
        return "fp16 loss scaling with an optimizer that is not fused"
    # The candidate slots, the prompt picks and the slow-fast scales are device-side with
    # static shapes (heba.train.step, ScalePolicy): only host-drawn scales stop a graph.
    return policy_graphs_reason(getattr(model, "heba_policy", None))


class GraphedStep:
    """Forward and backward of a training step, replayed as one CUDA graph per input shape.

    ``fn(*inputs)`` returns a tuple of tensors whose first is the loss;
    ``GraphedStep(fn, params)(*inputs)`` runs ``fn`` and ``loss.backward()`` and
    returns the outputs detached, with every ``p.grad`` of ``params`` set. The
    optimizer step stays outside the graph (a few foreach launches), so learning-rate
    schedules, ``GradScaler``-free optimizers and ``zero_grad(set_to_none=True)``
    between steps need no recapture: the gradients live in the graph's memory and
    ``p.grad`` is pointed at them after every replay.

    The first ``warmup`` calls per shape run eagerly on a side stream (cuBLAS
    workspaces, Triton autotuning, lazily built state), then the shape is captured.
    ``fn`` must have no host synchronisation and no host-side randomness (a graph
    replays what it recorded; :func:`graphs_reason` decides for heba-train). Inputs
    are copied into static buffers on each replay. Off the GPU (or
    with ``enabled=False``) every call is eager. A capture that fails switches to
    eager for good, with a warning that says why (``reason``).
    """

    def __init__(self, fn: Callable, params, *, enabled: bool = True, warmup: int = 3,
                 max_graphs: int = 4):
        self.fn, self.params = fn, list(params)
        self.warmup, self.max_graphs = warmup, max_graphs
        self.reason: Optional[str] = None if enabled else "disabled"
        self._graphs: dict = {}
        self._seen: dict = {}
        self._pool = None
        self.replays = 0

    def _eager(self, inputs):
        outs = self.fn(*inputs)
        outs[0].backward()
        return tuple(o.detach() for o in outs)

    def __call__(self, *inputs: torch.Tensor):
        if self.reason is not None or not inputs[0].is_cuda:
            return self._eager(inputs)
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        if key in self._graphs:
            return self._replay(key, inputs)
        if self._seen.get(key, 0) < self.warmup:
            self._seen[key] = self._seen.get(key, 0) + 1
            return _on_side_stream(lambda: self._eager(inputs))
        try:
            self._capture(key, inputs)
        except Exception as err:
            self.reason = f"capture failed ({type(err).__name__}: {str(err)[:200]})"
            warnings.warn(f"GraphedStep: CUDA graphs off: {self.reason}")
            self._graphs.clear()
            for p in self.params:
                p.grad = None
            return self._eager(inputs)
        return self._replay(key, inputs)

    def _capture(self, key, inputs):
        static = [t.clone() for t in inputs]
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        for p in self.params:
            p.grad = None            # backward allocates the gradients inside the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            outs = self.fn(*static)
            outs[0].backward()
        grads = [p.grad for p in self.params]
        _make_room(self._graphs, self.max_graphs)
        self._graphs[key] = (graph, static, tuple(o.detach() for o in outs), grads)

    def _replay(self, key, inputs):
        graph, static, outs, grads = self._graphs[key]
        for dst, src in zip(static, inputs):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        self.replays += 1
        for p, g in zip(self.params, grads):
            p.grad = g
        # The graphs share one memory pool: hand out copies, not the static outputs.
        return tuple(o.clone() for o in outs)


# --- 3. memory: activation checkpointing of the frozen blocks, largest batch ------------------

class CheckpointedBlock(Wrapper):
    """A transformer block whose activations are recomputed in backward.

    HeBA's slow-fast scales are drawn once per tower forward (the policy's own
    counter-based stream, :class:`heba.adapters.ScalePolicy`); by the time
    backward recomputes this block the tower may have run again and drawn anew
    (``torch.utils.checkpoint`` restores torch's RNG, not ours). So the scale
    objects the policy hands out in forward (0-d device tensors, or floats) are
    recorded and handed out again, in order, in the recomputation: the same
    values, also inside a captured CUDA graph (the recorded tensors live in the
    graph's memory and are rewritten by each replay's draw).
    """

    wrapped = "block"          # open_clip reads e.g. ``resblocks[0].get_weight_dtype()``

    def __init__(self, block: nn.Module, policy):
        super().__init__()
        self.block = block
        self._policy = policy

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.block(*args, **kwargs)
        draws: list = []
        calls = [0]

        def run(*a, **k):
            calls[0] += 1
            with _scale_tape(self._policy, draws, replay=calls[0] > 1):
                return self.block(*a, **k)
        return checkpoint(run, *args, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def _scale_tape(policy, draws: list, replay: bool):
    if policy is None:
        yield
        return
    if replay:
        it = iter(list(draws))
        policy.scale = lambda *args, **kwargs: next(it)
    else:
        orig = type(policy).scale

        def record(*args, **kwargs):
            s = orig(policy, *args, **kwargs)
            draws.append(s)
            return s
        policy.scale = record
    try:
        yield
    finally:
        del policy.scale          # the class's method again


def checkpoint_frozen_blocks(model: nn.Module, every: int = 1) -> int:
    """Wrap every ``every``-th residual block of each tower (blocks ``every-1, 2*every-1, ...``,
    0-based) in :class:`CheckpointedBlock`. Returns how many were wrapped.

    Saves the blocks' activations (the frozen backbone's bulk) at the price of
    recomputing their forward in backward. Undo with :func:`uncheckpoint_frozen_blocks`
    (before ``remove_adapters``).
    """
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    policy = getattr(model, "heba_policy", None)
    n = 0
    for tr in towers(model).values():
        for i in range(every - 1, len(tr.resblocks), every):
            if isinstance(tr.resblocks[i], CheckpointedBlock):
                raise ValueError("blocks are already checkpointed")
            tr.resblocks[i] = CheckpointedBlock(tr.resblocks[i], policy)
            n += 1
    return n


def uncheckpoint_frozen_blocks(model: nn.Module) -> int:
    """Undo :func:`checkpoint_frozen_blocks`; returns how many blocks were unwrapped."""
    n = 0
    for tr in towers(model).values():
        for i, blk in enumerate(tr.resblocks):
            if isinstance(blk, CheckpointedBlock):
                tr.resblocks[i] = blk.block
                n += 1
    return n


def find_max_batch(run: Callable[[int], object], start: int = 16, limit: int = 1 << 14) -> int:
    """The largest batch ``b <= limit`` for which ``run(b)`` does not run out of GPU memory.

    Doubles from ``start`` until ``run`` raises ``torch.cuda.OutOfMemoryError``,
    then bisects. ``run(b)`` should do one full training step at batch ``b``
    (build inputs inside, so they are freed after). Returns 0 if batch 1 fails.
    """
    def fits(b):
        try:
            run(b)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    lo, hi = 0, max(1, min(start, limit))
    while fits(hi):
        lo = hi
        if hi == limit:
            return lo
        hi = min(2 * hi, limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo

