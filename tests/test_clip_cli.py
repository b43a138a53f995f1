"""heba-train: data handling, the training step, checkpoints, resume, errors (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from heba import cli
from heba.clip import data as D
from heba.clip import train as T
from heba.clip.prompts import TextBank, class_prompts, load_descriptions
from tests.clip_utils import image_folder, one_thread, tiny_clip  # noqa: F401

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--model", "tiny", "--pretrained", "none", "--shots", "2", "--epochs", "1",
        "--batch-size", "4", "--quiet", "--threads", "1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("ds"), per_class=5)


def run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# --- data ------------------------------------------------------------------------------------

def test_folder_splits_shots_by_seed(folder):
    classes, train, test = D.folder_splits(folder, shots=2, seed=1)
    assert classes == ["blue square", "green triangle", "red circle", "yellow cross"]
    assert [sum(1 for _, y in train if y == c) for c in range(4)] == [2, 2, 2, 2]
    assert [sum(1 for _, y in test if y == c) for c in range(4)] == [3, 3, 3, 3]
    assert not {p for p, _ in train} & {p for p, _ in test}     # shots are not test images
    assert all(os.path.basename(os.path.dirname(p)).replace("_", " ") == classes[y]
               for p, y in train + test)
    again = D.folder_splits(folder, shots=2, seed=1)[1]
    other = D.folder_splits(folder, shots=2, seed=2)[1]
    assert again == train and other != train


def test_base_novel_halves():
    assert D.base_novel(5) == ([0, 1, 2], [3, 4])
    assert D.base_novel(4) == ([0, 1], [2, 3])


def test_train_test_subfolders(tmp_path):
    image_folder(tmp_path / "train", per_class=3, seed=0)
    image_folder(tmp_path / "test", per_class=2, seed=1)
    classes, train, test = D.folder_splits(str(tmp_path), shots=3, seed=0)
    assert len(train) == 12 and len(test) == 8
    assert all("/train/" in p for p, _ in train) and all("/test/" in p for p, _ in test)


# --- prompts and the training step ----------------------------------------------------------

def test_descriptions_load_and_are_the_prompts(tmp_path):
    classes = ["red circle", "blue square"]
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"red_circle": ["a round red thing", "a red disc"],
                                "blue square": "a blue box"}))
    desc = load_descriptions(str(path), classes)
    prompts = class_prompts(classes, descriptions=desc)
    assert prompts == [("a round red thing", 0), ("a red disc", 0), ("a blue box", 1)]
    path.write_text(json.dumps({"red circle": ["x"], "blue squar": ["y"]}))
    with pytest.raises(D.UsageError, match="no entry for 1 class.*blue square"):
        load_descriptions(str(path), classes)


def test_text_bank_matches_per_class_loop():
    model = tiny_clip()
    tok = lambda texts: torch.tensor([[98] + [1 + (hash(t) + j) % 90 for j in range(len(t) % 5 + 1)]  # noqa
                                      + [99] + [0] * (14 - len(t) % 5 - 1) for t in texts])
    prompts = [("a", 0), ("bb", 0), ("ccc", 1), ("dddd", 2), ("eeeee", 2), ("f", 2)]
    bank = TextBank(prompts, tok, 3)
    with torch.no_grad():
        got = bank.features(model)
        sub = bank.features(model, torch.tensor([0, 2]))
        exp = []
        for c in range(3):
            toks = tok([p for p, i in prompts if i == c])
            e = F.normalize(model.encode_text(toks), dim=-1).mean(0)
            exp.append(F.normalize(e, dim=-1))
        exp = torch.stack(exp)
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sub, exp[[0, 2]], rtol=1e-5, atol=1e-6)


def test_sample_candidates():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (4000,), generator=g)
    cand = T.sample_candidates(labels, 10, 5, g)
    assert cand.shape == (4000, 6) and torch.equal(cand[:, 0], labels)
    neg = cand[:, 1:]
    assert (neg != labels[:, None]).all()
    assert all(len(set(r)) == 6 for r in cand[:200].tolist())
    freq = torch.bincount(neg.flatten(), minlength=10).float() / neg.numel()
    assert (freq - 0.1).abs().max() < 0.01                     # uniform over the others
    assert T.sample_candidates(labels, 6, 5, g) is None         # 5 negatives = every other class
    assert T.sample_candidates(labels, 10, 0, g) is None


def test_adapter_step_loss_over_candidates():
    from heba.clip.wiring import attach_heba
    model = tiny_clip()
    attach_heba(model)
    model.eval()
    tok = lambda texts: torch.tensor([[98, 1 + int(t), 99] + [0] * 13 for t in texts])  # noqa
    bank = TextBank([(str(c), c) for c in range(8)], tok, 8)
    step = T.AdapterStep(model, bank, neg_classes=3, label_smoothing=0.1)
    images = torch.randn(5, 3, 32, 32)
    labels = torch.tensor([0, 3, 3, 7, 1])
    cand = T.sample_candidates(labels, 8, 3, torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss, _ = step(images, labels, cand)
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = bank.features(model)
        logits = model.logit_scale.exp() * img @ txt.T                   # all 8 classes
        exp = F.cross_entropy(logits.gather(1, cand), torch.zeros(5, dtype=torch.long),
                              label_smoothing=0.1)
        full, _ = T.AdapterStep(model, bank, 0, 0.1)(images, labels, None)
        exp_full = F.cross_entropy(logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(loss, exp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full, exp_full, rtol=1e-5, atol=1e-6)


# --- the command line ------------------------------------------------------------------------

def test_train_evaluate_and_files(folder, tmp_path, capsys):
    out = str(tmp_path / "run")
    rc, stdout, err = run([folder, *FAST, "--epochs", "2", "-o", out], capsys)
    assert rc == 0, err
    assert "before training: base" in stdout and "after training:  base" in stdout
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    train_lines = [l for l in lines if l["event"] == "train"]
    assert [l["epoch"] for l in train_lines] == [1, 2]
    assert all(k in train_lines[0] for k in ("loss", "lr", "img_per_s"))
    final = [l for l in lines if l["event"] == "eval"][-1]
    assert {"base", "novel", "hm"} <= set(final)
    from safetensors.torch import load_file
    weights = load_file(os.path.join(out, T.CKPT_NAME))
    assert weights and all(k.startswith(("visual_adapter.", "text_adapter.")) for k in weights)
    cfg = json.load(open(os.path.join(out, "adapters.json")))
    assert cfg["epoch"] == 2 and cfg["method"] == "heba" and cfg["shots"] == 2
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    # evaluate --checkpoint gives the accuracy the run reported
    rc, stdout, err = run(["evaluate", "--checkpoint", os.path.join(out, T.CKPT_NAME), folder,
                           "--threads", "1"], capsys)
    assert rc == 0, err
    assert f"base {final['base']:5.1f}%" in stdout and f"novel {final['novel']:5.1f}%" in stdout


def test_resume_continues(folder, tmp_path, capsys, monkeypatch):
    """Interrupt a 3-epoch run after epoch 1, resume it: same weights as uninterrupted."""
    from safetensors.torch import load_file
    args = [folder, *FAST, "--split", "all", "--no-eval-before", "--epochs", "3"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert run([*args, "-o", full], capsys)[0] == 0

    real_save = T._save

    def save_then_stop(model, opt, sched, cfg, epoch, *rest):
        real_save(model, opt, sched, cfg, epoch, *rest)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "_save", save_then_stop)
    assert run([*args, "-o", part], capsys)[0] == 130
    monkeypatch.setattr(T, "_save", real_save)
    assert json.load(open(os.path.join(part, "adapters.json")))["epoch"] == 1
    rc, stdout, err = run([*args, "-o", part, "--resume"], capsys)
    assert rc == 0, err
    wf, wp = load_file(os.path.join(full, T.CKPT_NAME)), load_file(os.path.join(part, T.CKPT_NAME))
    assert set(wf) == set(wp)
    for k in wf:
        assert torch.equal(wf[k], wp[k]), k
    epochs = [json.loads(l)["epoch"] for l in open(os.path.join(part, "metrics.jsonl"))
              if json.loads(l)["event"] == "train"]
    assert epochs == [1, 2, 3]


def test_adaptertune_recipe(folder, tmp_path, capsys):
    out = str(tmp_path / "at")
    rc, stdout, err = run([folder, *FAST, "--method", "adaptertune", "--rank", "4", "--every",
                           "2", "-o", out, "--no-eval-before", "--precision", "bf16"], capsys)
    assert rc == 0, err
    from safetensors.torch import load_file
    keys = set(load_file(os.path.join(out, T.CKPT_NAME)))
    assert keys == {f"blocks.{i}.adapter.{p}.{w}" for i in (0, 2) for p in ("down", "up")
                    for w in ("weight", "bias")}


def test_descriptions_cli(folder, tmp_path, capsys):
    desc = {c: [f"a photo of a {c}, a shape", f"{c}"] for c in
            ["red circle", "blue square", "green triangle", "yellow cross"]}
    path = tmp_path / "desc.json"
    path.write_text(json.dumps(desc))
    out = str(tmp_path / "d")
    rc, _, err = run([folder, *FAST, "--descriptions", str(path), "-o", out,
                      "--no-eval-before"], capsys)
    assert rc == 0, err
    assert json.load(open(os.path.join(out, "adapters.json")))["descriptions"] == str(path)
    path.write_text(json.dumps({"red circle": ["x"]}))
    rc, _, err = run([folder, *FAST, "--descriptions", str(path), "-o", str(tmp_path / "e")],
                     capsys)
    assert rc == 2 and "no entry for" in err


def _one_line_error(rc, err, pattern):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("heba-train: error:"), err
    assert pattern in lines[0], err


def test_bad_input_exit_2(folder, tmp_path, capsys):
    out = str(tmp_path / "x")
    _one_line_error(*run(["/nonexistent/ds", *FAST, "-o", out], capsys)[::2], "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(*run([str(empty), *FAST, "-o", out], capsys)[::2], "no class folders")
    (empty / "cls").mkdir()
    _one_line_error(*run([str(empty), *FAST, "-o", out], capsys)[::2], "no images")
    _one_line_error(*run([folder, *FAST, "--shots", "5", "-o", out], capsys)[::2],
                    "fewer images than 5 shots")
    _one_line_error(*run([folder, *FAST, "--model", "ViT-Q-99", "-o", out], capsys)[::2],
                    "unknown model 'ViT-Q-99'")
    _one_line_error(*run([folder, *FAST, "--model", "ViT-B-32", "--pretrained", "openai",
                          "-o", out], capsys)[::2], "--allow-download")
    assert not os.path.exists(out)                     # nothing was written


def test_checkpoint_never_overwritten(folder, tmp_path, capsys):
    out = str(tmp_path / "ck")
    assert run([folder, *FAST, "-o", out, "--no-eval-before"], capsys)[0] == 0
    files = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    _one_line_error(*run([folder, *FAST, "-o", out], capsys)[::2], "already holds a checkpoint")
    _one_line_error(*run([folder, *FAST, "--shots", "3", "-o", out, "--resume"], capsys)[::2],
                    "another configuration (shots: checkpoint 2 vs now 3)")
    _one_line_error(*run([folder, *FAST, "--method", "adaptertune", "-o", out, "--resume"],
                         capsys)[::2], "another configuration (method")
    _one_line_error(*run(["evaluate", "--checkpoint", out, "--model", "ViT-B-32", folder],
                         capsys)[::2], "another configuration (model")
    assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == files


def test_subprocess_error_has_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "heba.cli", str(tmp_path / "missing"), "-o",
                        str(tmp_path / "o")], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("heba-train: error: dataset directory")
