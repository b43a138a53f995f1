"""Checkpoints are atomic as a set: a kill between any two writes, then ``--resume``, gives
the uninterrupted run (fault injection at every write point, not timing)."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
import torch

from heba import cli
from heba.clip import checkpoints as ckpt
from heba.clip.checkpoints import CheckpointError
from heba.train import run_folder as rf
from tests.clip_utils import image_folder, one_thread  # noqa: F401

pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kills are forked children")

# Two epochs (a set replaces a set), adapters on the last image block only (fast).
ARGS = ["--model", "tiny", "--pretrained", "none", "--shots", "1", "--epochs", "2",
        "--batch-size", "2", "--split", "all", "--towers", "visual", "--start", "4",
        "--no-eval-before", "--quiet", "--threads", "1"]
FINAL = {"config.json", "split_all.json", "metrics.jsonl", "epoch_2", "adapters.safetensors",
         "adapters.json", "summary.md", "metrics.png"}
KILLED = 137


@pytest.fixture(autouse=True, scope="module")
def no_fsync():
    """These are process kills, not power cuts: the page cache survives them, so the
    fsyncs (a tenth of a run here) are skipped."""
    real = ckpt.fsync
    ckpt.fsync = lambda path: None
    yield
    ckpt.fsync = real


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("ds"), per_class=2)


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """The uninterrupted run: its final weights, its metrics, and every write it made."""
    out = str(tmp_path_factory.mktemp("ref") / "run")
    writes = []
    rf.WRITE_HOOK = writes.append
    try:
        assert cli.main([folder, *ARGS, "-o", out]) == 0
    finally:
        rf.WRITE_HOOK = None
    return dict(out=out, writes=writes, weights=_weights(out), metrics=_metrics(out))


def _weights(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "adapters.safetensors"))


def _metrics(out):
    return [(r["event"], r["epoch"]) for r in map(json.loads, open(os.path.join(out,
                                                                               "metrics.jsonl")))]


def _killed_at(k, argv):
    """Run ``heba-train argv`` in a forked child that dies (os._exit) right after write ``k``."""
    pid = os.fork()
    if pid == 0:                                   # the child: never returns into pytest
        code = 1
        try:
            count = [0]

            def hook(what):
                if count[0] == k:
                    os._exit(KILLED)
                count[0] += 1

            rf.WRITE_HOOK = hook
            code = 0 if cli.main(argv) == 0 else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _committed(writes, k):
    """The epoch of the last set committed by write ``k`` (0: none yet)."""
    done = [int(m.group(1)) for w in writes[:k + 1] for m in [re.search(r"/epoch_(\d+)$", w)]
            if m]
    return max(done, default=0)


def test_write_points_are_the_expected_sequence(reference):
    """config first; per epoch the metrics, then the set (files, manifest, rename), then the
    previous set removed; the final adapters and summary last."""
    names = [os.path.basename(w) for w in reference["writes"]]
    assert names[:2] == ["config.json", "split_all.json"]
    renamed = [i for i, w in enumerate(reference["writes"]) if re.search(r"/epoch_\d+$", w)]
    assert len(renamed) == 2
    first_set = names[renamed[0] - 4:renamed[0]]
    assert first_set == ["adapters.safetensors", "adapters.json", "train_state.pt",
                         "manifest.json"]
    assert names[-3:] == ["adapters.safetensors", "adapters.json", "summary.md"]
    assert any("removed" in w and "epoch_1" in w for w in reference["writes"])
    assert set(os.listdir(reference["out"])) == FINAL


def test_kill_after_every_write_then_resume(folder, reference, tmp_path):
    """After each write point: the folder holds the previous committed set (or the new one),
    and --resume finishes the run with the uninterrupted weights, bit for bit, every epoch
    listed once in metrics.jsonl, and no temporary file or folder left."""
    writes = reference["writes"]
    for k in range(len(writes)):
        out = str(tmp_path / f"k{k}")
        assert _killed_at(k, [folder, *ARGS, "-o", out]) == KILLED, f"write {k} not reached"
        latest = rf.read_set(out)                # the set on disk is always whole
        assert (latest.epoch if latest else 0) == _committed(writes, k), (k, writes[k])
        assert cli.main([folder, *ARGS, "-o", out, "--resume"]) == 0, (k, writes[k])
        assert set(os.listdir(out)) == FINAL, (k, writes[k], os.listdir(out))
        got = _weights(out)
        for name, ref in reference["weights"].items():
            assert torch.equal(got[name], ref), (k, writes[k], name)
        assert _metrics(out) == reference["metrics"], (k, writes[k])


def test_resume_drops_a_half_written_line_and_leftovers(folder, reference, tmp_path):
    """A kill inside a write: a metrics line cut short, a temporary file, a partial set."""
    out = str(tmp_path / "mid")
    k = next(i for i, w in enumerate(reference["writes"]) if re.search(r"/epoch_1$", w))
    assert _killed_at(k, [folder, *ARGS, "-o", out]) == KILLED
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"event": "train", "epo')
    open(os.path.join(out, ".summary.md.123.0badcafe.tmp"), "w").close()
    os.mkdir(os.path.join(out, ".epoch_2.partial-123-abcdef"))
    assert cli.main([folder, *ARGS, "-o", out, "--resume"]) == 0
    assert set(os.listdir(out)) == FINAL
    assert _metrics(out) == reference["metrics"]


def test_files_get_the_umask_mode(reference):
    """Every file the run writes has the mode a plain open() gives (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    want = 0o666 & ~umask
    out = reference["out"]
    files = [os.path.join(out, f) for f in os.listdir(out)]
    files += [os.path.join(out, "epoch_2", f) for f in os.listdir(os.path.join(out, "epoch_2"))]
    for path in files:
        if os.path.isfile(path):
            assert stat.S_IMODE(os.stat(path).st_mode) == want, path


def test_damaged_set_is_named(folder, reference, tmp_path):
    """A set changed after it was written (a file truncated) is refused in one line."""
    import shutil
    out = str(tmp_path / "dam")
    shutil.copytree(reference["out"], out)
    os.remove(os.path.join(out, "adapters.json"))      # not finished: resume reads the set
    state = os.path.join(out, "epoch_2", "train_state.pt")
    with open(state, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=r"train_state.pt is 100 bytes"):
        rf.read_set(out)


def test_evaluate_an_unfinished_run(folder, reference, tmp_path, capsys):
    """``evaluate --checkpoint <run>`` of a run stopped after epoch 1: its epoch_1 set."""
    out = str(tmp_path / "part")
    k = next(i for i, w in enumerate(reference["writes"]) if re.search(r"/epoch_1$", w))
    assert _killed_at(k, [folder, *ARGS, "-o", out]) == KILLED
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", out, folder, "--split", "all",
                     "--threads", "1"]) == 0
    assert os.path.join("epoch_1", "adapters.safetensors") in capsys.readouterr().out


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    """ckpt-write-in-place: a write that dies half way leaves the previous file intact
    and no temporary file behind."""
    path = str(tmp_path / "adapters.json")
    rf.atomic_write(path, lambda tmp: open(tmp, "w").write("old"))

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        rf.atomic_write(path, broken)
    assert open(path).read() == "old"
    assert os.listdir(tmp_path) == ["adapters.json"]


