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

With a frozen text tower (AdapterTune adapts the image tower only) every
prompt's feature is computed once; the step then selects them with masks on the
device (``[B, C]`` logits, non-candidates at ``-inf``), so it has static shapes
and no host sync and can be a CUDA graph. The masked loss equals the loss over
the gathered candidates (tested).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from heba.clip.fast import masked_cross_entropy
from heba.clip.wiring import encode_text
from heba.train.prompts import PromptBank


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

    ``forward(images [B,3,H,W], labels [B], mask [C] bool, generator)`` returns
    ``(loss, accuracy over the candidates)``. The frozen CLIP is held by
    reference.
    """

    def __init__(self, model, bank: PromptBank, label_smoothing: float = 0.1):
        super().__init__()
        self.adapters = model.heba_adapters
        self._model = (model,)
        self.bank, self.label_smoothing = bank, label_smoothing
        self.text_adapted = any(n.startswith(("text_adapter", "text_blocks"))
                                for n, _ in self.adapters.named_parameters())
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
        """``([B, K] logits, [C] -> K index)`` for the candidates (adapted text tower)."""
        img = F.normalize(self.model.encode_image(images).float(), dim=-1)        # [B, E]
        classes = mask.nonzero().squeeze(1)                                       # [K] sorted
        tokens = self.bank.tokens[classes, pick[classes]]                          # [K, L]
        txt = F.normalize(encode_text(self.model, tokens).float(), dim=-1)        # [K, E]
        where = torch.cumsum(mask.long(), 0) - 1                                  # [C]
        return self.model.logit_scale.exp().float() * img @ txt.T, where

    def forward(self, images, labels, mask, pick):
        """``pick [C]``: the prompt slot of each class this step."""
        if self.text_adapted:
            logits, where = self.logits(images, mask, pick)
            target = where[labels]
            loss = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
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
