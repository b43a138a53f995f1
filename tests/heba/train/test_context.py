"""heba.train.context: :func:`start` owns the run folder (an advisory lock, rank 0) before it
looks at it; a second process is refused before it writes or removes anything, and the lock
of a killed process is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from heba.train import run_folder as rf
from heba.train.config import make_config
from heba.train.context import RunOptions, start

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))
HOLD = ("import sys, time; from heba.train import run_folder as rf; rf.lock(sys.argv[1]); "
        "print('held', flush=True); time.sleep(120)")


def _holder(folder):
    """Another process that locks ``folder`` and keeps it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, folder], stdout=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=REPO), text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _snapshot(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, n))}


def test_second_process_is_refused_then_a_stale_lock_is_taken_over(tmp_path):
    """folder-lock: while another process holds the folder, start() (even with --overwrite)
    is refused in one line naming its pid, and the folder is unchanged; once that process is
    killed (SIGKILL: no clean-up) the lock is taken over, and released again."""
    out = str(tmp_path / "run")
    os.mkdir(out)
    open(os.path.join(out, rf.CONFIG_NAME), "w").write('{"source": "demo"}\n')
    cfg = make_config("heba", model="tiny", source="demo")
    holder = _holder(out)
    try:
        before = _snapshot(out)
        with pytest.raises(rf.FolderBusy, match=rf"{out} is in use by another heba-train "
                                                rf"process \(pid {holder.pid}\)"):
            start(cfg, RunOptions(output=out, overwrite=True, device="cpu", threads=1))
        assert _snapshot(out) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    run = start(cfg, RunOptions(output=out, overwrite=True, device="cpu", threads=1))
    assert run.plan.mode == "overwrite" and rf.locked(out)
    assert open(os.path.join(out, rf.LOCK_NAME)).read().strip() == str(os.getpid())
    rf.unlock(out)
    assert not rf.locked(out) and rf.LOCK_NAME not in os.listdir(out)


def test_fresh_folder_is_locked_at_its_first_write(tmp_path):
    """A folder that does not exist yet is not created by start(): nothing is written until
    the run's first write, which takes the lock (heba.train.loop.open_folder)."""
    out = str(tmp_path / "new" / "run")
    run = start(make_config("heba", model="tiny", source="demo"),
                RunOptions(output=out, device="cpu", threads=1))
    assert run.plan.mode == "fresh" and not os.path.exists(os.path.join(tmp_path, "new"))
    assert not rf.locked(out)
