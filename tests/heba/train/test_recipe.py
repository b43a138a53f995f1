"""heba-train: data handling, the training step, checkpoints, resume, errors (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")
import torch
import torch.nn.functional as F

from heba import cli
from heba.data.folder import folder_split
from heba.train import recipe as R
from heba.train.prompts import PromptBank, class_prompts, read_descriptions
from heba.train.step import AdapterStep, candidate_mask
from tests.clip_utils import image_folder, one_thread, tiny_clip  # noqa: F401

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
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

def test_folder_split_shots_by_seed(folder):
    sp = folder_split(folder, shots=2, seed=1)
    assert sp.classnames == ["blue square", "green triangle", "red circle", "yellow cross"]
    assert [sum(1 for it in sp.train if it.label == c) for c in range(4)] == [2, 2, 2, 2]
    assert [sum(1 for it in sp.test if it.label == c) for c in range(4)] == [3, 3, 3, 3]
    assert not {it.path for it in sp.train} & {it.path for it in sp.test}   # shots aren't test
    assert all(os.path.basename(os.path.dirname(it.path)).replace("_", " ") == it.classname
               == sp.classnames[it.label] for it in sp.train + sp.test)
    assert folder_split(folder, 2, 1).train == sp.train
    assert folder_split(folder, 2, 2).train != sp.train


def test_folder_base_new_halves(folder):
    base, new = folder_split(folder, 2, 1, "base"), folder_split(folder, 2, 1, "new")
    assert base.classnames == ["blue square", "green triangle"]
    assert new.classnames == ["red circle", "yellow cross"]
    assert {it.label for it in new.test} == {0, 1}                 # relabelled from 0


def test_train_test_subfolders(tmp_path):
    image_folder(tmp_path / "train", per_class=3, seed=0)
    image_folder(tmp_path / "test", per_class=2, seed=1)
    sp = folder_split(str(tmp_path), shots=3, seed=0)
    assert len(sp.train) == 12 and len(sp.test) == 8
    assert all("/train/" in it.path for it in sp.train)
    assert all("/test/" in it.path for it in sp.test)


# --- prompts and the training step ----------------------------------------------------------

def test_descriptions_json_and_prompts(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"red_circle": ["a round red thing", "a red {}"],
                                "Blue Square": "a blue box"}))
    desc = read_descriptions(str(path))
    prompts = class_prompts(["red circle", "blue square", "green dot"], desc)
    assert prompts == [["a photo of a red circle, a round red thing",
                        "a photo of a red circle, a red red circle"],
                       ["a photo of a blue square, a blue box"],
                       ["a photo of a green dot, a photo of a green dot."]]   # published fallback
    assert class_prompts(["red circle"], desc, templates=["{} here"]) == [["red circle here"]]


def test_prompt_bank_matches_per_class_loop():
    """The evaluation classifier is the published mean over the padded prompts."""
    model = tiny_clip()
    tok = lambda texts: torch.tensor([[98] + [1 + (hash(t) + j) % 90 for j in range(len(t) % 5 + 1)]  # noqa
                                      + [99] + [0] * (14 - len(t) % 5 - 1) for t in texts])
    prompts = [["a", "bb"], ["ccc"], ["dddd", "eeeee", "f"]]
    bank = PromptBank(prompts, tok)
    assert bank.tokens.shape[:2] == (3, 3)
    with torch.no_grad():
        got = bank.features(model)
        exp = []
        for p in prompts:
            padded = p + [p[0]] * (3 - len(p))                  # the first prompt repeats
            e = F.normalize(model.encode_text(tok(padded)), dim=-1).mean(0)
            exp.append(F.normalize(e, dim=-1))
    torch.testing.assert_close(got, torch.stack(exp), rtol=1e-5, atol=1e-6)


def test_candidate_mask_is_the_published_set():
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(40)
    for _ in range(300):
        labels = torch.randint(0, 40, (6,), generator=g)
        m = candidate_mask(labels, 40, 5, g)
        pos = labels.unique()
        assert m[pos].all()
        assert int(m.sum()) == len(pos) + min(40 - len(pos), 5 * len(pos))
        counts += m.float()
        counts[pos] -= 1
    assert counts.min() > 0                                   # every class gets drawn
    few = torch.tensor([0, 1, 2, 3, 0, 1])                    # classes <= batch: every class
    assert candidate_mask(few, 6, 5, g).all() and candidate_mask(few, 40, 0, g).sum() == 4
    assert candidate_mask(few, 40, 5, g, mode="all").all()


def _published_loss(logits, target, eps=0.1):
    """VLM-HeBA's LabelSmoothingCrossEntropy, restated from its definition."""
    logp = F.log_softmax(logits, dim=-1)
    c = logits.shape[-1]
    return (-logp.sum(-1) * eps / c + (1 - eps) * F.nll_loss(logp, target, reduction="none")
            ).mean()


