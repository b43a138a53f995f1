"""A fast training step for adapters on a frozen open_clip CLIP: cast once, static shapes, graphs.

What makes the default step slow, and what this module does about it:

* **Per-step weight casts.** Under ``torch.autocast`` every matmul of an fp32
  backbone casts its weight to bf16 again at every step (~150M parameters for
  ViT-B/16). The backbone is frozen (no optimizer, no master copy needed), so
  :func:`prepare_frozen` casts it once; autocast's casts then become no-ops.
  The adapters stay fp32 master weights (the optimizer updates them in fp32);
  their low-precision compute comes from autocast (heba's fused backends cast
  the adapter weights per call). LayerNorm parameters and ``logit_scale`` stay
  fp32 (autocast runs ``layer_norm`` in fp32; a bf16 ``logit_scale`` would be
  off by up to 0.4% after ``exp``).
* **Text tower work.** Prompts are 77 tokens but rarely longer than ~20: the
  text tower runs only up to the batch's last end-of-text token, rounded up to
  a multiple of ``text_multiple`` (8) so that only a few lengths occur.
* **Launch overhead.** With static shapes the whole step (forward, backward,
  optimizer step) is captured once per shape as a CUDA graph and replayed.
  Negative-class sampling changes the number of prompts per step: the prompt
  batch is padded to a multiple of ``prompt_multiple`` (or to the smallest of
  ``prompt_buckets``) and the padded classes' logits are masked to ``-inf``,
  which changes neither the loss nor any gradient (tested).
* **Memory.** :func:`checkpoint_frozen_blocks` recomputes the frozen blocks'
  activations in backward (``torch.utils.checkpoint``, non-reentrant), and
  :func:`find_max_batch` finds the largest batch that fits by bisection.

Example (CPU, float32; on a GPU pass ``dtype=torch.bfloat16``, the default)::

    >>> import open_clip, torch
    >>> from heba.clip import attach_adaptertune
    >>> from heba.clip.fast import TrainStep, prepare_frozen
    >>> model = open_clip.CLIP(embed_dim=32,
    ...     vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
    ...     text_cfg=dict(context_length=16, vocab_size=100, width=64, heads=2, layers=2))
    >>> _ = attach_adaptertune(model, "both", rank=4)
    >>> _ = prepare_frozen(model, torch.float32)
    >>> opt = torch.optim.SGD(model.heba_adapters.parameters(), lr=0.01)
    >>> step = TrainStep(model, opt, dtype=torch.float32, label_smoothing=0.1)
    >>> texts = torch.zeros(5, 16, dtype=torch.long); texts[:, 0] = 98; texts[:, 3] = 99
    >>> loss = step(torch.randn(4, 3, 32, 32), texts, torch.tensor([0, 1, 2, 4]))
    >>> loss.shape, step.graphs_reason
    (torch.Size([]), 'not a CUDA model')
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from heba.clip.wiring import encode_text, get_adapters, towers

__all__ = [
    "prepare_frozen", "bucket_length", "bucket_count", "pad_prompts", "encode_text_to",
    "masked_cross_entropy", "TrainStep", "checkpoint_frozen_blocks",
    "uncheckpoint_frozen_blocks", "find_max_batch", "GraphedStep", "policy_graphs_reason",
]


# --- 1. cast the frozen backbone once ---------------------------------------------------------

def prepare_frozen(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Cast the frozen backbone of ``model`` to ``dtype`` once; keep trainable weights fp32.

    Cast: every frozen floating parameter and buffer outside ``model.heba_adapters``,
    except LayerNorm parameters and 0-d scalars (``logit_scale``, ``logit_bias``),
    which stay float32. Kept float32: every adapter parameter and anything else
    with ``requires_grad`` (the optimizer's master weights). Run the step under
    ``torch.autocast(device, dtype)`` (``TrainStep`` does): the adapters then
    compute in ``dtype`` and the LayerNorms in float32, as with an fp32 backbone.

    Not undone by ``remove_adapters``; cast back with ``model.float()`` if needed.
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
    return model


# --- 2. static shapes: bucketed text length, padded prompt batch, masked loss ----------------

def bucket_length(text: torch.Tensor, multiple: int = 8) -> int:
    """Tokens the text tower must run: the last end-of-text position + 1, rounded up to
    ``multiple`` and capped at the context length. One host sync if ``text`` is on a GPU."""
    n = int(text.argmax(dim=-1).max()) + 1
    return min(text.shape[-1], -(-n // multiple) * multiple)


def bucket_count(n: int, multiple: int = 8, buckets: Optional[Sequence[int]] = None) -> int:
    """The padded prompt count for ``n`` prompts: the smallest of ``buckets`` >= n, else
    ``n`` rounded up to ``multiple``."""
    if buckets:
        fit = [b for b in sorted(buckets) if b >= n]
        if fit:
            return fit[0]
    return -(-n // multiple) * multiple


def pad_prompts(text: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``text [C, L]`` with all-zero rows to ``[count, L]``; also the ``[count]`` bool mask
    of real prompts. A zero row's end-of-text is at position 0, so it never lengthens the
    bucketed context."""
    C = text.shape[0]
    if count < C:
        raise ValueError(f"cannot pad {C} prompts to {count}")
    pad = text.new_zeros(count - C, text.shape[1])
    valid = torch.zeros(count, dtype=torch.bool, device=text.device)
    valid[:C] = True
    return torch.cat([text, pad]), valid


