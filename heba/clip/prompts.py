"""Text classifiers: class prompts from templates or per-class descriptions, as one token bank.

The bank holds every prompt of every class as one token tensor ``[P, L]`` and
the class each prompt belongs to (``owner [P]``); a class's embedding is the
normalised mean of its prompts' normalised embeddings. Building the
embeddings of any subset of classes is a handful of tensor ops (a mask, one
text-tower call, one ``index_add_``), with no Python loop over classes.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from heba.clip.data import UsageError
from heba.clip.wiring import encode_text

# A small ensemble in the spirit of CLIP's ImageNet templates.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a drawing of a {}.",
    "this is a {}.",
)


def load_descriptions(path: str, classes: Sequence[str]) -> dict:
    """``{class: [prompt, ...]}`` from a JSON file ``{class: "text" | ["text", ...]}``.

    Keys are matched to class names as given or with ``_`` for spaces; every
    class needs at least one description, and unknown keys are an error (a
    misspelt class would otherwise be silently dropped).
    """
    if not os.path.isfile(path):
        raise UsageError(f"descriptions file {path} does not exist")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as err:
        raise UsageError(f"descriptions file {path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"descriptions file {path} must hold an object {{class: [texts]}}")
    norm = {k.replace("_", " ").strip().lower(): v for k, v in raw.items()}
    wanted = {c.lower() for c in classes}
    unknown = sorted(k for k in norm if k not in wanted)
    missing = [c for c in classes if c.lower() not in norm]
    if missing:
        raise UsageError(f"descriptions file {path} has no entry for {len(missing)} class(es): "
                         f"{', '.join(missing[:5])}")
    if unknown:
        raise UsageError(f"descriptions file {path} names unknown class(es): "
                         f"{', '.join(unknown[:5])}")
    out = {}
    for c in classes:
        v = norm[c.lower()]
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not v or not all(isinstance(t, str) and t for t in v):
            raise UsageError(f"descriptions file {path}: the entry for {c!r} must be a "
                             f"non-empty string or list of strings")
        out[c] = v
    return out


def class_prompts(classes: Sequence[str], templates: Optional[Sequence[str]] = None,
                  descriptions: Optional[dict] = None) -> list:
    """``[(prompt, class index), ...]`` from templates (``{}`` = the class name) or descriptions."""
    if descriptions is not None:
        return [(t, i) for i, c in enumerate(classes) for t in descriptions[c]]
    templates = templates or DEFAULT_TEMPLATES
    for t in templates:
        if "{}" not in t:
            raise UsageError(f"template {t!r} has no '{{}}' for the class name")
    return [(t.format(c), i) for i, c in enumerate(classes) for t in templates]


class TextBank:
    """Tokenized prompts of ``n_classes`` classes, and their class embeddings on demand."""

    def __init__(self, prompts: list, tokenizer, n_classes: int, device=None):
        self.prompts = [p for p, _ in prompts]
        self.tokens = tokenizer(self.prompts).to(device)                     # [P, L]
        self.owner = torch.tensor([i for _, i in prompts], device=device)    # [P]
        self.n_classes = n_classes
        self.counts = torch.bincount(self.owner, minlength=n_classes).float()  # [C]

    def to(self, device):
        self.tokens, self.owner, self.counts = (t.to(device) for t in
                                                (self.tokens, self.owner, self.counts))
        return self

    def features(self, model, classes: Optional[torch.Tensor] = None,
                 chunk: int = 1024) -> torch.Tensor:
        """Normalised class embeddings ``[C, E]`` (or ``[len(classes), E]`` for sorted ``classes``)."""
        tokens, owner, counts = self.tokens, self.owner, self.counts
        if classes is not None:
            keep = torch.isin(owner, classes)
            tokens, owner = tokens[keep], torch.searchsorted(classes, owner[keep])
            counts = counts[classes]
        emb = torch.cat([F.normalize(encode_text(model, tokens[i:i + chunk]).float(), dim=-1)
                         for i in range(0, len(tokens), chunk)])             # [P', E]
        out = torch.zeros(len(counts), emb.shape[1], device=emb.device, dtype=emb.dtype)
        out.index_add_(0, owner, emb)
        return F.normalize(out / counts[:, None], dim=-1)
