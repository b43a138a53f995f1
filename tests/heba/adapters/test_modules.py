"""The wrappers an adapted model holds: delegation to the wrapped module, tuple outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from heba.adapters import AdaptedOutput, Wrapper
from heba.nn import LowRankAdapter


class Doubled(Wrapper):
    wrapped = "inner"

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 2 * self.inner(x)


def test_wrapper_answers_for_the_wrapped_module():
    lin = nn.Linear(3, 5)
    w = Doubled(lin)
    assert w.out_features == 5 and w.weight is lin.weight
    assert list(dict(w.named_parameters())) == ["inner.weight", "inner.bias"]
    with pytest.raises(AttributeError, match="nothing_here"):
        w.nothing_here


def test_adapted_output_adapts_the_first_of_a_tuple():
    """Older transformers layers return ``(hidden_states, attn)``: only the first is adapted."""
    a = LowRankAdapter(8, 2, init="small")
    wrapped = AdaptedOutput(nn.Identity(), a, None)
    x = torch.randn(2, 3, 8)
    y, extra = wrapped((x, "attn"))[0], wrapped((x, "attn"))[1:]
    torch.testing.assert_close(y, a(x))
    assert extra == ("attn",)
    torch.testing.assert_close(wrapped(x), a(x))
    assert wrapped.adapter is a and not list(wrapped.parameters())   # held by reference only
