"""heba-train when the world is not kind: a rejected command line, places it cannot write,
a diverged run, signals from outside, a data set and a run folder that nest. Every case is
one line on stderr (``heba-train: error: ...`` for errors), a documented exit status, no
traceback, and nothing written that was not there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from heba import cli
from tests.clip_utils import image_folder, one_thread  # noqa: F401

pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

FAST = ["--model", "tiny", "--pretrained", "none", "--shots", "1", "--batch-size", "2",
        "--split", "all", "--towers", "visual", "--start", "4", "--no-eval-before", "--quiet",
        "--threads", "1"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("data") / "ds", per_class=2)


def run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(rc, err, status, *patterns):
    assert rc == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("heba-train: error: "), err
    for p in patterns:
        assert p in lines[0], (p, lines[0])
    return lines[0]


# --- the command line ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv, patterns", [
    (["--shots", "1e9"], ["argument --shots: invalid int value: '1e9'"]),
    (["--optimizer", "sdg"], ["invalid choice: 'sdg'", "did you mean sgd?"]),
    (["--epchs", "3"], ["unrecognized arguments: --epchs", "did you mean --epochs?"]),
    (["split", "--dataset", "eurosat", "--shots", "1", "--seed", "1", "--json", "s.json",
      "--subsampel", "base"], ["unrecognized arguments: --subsampel", "did you mean --subsample?"]),
    (["evaluate", "--dataset", "eurosat"], ["required: --checkpoint"]),
])
def test_argparse_errors_are_one_line(argv, patterns, capsys):
    """argparse-one-line: argparse's own errors in heba-train's format, exit 2, a hint."""
    rc, out, err = run(argv, capsys)
    one_line(rc, err, 2, *patterns)
    assert "usage:" not in err and out == ""


def test_help_still_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    assert "usage:" in capsys.readouterr().out


# --- places that cannot be written: refused before any model loads --------------------------------

def test_unwritable_outputs_are_refused_up_front(data, tmp_path, capsys):
    """probe-writes: a name too long, a file where a folder should be, an existing file as
    ``evaluate -o``: one line each, nothing left behind."""
    long = str(tmp_path / "a" / ("x" * 300))
    one_line(*run([data, *FAST, "--epochs", "1", "-o", long], capsys)[::2], 2,
             "file name too long")
    assert os.listdir(tmp_path) == []                   # the folder "a" made by the probe went
    one_line(*run(["split", "--dataset", "eurosat", "--root", str(tmp_path), "--shots", "1",
                   "--seed", "1", "--json", long + "/s.json"], capsys)[::2], 2,
             "--json", "file name too long")
    f = tmp_path / "afile"
    f.write_text("mine")
    one_line(*run(["evaluate", "--checkpoint", str(tmp_path / "none"), data, "-o", str(f)],
                  capsys)[::2], 2, f"-o {f} is a file")
    one_line(*run(["split", "--dataset", "eurosat", "--root", str(tmp_path), "--shots", "1",
                   "--seed", "1", "--json", str(f / "s.json")], capsys)[::2], 2, "is a file")
    assert f.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["afile"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_proc_is_refused_up_front(data, capsys):
    """/proc lets even root pass os.access; the probe file cannot be created there."""
    one_line(*run([data, *FAST, "--epochs", "1", "-o", "/proc/heba-run"], capsys)[::2], 2,
             "-o /proc/heba-run: cannot write")


def test_data_and_output_must_not_nest(data, tmp_path, capsys):
    """``-o`` inside the ImageFolder root, or the root inside ``-o``; a root that is a file."""
    one_line(*run([data, *FAST, "--epochs", "1", "-o", os.path.join(data, "run")],
                  capsys)[::2], 2, "is inside the ImageFolder")
    one_line(*run([data, *FAST, "--epochs", "1", "-o", os.path.dirname(data)], capsys)[::2], 2,
             "is inside -o")
    f = tmp_path / "root"
    f.write_text("x")
    one_line(*run(["--dataset", "eurosat", "--root", str(f), *FAST, "--epochs", "1", "-o",
                   str(tmp_path / "r")], capsys)[::2], 2, f"--root {f} is a file")
    assert sorted(os.listdir(tmp_path)) == ["root"]


# --- a diverged run -----------------------------------------------------------------------------

def test_diverged_run_stops_without_saving_nan(data, tmp_path, capsys):
    """nan-guard: lr 1e9 makes the loss non-finite: one line naming the epoch, the step and
    the last good saved epoch, exit 1, no set or final adapters from it, strict JSON."""
    out = str(tmp_path / "nan")
    rc, _, err = run([data, *FAST, "--epochs", "3", "--lr", "1e9", "-o", out], capsys)
    line = one_line(rc, err, 1, "training diverged at epoch ", " step ")
    assert "last good saved epoch" in line or "no epoch was saved" in line, line
    assert not os.path.exists(os.path.join(out, "adapters.safetensors"))
    from safetensors.torch import load_file
    from heba.train import run_folder as rf
    latest = rf.read_set(out)
    if latest is not None:
        assert f"last good saved epoch is {latest.epoch}" in line
        for t in load_file(latest.file("adapters.safetensors")).values():
            assert t.isfinite().all()
    metrics = os.path.join(out, "metrics.jsonl")
    for text in open(metrics).read().splitlines() if os.path.exists(metrics) else []:
        json.loads(text, parse_constant=pytest.fail)


# --- signals to a real process ------------------------------------------------------------------

def _child(argv, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "heba.cli", *argv], cwd=str(tmp_path),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(pattern, proc, limit=240):
    """Until a path matching ``pattern`` exists (only the latest epoch's set is kept, so an
    exact epoch may come and go between two looks)."""
    import glob
    t0 = time.time()
    while not glob.glob(pattern):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < limit, f"{pattern} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("sig, workers", [(signal.SIGTERM, "0"), (signal.SIGINT, "2")])
def test_signal_stops_cleanly(data, tmp_path, sig, workers):
    """signals: SIGTERM (to the process) or SIGINT (to its group, as Ctrl-C: the loader's
    workers too) once epoch 1 is saved: one line with the --resume hint, 128 + signal, no
    traceback, a whole set and no leftovers or lock file."""
    out = str(tmp_path / "run")
    argv = [data, *FAST, "--epochs", "2000", "--workers", workers, "-o", out]
    proc = _child(argv, tmp_path)
    _wait_for(os.path.join(out, "epoch_*"), proc)
    (os.killpg if sig == signal.SIGINT else os.kill)(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    assert f"stopped by {signal.Signals(sig).name}" in err and "--resume" in err, err
    from heba.train import run_folder as rf
    assert rf.read_set(out).epoch >= 1 and rf.stale_entries(out) == []
    assert not os.path.exists(os.path.join(out, rf.LOCK_NAME))


# --- one process per run folder -------------------------------------------------------------------

def test_second_run_on_a_folder_is_refused_before_writing(data, tmp_path, capsys):
    """folder-lock: a run folder held by another live process (a real one): ``--resume``
    and ``--overwrite`` are refused in one line, exit 2, and the folder is unchanged."""
    out = str(tmp_path / "run")
    assert cli.main([data, *FAST, "--epochs", "1", "-o", out]) == 0
    capsys.readouterr()
    hold = ("import sys, time; from heba.train import run_folder as rf; rf.lock(sys.argv[1]); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", hold, out], stdout=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=REPO), text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)
                  if os.path.isfile(os.path.join(out, n))}
        for flag in ("--resume", "--overwrite"):
            one_line(*run([data, *FAST, "--epochs", "1", "-o", out, flag], capsys)[::2], 2,
                     f"{out} is in use by another heba-train process (pid {proc.pid})")
        assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)
                if os.path.isfile(os.path.join(out, n))} == before
    finally:
        proc.kill()
        proc.wait()
    assert cli.main([data, *FAST, "--epochs", "1", "-o", out, "--resume"]) == 0


# --- files that are not what they are given as --------------------------------------------------

def test_a_file_that_is_no_checkpoint_is_named_in_one_line(data, tmp_path, capsys):
    """evaluate --checkpoint on a text file or a pickle of other objects: one line naming the
    file as no heba or published checkpoint; torch's advice to load it with
    weights_only=False (code execution) is never relayed."""
    import argparse
    import pickle
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint\n")
    obj = tmp_path / "last.pt"
    with open(obj, "wb") as f:
        pickle.dump({"args": argparse.Namespace(lr=0.1)}, f, protocol=4)
    for f in (notes, obj):
        rc, _, err = run(["evaluate", "--checkpoint", str(f), data, "--model", "tiny",
                          "--pretrained", "none", "--threads", "1"], capsys)
        line = one_line(rc, err, 2, str(f), "is not a heba or published checkpoint")
        assert "weights_only" not in line, line


def test_an_empty_coop_train_list_is_named_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """A split file whose train list is empty: one line naming the split file and the cause,
    raised while the data is listed (the model loader is never reached)."""
    from heba.clip import tiny
    from tests import coop_fixtures as fx

    def no_model(*a, **k):
        raise AssertionError("the model loaded before the data was listed")
    monkeypatch.setattr(tiny, "load_tiny_clip", no_model)
    spec = fx.make_split_dataset(tmp_path / "data", "oxford_pets", [(0, 2, 3)] * 3, images=True)
    rc, _, err = run(["--dataset", "oxford_pets", "--root", str(tmp_path / "data"), *FAST,
                      "--epochs", "1", "-o", str(tmp_path / "run")], capsys)
    one_line(rc, err, 2, spec["split_path"], "train list is empty")
    assert not os.path.exists(tmp_path / "run")
