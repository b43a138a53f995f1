"""The benchmark cases: CLIP ViT-B/16 shapes at batch 256, and how to build each contender.

A contender is a function ``make(case, dtype, device) -> (fn, inputs)`` where
``fn(*inputs)`` runs one forward and ``inputs[0]`` is the token tensor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

import heba.nn
from benchmarks.baselines import heba_visual_channels_last

DRY_RUN = os.environ.get("HEBA_BENCH_DRY_RUN", "0") not in ("", "0")
SCALE = 0.025


@dataclass(frozen=True)
class Case:
    name: str
    op: str                  # heba_visual | heba_text | low_rank
    batch: int
    tokens: int
    dim: int
    rank: int = 0            # low-rank only
    grid: tuple = (14, 14)   # visual only

    def shape(self):
        return (self.batch, self.tokens, self.dim)

    def flops(self) -> float:
        """Multiply-adds x2 of the forward's projections and stencil."""
        m = self.batch * self.tokens
        if self.op == "low_rank":
            return 2 * 2 * m * self.dim * self.rank
        h = self.dim // 4
        f = 2 * 2 * m * self.dim * h
        return f + (2 * 9 * m * h if self.op == "heba_visual" else 0)

    def io_bytes(self, elem: int) -> float:
        """The forward's floor: read the tokens once and write them once."""
        return 2 * self.batch * self.tokens * self.dim * elem


if DRY_RUN:   # tiny shapes so the harness itself can be exercised on the CPU
    CASES = [Case("visual-attn-d768", "heba_visual", 2, 17, 32, grid=(4, 4)),
             Case("visual-mlp-d3072", "heba_visual", 2, 17, 64, grid=(4, 4)),
             Case("text-d512", "heba_text", 2, 9, 32),
             Case("lowrank-r16-d768", "low_rank", 2, 9, 32, rank=16),
             Case("lowrank-r64-d768", "low_rank", 2, 9, 32, rank=64)]
else:
    CASES = [Case("visual-attn-d768", "heba_visual", 256, 197, 768),
             Case("visual-mlp-d3072", "heba_visual", 256, 197, 3072),
             Case("text-d512", "heba_text", 512, 77, 512),
             Case("lowrank-r16-d768", "low_rank", 256, 197, 768, rank=16),
             Case("lowrank-r64-d768", "low_rank", 256, 197, 768, rank=64)]


def _module(case: Case, backend: str, batch_first: bool = True):
    if case.op == "low_rank":
        m = heba.nn.LowRankAdapter(case.dim, case.rank, init="small", backend=backend)
    else:
        m = heba.nn.HeBAAdapter(case.dim, modality="visual" if case.op == "heba_visual" else "text",
                                grid=case.grid if case.op == "heba_visual" else None,
                                batch_first=batch_first, backend=backend)
    with torch.no_grad():   # trained-looking weights: no zero `up` hiding half the work
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


def _tokens(case: Case, dtype, device, batch_first=True):
    x = torch.randn(case.shape(), device=device, dtype=dtype)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()     # [N, B, D] as the published code holds them
    return x.requires_grad_(True)


def _call(m, case):
    if case.op == "low_rank":
        return lambda x: m(x)
    return lambda x: m(x, scale=SCALE)


def contenders(case: Case) -> dict:
    """name -> make(dtype, device) -> (fn, x, params). Baselines first."""
    out = {}

    def eager_published(dtype, device):
        m = _module(case, "reference", batch_first=False).to(device, dtype)
        return _call(m, case), _tokens(case, dtype, device, batch_first=False), list(m.parameters())

    def compile_published(dtype, device):
        m = _module(case, "reference", batch_first=False).to(device, dtype)
        return (torch.compile(_call(m, case)), _tokens(case, dtype, device, batch_first=False),
                list(m.parameters()))

    out["eager"] = eager_published
    if case.op == "heba_visual":
        def eager_channels_last(dtype, device):
            m = _module(case, "reference").to(device, dtype)

            def fn(x):
                return heba_visual_channels_last(
                    x, m.down.weight, m.mid.weight, m.up.weight, m.norm.weight, m.norm.bias,
                    scale=SCALE, num_prefix_tokens=1, grid=case.grid)
            return fn, _tokens(case, dtype, device), list(m.parameters())
        out["eager-cl"] = eager_channels_last
    out["compile"] = compile_published

    for backend in ("triton", "cuda"):
        def fused(dtype, device, backend=backend):
            m = _module(case, backend).to(device, dtype)
            return _call(m, case), _tokens(case, dtype, device), list(m.parameters())
        out[backend] = fused
    return out
