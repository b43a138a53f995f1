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


# --- strict loading of heba's own files: each mismatch refused, naming the key and the file -----

def _saved(tmp_path, folder="ck"):
    model = tiny_clip()
    attach_heba(model, start=1, end=2)
    with torch.no_grad():
        for p in model.heba_adapters.parameters():
            p.normal_()
    path = str(tmp_path / folder / "adapters.safetensors")
    save_adapters(path, model, {"method": "heba", "start": 1, "end": 2})
    return path


def _rewrite(path, change):
    """Rewrite the safetensors file at ``path`` with ``change``; ``(key, word)`` to expect."""
    from safetensors.torch import load_file, save_file
    state = load_file(path)
    if change == "unexpected-key":
        key, what = "visual_adapter.3.att_conv.down.weight", "unknown"
        state[key] = torch.randn(16, 64, 1, 1)
    elif change == "missing-key":
        key, what = "text_adapter.2.mlp_conv.norm.weight", "missing"
        del state[key]
    else:
        key, what = "visual_adapter.1.mlp_conv.up.weight", "shape"
        state[key] = torch.randn(256, 63, 1, 1)
    save_file(state, path)
    return key, what


@pytest.mark.parametrize("folder", ["ck", "run/epoch_3"], ids=["final", "resume-set"])
@pytest.mark.parametrize("change", ["unexpected-key", "missing-key", "wrong-shape"])
def test_own_checkpoint_is_loaded_strictly(tmp_path, change, folder):
    """heba's adapters.safetensors (a run's final file or a resume set's) with one tensor too
    many, too few or misshapen: one line naming it and the file; the model keeps its weights."""
    path = _saved(tmp_path, folder)
    key, what = _rewrite(path, change)
    model = tiny_clip()
    attach_heba(model, start=1, end=2)
    before = {k: v.clone() for k, v in model.heba_adapters.state_dict().items()}
    with pytest.raises(ckpt.CheckpointError) as err:
        load_adapters(path, model)
    msg = str(err.value)
    assert "\n" not in msg and key in msg and path in msg and what in msg, msg
    for k, v in model.heba_adapters.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a refused load"


def test_own_configuration_lacking_a_model_field_is_refused(tmp_path):
    """The JSON beside the adapters must hold every field that shapes the model."""
    path = _saved(tmp_path)
    with pytest.raises(ckpt.CheckpointError) as err:
        read_config(path, require=("method", "start", "end", "reduction"))
    msg = str(err.value)
    assert "\n" not in msg and "reduction" in msg and ckpt.config_path(path) in msg, msg
    os.remove(ckpt.config_path(path))
    with pytest.raises(ckpt.CheckpointError, match="has no configuration file"):
        read_config(path)