def encode_text_to(model: nn.Module, text: torch.Tensor, length: int,
                   normalize: bool = False) -> torch.Tensor:
    """``model.encode_text(text)`` running only the first ``length`` tokens: no host sync,
    one shape per bucket. ``length`` must be > every row's end-of-text position (not
    checked: that would sync). ``text`` is ``[C, context_length]`` token ids; returns
    ``[C, embed_dim]``. See :func:`heba.clip.wiring.encode_text`."""
    return encode_text(model, text, normalize=normalize, length=length)


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                         valid: Optional[torch.Tensor] = None,
                         label_smoothing: float = 0.0) -> torch.Tensor:
    """Label-smoothed cross-entropy over the valid classes only.

    ``logits [B, C]``, ``labels [B]`` (indices of valid classes), ``valid [C]`` bool
    (None: all valid). Equals ``F.cross_entropy(logits[:, valid], labels,
    label_smoothing=...)`` with the smoothing spread over the valid classes, and
    padded classes get exactly zero gradient. No host sync (graph-safe).
    """
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    logp = logits.float().log_softmax(dim=-1)
    nll = -logp.gather(1, labels[:, None]).squeeze(1)
    if label_smoothing == 0.0:
        return nll.mean()
    if valid is None:
        smooth = -logp.mean(dim=-1)
    else:
        smooth = -logp.masked_fill(~valid, 0.0).sum(dim=-1) / valid.sum()
    return ((1.0 - label_smoothing) * nll + label_smoothing * smooth).mean()


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


