"""The CLIP recipe's fast path end to end: cast-once backbone, checkpointed blocks (the graphed
step itself: tests/heba/train/test_graph.py)."""

from __future__ import annotations

import json
import os

import pytest
pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")
import torch

from heba import cli
from heba.train import recipe as T
from tests.clip_utils import image_folder, one_thread  # noqa: F401

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

FAST = ["--model", "tiny", "--pretrained", "none", "--shots", "2", "--epochs", "2",
        "--batch-size", "4", "--quiet", "--threads", "1", "--no-eval-before", "--split", "all"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("ds"), per_class=4)


def train_losses(folder, out, capsys, *extra):
    rc = cli.main([folder, *FAST, "-o", str(out), *extra])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    return [l["loss"] for l in lines if l["event"] == "train"], stdout


@pytest.mark.parametrize("method", ["heba", "adaptertune"])
def test_cast_once_cli_matches_autocast(folder, tmp_path, capsys, method):
    """bf16 with the backbone cast once = bf16 autocast over an fp32 backbone, up to rounding."""
    args = ("--method", method, "--precision", "bf16")
    once, log = train_losses(folder, tmp_path / "once", capsys, *args)
    assert "frozen backbone cast once to bf16" in log and "CUDA graphs off (not on a GPU)" in log
    every, log = train_losses(folder, tmp_path / "every", capsys, *args, "--no-cast-once")
    assert "backbone kept in fp32 (--no-cast-once)" in log
    fp32, _ = train_losses(folder, tmp_path / "fp32", capsys, "--method", method)
    for a, b, c in zip(once, every, fp32):
        assert abs(a - b) <= 2e-2 * abs(b), (once, every)
        assert abs(a - c) <= 5e-2 * abs(c), (once, fp32)     # and both near fp32


def test_checkpointed_blocks_change_nothing(folder, tmp_path, capsys):
    plain, _ = train_losses(folder, tmp_path / "plain", capsys)
    ck, log = train_losses(folder, tmp_path / "ck", capsys, "--checkpoint-blocks", "1")
    assert "8 frozen blocks checkpointed" in log          # 4 blocks x 2 towers
    assert ck == pytest.approx(plain, rel=1e-5)
    from safetensors.torch import load_file
    a = load_file(os.path.join(tmp_path / "plain", T.CKPT_NAME))
    b = load_file(os.path.join(tmp_path / "ck", T.CKPT_NAME))
    assert set(a) == set(b)                               # block wrappers rename nothing
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_checkpoint_blocks_bad_value(folder, tmp_path, capsys):
    rc = cli.main([folder, *FAST, "-o", str(tmp_path / "x"), "--checkpoint-blocks", "-1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--checkpoint-blocks must be >= 0" in err


