"""Published HeBA / AdapterTune checkpoints land where they belong; mismatches are named."""

from __future__ import annotations

import os

from collections import OrderedDict

import pytest
pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")
import torch
from torch import nn

from heba.adapters import CheckpointError, load_published_checkpoint, published_layout
from heba.clip import attach_adaptertune, attach_heba
from heba.clip.checkpoints import find_checkpoint
from tests.clip_utils import tiny_clip

VIS_D, TXT_D = 64, 48          # tiny_clip widths


class PublishedBlock(nn.Module):
    """VLM-HeBA trainers/heba.py RobustAdapterBlock's parameters: down, mid, up, norm."""

    def __init__(self, dim, visual, reduction=4):
        super().__init__()
        h = dim // reduction
        if visual:
            self.down = nn.Conv2d(dim, h, 1, bias=False)
            self.up = nn.Conv2d(h, dim, 1, bias=False)
            self.mid = nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False)
        else:
            self.down = nn.Linear(dim, h, bias=False)
            self.up = nn.Linear(h, dim, bias=False)
            self.mid = nn.Identity()
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(dim)


class PublishedLearner(nn.Module):
    """AdapterLearner's modules as the published code builds them: per tower a ModuleList of
    ``layers + 1`` slots, ``[i]`` = Sequential(att_conv, mlp_conv) for i in start..end and
    None elsewhere (slot 0 always), then the tokenized prompts as a buffer."""

    def __init__(self, layers, start, end, vis_d=VIS_D, txt_d=TXT_D, n_cls=6, n_temp=3, ctx=16):
        super().__init__()
        self.text_adapter = self._build(txt_d, layers, start, end, False)
        self.visual_adapter = self._build(vis_d, layers, start, end, True)
        self.register_buffer("tk_prompts", torch.randint(0, 100, (n_cls, n_temp, ctx)))

    @staticmethod
    def _build(d, layers, start, end, visual):
        slots = [None] * (layers + 1)
        for i in range(start, end + 1):
            slots[i] = nn.Sequential(OrderedDict([("att_conv", PublishedBlock(d, visual)),
                                                  ("mlp_conv", PublishedBlock(4 * d, visual))]))
        return nn.ModuleList(slots)


def published_heba(layers=3, start=1, end=3, seed=0, out=None, **widths):
    """The dict Dassl's save_model writes for the published learner (random weights);
    saved to ``<out>/adapter_learner/model.pth.tar-30`` when ``out`` is given."""
    torch.manual_seed(seed)
    learner = PublishedLearner(layers, start, end, **widths)
    with torch.no_grad():
        for p in learner.parameters():
            p.normal_()
    opt = torch.optim.SGD(learner.parameters(), lr=0.0075, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 30.0)
    ck = {"state_dict": learner.state_dict(), "epoch": 30, "optimizer": opt.state_dict(),
          "scheduler": sched.state_dict(), "val_result": None}
    if out is not None:
        os.makedirs(os.path.join(out, "adapter_learner"), exist_ok=True)
        torch.save(ck, os.path.join(out, "adapter_learner", "model.pth.tar-30"))
    return ck


def test_heba_keys_are_the_published_keys():
    for start, end in ((1, 3), (2, 3)):
        model = tiny_clip(layers=3)
        attach_heba(model, start=start, end=end)
        pub = set(published_heba(3, start, end)["state_dict"]) - {"tk_prompts"}
        assert set(model.heba_adapters.state_dict()) == pub


def test_heba_checkpoint_lands_in_place(tmp_path):
    model = tiny_clip(layers=3)
    attach_heba(model, start=2, end=3)
    ckpt = published_heba(3, 2, 3, out=str(tmp_path))
    kind, path = find_checkpoint(str(tmp_path))
    assert kind == "published" and path.endswith("adapter_learner/model.pth.tar-30")
    load_published_checkpoint(model, path)
    sd = ckpt["state_dict"]
    towers = {"visual": model.visual.transformer, "text": model.transformer}
    n = 0
    for tower, tr in towers.items():
        for layer in (2, 3):
            block = tr.resblocks[layer - 1]            # published layer i -> block i (1-based)
            for pos, wrapped in (("att_conv", block.ln_1), ("mlp_conv", block.mlp.c_fc)):
                for name, p in wrapped.adapter.named_parameters():
                    assert torch.equal(p, sd[f"{tower}_adapter.{layer}.{pos}.{name}"]), (
                        tower, layer, pos, name)
                    n += 1
    assert n == len(sd) - 1                        # every tensor but tk_prompts
    assert published_layout(sd) == dict(towers="both", start=2, end=3)


