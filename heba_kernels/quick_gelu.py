"""QuickGELU, ``x * sigmoid(1.702 x)``, fused: one launch forward, one backward.

The activation of OpenAI's CLIP weights (open_clip's ``QuickGELU``, built whenever the
``openai`` weights are loaded), between the two projections of every MLP of both towers.
Eager PyTorch runs it as three elementwise launches forward (``1.702 * x``, ``sigmoid``,
the product) and five backward, each reading and writing the whole ``[tokens, 4 D]``
hidden tensor; here the forward reads ``x`` and writes ``y``, and the backward reads
``x`` and the gradient and writes ``dx``, both computing in float32::

    s  = sigmoid(1.702 x)
    y  = x s
    dx = g (s + 1.702 x s (1 - s))

Only ``x`` is saved for the backward (``s`` is recomputed). The reference is open_clip's
formula, :func:`heba_kernels.reference.quick_gelu`; in 16-bit this rounds once where
eager PyTorch rounds after each of its three ops. heba-train runs the frozen backbone's
QuickGELU modules through it (:func:`heba.train.graph.prepare_frozen`).

Example (Triton's interpreter on a CPU, ``TRITON_INTERPRET=1``, or a CUDA tensor)::

    >>> import torch
    >>> from heba_kernels.quick_gelu import quick_gelu
    >>> x = torch.randn(2, 5, 64)
    >>> torch.allclose(quick_gelu(x), x * torch.sigmoid(1.702 * x), atol=1e-6)
    True
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from heba_kernels._triton_common import device_guard
from heba_kernels.runtime import launch, new_buffer

__all__ = ["quick_gelu", "quick_gelu_plan", "QUICK_GELU_BLOCK", "INTERPRETER_BLOCK"]

QUICK_GELU_BLOCK = 1024     # elements per program on a GPU (4 warps, 8 per thread)
# In Triton's CPU interpreter a program costs Python time, not a thread's: far fewer of them
# (a text tower's MLP activation is 3M elements at the published 50 classes).
INTERPRETER_BLOCK = 1 << 16
_K = 1.702
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _quick_gelu_fwd_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(1.702 * x)
    tl.store(y_ptr + offs, (x * s).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quick_gelu_bwd_kernel(g_ptr, x_ptr, dx_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(1.702 * x)
    dx = g * (s + 1.702 * x * s * (1.0 - s))
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def quick_gelu_plan(n: int, device: torch.device) -> tuple[tuple[int], int]:
    """``(grid, BLOCK)`` of both launches over ``n`` elements on ``device``."""
    block = INTERPRETER_BLOCK if device.type == "cpu" else QUICK_GELU_BLOCK
    return (triton.cdiv(n, block),), block


@torch.library.custom_op("heba::triton_quick_gelu_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor) -> torch.Tensor:
    y = new_buffer(x.shape, x.dtype, x.device)
    if x.numel():
        grid, block = quick_gelu_plan(x.numel(), x.device)
        with device_guard(x):
            launch(_quick_gelu_fwd_kernel, grid, x, y, x.numel(), BLOCK=block, num_warps=4)
    return y


@_fwd_op.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("heba::triton_quick_gelu_bwd", mutates_args=())
def _bwd_op(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    dx = new_buffer(x.shape, x.dtype, x.device)
    if x.numel():
        grid, block = quick_gelu_plan(x.numel(), x.device)
        with device_guard(x):
            launch(_quick_gelu_bwd_kernel, grid, g, x, dx, x.numel(), BLOCK=block, num_warps=4)
    return dx


@_bwd_op.register_fake
def _(g, x):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, g):
    x, = ctx.saved_tensors
    return torch.ops.heba.triton_quick_gelu_bwd(g.contiguous(), x)


torch.library.register_autograd("heba::triton_quick_gelu_fwd", _backward,
                                setup_context=_setup_context)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 x)`` in ``x``'s dtype (float32, float16 or bfloat16), computed
    in float32; differentiable. ``x`` on a CUDA device, or on the CPU in Triton's
    interpreter; any layout (a non-contiguous ``x`` is copied first)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"quick_gelu: x must be a float32, float16 or bfloat16 tensor, "
                        f"got {got}")
    return torch.ops.heba.triton_quick_gelu_fwd(x.contiguous())
