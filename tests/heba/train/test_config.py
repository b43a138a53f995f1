"""The published HeBA recipe, field by field: config as data, schedule, batches, prompts, QuickGELU.

The expected values are those of VLM-HeBA configs/trainers/HeBA/base2new.yaml on
Dassl's defaults (dassl/config/defaults.py, dassl/optim, dassl/data).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from heba import cli
from heba.train.config import Config, UsageError, make_config
from heba.train.prompts import read_descriptions
from tests.clip_utils import image_folder, one_thread  # noqa: F401

pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

FAST = ["--model", "tiny", "--pretrained", "none", "--quiet", "--threads", "1",
        "--no-eval-before", "--split", "all"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("ds"), per_class=6)


def test_heba_recipe_is_the_published_one():
    c = make_config("heba")
    published = dict(epochs=30, batch_size=16, drop_last=True, lr=0.0075, momentum=0.9,
                     weight_decay=5e-4, schedule="epoch", label_smoothing=0.1,
                     candidates="batch", neg_per_class=5, start=1, end=None, reduction=4,
                     base_scale=0.025, novel_scale=0.010, novel_eval="base", scale_factor=2.25,
                     slow_fast_ratio=0.8, slow_fast_draw="block", augment="dassl", ctx_init="a photo of a",
                     towers="both", model="ViT-B-16", pretrained="openai", quick_gelu="auto")
    assert {k: getattr(c, k) for k in published} == published
    from heba.train.runtime import resolve_precision
    assert c.precision == "auto" and c.gpu_precision == "fp16"      # PREC "amp"
    assert resolve_precision("auto", torch.device("cuda"), c.gpu_precision) == "fp16"
    assert resolve_precision("auto", torch.device("cpu"), c.gpu_precision) == "fp32"
    assert make_config("heba", epochs=3, lr=None).epochs == 3         # None keeps the default
    with pytest.raises(UsageError, match="unknown recipe 'hebe'; known: heba"):
        make_config("hebe")
    with pytest.raises(UsageError, match="schedule must be one of epoch, step"):
        make_config("heba", schedule="linear")


def _train(folder, out, capsys, *extra):
    rc = cli.main([folder, *FAST, "-o", str(out), *extra])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))
            if json.loads(line)["event"] == "train"]


def test_config_saved_beside_checkpoint_and_schedule_per_epoch(folder, tmp_path, capsys):
    """3 epochs, 20 images, batch 6: 3 steps an epoch (last partial batch dropped, as Dassl);
    the learning rate is Dassl's CosineAnnealingLR(T_max=epochs), stepped once per epoch."""
    out = tmp_path / "run"
    rec = _train(folder, out, capsys, "--epochs", "3", "--batch-size", "6", "--shots", "5",
                 "--lr", "0.01")
    assert [r["step"] for r in rec] == [3, 6, 9]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 3.0)
    for r, e in zip(rec, range(3)):
        assert r["lr"] == pytest.approx(opt.param_groups[0]["lr"])
        assert r["lr"] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * e / 3)))
        opt.step()
        sched.step()
    saved = json.load(open(out / "config.json"))
    assert saved["recipe"] == "heba" and saved["lr"] == 0.01 and saved["epochs"] == 3
    ck = json.load(open(out / "adapters.json"))
    assert Config.from_dict(ck) == Config.from_dict(saved) and ck["epoch"] == 3
    rec = _train(folder, tmp_path / "keep", capsys, "--epochs", "1", "--batch-size", "6",
                 "--shots", "5", "--no-drop-last", "--schedule", "step")
    assert rec[0]["step"] == 4                       # 20 images: 6 + 6 + 6 + 2


def test_published_description_files_are_read_not_run(tmp_path):
    """A description .py is parsed (ast.literal_eval of its dict), never executed."""
    canary = tmp_path / "executed"
    src = (f"import os\nos.makedirs({str(canary)!r})\n"
           "EUROSAT_TEMPLATES = {\n    'Forest': ['A satellite photo of a forest.',\n"
           "                '\\nTrees seen from above.'],\n}\n")
    folder = tmp_path / "gpt3_prompts"
    folder.mkdir()
    (folder / "eurosat.py").write_text(src)
    (folder / "imagenet.json").write_text(json.dumps({"tench": ["a fish."]}))
    got = read_descriptions(str(folder / "eurosat.py"))
    assert got == {"Forest": ["A satellite photo of a forest.", "\nTrees seen from above."]}
    assert not canary.exists()
    assert read_descriptions(str(folder), "eurosat") == got
    assert read_descriptions(str(folder), "imagenet_sketch") == {"tench": ["a fish."]}
    (folder / "dtd.py").write_text("DTD = {'banded': [f'{x}']}\n")
    with pytest.raises(UsageError, match="not a literal"):
        read_descriptions(str(folder / "dtd.py"))
    with pytest.raises(UsageError, match="no description file for oxford_pets"):
        read_descriptions(str(folder), "oxford_pets")


