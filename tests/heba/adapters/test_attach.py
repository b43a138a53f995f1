"""The backbone-agnostic wiring, on a model library of the test's own: one :class:`Sites` is
all a library needs (open_clip, timm and Hugging Face are tested in their own files)."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from heba.adapters import (AdaptedOutput, Sites, attach_adaptertune, attach_heba,
                           count_parameters, remove_adapters)

D, DEPTH, GRID = 16, 3, (3, 5)          # a class token, then a 3 x 5 grid


class Block(nn.Module):
    """A pre-norm block with its own attribute names (no attention: placement is the point)."""

    def __init__(self):
        super().__init__()
        self.pre_attn, self.mix = nn.LayerNorm(D), nn.Linear(D, D)
        self.pre_mlp = nn.LayerNorm(D)
        self.ffn = nn.Sequential(OrderedDict(up=nn.Linear(D, 4 * D), act=nn.GELU(),
                                             down=nn.Linear(4 * D, D)))

    def forward(self, x):
        x = x + self.mix(self.pre_attn(x))
        return x + self.ffn(self.pre_mlp(x))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(DEPTH))
        with torch.no_grad():
            for p in self.parameters():
                p.add_(0.1 * torch.randn_like(p))

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def _towers(model):
    if not isinstance(model, Toy):
        raise TypeError(f"{type(model).__name__} is not a Toy")
    return {"visual": model}


SITES = Sites(library="toy", towers=_towers, blocks=lambda tr: tr.layers,
              attn_input="pre_attn", mlp_hidden="ffn.up", required=("mix",),
              tokens=lambda model, tower, tr: dict(modality="visual", num_prefix_tokens=1,
                                                   grid=GRID, batch_first=True),
              width=lambda tr, block: D)


def tokens(seed=0):
    return torch.randn(2, 1 + GRID[0] * GRID[1], D, generator=torch.Generator().manual_seed(seed))


def randomize(adapters, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))


@pytest.mark.parametrize("start,end", [(1, None), (2, 3), (2, 2)], ids=["all", "L2-3", "L2"])
def test_heba_goes_where_the_sites_say(start, end):
    pristine = Toy().eval()
    model = copy.deepcopy(pristine)
    ad = attach_heba(model, SITES, towers_="visual", start=start, end=end)
    randomize(ad)
    adapted = range(start - 1, end or DEPTH)
    assert sorted(k.split(".")[1] for k in ad.state_dict() if k.endswith("att_conv.norm.weight")) \
        == [str(i + 1) for i in adapted]                         # 1-based, as published
    x = tokens()
    with torch.no_grad():
        got = model(x)
        exp = x
        for i, b in enumerate(pristine.layers):                  # the block equations by hand
            layer = ad.visual_adapter[i + 1]
            h = b.pre_attn(exp)
            exp = exp + b.mix(layer.att_conv(h, scale=0.025) if i in adapted else h)
            h = b.ffn.up(b.pre_mlp(exp))
            h = layer.mlp_conv(h, scale=0.025) if i in adapted else h
            exp = exp + b.ffn.down(b.ffn.act(h))
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
    assert (got - pristine(x)).abs().max() > 1e-3
    assert count_parameters(model)[0] == sum(p.numel() for p in ad.parameters())


@pytest.mark.parametrize("every", [1, 2])
def test_adaptertune_follows_blocks_every_nth(every):
    pristine = Toy().eval()
    model = copy.deepcopy(pristine)
    ad = attach_adaptertune(model, SITES, rank=3, every=every, init="small")
    assert sorted(ad.blocks) == [str(i) for i in range(0, DEPTH, every)]
    assert all(isinstance(model.layers[int(i)], AdaptedOutput) for i in ad.blocks)
    x = tokens()
    with torch.no_grad():
        exp = x
        for i, b in enumerate(pristine.layers):
            exp = b(exp)
            exp = ad.blocks[str(i)].adapter(exp) if str(i) in ad.blocks else exp
        torch.testing.assert_close(model(x), exp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["heba", "adaptertune"])
def test_remove_gives_the_model_back(method):
    model = Toy().train()
    model.layers[0].mix.bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ad = (attach_heba(model, SITES, towers_="visual") if method == "heba"
          else attach_adaptertune(model, SITES, init="small"))
    assert ad.training and all(not p.requires_grad for n, p in model.named_parameters()
                               if not n.startswith("heba_adapters."))
    remove_adapters(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_refusals_name_the_problem_and_change_nothing():
    model = Toy()
    del model.layers[1].mix
    with pytest.raises(TypeError, match=r"visual block 1 \(Block\) has no attribute 'mix': "
                                        r"heba wires adapters by toy's block attribute names"):
        attach_heba(model, SITES, towers_="visual")
    with pytest.raises(TypeError, match="the model has no text tower"):
        attach_heba(model, SITES, towers_="both")
    with pytest.raises(ValueError, match="towers must be 'both', 'visual' or 'text'"):
        attach_adaptertune(model, SITES, towers_="image")
    with pytest.raises(ValueError, match="every must be a positive int, got True"):
        attach_adaptertune(model, SITES, every=True)
    assert all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "heba_adapters")
    with pytest.raises(TypeError, match="Linear is not a Toy"):
        attach_heba(nn.Linear(2, 2), SITES)
