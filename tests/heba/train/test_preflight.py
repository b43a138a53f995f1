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
