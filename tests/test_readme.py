"""Every `heba-train` command in README.md runs as written, on generated data in its layout.

The commands are read from the README's ``bash`` blocks, so an example cannot
rot unseen. Each runs in a fresh folder where ``/data`` is a generated root:
``/data/eurosat`` in CoOp's layout (tests/coop_fixtures.py), ``/data/my_folder``
an ImageFolder tree, ``photos/`` a few images, ``more.txt`` a list of them. The
training commands get the tiny built-in CLIP and one short epoch appended
(``--model tiny --epochs 1 ...``); everything else is the README's text. The
commands that need ImageNet and ten more data sets, a timm or a Hugging Face
model (``NOT_RUN``) are only parsed; a new README command must be added to one
of the two lists below, or this test fails.
"""

from __future__ import annotations

import os
import re
import shlex

import pytest

pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TINY = ["--model", "tiny", "--pretrained", "builtin", "--epochs", "1", "--shots", "1",
        "--test-per-class", "1", "--quiet"]
NOT_RUN = ("cross-dataset", "domain-generalization", "timm:", "hf:")


def readme_commands() -> list:
    """The ``heba-train`` command lines of README.md's bash blocks, comments removed."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [shlex.split(line, comments=True) for block in blocks
            for line in block.splitlines() if line.startswith("heba-train ")]


def _data(tmp_path):
    from heba.clip import synthetic
    from tests import coop_fixtures as fx
    data = tmp_path / "data"
    fx.make_split_dataset(data, "eurosat", [(2, 1, 1)] * 4, images=True)
    synthetic.save_png_folder(str(data / "my_folder"), synthetic.all_classes()[:3], 2)
    photos = synthetic.save_png_folder(str(tmp_path / "photos"), synthetic.all_classes()[:2], 1)
    some = sorted(os.path.join(d, f) for d, _, fs in os.walk(photos) for f in fs)
    (tmp_path / "more.txt").write_text(some[0] + "\n")
    return str(data)


def _run(argv, data):
    from heba.cli import main
    argv = [data + a[len("/data"):] if a.startswith("/data") else a for a in argv[1:]]
    if argv[0] not in ("evaluate", "split", "predict"):
        argv += TINY
    return main(argv)


def test_readme_commands_run_as_written(tmp_path, monkeypatch):
    commands = readme_commands()
    skipped = [c for c in commands if any(k in " ".join(c) for k in NOT_RUN)]
    assert len(skipped) == 4, skipped              # the four named in the module docstring
    data = _data(tmp_path)
    monkeypatch.chdir(tmp_path)
    demo = ["heba-train", "-o", "runs/demo", "--shots", "2"]  # the run "Use a trained run" names
    for argv in [demo] + [c for c in commands if c not in skipped]:
        assert _run(argv, data) == 0, " ".join(argv)
    # the default folders the README names: one per protocol, data set and method
    assert sorted(os.listdir("runs")) == ["base2novel-eurosat-heba",
                                          "base2novel-my_folder-adaptertune", "demo"]
    assert os.path.isfile("runs/base2novel-eurosat-heba/base2novel.json")
    assert os.path.isfile("runs/base2novel-eurosat-heba/base2novel.png")
    assert os.path.isfile("split.json") and os.path.isfile("predictions.csv")
