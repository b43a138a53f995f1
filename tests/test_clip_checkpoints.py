"""Published HeBA / AdapterTune checkpoints land where they belong; mismatches are named."""

from __future__ import annotations

import os

import pytest
import torch

from heba.clip import attach_adaptertune, attach_heba
from heba.clip.checkpoints import (CheckpointError, load_adapters, load_published_checkpoint,
                                   read_config, save_adapters)
from tests.clip_utils import tiny_clip

VIS_D, TXT_D = 64, 48          # tiny_clip widths


def published_heba(n_layers, seed=0):
    """A checkpoint as the published HeBA code writes it, random tensors, SPEC.md shapes."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for tower, D in (("visual", VIS_D), ("text", TXT_D)):
        for i in range(n_layers):
            for pos, dim in (("att_conv", D), ("mlp_conv", 4 * D)):
                h = dim // 4
                shapes = ({"down.weight": (h, dim, 1, 1), "mid.weight": (h, 1, 3, 3),
                           "up.weight": (dim, h, 1, 1)} if tower == "visual" else
                          {"down.weight": (h, dim), "up.weight": (dim, h)})
                shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
                for name, shape in shapes.items():
                    sd[f"{tower}_adapter.{i}.{pos}.{name}"] = torch.randn(*shape, generator=g)
    sd["tk_prompts"] = torch.randint(0, 100, (10, 16))
    return {"state_dict": sd, "epoch": 5, "optimizer": None}


def test_heba_checkpoint_lands_in_place(tmp_path):
    model = tiny_clip(layers=3)
    attach_heba(model, start=2, end=3)
    ckpt = published_heba(n_layers=2)
    path = tmp_path / "model.pth.tar-5"
    torch.save(ckpt, path)
    load_published_checkpoint(model, path)
    sd = ckpt["state_dict"]
    towers = {"visual": model.visual.transformer, "text": model.transformer}
    n = 0
    for tower, tr in towers.items():
        for i in range(2):
            block = tr.resblocks[1 + i]            # layer start=2 is adapted layer 0
            for pos, wrapped in (("att_conv", block.ln_1), ("mlp_conv", block.mlp.c_fc)):
                for name, p in wrapped.adapter.named_parameters():
                    assert torch.equal(p, sd[f"{tower}_adapter.{i}.{pos}.{name}"]), (tower, i, pos,
                                                                                       name)
                    n += 1
    assert n == len(sd) - 1                        # every tensor but tk_prompts


def test_heba_checkpoint_errors():
    model = tiny_clip(layers=3)
    attach_heba(model, start=2, end=3)
    sd = published_heba(n_layers=3)["state_dict"]       # one layer too many
    with pytest.raises(CheckpointError, match=r"unknown key\(s\): text_adapter\.2\.att_conv"):
        load_published_checkpoint(model, sd)
    sd = published_heba(n_layers=2)["state_dict"]
    del sd["visual_adapter.1.mlp_conv.norm.bias"]
    with pytest.raises(CheckpointError, match=r"missing key\(s\): visual_adapter\.1\.mlp_conv"
                                              r"\.norm\.bias"):
        load_published_checkpoint(model, sd)
    sd = published_heba(n_layers=2)["state_dict"]
    sd["text_adapter.0.att_conv.up.weight"] = torch.randn(48, 7)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*text_adapter\.0\.att_conv\.up"):
        load_published_checkpoint(model, sd)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_published_checkpoint(model, "/nonexistent/model.pth")


def test_adaptertune_checkpoint_lands_in_place(tmp_path):
    model = tiny_clip(layers=4)
    attach_adaptertune(model, rank=8, every=2)
    g = torch.Generator().manual_seed(3)
    sd = {}
    for i in (0, 2):
        sd[f"blocks.{i}.adapter.down.weight"] = torch.randn(8, VIS_D, generator=g)
        sd[f"blocks.{i}.adapter.down.bias"] = torch.randn(8, generator=g)
        sd[f"blocks.{i}.adapter.up.weight"] = torch.randn(VIS_D, 8, generator=g)
        sd[f"blocks.{i}.adapter.up.bias"] = torch.randn(VIS_D, generator=g)
    torch.save({"state_dict": sd}, tmp_path / "at.pth")
    load_published_checkpoint(model, tmp_path / "at.pth")
    for i in (0, 2):
        a = model.visual.transformer.resblocks[i].adapter
        for name, p in a.named_parameters():
            assert torch.equal(p, sd[f"blocks.{i}.adapter.{name}"])
    # a HeBA checkpoint into an AdapterTune model: named as such
    with pytest.raises(CheckpointError, match="holds heba adapters.*wired with adaptertune"):
        load_published_checkpoint(model, published_heba(1))


def test_own_checkpoint_roundtrip(tmp_path):
    model = tiny_clip()
    attach_heba(model)
    with torch.no_grad():
        for p in model.heba_adapters.parameters():
            p.normal_()
    path = str(tmp_path / "ck" / "adapters.safetensors")
    save_adapters(path, model, {"method": "heba", "x": 1})
    assert read_config(path) == {"method": "heba", "x": 1}
    assert not [f for f in os.listdir(tmp_path / "ck") if f.endswith(".tmp")]
    other = tiny_clip()
    attach_heba(other)
    load_adapters(path, other)
    for (k, a), (_, b) in zip(model.heba_adapters.state_dict().items(),
                              other.heba_adapters.state_dict().items()):
        assert torch.equal(a, b), k
    # only adapter weights are in the file
    from safetensors.torch import load_file
    assert set(load_file(path)) == set(model.heba_adapters.state_dict())
