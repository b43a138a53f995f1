"""One training step's forward: candidate classes, one prompt each, cosine logits, the loss.

The published step (VLM-HeBA ``trainers/heba.py``, ``CustomCLIP.forward`` in training):

1. **Candidates.** When the data set has more classes than the batch has
   images, the candidate set is the batch's unique classes plus
   ``min(#other classes, neg_per_class * #unique)`` other classes drawn
   uniformly without replacement; otherwise every class. Labels are renumbered
   into the candidate set. (``candidates="all"``: every class, always.)
2. **Prompts.** One prompt per candidate class, drawn uniformly from its
   (padded) prompts (:class:`heba.train.prompts.PromptBank`).
3. **Logits.** ``logit_scale.exp() * normalize(image) @ normalize(text).T``
   over the candidates, ``[B, K]``.
4. **Loss.** Cross-entropy with label smoothing 0.1 over the candidates (the
   published ``LabelSmoothingCrossEntropy`` is
   ``eps / K * sum(-log p) + (1 - eps) * nll``, which is
   ``F.cross_entropy(label_smoothing=eps)``; tested).

Static shapes, no host sync (so that a step is one CUDA graph per batch shape):

* **Adapted text tower (HeBA).** The candidates go into ``K`` fixed slots,
  ``K = min(C, B * (1 + neg_per_class))`` (:func:`candidate_count`), the most the
  published set can hold for a batch of ``B``: every class when ``K = C`` (most
  base-class sets at batch 16: no gather at all, the non-candidates masked),
  else the candidates in ascending class order, then non-candidate classes as
  padding (:func:`candidate_slots`, a cumulative sum, no sort, no ``nonzero``).
  Padded slots are masked to ``-inf`` before the loss
  (:func:`masked_cross_entropy`, label smoothing over the valid
  slots), so the loss and every gradient equal the published ones over the
  gathered candidates (tested). The text tower runs the bank's longest prompt,
  rounded up to 8 tokens, a length fixed at construction.
* **Frozen text tower (AdapterTune adapts the image tower only).** Every
  prompt's feature is computed once; the step selects them with masks on the
  device (``[B, C]`` logits, non-candidates at ``-inf``).

The per-class prompt (``pick``) and the candidate draw (:func:`draw_step`) run
on the device from a ``torch.Generator`` there, outside the graph.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from heba.clip.wiring import encode_text
from heba.train.prompts import PromptBank


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


def candidate_count(n_classes: int, batch: int, neg_per_class: int, mode: str = "batch") -> int:
    """``K``: the static number of candidate slots for a batch of ``batch`` images (host ints).

    The published set holds ``u + min(C - u, neg * u) = min(C, (1 + neg) u)`` classes for
    ``u <= batch`` unique labels, and every class when ``C <= batch`` or ``mode="all"``.

    Example::

        >>> candidate_count(50, 16, 5), candidate_count(500, 16, 5), candidate_count(10, 16, 5)
        (50, 96, 10)
    """
    if mode == "all" or n_classes <= batch:
        return n_classes
    return min(n_classes, batch * (1 + neg_per_class))


def candidate_slots(mask: torch.Tensor, k: int):
    """``(classes [K] long, valid [K] bool, slot [C] long)``: the candidates of ``mask [C]`` in
    ``K`` static slots, and each class's slot.

    ``k == C``: the identity (``classes = slot = arange(C)``, ``valid = mask``). Otherwise
    the candidates fill the first ``mask.sum()`` slots in ascending class order (the
    order of the published ``torch.unique`` / ``nonzero``), non-candidates the rest
    (``valid`` False). Device-side, no host sync. ``k`` must be >= ``mask.sum()``
    (:func:`candidate_count` guarantees it; not checked, which would sync).

    Example::

        >>> mask = torch.tensor([0, 1, 0, 1, 1], dtype=torch.bool)
        >>> classes, valid, slot = candidate_slots(mask, 4)
        >>> classes.tolist(), valid.tolist(), slot[[1, 3, 4]].tolist()
        ([1, 3, 4, 0], [True, True, True, False], [0, 1, 2])
    """
    n = mask.shape[0]
    ar = torch.arange(n, device=mask.device)
    if k == n:
        return ar, mask, ar
    m = mask.long()
    pos = torch.cumsum(m, 0) - 1                                  # rank among candidates
    neg = torch.cumsum(1 - m, 0) - 1 + m.sum()                    # after every candidate
    slot = torch.where(mask, pos, neg)                            # [C], a permutation
    classes = torch.empty_like(slot).scatter_(0, slot, ar)        # slot -> class
    valid = torch.arange(k, device=mask.device) < m.sum()
    return classes[:k], valid, slot


def text_length(tokens: torch.Tensor, multiple: int = 8) -> int:
    """Tokens the text tower must run for every prompt of ``tokens [..., L]``: the last
    end-of-text position + 1, rounded up to ``multiple``, at most ``L``. Read once (a host
    sync), so that every step runs the same length."""
    n = int(tokens.argmax(dim=-1).max()) + 1
    return min(tokens.shape[-1], -(-n // multiple) * multiple)


def candidate_mask(labels: torch.Tensor, n_classes: int, neg_per_class: int,
                   generator: Optional[torch.Generator] = None,
                   mode: str = "batch") -> torch.Tensor:
    """``[C]`` bool: the published candidate set of a batch (module docstring, step 1).

    Device-side only (no host sync). ``mode="all"`` or ``n_classes <= len(labels)``:
    every class.

    Example::

        >>> m = candidate_mask(torch.tensor([3, 3, 7]), 100, 5)
        >>> bool(m[3] and m[7]), int(m.sum())
        (True, 12)
    """
    if mode == "all" or n_classes <= labels.shape[0]:
        return torch.ones(n_classes, dtype=torch.bool, device=labels.device)
    pos = torch.zeros(n_classes, dtype=torch.bool, device=labels.device)
    pos[labels] = True
    n_neg = torch.clamp(pos.sum() * neg_per_class, max=n_classes - pos.sum())
    key = torch.rand(n_classes, device=labels.device, generator=generator)
    key = key.masked_fill(pos, 2.0)                      # positives sort last
    rank = torch.empty(n_classes, dtype=torch.long, device=labels.device)
    rank[key.argsort()] = torch.arange(n_classes, device=labels.device)
    return pos | (rank < n_neg)


class AdapterStep(nn.Module):
    """The module DistributedDataParallel wraps: it registers the adapters only.

    ``forward(images [B,3,H,W], labels [B], mask [C] bool, pick [C])`` returns
    ``(loss, accuracy over the candidates)``, with static shapes and no host sync
    (module docstring). The frozen CLIP is held by reference.

    Args:
        model, bank: the adapted CLIP and the training classes' prompts.
        label_smoothing: over the candidates (0.1 published).
        neg_per_class, candidates: as given to :func:`draw_step`; they size the
            static candidate slots (:func:`candidate_count`).
    """

    def __init__(self, model, bank: PromptBank, label_smoothing: float = 0.1,
                 neg_per_class: int = 5, candidates: str = "batch"):
        super().__init__()
        self.adapters = model.heba_adapters
        self._model = (model,)
        self.bank, self.label_smoothing = bank, label_smoothing
        self.neg_per_class, self.candidates = neg_per_class, candidates
        self.text_adapted = any(n.startswith(("text_adapter", "text_blocks"))
                                for n, _ in self.adapters.named_parameters())
        self.text_len = text_length(bank.tokens)
        self._frozen = None

    @property
    def model(self):
        return self._model[0]

    def frozen_features(self) -> torch.Tensor:
        """``[C, T, E]``: every prompt's feature, once (text tower not adapted)."""
        if self._frozen is None:
            with torch.no_grad():
                self._frozen = self.bank.encode_all(self.model)
        return self._frozen

    def logits(self, images, mask, pick):
        """``([B, K] logits, [K] valid slots, [C] -> slot)`` over the static candidate slots
        (adapted text tower); invalid slots are not masked yet."""
        img = F.normalize(self.model.encode_image(images).float(), dim=-1)        # [B, E]
        k = candidate_count(self.bank.n_classes, images.shape[0], self.neg_per_class,
                            self.candidates)
        classes, valid, slot = candidate_slots(mask, k)                           # [K], [K], [C]
        tokens = self.bank.tokens[classes, pick[classes]]                          # [K, L]
        txt = encode_text(self.model, tokens, length=self.text_len)
        txt = F.normalize(txt.float(), dim=-1)                                    # [K, E]
        return self.model.logit_scale.exp().float() * img @ txt.T, valid, slot

    def forward(self, images, labels, mask, pick):
        """``pick [C]``: the prompt slot of each class this step."""
        if self.text_adapted:
            logits, valid, slot = self.logits(images, mask, pick)
            target = slot[labels]
            loss = masked_cross_entropy(logits, target, valid, self.label_smoothing)
            logits = logits.masked_fill(~valid, float("-inf"))
        else:
            img = F.normalize(self.model.encode_image(images).float(), dim=-1)
            feats = self.frozen_features()
            txt = feats[torch.arange(feats.shape[0], device=feats.device), pick]      # [C, E]
            logits = self.model.logit_scale.exp().float() * img @ txt.T             # [B, C]
            loss = masked_cross_entropy(logits, labels, mask, self.label_smoothing)
            logits, target = logits.masked_fill(~mask, float("-inf")), labels
        return loss, (logits.argmax(1) == target).float().mean()


def draw_step(labels: torch.Tensor, bank: PromptBank, neg_per_class: int, mode: str,
              generator: Optional[torch.Generator]):
    """``(mask [C], pick [C])``: this step's candidates and each class's prompt slot."""
    mask = candidate_mask(labels, bank.n_classes, neg_per_class, generator, mode)
    pick = torch.randint(0, bank.n_prompts, (bank.n_classes,), device=labels.device,
                         generator=generator)
    return mask, pick