def test_checkpoint_set_changed_in_place_is_named(tmp_path):
    """set-sha-compared-with-itself: a file of a committed set changed after the commit,
    same size (so only its sha256 can tell), fails read_set naming the file."""
    rf.write_set(str(tmp_path), 3, {"a.bin": lambda p: open(p, "wb").write(b"abcd")})
    assert rf.read_set(str(tmp_path)).epoch == 3
    with open(tmp_path / "epoch_3" / "a.bin", "wb") as f:
        f.write(b"abce")
    with pytest.raises(CheckpointError, match=r"a\.bin does not match its manifest"):
        rf.read_set(str(tmp_path))


# --- a full disk, strict metrics, records kept on resume ---------------------------------------

def test_full_disk_is_one_line_and_leaves_no_partial_set(folder, reference, tmp_path, capsys):
    """write-error-named: ENOSPC from the write seam while epoch 2's set is written: one line
    naming the file and the cause, exit 1, the partial set removed, epoch 1's set intact;
    --resume then finishes the uninterrupted run."""
    import errno
    out = str(tmp_path / "full")

    def hook(what):
        if re.search(r"\.epoch_2\.partial-[^/]*/train_state\.pt$", what):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)

    rf.WRITE_HOOK = hook
    try:
        rc = cli.main([folder, *ARGS, "-o", out])
    finally:
        rf.WRITE_HOOK = None
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert re.match(r"heba-train: error: cannot write \S+/\.epoch_2\.partial-\S+/train_state\.pt"
                    r": no space left on device \(the unfinished set was removed; a run needs "
                    r"room for two sets", err[0]), err
    assert rf.stale_entries(out) == [] and rf.read_set(out).epoch == 1
    assert cli.main([folder, *ARGS, "-o", out, "--resume"]) == 0
    for name, ref in reference["weights"].items():
        assert torch.equal(_weights(out)[name], ref), name


def test_writer_hiding_a_full_disk_is_named(tmp_path, monkeypatch):
    """A writer that fails with something other than OSError on a full file system
    (torch.save: "unexpected pos") becomes ENOSPC, and the partial set goes."""
    def torch_like(path):
        open(path, "wb").write(b"12")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")

    monkeypatch.setattr(ckpt, "no_space", lambda path: True)
    with pytest.raises(rf.WriteError, match=r"state\.pt: no space left on device \(the"):
        rf.write_set(str(tmp_path), 1, {"state.pt": torch_like})
    assert os.listdir(tmp_path) == []


