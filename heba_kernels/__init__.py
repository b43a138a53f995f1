"""Kernels behind ``heba``: the pure-PyTorch reference and the fused backends.

Each backend module exposes the same three functions, with the same
signatures as :mod:`heba_kernels.reference`:

* ``heba_visual(x, down_weight, mid_weight, up_weight, norm_weight, norm_bias, *,
  scale, num_prefix_tokens, grid, batch_first, eps, rescale_param_grad)``
* ``heba_text(x, down_weight, up_weight, norm_weight, norm_bias, *, scale, eps,
  rescale_param_grad)``
* ``low_rank(x, down_weight, down_bias, up_weight, up_bias, *, alpha)``

They receive arguments already validated by :mod:`heba.ops` (shapes, devices,
the resolved ``grid=(H, W)``), and they are differentiable. Outside autocast,
``x`` and every weight share one dtype. Under autocast, :mod:`heba.ops` casts
the weights to the autocast dtype and calls the fused backends with autocast
off, so ``x`` may then be float32 while the weights are bfloat16/float16: the
projections use the weights' dtype as operand dtype, accumulate in float32,
and the result has ``x``'s dtype.
"""
