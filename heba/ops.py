"""Public functional API: validate, handle autocast, dispatch to a backend.

Every check runs here, before any backend is called, so every backend sees
the same validated arguments and bad input fails the same way everywhere.
The math lives in :mod:`heba_kernels.reference` (see its docstring).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from heba.backends import ROUNDS_IN_KERNEL, resolve
from heba_kernels.runtime import Scale

__all__ = ["heba_visual", "heba_text", "low_rank", "resolve_grid"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_x(x, dim, name="x"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, float16, bfloat16 or "
                        f"float64), got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != dim:
        raise ValueError(f"{name} must have last dimension dim={dim}, got shape {tuple(x.shape)}")


def _autocast_on(device: torch.device) -> bool:
    """Whether autocast is on for ``device`` (devices autocast does not know, such as
    ``meta``, have none)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return False


def _check_params(x, params: dict):
    """Weights on x's device; same dtype as x unless autocast is on for that device."""
    for pname, p in params.items():
        if p is not None and p.device != x.device:
            raise ValueError(f"{pname} is on {p.device} but x is on {x.device}; "
                             f"move the adapter with .to(x.device)")
    autocast = _autocast_on(x.device)
    for pname, p in params.items():
        if p is None:
            continue
        if p.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{pname} must be floating, got {p.dtype}")
        if not autocast and p.dtype != x.dtype:
            raise TypeError(f"{pname} has dtype {p.dtype} but x has dtype {x.dtype}; cast the "
                            f"adapter with .to({x.dtype}) or run under torch.autocast")


def _check_scale(scale, x, name="scale") -> Scale:
    """The one check and normalisation of ``scale``: a Python float, or a 0-d floating
    tensor on x's device, returned as the :class:`~heba_kernels.runtime.Scale` the
    kernels take (a tensor detached, as a contiguous float32 0-d tensor: the kernels read
    it from memory, so a captured CUDA graph replays with whatever value it holds then).
    No gradient flows to ``scale``."""
    if isinstance(scale, torch.Tensor):
        if not scale.dtype.is_floating_point:
            raise TypeError(f"{name} must be a Python float or a 0-d floating tensor, "
                            f"got a tensor of dtype {scale.dtype}")
        if scale.dim() != 0:
            raise ValueError(f"{name} must be a Python float or a 0-d tensor, got a tensor "
                             f"of shape {tuple(scale.shape)}")
        if scale.device != x.device:
            raise ValueError(f"{name} is a tensor on {scale.device} but x is on {x.device}; "
                             f"put it on x's device")
        return Scale(0.0, scale.detach().to(torch.float32).contiguous())
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name} must be a Python float or a 0-d floating tensor, "
                        f"got {type(scale).__name__}")
    if torch.compiler.is_compiling():
        # Under torch.compile a float that changes between calls (e.g. the slow-fast
        # scale) becomes symbolic after the first recompile; checking it here would break
        # the graph. The eager call before compilation has checked it already.
        return Scale(scale, None)
    if not math.isfinite(scale):
        raise ValueError(f"{name} must be finite, got {scale}")
    return Scale(float(scale), None)


def _check_alpha(alpha):
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a Python float, got {type(alpha).__name__}")
    if torch.compiler.is_compiling():
        return alpha    # symbolic after a recompile, as a changing scale (see _check_scale)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    return float(alpha)


def resolve_grid(n_tokens: int, num_prefix_tokens: int,
                 grid: Optional[Sequence[int]]) -> tuple[int, int]:
    """The ``(H, W)`` patch grid for ``n_tokens`` tokens of which the first are prefix."""
    n_grid = n_tokens - num_prefix_tokens
    if n_grid <= 0:
        raise ValueError(f"x has {n_tokens} tokens but num_prefix_tokens={num_prefix_tokens}: "
                         f"no patch tokens are left for the grid")
    if grid is not None:
        if len(grid) != 2 or any(isinstance(g, bool) or not isinstance(g, int) or g < 1
                                 for g in grid):
            raise ValueError(f"grid must be (H, W) with positive ints, got {grid!r}")
        H, W = grid
        if H * W != n_grid:
            raise ValueError(f"x has {n_tokens} tokens, expected num_prefix_tokens + H*W = "
                             f"{num_prefix_tokens} + {H}*{W} = {num_prefix_tokens + H * W} "
                             f"for grid={tuple(grid)}")
        return int(H), int(W)
    side = math.isqrt(n_grid)
    if side * side != n_grid:
        raise ValueError(f"x has {n_tokens} tokens: {n_grid} patch tokens after "
                         f"num_prefix_tokens={num_prefix_tokens} is not a perfect square; "
                         f"pass grid=(H, W) for a non-square patch grid")
    return side, side