def test_metrics_are_strict_json(tmp_path):
    """metrics-nan: a non-finite number is written as null, never a bare NaN."""
    path = str(tmp_path / "metrics.jsonl")
    rf.append_record(path, dict(event="train", epoch=1, loss=float("nan"),
                                acc=[float("inf"), 1.5]))
    line = open(path).read()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line, parse_constant=pytest.fail) == dict(event="train", epoch=1,
                                                                loss=None, acc=[None, 1.5])


def test_resume_keeps_records_it_did_not_write(tmp_path):
    """trim-foreign-records: trimming on resume drops only the run's records past the
    committed epoch (and a cut line); ``evaluate -o``'s record stays."""
    path = str(tmp_path / "metrics.jsonl")
    lines = [dict(event="eval", epoch=0), dict(event="train", epoch=1),
             dict(event="evaluate", checkpoint="x", base=1.0), dict(event="train", epoch=2),
             dict(event="note", epoch="two")]
    open(path, "w").write("".join(json.dumps(r) + "\n" for r in lines) + '{"event": "tr')
    rf.trim_metrics(path, 1)
    got = [json.loads(line) for line in open(path)]
    assert got == [lines[0], lines[1], lines[2], lines[4]]
    rf.trim_metrics(path, 0)
    assert [json.loads(line) for line in open(path)] == [lines[2], lines[4]]


def test_a_swallowed_stop_is_raised_again_at_the_next_safe_point():
    """signals: a stop raised where Python swallows exceptions (an at-fork callback while a
    loader starts its workers) stays pending, and the next safe point raises it."""
    import signal
    restore = rf.handle_signals()
    try:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):               # the handler runs between two bytecodes
                pass
        except rf.Interrupted:
            pass                                # swallowed, as an at-fork callback does
        with pytest.raises(rf.Interrupted) as err:
            rf.check_stop()
        assert err.value.signum == signal.SIGTERM
    finally:
        restore()
    rf.check_stop()                             # restored: nothing pending any more


_THREAD_AFTER_STOP = """
import os, signal, sys, threading
from heba.train import run_folder as rf

def thread_error(tag):
    def broken_transfer():          # an uncaught error: threading's hook prints it
        raise ConnectionResetError(tag + "-raised")

    def reported_transfer():        # reported through sys.excepthook, as multiprocessing's
        try:                        # fd sharer reports its errors
            raise ConnectionResetError(tag + "-reported")
        except ConnectionResetError:
            sys.excepthook(*sys.exc_info())
    for target in (broken_transfer, reported_transfer):
        t = threading.Thread(target=target)
        t.start()
        t.join()

restore = rf.handle_signals()
thread_error("before-the-stop")
if sys.argv[1] == "worker":        # a forked worker: not the process that owns the run
    rf._OWNER[0] = os.getpid() + 1
try:
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(1000):          # the handler runs between two bytecodes
        pass
except rf.Interrupted:
    assert sys.argv[1] == "main"
thread_error("after-the-stop")
restore()
thread_error("after-restore")
"""


@pytest.mark.parametrize("process", ["main", "worker"])
def test_a_thread_cut_by_a_stop_prints_no_traceback(process):
    """signals: once SIGINT has arrived (in the main process, or in a DataLoader worker,
    which Ctrl-C reaches too), a helper thread that fails on the way out (multiprocessing's
    file-descriptor sharer whose peer stopped reading) prints no traceback; before the
    stop, and once the handlers are restored, a thread's error prints as usual. A real
    process: pytest replaces the thread hook inside tests."""
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))
    proc = subprocess.run([sys.executable, "-c", _THREAD_AFTER_STOP, process],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=repo))
    assert proc.returncode == 0, proc.stderr
    for tag in ("before-the-stop", "after-restore"):
        assert f"{tag}-raised" in proc.stderr and f"{tag}-reported" in proc.stderr, proc.stderr
    assert "after-the-stop-raised" not in proc.stderr, proc.stderr
    # a worker's sys.excepthook goes quiet too; the main process keeps its own
    assert ("after-the-stop-reported" in proc.stderr) == (process == "main"), proc.stderr


def test_a_stop_during_a_set_write_waits_for_its_commit(tmp_path, monkeypatch):
    """signals: SIGTERM arriving while a set is being written (here: as its hidden partial
    folder is made) stops the run only once the set is committed and the older one removed:
    no partial set is left behind."""
    import signal
    folder = str(tmp_path / "run")
    rf.write_set(folder, 1, {"a.json": lambda p: rf.write_text(p, "{}")})
    real_mkdir = os.mkdir

    def mkdir_then_stop(path, *args, **kwargs):
        real_mkdir(path, *args, **kwargs)
        if ".partial-" in os.path.basename(path):
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(rf.os, "mkdir", mkdir_then_stop)
    restore = rf.handle_signals()
    try:
        with pytest.raises(rf.Interrupted):
            rf.write_set(folder, 2, {"a.json": lambda p: rf.write_text(p, '{"b": 1}')})
    finally:
        restore()
    assert rf.read_set(folder).epoch == 2 and rf.stale_entries(folder) == []
