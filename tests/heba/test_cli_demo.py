"""The built-in demo: the shipped tiny CLIP is pretrained, and `heba-train` runs without data."""

from __future__ import annotations

import torch
import pytest
import torch.nn.functional as F

pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")

from heba import cli
from heba.clip import synthetic, tiny
from heba.data.demo import TEMPLATES
from heba.train.prompts import PromptBank, class_prompts


def test_shipped_tiny_clip_is_pretrained():
    torch.set_num_threads(1)
    model, tok = tiny.load_tiny_clip()
    classes = synthetic.all_classes()
    ids = synthetic.balanced_ids(len(classes), 3)
    with torch.no_grad():
        txt = PromptBank(class_prompts(classes, templates=TEMPLATES), tok).features(model)
        img = F.normalize(model.encode_image(synthetic.render(ids, classes, seed=7)), dim=-1)
    acc = (img @ txt.T).argmax(1).eq(ids).float().mean().item()
    assert acc > 0.9, acc                        # chance: 1/64
    rand, _ = tiny.load_tiny_clip(pretrained=False)
    assert set(rand.state_dict()) == set(model.state_dict())


def test_renderer_is_deterministic():
    ids = torch.arange(8)
    a = synthetic.render(ids, synthetic.all_classes(), seed=3, style="shifted")
    b = synthetic.render(ids, synthetic.all_classes(), seed=3, style="shifted")
    c = synthetic.render(ids, synthetic.all_classes(), seed=4, style="shifted")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_default_command_runs(tmp_path, capsys):
    rc = cli.main(["--epochs", "1", "--shots", "1", "--test-per-class", "2", "--quiet",
                   "--threads", "1", "-o", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "built-in generated shapes: 64 classes, 32 trained, 1 shots" in out
    assert "before training: base" in out and "after training:  base" in out
