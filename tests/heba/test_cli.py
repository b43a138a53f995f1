"""heba-train on bad input: exit 2, one line on stderr naming the argument or file, nothing
written; and what happens with an existing output folder (resume, overwrite, the demo)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from heba import cli
from tests.clip_utils import image_folder, one_thread  # noqa: F401

pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

FAST = ["--model", "tiny", "--pretrained", "none", "--shots", "2", "--epochs", "1",
        "--batch-size", "4", "--towers", "visual", "--start", "4", "--quiet", "--threads", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train/ + test/ trees, 2 images per class in train/ (all of them are the 2 shots)."""
    root = tmp_path_factory.mktemp("data") / "ds"
    image_folder(root / "train", per_class=2, seed=0)
    image_folder(root / "test", per_class=2, seed=1)
    return str(root)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished 1-epoch run (adapters at the top, epoch_1/ set)."""
    out = str(tmp_path_factory.mktemp("runs") / "done")
    assert cli.main([data, *FAST, "-o", out]) == 0
    return out


def run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, *patterns):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("heba-train: error: "), err
    for p in patterns:
        assert p in lines[0], (p, lines[0])
    return lines[0]


def snapshot(out):
    return {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(out) for f in names}


# --- bad values: nothing is written -----------------------------------------------------------

BAD_VALUES = [
    (["--method", "adaptertune", "--rank", "0"], "--rank must be an integer >= 1, got 0"),
    (["--method", "adaptertune", "--every", "0"], "--every must be an integer >= 1, got 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--lr", "-1"], "--lr must be a number >= 0, got -1.0"),
    (["--lr", "nan"], "--lr must be a number >= 0, got nan"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--shots", "0"], "--shots must be an integer >= 1, got 0"),
    (["--test-per-class", "0"], "--test-per-class must be an integer >= 1 (leave it out"),
    (["--reduction", "0"], "--reduction must be an integer >= 1"),
    (["--start", "3", "--end", "2"], "--end (2) must be >= --start (3)"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a number >= 0"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
    (["--slow-fast-ratio", "2"], "--slow-fast-ratio must be a probability in [0, 1]"),
    (["--scale-factor", "0"], "--scale-factor must be a positive number"),
    (["--neg-per-class", "-1"], "--neg-per-class must be an integer >= 0, got -1"),
    (["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--eval-every", "-1"], "--eval-every must be >= 0"),
    (["--checkpoint-blocks", "-1"], "--checkpoint-blocks must be >= 0"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be an integer >= 0, got -1"),
    (["--grad-clip", "-1"], "--grad-clip must be a number >= 0 (0: off), got -1.0"),
    (["--val-split", "1"], "--val-split must be a fraction in [0, 1), got 1.0"),
    (["--backend", "tritn"], "--backend must be one of auto, reference, triton, cuda, got 'tritn'"),
]


@pytest.mark.parametrize("extra,message", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_value(data, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    one_line_error(*run([data, *FAST, *extra, "-o", str(out)], capsys)[::2], message)
    assert not out.exists()


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_named_backend_without_a_gpu(data, tmp_path, capsys, monkeypatch, backend):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the backend can run")
    monkeypatch.setenv("TRITON_INTERPRET", "0")          # CI interprets triton on the CPU
    out = tmp_path / "out"
    one_line_error(*run([data, *FAST, "--backend", backend, "-o", str(out)], capsys)[::2],
                   f"--backend {backend} cannot run on cpu")
    assert not out.exists()


def test_output_is_a_file(data, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("mine")
    one_line_error(*run([data, *FAST, "-o", str(f)], capsys)[::2], f"-o {f} is a file")
    one_line_error(*run([data, *FAST, "-o", str(f / "run")], capsys)[::2], "is a file")
    assert f.read_text() == "mine"


# --- bad files: images, weights, checkpoints -------------------------------------------------

def _damage(path, how):
    if how == "empty":
        open(path, "wb").close()
    elif how == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
    else:
        open(path, "wb").write(b"this is not an image\n" * 10)


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("how", ["empty", "truncated", "corrupt"])
def test_unreadable_image_fails_before_training(data, tmp_path, capsys, split, how):
    """Policy: every image a run reads is decoded first; a bad one stops it, named."""
    ds = tmp_path / "ds"
    shutil.copytree(data, ds)
    cls = sorted(os.listdir(ds / split))[1]
    bad = ds / split / cls / sorted(os.listdir(ds / split / cls))[0]
    _damage(bad, how)
    out = tmp_path / "out"
    one_line_error(*run([str(ds), *FAST, "-o", str(out)], capsys)[::2],
                   f"image {bad} cannot be read", "checked before training")
    assert not out.exists()


def test_weights_files(data, finished, tmp_path, capsys):
    """--pretrained: a text file, an empty file, an adapters file, a weights file that does
    not fit the model."""
    text = tmp_path / "weights.pt"
    text.write_text("hello\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    other = tmp_path / "other.pt"
    torch.save({"visual.proj": torch.randn(4, 4)}, other)
    out = tmp_path / "out"
    cases = [(text, "is not a weights file"), (empty, "is an empty file"),
             (os.path.join(finished, "adapters.safetensors"), "holds adapter weights"),
             (os.path.join(finished, "adapters.json"), "is not a weights file"),
             (other, "cannot load weights")]
    for path, message in cases:
        args = [a for a in FAST if a != "none"]
        args[args.index("--pretrained") + 1:args.index("--pretrained") + 1] = [str(path)]
        line = one_line_error(*run([data, *args, "-o", str(out)], capsys)[::2], message)
        assert str(path) in line
        assert len(line) < 400, line
    assert not out.exists()


def _older_layout(out):
    """The layout before checkpoint sets: train_state.pt beside the adapters, no epoch_<N>/."""
    os.replace(out / "epoch_1" / "train_state.pt", out / "train_state.pt")
    shutil.rmtree(out / "epoch_1")


def test_resume_of_damaged_run(data, finished, tmp_path, capsys):
    """train_state.pt missing or truncated, adapters.json corrupt or edited, a folder in the
    older layout: one line naming the file; the folder is left as it was."""
    def damaged(name, change):
        out = tmp_path / name
        shutil.copytree(finished, out)
        change(out)
        before = snapshot(out)
        return out, before

    state = os.path.join("epoch_1", "train_state.pt")
    cases = [("missing", lambda o: os.remove(o / state), "train_state.pt is missing"),
             ("truncated", lambda o: open(o / state, "r+b").truncate(50),
              "train_state.pt is 50 bytes"),
             ("corrupt json", lambda o: (o / "epoch_1" / "adapters.json").write_text("{"),
              "adapters.json"),
             ("edited json", lambda o: (o / "epoch_1" / "adapters.json").write_text("{}"),
              "adapters.json"),
             ("older layout", _older_layout, "written by an older heba-train")]
    for name, change, message in cases:
        out, before = damaged(name, change)
        one_line_error(*run([data, *FAST, "-o", str(out), "--resume"], capsys)[::2], message)
        assert snapshot(out) == before, name


def test_evaluate_bad_adapters_json(data, finished, tmp_path, capsys):
    for name, text, message in [("corrupt", '{"method": ', "does not parse as JSON"),
                                ("lacks", '{"epoch": 1}', "lacks key(s) method")]:
        ck = tmp_path / name
        shutil.copytree(finished, ck)
        shutil.rmtree(ck / "epoch_1")
        (ck / "adapters.json").write_text(text)
        one_line_error(*run(["evaluate", "--checkpoint", str(ck), data, "--threads", "1"],
                            capsys)[::2], "adapters.json", message)


def test_resume_of_a_started_run_with_corrupt_config(data, tmp_path, capsys):
    out = tmp_path / "started"
    out.mkdir()
    (out / "config.json").write_text("not json")
    one_line_error(*run([data, *FAST, "-o", str(out), "--resume"], capsys)[::2],
                   "config.json does not parse as JSON")


# --- an existing output folder ---------------------------------------------------------------

def test_resume_and_overwrite_exclude_each_other(data, finished, capsys):
    before = snapshot(finished)
    one_line_error(*run([data, *FAST, "-o", finished, "--resume", "--overwrite"], capsys)[::2],
                   "--resume and --overwrite exclude each other")
    assert snapshot(finished) == before


def test_resume_with_nothing_to_resume(data, tmp_path, capsys):
    one_line_error(*run([data, *FAST, "-o", str(tmp_path / "none"), "--resume"], capsys)[::2],
                   "holds no run to resume")
    assert not (tmp_path / "none").exists()


def test_resume_of_a_finished_run_says_so(data, finished, capsys):
    """Exit 0, one line saying it is finished, its saved accuracy; nothing is written."""
    before = snapshot(finished)
    rc, out, err = run([data, *FAST, "-o", finished, "--resume"], capsys)
    assert rc == 0, err
    assert "has already finished: epoch 1 of 1 is saved, nothing is trained" in out
    saved = json.load(open(os.path.join(finished, "adapters.json")))["accuracy"]
    assert f"base {saved['base']:5.1f}%" in out
    assert snapshot(finished) == before


def test_overwrite_replaces_only_the_run(data, finished, tmp_path, capsys):
    out = tmp_path / "ow"
    shutil.copytree(finished, out)
    (out / "notes.txt").write_text("mine")
    rc, log, err = run([data, *FAST, "--epochs", "2", "-o", str(out), "--overwrite"], capsys)
    assert rc == 0, err
    assert "--overwrite: the previous run's files are removed" in log
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(out)) == sorted(["notes.txt", "config.json", "split_base.json",
                                              "split_new.json", "metrics.jsonl", "epoch_2",
                                              "adapters.safetensors", "adapters.json",
                                              "summary.md", "metrics.png"])
    epochs = [json.loads(line)["epoch"] for line in open(out / "metrics.jsonl")
              if json.loads(line)["event"] == "train"]
    assert epochs == [1, 2]


def test_bare_demo_replaces_only_a_demo_run(finished, tmp_path, capsys, monkeypatch):
    """The bare demo's runs/demo: a user's run there is refused, untouched; a previous demo
    run is replaced, and the log says so."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(finished, "runs/demo")
    before = snapshot("runs/demo")
    demo = ["--epochs", "1", "--shots", "1", "--test-per-class", "1", "--quiet",
            "--threads", "1", "--towers", "visual", "--start", "4", "--no-eval-before"]
    one_line_error(*run(demo, capsys)[::2], "runs/demo holds a run that is not the demo's",
                   "-o DIR")
    assert snapshot("runs/demo") == before
    cfg = json.load(open("runs/demo/config.json"))
    json.dump(dict(cfg, source="demo", dataset=None), open("runs/demo/config.json", "w"))
    rc, log, err = run(demo, capsys)
    assert rc == 0, err
    assert "runs/demo: replacing the previous demo run" in log
    assert json.load(open("runs/demo/adapters.json"))["source"] == "demo"
    assert sorted(os.listdir("runs/demo")) == sorted(["config.json", "metrics.jsonl",
                                                      "epoch_1", "adapters.safetensors",
                                                      "adapters.json", "summary.md",
                                                      "metrics.png"])


