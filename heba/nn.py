"""Drop-in adapter modules. They hold parameters and call :mod:`heba.ops`; no math here.

Parameter names and shapes are those of the published HeBA and AdapterTune
code, so their state dicts load with ``strict=True`` (see docs/semantics.md).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

from heba import ops
from heba.backends import check_backend_name

__all__ = ["HeBAAdapter", "LowRankAdapter"]


class HeBAAdapter(nn.Module):
    """Heterogeneous bottleneck adapter: ``out = x + scale * LayerNorm(x + up(gelu(mid(down(x)))))``.

    ``modality="visual"``: 1x1 conv down (D -> D/reduction), 3x3 depthwise conv
    over the H x W patch grid, GELU, 1x1 conv up; the first
    ``num_prefix_tokens`` tokens (class token, registers) pass through.
    ``modality="text"``: the same bottleneck with linear projections and no
    stencil, on every token.

    Args:
        dim: token width D (divisible by ``reduction``).
        modality: ``"visual"`` or ``"text"``.
        reduction: bottleneck ratio, hidden width ``h = dim // reduction``.
        num_prefix_tokens: visual only; leading tokens that bypass the adapter.
        grid: visual only; ``(H, W)`` of the patch grid, or None for a square grid.
        batch_first: ``x`` is ``[B, N, D]`` if True, ``[N, B, D]`` if False.
        init: ``"kaiming"`` (up-projection kaiming-normal, fan_out, relu) or ``"zero"``.
        rescale_param_grad: parameter gradients as if ``scale`` were 1 (docs/semantics.md).
        eps: LayerNorm epsilon.
        backend: ``"auto" | "reference" | "triton" | "cuda"``.

    Example::

        >>> import torch, heba.nn
        >>> a = heba.nn.HeBAAdapter(768, modality="visual")
        >>> x = torch.randn(2, 1 + 14 * 14, 768)
        >>> a(x, scale=0.025).shape
        torch.Size([2, 197, 768])
    """

    def __init__(self, dim: int, modality: str = "visual", reduction: int = 4,
                 num_prefix_tokens: int = 1, grid: Optional[Sequence[int]] = None,
                 batch_first: bool = True, init: str = "kaiming",
                 rescale_param_grad: bool = True, eps: float = 1e-5, backend: str = "auto"):
        super().__init__()
        if modality not in ("visual", "text"):
            raise ValueError(f"modality must be 'visual' or 'text', got {modality!r}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(reduction, int) or reduction < 1 or dim % reduction:
            raise ValueError(f"dim={dim} must be divisible by reduction={reduction!r}")
        if init not in ("kaiming", "zero"):
            raise ValueError(f"init must be 'kaiming' or 'zero', got {init!r}")
        if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
        if grid is not None:
            if len(grid) != 2 or any(not isinstance(g, int) or g < 1 for g in grid):
                raise ValueError(f"grid must be (H, W) with positive ints, got {grid!r}")
            grid = (int(grid[0]), int(grid[1]))
        check_backend_name(backend)
        hidden = dim // reduction
        self.dim, self.hidden, self.modality = dim, hidden, modality
        self.reduction = reduction
        self.num_prefix_tokens, self.grid = num_prefix_tokens, grid
        self.batch_first, self.rescale_param_grad = batch_first, rescale_param_grad
        self.eps, self.backend, self.init = eps, backend, init
        if modality == "visual":
            self.down = nn.Conv2d(dim, hidden, 1, bias=False)
            self.mid = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
            self.up = nn.Conv2d(hidden, dim, 1, bias=False)
        else:
            self.down = nn.Linear(dim, hidden, bias=False)
            self.up = nn.Linear(hidden, dim, bias=False)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self._init_up()

    def _init_up(self):
        if self.init == "zero":
            nn.init.zeros_(self.up.weight)
        else:  # "active gradient" init of the published HeBA code
            nn.init.kaiming_normal_(self.up.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor, scale: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
        """``x + scale * adapter(x)``; ``scale`` a Python float or a 0-d floating tensor on
        ``x``'s device (read from memory by the kernels: a captured CUDA graph replays with
        the tensor's current value; bitwise the same results as the equal float)."""
        if self.modality == "visual":
            return ops.heba_visual(
                x, self.down.weight, self.mid.weight, self.up.weight, self.norm.weight,
                self.norm.bias, scale, num_prefix_tokens=self.num_prefix_tokens, grid=self.grid,
                batch_first=self.batch_first, eps=self.eps,
                rescale_param_grad=self.rescale_param_grad, backend=self.backend)
        return ops.heba_text(
            x, self.down.weight, self.up.weight, self.norm.weight, self.norm.bias, scale,
            eps=self.eps, rescale_param_grad=self.rescale_param_grad, backend=self.backend)

    def extra_repr(self) -> str:
        s = f"dim={self.dim}, hidden={self.hidden}, modality={self.modality!r}"
        if self.modality == "visual":
            s += f", num_prefix_tokens={self.num_prefix_tokens}, grid={self.grid}"
        return s + f", batch_first={self.batch_first}, backend={self.backend!r}"


class LowRankAdapter(nn.Module):
    """AdapterTune low-rank residual: ``out = x + alpha * up(gelu(down(x)))``.

    Args:
        dim: token width D.
        rank: bottleneck rank r.
        alpha: residual scale.
        init: ``"zero"`` (``up`` zero: the identity at start) or ``"small"``
            (``up`` drawn from N(0, std=1e-4)). ``down.weight`` is Xavier-uniform.
        bias: projections with biases (the published code has them).
        backend: ``"auto" | "reference" | "triton" | "cuda"``.

    Accepts any leading shape ``[..., dim]``.

    Example::

        >>> import torch, heba.nn
        >>> l = heba.nn.LowRankAdapter(768, rank=16)
        >>> l(torch.randn(4, 197, 768)).shape
        torch.Size([4, 197, 768])
    """

    def __init__(self, dim: int, rank: int, alpha: float = 1.0, init: str = "zero",
                 bias: bool = True, backend: str = "auto"):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        if init not in ("zero", "small"):
            raise ValueError(f"init must be 'zero' or 'small', got {init!r}")
        check_backend_name(backend)
        self.dim, self.rank, self.alpha = dim, rank, float(alpha)
        self.init, self.backend = init, backend
        self.down = nn.Linear(dim, rank, bias=bias)
        self.up = nn.Linear(rank, dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.xavier_uniform_(self.down.weight)
        if self.down.bias is not None:
            nn.init.zeros_(self.down.bias)
        if self.init == "zero":
            nn.init.zeros_(self.up.weight)
            if self.up.bias is not None:
                nn.init.zeros_(self.up.bias)
        else:
            nn.init.normal_(self.up.weight, std=1e-4)
            if self.up.bias is not None:
                nn.init.normal_(self.up.bias, std=1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.low_rank(x, self.down.weight, self.down.bias, self.up.weight, self.up.bias,
                            self.alpha, backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rank={self.rank}, alpha={self.alpha}, backend={self.backend!r}"
