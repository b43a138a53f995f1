"""heba-train on a Hugging Face CLIP folder (``--backbone hf:DIR``): the CLIP few-shot protocol.

The folder is what transformers writes (``CLIPModel.save_pretrained`` +
``CLIPTokenizer.save_pretrained``) for a tiny random config with a byte-level
tokenizer (256 byte symbols, their end-of-word forms, start / end tokens; no
merges). The wrapper's features are checked against transformers' own
``get_image_features`` / ``get_text_features``; a run end to end, its
checkpoint evaluated again, and bad folders refused in one line.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="heba[hf] extra not installed")

from heba import cli  # noqa: E402
from heba.train.backbones import hf as hf_backbone  # noqa: E402
from heba.train.config import make_config  # noqa: E402
from tests.clip_utils import image_folder, one_thread  # noqa: E402,F401

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

FAST = ["--shots", "2", "--epochs", "1", "--batch-size", "4", "--quiet", "--threads", "1"]


def tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    chars = sorted(ByteLevel.alphabet())
    words = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return transformers.CLIPTokenizer(vocab={w: i for i, w in enumerate(words)}, merges=[])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hfclip"))
    tok = tokenizer()
    tower = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2)
    cfg = transformers.CLIPConfig(
        text_config=dict(tower, vocab_size=len(tok), max_position_embeddings=64,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg)
    with torch.no_grad():                      # HF leaves unit norms and zero biases: draw all
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("ds"), per_class=4)


def run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_wrapper_features_are_transformers_features(hf_dir):
    cfg = make_config("heba", model=f"hf:{hf_dir}", pretrained="folder")
    bb = hf_backbone.load(cfg)
    ref = transformers.CLIPModel.from_pretrained(hf_dir).eval()
    texts = ["a photo of a red circle.", "a blue square", "x"]
    tokens = bb.tokenizer(texts)
    assert tokens.shape == (3, 64)
    exp_tokens = transformers.AutoTokenizer.from_pretrained(hf_dir)(texts)["input_ids"]
    for row, exp in zip(tokens.tolist(), exp_tokens):
        assert row[:len(exp)] == exp and set(row[len(exp):]) <= {tokenizer().pad_token_id}
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        img, txt = bb.model.encode_image(images), bb.model.encode_text(tokens)
        exp_i = ref.get_image_features(pixel_values=images)
        exp_t = ref.get_text_features(input_ids=tokens)
    exp_i = getattr(exp_i, "pooler_output", exp_i)
    exp_t = getattr(exp_t, "pooler_output", exp_t)
    torch.testing.assert_close(img, exp_i)
    torch.testing.assert_close(txt, exp_t)
    assert bb.model.logit_scale is bb.model.clip.logit_scale
    x = bb.eval_transform(__import__("PIL.Image", fromlist=["x"]).new("RGB", (40, 50)))
    assert x.shape == (3, 32, 32)


@pytest.mark.parametrize("method", ["heba", "adaptertune"])
def test_train_and_evaluate_end_to_end(method, hf_dir, folder, tmp_path, capsys):
    from safetensors.torch import load_file
    out = str(tmp_path / method)
    extra = ["--rank", "4"] if method == "adaptertune" else []
    rc, stdout, err = run([folder, "--backbone", f"hf:{hf_dir}", "--method", method, *FAST,
                           *extra, "-o", out], capsys)
    assert rc == 0, err
    keys = set(load_file(os.path.join(out, "adapters.safetensors")))
    cfg = json.load(open(os.path.join(out, "config.json")))
    if method == "heba":                        # published 1-based slots, both towers
        assert {k.split(".")[0] for k in keys} == {"visual_adapter", "text_adapter"}
        assert {k.split(".")[1] for k in keys} == {"1", "2"}
        assert cfg["optimizer"] == "sgd" and cfg["recipe"] == "heba"
    else:                                       # AdapterTune: image tower, the recipe's AdamW
        assert keys == {f"blocks.{i}.adapter.{p}.{w}" for i in (0, 1) for p in ("down", "up")
                        for w in ("weight", "bias")}
        assert cfg["optimizer"] == "adamw" and cfg["recipe"] == "adaptertune"
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    final = [r for r in recs if r["event"] == "eval"][-1]
    assert {"base", "novel", "hm"} <= set(final)
    rc, stdout, err = run(["evaluate", "--checkpoint", out, "--threads", "1"], capsys)
    assert rc == 0, err
    assert f"base {final['base']:5.1f}%" in stdout and f"novel {final['novel']:5.1f}%" in stdout


def test_bad_folders_are_one_line(hf_dir, folder, tmp_path, capsys):
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes(open(os.path.join(hf_dir, name), "rb").read())
    out = str(tmp_path / "never")
    for argv, pattern in [
        (["--backbone", f"hf:{tmp_path / 'missing'}"], "not a Hugging Face model folder"),
        (["--backbone", f"hf:{no_tok}"], "has no tokenizer files"),
        (["--backbone", f"hf:{hf_dir}", "--pretrained", "openai"], "takes 'folder'"),
        (["--backbone", f"hf:{hf_dir}", "--method", "head-only"], "timm classification"),
        (["--backbone", f"hf:{hf_dir}", "--checkpoint-blocks", "1"], "--checkpoint-blocks"),
    ]:
        rc, _, err = run([folder, *argv, *FAST, "-o", out], capsys)
        assert rc == 2 and pattern in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert not os.path.exists(out)
