"""heba's own adapter checkpoints (safetensors + JSON) round-trip exactly."""

from __future__ import annotations

import os

import pytest
pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")
import torch

from heba.clip import attach_heba
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