def test_openai_weights_build_quick_gelu(monkeypatch):
    """--model ViT-B-16 --pretrained openai builds QuickGELU (the weights' activation)."""
    import open_clip
    from heba.train.backbones import openclip
    built = {}

    def fake(name, pretrained=None, force_quick_gelu=False, **kw):   # no weights here
        built["quick_gelu"] = force_quick_gelu
        model = open_clip.create_model(name, pretrained=None, force_quick_gelu=force_quick_gelu,
                                       device="meta")
        return model, None, None

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake)
    bb = openclip.load(make_config("heba", model="ViT-B-16", pretrained="openai"))
    act = bb.model.visual.transformer.resblocks[0].mlp.gelu
    assert built["quick_gelu"] is True and isinstance(act, open_clip.transformer.QuickGELU)
    assert openclip.wants_quick_gelu("ViT-B-16", "laion2b_s34b_b88k") is False
    assert openclip.wants_quick_gelu("ViT-B-16", "openai", "off") is False
    bb = openclip.load(make_config("heba", model="ViT-B-16", pretrained="none"))
    assert not isinstance(bb.model.visual.transformer.resblocks[0].mlp.gelu,
                          open_clip.transformer.QuickGELU)


def test_dassl_transforms():
    from PIL import Image
    from torchvision import transforms as T
    from heba.train.backbones.openclip import dassl_transforms
    train, test = dassl_transforms(32, (0.5,) * 3, (0.25,) * 3)
    rrc = [t for t in train.transforms if isinstance(t, T.RandomResizedCrop)][0]
    assert rrc.scale == (0.08, 1.0) and rrc.interpolation == T.InterpolationMode.BICUBIC
    assert any(isinstance(t, T.RandomHorizontalFlip) for t in train.transforms)
    img = Image.new("RGB", (50, 40), (200, 10, 90))
    assert train(img).shape == test(img).shape == (3, 32, 32)
    assert [type(t).__name__ for t in test.transforms] == ["Resize", "CenterCrop", "ToTensor",
                                                          "Normalize"]


def test_slow_fast_scale_drawn_once_per_block(monkeypatch):
    """As published (return_*_adapter(index) draws once per block): a block's attention and
    MLP adapters get the same training scale; blocks draw independently."""
    from heba.clip.wiring import attach_heba, ScalePolicy
    from heba.nn import HeBAAdapter
    from tests.clip_utils import images, texts, tiny_clip
    seen = []
    orig = HeBAAdapter.forward

    def spy(self, x, scale=1.0):
        seen.append(scale)
        return orig(self, x, scale=scale)

    monkeypatch.setattr(HeBAAdapter, "forward", spy)
    model = tiny_clip(layers=3)
    attach_heba(model, policy=ScalePolicy(slow_fast_ratio=0.5, seed=0, per_block=True))
    model.train()
    with torch.no_grad():
        for _ in range(10):
            model.encode_image(images(n=1))
            model.encode_text(texts())
    pairs = [(float(a), float(b)) for a, b in zip(seen[::2], seen[1::2])]
    assert len(pairs) == 60 and all(a == b for a, b in pairs)
    assert {a for a, _ in pairs} == {float(torch.tensor(0.025)), float(torch.tensor(0.05625))}
    seen.clear()
    attach = tiny_clip(layers=3)
    attach_heba(attach, policy=ScalePolicy(slow_fast_ratio=0.5, seed=0, per_block=False))
    attach.train()
    with torch.no_grad():
        for _ in range(10):
            attach.encode_image(images(n=1))
    assert any(a != b for a, b in zip(seen[::2], seen[1::2]))       # per call: independent


@pytest.mark.parametrize("over, expected", [
    (dict(epochs=3), ["--warmup-epochs 5 with --epochs 3", "longer than the run",
                      "up to 0.0006 (--lr 0.001)"]),
    (dict(epochs=5), ["--warmup-epochs 5 with --epochs 5", "as long as the run"]),
    (dict(epochs=6), []),
    (dict(epochs=3, schedule="epoch"), ["--warmup-epochs 5 has no effect with --schedule epoch"]),
])
def test_combination_warnings(over, expected):
    from heba.train.config import combination_warnings
    lines = combination_warnings(make_config("adaptertune", **over))
    assert len(lines) == (1 if expected else 0), lines
    for text in expected:
        assert text in lines[0]
    assert combination_warnings(make_config("heba", epochs=1)) == []