def test_heba_checkpoint_errors():
    model = tiny_clip(layers=3)
    attach_heba(model, start=2, end=3)
    sd = published_heba(3, 1, 3)["state_dict"]       # one layer too many
    with pytest.raises(CheckpointError, match=r"unknown key\(s\): text_adapter\.1\.att_conv"):
        load_published_checkpoint(model, sd)
    sd = published_heba(3, 2, 3)["state_dict"]
    del sd["visual_adapter.2.mlp_conv.norm.bias"]
    with pytest.raises(CheckpointError, match=r"missing key\(s\): visual_adapter\.2\.mlp_conv"
                                              r"\.norm\.bias"):
        load_published_checkpoint(model, sd)
    sd = published_heba(3, 2, 3)["state_dict"]
    sd["text_adapter.2.att_conv.up.weight"] = torch.randn(48, 7)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*text_adapter\.2\.att_conv\.up"):
        load_published_checkpoint(model, sd)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_published_checkpoint(model, "/nonexistent/model.pth")


def test_evaluate_cli_loads_published_checkpoint(tmp_path, capsys):
    """heba-train evaluate on a published run folder: the tiny demo model, its 2 layers."""
    from heba import cli
    from heba.clip import tiny
    from heba.train import backbones
    from heba.train.config import make_config
    from heba.train.evaluate import evaluate_checkpoint
    from heba.train.recipe import RunOptions
    layers = tiny.CONFIG["vision_cfg"]["layers"]
    ck = published_heba(layers, 1, layers, out=str(tmp_path),
                        vis_d=tiny.CONFIG["vision_cfg"]["width"],
                        txt_d=tiny.CONFIG["text_cfg"]["width"])
    argv = ["evaluate", "--checkpoint", str(tmp_path), "--model", "tiny", "--pretrained",
            "none", "--test-per-class", "2", "--threads", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "model.pth.tar-30: base" in out and "novel" in out
    # the weights that were evaluated are the file's, layer by layer
    cfg = make_config("heba", model="tiny", pretrained="none", source="demo", start=1,
                      end=layers, test_per_class=2)
    model = backbones.attach(backbones.load(cfg).model, cfg)
    load_published_checkpoint(model, os.path.join(tmp_path, "adapter_learner",
                                                  "model.pth.tar-30"))
    w = model.visual.transformer.resblocks[0].ln_1.adapter.down.weight
    assert torch.equal(w, ck["state_dict"]["visual_adapter.1.att_conv.down.weight"])
    acc = evaluate_checkpoint(str(tmp_path), dict(model="tiny", pretrained="none",
                                                  test_per_class=2), RunOptions(threads=1),
                              log=lambda *a: None)
    assert f"base {acc['base']:5.1f}%" in out


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
        load_published_checkpoint(model, published_heba(4, 1, 1))


# --- strict loading of a published file: each mismatch refused, naming the key and the file -----

def _adapter_copy(model):
    return {k: v.clone() for k, v in model.heba_adapters.state_dict().items()}


def _refused_in_one_line(model, path, key, what):
    before = _adapter_copy(model)
    with pytest.raises(CheckpointError) as err:
        load_published_checkpoint(model, path)
    msg = str(err.value)
    assert "\n" not in msg and key in msg and path in msg and what in msg, msg
    for k, v in model.heba_adapters.state_dict().items():       # nothing half-loaded
        assert torch.equal(v, before[k]), f"{k} changed by a refused load"


@pytest.mark.parametrize("change", ["unexpected-adapter-key", "unexpected-other-key",
                                    "missing-key", "wrong-shape"])
def test_published_heba_file_is_loaded_strictly(tmp_path, change):
    """A Dassl ``model.pth.tar-<N>`` with one tensor too many, too few or misshapen is refused
    with one line naming that tensor and the file; the model keeps its weights."""
    model = tiny_clip(layers=3)
    attach_heba(model, start=2, end=3)
    ck = published_heba(3, 2, 3)
    sd = ck["state_dict"]
    if change == "unexpected-adapter-key":
        key, what = "visual_adapter.3.att_conv.gate.weight", "unknown"
        sd[key] = torch.randn(4)
    elif change == "unexpected-other-key":          # e.g. another trainer's prompt learner
        key, what = "prompt_learner.ctx", "unknown"
        sd[key] = torch.randn(4, TXT_D)
    elif change == "missing-key":
        key, what = "text_adapter.3.mlp_conv.up.weight", "missing"
        del sd[key]
    else:
        key, what = "visual_adapter.2.att_conv.mid.weight", "shape"
        sd[key] = torch.randn(VIS_D // 4, 1, 3, 1)
    path = str(tmp_path / "model.pth.tar-30")
    torch.save(ck, path)
    _refused_in_one_line(model, path, key, what)