class TrainStep:
    """One training step of adapters on a frozen CLIP, with as few launches as possible.

    ``step(images, texts, labels)`` encodes ``images [B, 3, H, W]`` and the class
    prompts ``texts [C, context_length]`` (token ids), computes
    ``logit_scale.exp() * img @ txt.T`` on L2-normalised features, the
    label-smoothed cross-entropy against ``labels [B]`` (indices into ``texts``),
    backward and ``optimizer.step()``; returns the loss (a detached 0-d tensor,
    no host sync).

    Args:
        model: open_clip CLIP with adapters attached (``attach_heba`` /
            ``attach_adaptertune``), ideally after :func:`prepare_frozen`.
        optimizer: over the adapter parameters. For CUDA graphs its update must be
            capturable: SGD is; Adam/AdamW need ``capturable=True``.
        dtype: autocast dtype (bf16); ``torch.float32`` runs without autocast.
        label_smoothing: as in ``F.cross_entropy``, over the real (unpadded) classes.
        prompt_multiple, prompt_buckets: the prompt batch is padded to the smallest
            of ``prompt_buckets`` that fits, else to a multiple of ``prompt_multiple``.
        text_multiple: the text context is cut after the last end-of-text token,
            rounded up to this multiple (None: no truncation, full context).
        cuda_graphs: capture each step shape as a CUDA graph after ``warmup`` eager
            steps (real steps on real data) and replay it. Off on the CPU, and off
            while a HeBA slow-fast policy draws on the host (a graph would freeze
            the scales it drew at capture; the default device-side draws replay
            correctly): ``graphs_reason`` says why.
        max_graphs: graphs kept at once (one per (batch, prompts, text length)).

    After each step on a GPU, ``peak_memory_bytes`` is ``torch.cuda.max_memory_allocated``
    over that step.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 dtype: torch.dtype = torch.bfloat16, label_smoothing: float = 0.0,
                 prompt_multiple: int = 8, prompt_buckets: Optional[Sequence[int]] = None,
                 text_multiple: Optional[int] = 8, cuda_graphs: bool = True, warmup: int = 3,
                 max_graphs: int = 4):
        self.model, self.optimizer = model, optimizer
        self.dtype, self.label_smoothing = dtype, float(label_smoothing)
        self.prompt_multiple, self.prompt_buckets = prompt_multiple, prompt_buckets
        self.text_multiple = text_multiple
        self.warmup, self.max_graphs = warmup, max_graphs
        self.device = next(p for p in model.parameters()).device
        self.cuda_graphs = cuda_graphs
        self.peak_memory_bytes: Optional[int] = None
        self._graphs: dict = {}           # key -> (graph, static inputs, static loss)
        self._seen: dict = {}             # key -> eager steps run so far
        self._snapshot = None             # what the graphs baked in (hyperparameters, modes)
        self._recaptures = 0
        self._pool = None
        self._broken: Optional[str] = None

    # -- the step, eagerly ------------------------------------------------------------------
    def _autocast(self, cache: bool = True):
        return torch.autocast(self.device.type, dtype=self.dtype,
                              enabled=self.dtype != torch.float32, cache_enabled=cache)

    def loss(self, images, texts, labels, valid=None, length=None, cache=True) -> torch.Tensor:
        """The step's loss (with autograd), on already padded ``texts`` and its ``valid`` mask."""
        m = self.model
        with self._autocast(cache):
            img = m.encode_image(images, normalize=True)
            length = texts.shape[1] if length is None else length
            txt = encode_text_to(m, texts, length, normalize=True)
        # Logits in float32 (a [B, C] matmul, negligible): bf16 logits would be quantised
        # to ~0.4% of logit_scale (up to 0.4 of a logit at scale 100).
        logits = m.logit_scale.exp().float() * (img.float() @ txt.float().t())
        if getattr(m, "logit_bias", None) is not None:
            logits = logits + m.logit_bias.float()
        return masked_cross_entropy(logits, labels, valid, self.label_smoothing)

    def _eager(self, images, texts, labels, valid, length, cache=True):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(images, texts, labels, valid, length, cache)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    # -- shapes ------------------------------------------------------------------------------
    def prepare(self, texts: torch.Tensor):
        """``(padded texts, valid mask, text length)`` for a prompt batch."""
        count = bucket_count(texts.shape[0], self.prompt_multiple, self.prompt_buckets)
        length = texts.shape[1] if self.text_multiple is None else \
            bucket_length(texts, self.text_multiple)
        padded, valid = pad_prompts(texts, count)
        return padded, valid, length

    # -- graphs ------------------------------------------------------------------------------
    @property
    def graphs_reason(self) -> Optional[str]:
        """Why CUDA graphs are off (None when they are on)."""
        if not self.cuda_graphs:
            return "cuda_graphs=False"
        if self.device.type != "cuda":
            return "not a CUDA model"
        if self._broken:
            return self._broken
        return policy_graphs_reason(getattr(self.model, "heba_policy", None),
                                    self.model.training)

    @property
    def graphs(self) -> bool:
        return self.graphs_reason is None

    def _state(self):
        # Everything a graph bakes in as host values: optimizer hyperparameters, modes, scales.
        hyper = [{k: v for k, v in g.items() if isinstance(v, (int, float, bool, str))}
                 for g in self.optimizer.param_groups]
        return hyper, self.model.training, repr(getattr(self.model, "heba_policy", None))

    def _capture(self, key, images, texts, labels, valid, length):
        static = [t.clone() for t in (images, texts, labels, valid)]
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        # autocast's weight cache must be off inside a capture (cast-once makes it moot).
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            loss = self.loss(*static[:3], static[3], length, cache=False)
            loss.backward()
            self.optimizer.step()
        _make_room(self._graphs, self.max_graphs)
        self._graphs[key] = (graph, static, loss)

    def _replay(self, key, images, texts, labels, valid):
        graph, static, loss = self._graphs[key]
        for dst, src in zip(static, (images, texts, labels, valid)):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return loss.detach().clone()

    def _graphed(self, key, images, texts, labels, valid, length):
        state = self._state()
        if self._graphs and state != self._snapshot:
            self._graphs.clear()
            self._recaptures += 1
            if self._recaptures > 3:
                self._broken = ("the optimizer's hyperparameters (an LR schedule?) or the model's "
                                "mode keep changing, and a graph bakes them in")
                warnings.warn(f"TrainStep: CUDA graphs off: {self._broken}")
                return self._eager(images, texts, labels, valid, length)
        if key in self._graphs:
            return self._replay(key, images, texts, labels, valid)
        if self._seen.get(key, 0) < self.warmup:
            self._seen[key] = self._seen.get(key, 0) + 1
            return _on_side_stream(lambda: self._eager(images, texts, labels, valid, length))
        try:
            self._capture(key, images, texts, labels, valid, length)
        except Exception as err:  # e.g. an optimizer that is not capturable: run eagerly
            self._broken = f"capture failed ({type(err).__name__}: {str(err)[:200]})"
            warnings.warn(f"TrainStep: CUDA graphs off: {self._broken}")
            self._graphs.clear()
            return self._eager(images, texts, labels, valid, length)
        self._snapshot = state
        return self._replay(key, images, texts, labels, valid)

    # -- public --------------------------------------------------------------------------------
    def __call__(self, images: torch.Tensor, texts: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
        texts, valid, length = self.prepare(texts)
        dev = self.device
        images = images.to(dev, non_blocking=True)
        texts = texts.to(dev, non_blocking=True)
        labels = labels.to(dev, non_blocking=True)
        valid = valid.to(dev, non_blocking=True)
        on_cuda = dev.type == "cuda"
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        if self.graphs:
            key = (tuple(images.shape), tuple(texts.shape), length)
            loss = self._graphed(key, images, texts, labels, valid, length)
        else:
            loss = self._eager(images, texts, labels, valid, length)
        if on_cuda:
            # The caching allocator's counters are host-side: no sync needed.
            self.peak_memory_bytes = torch.cuda.max_memory_allocated(dev)
        return loss


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
    replays what it recorded); use :class:`TrainStep`'s checks or the caller's to
    decide. Inputs are copied into static buffers on each replay. Off the GPU (or
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

class CheckpointedBlock(nn.Module):
    """A transformer block whose activations are recomputed in backward.

    HeBA's slow-fast scales are drawn once per tower forward (the policy's own
    counter-based stream, :class:`heba.clip.wiring.ScalePolicy`); by the time
    backward recomputes this block the tower may have run again and drawn anew
    (``torch.utils.checkpoint`` restores torch's RNG, not ours). So the scale
    objects the policy hands out in forward (0-d device tensors, or floats) are
    recorded and handed out again, in order, in the recomputation: the same
    values, also inside a captured CUDA graph (the recorded tensors live in the
    graph's memory and are rewritten by each replay's draw).
    """

    def __init__(self, block: nn.Module, policy):
        super().__init__()
        self.block = block
        self._policy = policy

    def __getattr__(self, name):
        # open_clip reads e.g. ``resblocks[0].get_weight_dtype()``.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "block":
                raise
            return getattr(self.block, name)

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
