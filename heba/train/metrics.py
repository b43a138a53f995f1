"""The numbers a run reports: harmonic mean, top-k hits, and their one-line form.

Example::

    >>> format_acc({"base": 80.0, "novel": 60.0, "hm": harmonic_mean(80.0, 60.0)})
    'base  80.0%  novel  60.0%  HM  68.6%'
"""

from __future__ import annotations

import torch


def harmonic_mean(a: float, b: float) -> float:
    """>>> harmonic_mean(80.0, 60.0)
    68.57142857142857
    """
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def format_acc(acc: dict) -> str:
    """``{split: accuracy %}`` on one line (``base``, ``novel``, ``HM``, ``accuracy``, ...)."""
    names = {"base": "base", "novel": "novel", "hm": "HM", "all": "accuracy"}
    return "  ".join(f"{names.get(k, k)} {v:5.1f}%" for k, v in acc.items())


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks) -> torch.Tensor:
    """``[len(ks)]`` float: how many rows of ``logits [B, C]`` have ``labels [B]`` in their top k.

    >>> topk_correct(torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3]]), torch.tensor([0, 2]),
    ...              (1, 2)).tolist()
    [0.0, 2.0]
    """
    top = logits.topk(max(ks), dim=1).indices                   # [B, kmax], sorted
    hit = top.eq(labels[:, None])
    return torch.stack([hit[:, :k].any(1).sum() for k in ks]).float()


def topk_acc(metrics: dict) -> dict:
    """``{"top-1": .., "top-5": ..}`` of an evaluation record (for :func:`format_acc`).

    >>> topk_acc({"loss": 0.5, "top1": 90.0, "top5": 99.0})
    {'top-1': 90.0, 'top-5': 99.0}
    """
    return {f"top-{k[3:]}": v for k, v in metrics.items() if k.startswith("top")}
