"""heba.clip.checkpoints: heba's own adapter checkpoints (safetensors + JSON) round-trip exactly;
the published trainer's checkpoints are found and read."""

from __future__ import annotations

import os

import pytest
pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")
import torch

from heba.clip import attach_heba
from heba.clip import checkpoints as ckpt
from heba.clip.checkpoints import load_adapters, read_config, save_adapters
from tests.clip_utils import tiny_clip


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


def test_find_checkpoint_takes_the_largest_epoch_numerically(tmp_path):
    """ckpt-latest-lexicographic: the Dassl trainer's ``model.pth.tar-<N>``, N as a number."""
    folder = tmp_path / "adapter_learner"
    folder.mkdir()
    for n in (2, 5, 10):
        (folder / f"model.pth.tar-{n}").write_bytes(b"x")
    (folder / "model-best.pth.tar").write_bytes(b"x")
    assert ckpt.find_checkpoint(str(tmp_path)) == ("published",
                                                   str(folder / "model.pth.tar-10"))


def test_published_layout_reads_first_and_last_layer():
    """ckpt-layout-end: a checkpoint adapting layers 3..12 (1-based) of both towers."""
    keys = {f"{t}_adapter.{i}.{m}.norm.bias": None for t in ("visual", "text")
            for i in range(3, 13) for m in ("att_conv", "mlp_conv")}
    assert ckpt.published_layout(keys) == dict(towers="both", start=3, end=12)
    assert ckpt.published_layout({"text_adapter.7.att_conv.up.weight": None}) == dict(
        towers="text", start=7, end=7)