def _autocast_params(x, params):
    """Under autocast, cast the weights to the autocast dtype (for the fused backends that
    do not round them in their kernels, see ``heba.backends.ROUNDS_IN_KERNEL``)."""
    dtype = torch.get_autocast_dtype(x.device.type)
    return [None if p is None else p.to(dtype) for p in params]


def _call(op, backend, x, params, **kwargs):
    name, fn = resolve(op, backend, x.device)
    if name == "reference" and "scale" in kwargs:
        kwargs["scale"] = kwargs["scale"].joined()   # the reference takes a float or a tensor
    if name != "reference" and _autocast_on(x.device):
        # Fused kernels see autocast as a dtype choice: low-precision weights,
        # float32 accumulation, x's dtype out. The reference runs under
        # autocast as PyTorch does, since it defines what autocast means here.
        if name in ROUNDS_IN_KERNEL:   # the kernels round the weights: no cast launches
            kwargs["op_dtype"] = torch.get_autocast_dtype(x.device.type)
        else:
            params = _autocast_params(x, params)
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, *params, **kwargs)
    return fn(x, *params, **kwargs)


def heba_visual(x: torch.Tensor, down_weight: torch.Tensor, mid_weight: torch.Tensor,
                up_weight: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                scale: Union[float, torch.Tensor] = 1.0, *, num_prefix_tokens: int = 1,
                grid: Optional[Sequence[int]] = None, batch_first: bool = True,
                eps: float = 1e-5, rescale_param_grad: bool = True,
                backend: str = "auto") -> torch.Tensor:
    """HeBA visual adapter: ``t + scale * LayerNorm(t + up(gelu(dwconv3x3(down(t)))))``.

    Args:
        x: tokens ``[B, N, D]`` (``[N, B, D]`` if ``batch_first=False``); the first
            ``num_prefix_tokens`` pass through, the rest are a row-major H x W grid.
        down_weight: ``[h, D, 1, 1]``; mid_weight: ``[h, 1, 3, 3]``; up_weight: ``[D, h, 1, 1]``.
        norm_weight, norm_bias: ``[D]`` LayerNorm affine parameters.
        scale: the outer residual's scale: a Python float, or a 0-d floating tensor on
            ``x``'s device (read by the kernels from memory, so a captured CUDA graph
            replays with its current value; bitwise the same results as the float).
        grid: ``(H, W)``; if None, ``H = W = sqrt(N - num_prefix_tokens)``.
        backend: ``"auto" | "reference" | "triton" | "cuda"``.

    Returns ``[B, N, D]`` (or ``[N, B, D]``) in ``x``'s dtype.

    Example::

        >>> import torch, heba.nn
        >>> a = heba.nn.HeBAAdapter(64, modality="visual")
        >>> a(torch.randn(2, 1 + 7 * 7, 64), scale=0.025).shape
        torch.Size([2, 50, 64])
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    h = mid_weight.shape[0]
    dim = down_weight.shape[1]
    _check_x(x, dim)
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D tokens [B, N, {dim}] (batch_first) or [N, B, {dim}], "
                         f"got shape {tuple(x.shape)}")
    if tuple(down_weight.shape) != (h, dim, 1, 1) or tuple(mid_weight.shape) != (h, 1, 3, 3) \
            or tuple(up_weight.shape) != (dim, h, 1, 1):
        raise ValueError(f"visual weights must be down [h, D, 1, 1], mid [h, 1, 3, 3], "
                         f"up [D, h, 1, 1]; got {tuple(down_weight.shape)}, "
                         f"{tuple(mid_weight.shape)}, {tuple(up_weight.shape)}")
    _check_norm(norm_weight, norm_bias, dim)
    params = dict(down_weight=down_weight, mid_weight=mid_weight, up_weight=up_weight,
                  norm_weight=norm_weight, norm_bias=norm_bias)
    _check_params(x, params)
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) \
            or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
    n_tokens = x.shape[1] if batch_first else x.shape[0]
    H, W = resolve_grid(n_tokens, num_prefix_tokens, grid)
    return _call("heba_visual", backend, x, list(params.values()),
                 scale=_check_scale(scale, x), num_prefix_tokens=num_prefix_tokens, grid=(H, W),
                 batch_first=bool(batch_first), eps=float(eps),
                 rescale_param_grad=bool(rescale_param_grad))


def heba_text(x: torch.Tensor, down_weight: torch.Tensor, up_weight: torch.Tensor,
              norm_weight: torch.Tensor, norm_bias: torch.Tensor,
              scale: Union[float, torch.Tensor] = 1.0, *,
              eps: float = 1e-5, rescale_param_grad: bool = True,
              backend: str = "auto") -> torch.Tensor:
    """HeBA text adapter, token-wise: ``x + scale * LayerNorm(x + up(gelu(down(x))))``.

    Args:
        x: ``[..., D]`` tokens (``[B, N, D]`` or ``[N, B, D]``: the op is token-wise).
        down_weight: ``[h, D]``; up_weight: ``[D, h]``; norm_weight, norm_bias: ``[D]``.
        scale: a Python float or a 0-d floating tensor on ``x``'s device (as in
            :func:`heba_visual`).

    Example::

        >>> import torch, heba.nn
        >>> a = heba.nn.HeBAAdapter(64, modality="text")
        >>> a(torch.randn(2, 77, 64), scale=0.025).shape
        torch.Size([2, 77, 64])
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    h, dim = down_weight.shape
    _check_x(x, dim)
    if x.dim() < 2:
        raise ValueError(f"x must be tokens [..., {dim}] with at least 2 dimensions, "
                         f"got shape {tuple(x.shape)}")
    if tuple(up_weight.shape) != (dim, h):
        raise ValueError(f"up_weight must be [{dim}, {h}], got {tuple(up_weight.shape)}")
    _check_norm(norm_weight, norm_bias, dim)
    params = dict(down_weight=down_weight, up_weight=up_weight, norm_weight=norm_weight,
                  norm_bias=norm_bias)
    _check_params(x, params)
    return _call("heba_text", backend, x, list(params.values()),
                 scale=_check_scale(scale, x), eps=float(eps),
                 rescale_param_grad=bool(rescale_param_grad))