# --- default folders, warnings, one line per measurement ------------------------------------

def test_default_folders_differ_per_method_and_warn_of_a_long_warm_up(data, tmp_path, capsys,
                                                                      monkeypatch):
    """Without -o: runs/<split>-<data>-<method>, so an AdapterTune run never lands in a HeBA
    run's folder; a warm-up longer than the run is one warning line; the accuracy before
    training is printed once; each finished run has its figure."""
    monkeypatch.chdir(tmp_path)
    rc, out, err = run([data, *FAST], capsys)
    assert rc == 0, err
    assert out.count("before training:") == 1 and "warning" not in out + err
    rc, out, err = run([data, *FAST, "--method", "adaptertune", "--rank", "4"], capsys)
    assert rc == 0, err
    assert sorted(os.listdir("runs")) == ["base2novel-ds-adaptertune", "base2novel-ds-heba"]
    warnings = [line for line in (out + err).splitlines() if "warning" in line]
    assert len(warnings) == 1 and "--warmup-epochs 5 with --epochs 1" in warnings[0], err
    for name in os.listdir("runs"):
        with open(os.path.join("runs", name, "metrics.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, expected", [
    (["--dataset", "cifar10"], ["CLIP backbone", "eurosat", "imagenet_r",
                                "cifar10 is a torchvision data set"]),
    (["--dataset", "eurosatt"], ["CLIP backbone", "oxford_pets, eurosat"]),
    (["--backbone", "timm:vit_tiny_patch16_224", "--dataset", "eurosat"],
     ["a timm backbone trains on", "cifar10", "svhn",
      "eurosat is a data set in CoOp's layout: train a CLIP backbone on it"]),
])
def test_dataset_name_checked_for_the_backbone(tmp_path, capsys, argv, expected):
    rc, _, err = run([*argv, "--root", str(tmp_path), "-o", str(tmp_path / "o")], capsys)
    one_line_error(rc, err, *expected)
    assert os.listdir(tmp_path) == []


# --- logs -----------------------------------------------------------------------------------

def test_no_progress_bar_when_stderr_is_not_a_terminal(data, tmp_path, capsys):
    args = [a for a in FAST if a != "--quiet"]
    rc, out, err = run([data, *args, "-o", str(tmp_path / "log")], capsys)
    assert rc == 0, err
    assert "\r" not in err and "\r" not in out
    assert "epoch 1/1: loss" in out                     # the plain per-epoch line


def test_worker_error_is_one_line():
    """A DataLoader worker wraps the error with its traceback: its last line is the message."""
    from heba.data.coop import DataError
    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback "
                        "(most recent call last):\n  File \"x.py\", line 1\nheba.data.coop."
                        "DataError: image /d/a.png cannot be read (OSError: truncated)")
    assert cli.error_line(wrapped) == "image /d/a.png cannot be read (OSError: truncated)"


def test_protocol_resume_reports_finished_seeds_and_starts_the_rest(data, tmp_path, capsys):
    out = str(tmp_path / "b2n")
    one_line_error(*run([data, *FAST, "--seeds", "1", "2", "-o", out, "--resume"],
                        capsys)[::2], "no seed folder", "holds a run to resume")
    assert not os.path.exists(out)
    assert run([data, *FAST, "--seeds", "1", "-o", out], capsys)[0] == 0
    rc, log, err = run([data, *FAST, "--seeds", "1", "2", "-o", out, "--resume"], capsys)
    assert rc == 0, err
    assert "seed1 has already finished" in log
    table = json.load(open(os.path.join(out, "base2novel.json")))
    assert sorted(table["per_seed"]) == ["1", "2"]


def test_split_json_must_be_a_file_path(tmp_path, capsys):
    one_line_error(*run(["split", "--dataset", "eurosat", "--root", str(tmp_path), "--shots",
                         "1", "--seed", "1", "--json", str(tmp_path)], capsys)[::2],
                   f"--json {tmp_path} is a folder")
