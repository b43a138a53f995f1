"""Optimizers and learning-rate schedules of the recipes (HeBA's SGD, AdapterTune's AdamW).

* ``sgd``: Dassl's SGD (momentum, weight decay, no dampening / Nesterov), the HeBA recipe.
* ``adamw``: ``torch.optim.AdamW(lr, weight_decay)`` with torch's betas and eps, as the
  published AdapterTune ``src/train/optim.py`` builds it.

The per-step cosine (``schedule="step"``) with ``warmup_epochs`` is the published
AdapterTune ``src/train/sched.py`` rule, a ``LambdaLR`` factor of step ``s``
(``W = warmup_epochs * steps_per_epoch``, ``T = epochs * steps_per_epoch``)::

    s < W:  (s + 1) / W
    else:   0.5 * (1 + cos(pi * (s - W) / (T - W)))

(``W = 0``: the plain per-step cosine, clamped at ``s = T``.)

Example::

    >>> f = cosine_factor(epochs=10, steps_per_epoch=2, warmup_epochs=1)
    >>> [round(f(s), 3) for s in (0, 1, 2, 20)]
    [0.5, 1.0, 1.0, 0.0]
"""

from __future__ import annotations

import math

import torch


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names over ``params`` (module docstring)."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    params = list(params)
    # Fused on a GPU (the same update): GradScaler then unscales and skips inside the
    # optimizer, with no host read of found_inf (a sync per step otherwise), so the fp16
    # HeBA recipe has no host sync in a step and its forward + backward can be a graph.
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, fused=fused or None)


def cosine_factor(epochs: int, steps_per_epoch: int, warmup_epochs: int = 0):
    """The ``LambdaLR`` factor of the per-step cosine with linear warm-up (module docstring)."""
    total = max(1, epochs * steps_per_epoch)
    warm = warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warm:
            return float(step + 1) / float(max(1, warm))
        progress = (min(step, total) - warm) / float(max(1, total - warm))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def step_schedule(opt, cfg, steps_per_epoch: int):
    """``LambdaLR`` over ``cfg.epochs`` epochs of ``steps_per_epoch`` steps, stepped per step."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, cosine_factor(cfg.epochs, steps_per_epoch, cfg.warmup_epochs))


def clip_gradients(params, max_norm: float, scaler=None, opt=None) -> None:
    """``clip_grad_norm_(params, max_norm)`` (0: nothing); unscales a GradScaler's grads first.

    No host synchronisation (the total norm stays on the device)."""
    if not max_norm:
        return
    if scaler is not None and scaler.is_enabled():
        scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, max_norm)