def low_rank(x: torch.Tensor, down_weight: torch.Tensor, down_bias: Optional[torch.Tensor],
             up_weight: torch.Tensor, up_bias: Optional[torch.Tensor], alpha: float = 1.0, *,
             backend: str = "auto") -> torch.Tensor:
    """AdapterTune low-rank residual: ``x + alpha * (up(gelu(down(x))))``.

    Args:
        x: ``[..., D]``. down_weight: ``[r, D]``, down_bias: ``[r]`` or None,
        up_weight: ``[D, r]``, up_bias: ``[D]`` or None. alpha: a Python float.

    Example::

        >>> import torch, heba.nn
        >>> l = heba.nn.LowRankAdapter(64, rank=8)
        >>> x = torch.randn(2, 10, 64)
        >>> torch.equal(l(x), x)   # zero-initialised up: the identity at start
        True
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    r, dim = down_weight.shape
    _check_x(x, dim)
    if tuple(up_weight.shape) != (dim, r):
        raise ValueError(f"up_weight must be [{dim}, {r}], got {tuple(up_weight.shape)}")
    if down_bias is not None and tuple(down_bias.shape) != (r,):
        raise ValueError(f"down_bias must be [{r}], got {tuple(down_bias.shape)}")
    if up_bias is not None and tuple(up_bias.shape) != (dim,):
        raise ValueError(f"up_bias must be [{dim}], got {tuple(up_bias.shape)}")
    params = dict(down_weight=down_weight, down_bias=down_bias, up_weight=up_weight,
                  up_bias=up_bias)
    _check_params(x, params)
    return _call("low_rank", backend, x, list(params.values()),
                 alpha=_check_alpha(alpha))


def _check_norm(norm_weight, norm_bias, dim):
    for name, p in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if tuple(p.shape) != (dim,):
            raise ValueError(f"{name} must be [{dim}], got {tuple(p.shape)}")