@pytest.mark.parametrize("towers", ["both", "visual"])
def test_step_loss_is_the_published_loss(towers):
    """Adapted text: the candidates' prompts encoded; frozen text: masked logits; both
    equal the published loss over the candidate set with the labels renumbered."""
    from heba.clip.wiring import attach_heba
    model = tiny_clip()
    attach_heba(model, towers_=towers)
    model.eval()
    tok = lambda texts: torch.tensor([[98, 1 + int(t), 99] + [0] * 13 for t in texts])  # noqa
    bank = PromptBank([[str(2 * c), str(2 * c + 1)] for c in range(20)], tok)
    step = AdapterStep(model, bank, label_smoothing=0.1)
    images, labels = torch.randn(5, 3, 32, 32), torch.tensor([0, 3, 3, 17, 1])
    g = torch.Generator().manual_seed(1)
    mask = candidate_mask(labels, 20, 2, g)
    pick = torch.randint(0, 2, (20,), generator=g)
    with torch.no_grad():
        loss, _ = step(images, labels, mask, pick)
        classes = mask.nonzero().squeeze(1)
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(bank.tokens[classes, pick[classes]]), dim=-1)
        target = torch.tensor([classes.tolist().index(y) for y in labels.tolist()])
        exp = _published_loss(model.logit_scale.exp() * img @ txt.T, target)
    torch.testing.assert_close(loss, exp, rtol=1e-5, atol=1e-6)


# --- the command line ------------------------------------------------------------------------

def test_train_evaluate_and_files(folder, tmp_path, capsys):
    out = str(tmp_path / "run")
    rc, stdout, err = run([folder, *FAST, "--epochs", "2", "-o", out], capsys)
    assert rc == 0, err
    assert "before training: base" in stdout and "after training:  base" in stdout
    assert stdout.count("before training:") == 1            # printed when it is measured
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    train_lines = [l for l in lines if l["event"] == "train"]
    assert [l["epoch"] for l in train_lines] == [1, 2]
    assert all(k in train_lines[0] for k in ("loss", "lr", "img_per_s"))
    final = [l for l in lines if l["event"] == "eval"][-1]
    assert {"base", "novel", "hm"} <= set(final)
    from safetensors.torch import load_file
    weights = load_file(os.path.join(out, R.CKPT_NAME))
    assert weights and all(k.startswith(("visual_adapter.", "text_adapter.")) for k in weights)
    cfg = json.load(open(os.path.join(out, "adapters.json")))
    assert cfg["epoch"] == 2 and cfg["method"] == "heba" and cfg["shots"] == 2
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    # evaluate --checkpoint gives the accuracy the run reported
    rc, stdout, err = run(["evaluate", "--checkpoint", os.path.join(out, R.CKPT_NAME), folder,
                           "--threads", "1"], capsys)
    assert rc == 0, err
    assert f"base {final['base']:5.1f}%" in stdout and f"novel {final['novel']:5.1f}%" in stdout


def test_resume_continues(folder, tmp_path, capsys, monkeypatch):
    """Interrupt a 3-epoch run after epoch 1, resume it: same weights as uninterrupted."""
    from safetensors.torch import load_file
    args = [folder, *FAST, "--split", "all", "--no-eval-before", "--epochs", "3"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert run([*args, "-o", full], capsys)[0] == 0

    real_save = R.TrainRecipe.save_checkpoint

    def save_then_stop(self, epoch, acc):
        real_save(self, epoch, acc)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(R.TrainRecipe, "save_checkpoint", save_then_stop)
    assert run([*args, "-o", part], capsys)[0] == 130
    monkeypatch.setattr(R.TrainRecipe, "save_checkpoint", real_save)
    assert json.load(open(os.path.join(part, "epoch_1", "adapters.json")))["epoch"] == 1
    rc, stdout, err = run([*args, "-o", part, "--resume"], capsys)
    assert rc == 0, err
    wf, wp = load_file(os.path.join(full, R.CKPT_NAME)), load_file(os.path.join(part, R.CKPT_NAME))
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
    keys = set(load_file(os.path.join(out, R.CKPT_NAME)))
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
    bad = tmp_path / "bad.py"
    bad.write_text("SHAPES = {'red circle': ['x'],\n")
    rc, _, err = run([folder, *FAST, "--descriptions", str(bad), "-o", str(tmp_path / "e")],
                     capsys)
    assert rc == 2 and "does not parse" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "e")


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
    files = _snapshot(out)
    _one_line_error(*run([folder, *FAST, "-o", out], capsys)[::2], "already holds a checkpoint")
    _one_line_error(*run([folder, *FAST, "--shots", "3", "-o", out, "--resume"], capsys)[::2],
                    "another configuration (shots: checkpoint 2 vs now 3)")
    _one_line_error(*run([folder, *FAST, "--method", "adaptertune", "-o", out, "--resume"],
                         capsys)[::2], "another configuration (method")
    _one_line_error(*run(["evaluate", "--checkpoint", out, "--model", "ViT-B-32", folder],
                         capsys)[::2], "another configuration (model")
    assert _snapshot(out) == files


def _snapshot(out):
    """Every file under ``out`` (the run folder and its epoch_<N>/ set) and its bytes."""
    return {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(out) for f in names}


def test_subprocess_error_has_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "heba.cli", str(tmp_path / "missing"), "-o",
                        str(tmp_path / "o")], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("heba-train: error: dataset directory")
