"""heba.train.preflight: every value a run can fail on, checked before anything is written."""

from __future__ import annotations

import os

import pytest

from heba.train.config import make_config


def test_momentum_one_is_refused():
    """preflight-momentum-one: momentum must be < 1 (1 never decays a gradient)."""
    from heba.train.config import UsageError, make_config
    from heba.train.preflight import check_config
    check_config(make_config("heba", momentum=0.9))
    with pytest.raises(UsageError, match=r"--momentum must be in \[0, 1\), got 1.0"):
        check_config(make_config("heba", momentum=1.0))


def test_probe_leaves_nothing_behind(tmp_path):
    """probe-writes: missing folders are made for the probe and removed again."""
    from heba.train.preflight import probe_folder
    probe_folder(str(tmp_path / "a" / "b" / "c"), "-o")
    assert os.listdir(tmp_path) == []
    probe_folder(str(tmp_path), "-o")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("case, message", [
    ("long", "cannot write in .* \\(file name too long\\)"),
    ("file", "is a file, not a folder"),
    ("under-file", "afile is a file, not a folder"),
])
def test_probe_names_the_cause(tmp_path, case, message):
    from heba.train.config import UsageError
    from heba.train.preflight import probe_folder
    (tmp_path / "afile").write_text("x")
    path = {"long": tmp_path / ("x" * 300), "file": tmp_path / "afile",
            "under-file": tmp_path / "afile" / "run"}[case]
    with pytest.raises(UsageError, match=message):
        probe_folder(str(path), "-o")
    assert os.listdir(tmp_path) == ["afile"]


def test_data_folder_that_is_a_file_or_nests_with_output(tmp_path):
    from heba.train.config import UsageError
    from heba.train.preflight import check_data_paths
    f = tmp_path / "root"
    f.write_text("x")
    cfg = make_config("heba", source="coop", dataset="eurosat", root=str(f))
    with pytest.raises(UsageError, match=f"--root {f} is a file, not a folder"):
        check_data_paths(cfg, str(tmp_path / "out"))
    cfg = make_config("heba", source="folder", dataset=str(tmp_path / "ds"))
    with pytest.raises(UsageError, match="is inside the ImageFolder"):
        check_data_paths(cfg, str(tmp_path / "ds" / "runs" / "r"))
    with pytest.raises(UsageError, match="is inside -o"):
        check_data_paths(cfg, str(tmp_path))
    check_data_paths(cfg, str(tmp_path / "dsx"))          # a sibling with a common prefix


def test_resume_keeps_the_worker_count_the_result_depends_on(tmp_path, capsys):
    """resume-workers-unsaved: where a data set's own random transforms run in the loader
    workers (the demo's tensors, batched as they are), the run saves its worker count and a
    resume with another is refused in one line; where every draw is made in the main
    process (the image pipelines), no count is kept and any is accepted."""
    import glob
    from heba import cli
    from heba.train.config import UsageError
    from heba.train.preflight import check_workers, load_train_state
    out = str(tmp_path / "run")
    assert cli.main(["-o", out, "--epochs", "1", "--shots", "1", "--batch-size", "4",
                     "--no-eval-before", "--quiet", "--threads", "1", "--workers", "0"]) == 0
    state = load_train_state(glob.glob(os.path.join(out, "epoch_*", "train_state.pt"))[0])
    assert "workers" in state and state["workers"] == 0
    check_workers(state, 0, "set")
    with pytest.raises(UsageError) as err:
        check_workers(state, 2, "set")
    msg = str(err.value)
    assert "\n" not in msg and "0 loader worker(s), now 2" in msg and "--workers 0" in msg
    check_workers({"workers": None}, None, "set")             # image pipelines: no count
    check_workers({}, 3, "set")                               # a set saved before it was kept



def test_lock_of_a_folder_another_rank_probed_away(tmp_path, monkeypatch):
    """A DDP rank's writability probe makes the output folder and removes it again: if it
    is gone by the time rank 0 locks it, the run is a fresh one (locked at its first write),
    not a write error; a folder that stays and cannot be locked still fails."""
    from types import SimpleNamespace

    from heba.train import preflight
    out = tmp_path / "out"
    out.mkdir()                                  # the other rank's probe folder, for now
    real_lock = preflight.rf.lock

    def lock_after_the_probe_is_gone(folder):
        os.rmdir(folder)                         # the other rank's probe removes it
        return real_lock(folder)
    monkeypatch.setattr(preflight.rf, "lock", lock_after_the_probe_is_gone)
    opts = SimpleNamespace(output=str(out), resume=False, overwrite=False)
    assert preflight.plan_output(None, opts, lock=True).mode == "fresh"

    out.mkdir()

    def lock_fails(folder):
        raise preflight.rf.WriteError(f"cannot write {folder}/.lock: permission denied")
    monkeypatch.setattr(preflight.rf, "lock", lock_fails)
    with pytest.raises(preflight.rf.WriteError, match="permission denied"):
        preflight.plan_output(None, opts, lock=True)
