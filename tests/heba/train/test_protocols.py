"""The paper's protocols end to end on the built-in tiny model and fixture CoOp trees.

Base-to-novel over seeds, cross-dataset and domain generalization write per-seed
and mean +- std tables (JSON + markdown); `heba-train split` writes the exact
split; bad input is one line, exit 2, before anything is written.
"""

from __future__ import annotations

import json
import os
import statistics

import pytest

from heba import cli
from heba.data import coop
from tests.clip_utils import one_thread  # noqa: F401
from tests.coop_fixtures import make_dataset

pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

FAST = ["--model", "tiny", "--pretrained", "none", "--shots", "2", "--epochs", "1",
        "--batch-size", "2", "--quiet", "--threads", "1", "--no-eval-before"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("coop")
    for name in ("eurosat", "dtd", "imagenet", "imagenet_sketch", "imagenet_a"):
        make_dataset(r, name, images=True)
    return str(r)


def run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_base2novel_over_seeds(root, tmp_path, capsys):
    out = str(tmp_path / "b2n")
    rc, stdout, err = run(["--dataset", "eurosat", "--root", root, "--seeds", "1", "2",
                           *FAST, "-o", out], capsys)
    assert rc == 0, err
    res = json.load(open(os.path.join(out, "base2novel.json")))
    assert res["seeds"] == [1, 2] and set(res["per_seed"]) == {"1", "2"}
    for figure in ("base2novel.png", "seed1/metrics.png", "seed2/metrics.png"):
        with open(os.path.join(out, figure), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", figure
    for k in ("base", "novel", "hm"):
        vals = [res["per_seed"][s][k] for s in ("1", "2")]
        assert res["mean"][k] == pytest.approx(statistics.fmean(vals))
        assert res["std"][k] == pytest.approx(statistics.pstdev(vals))   # np.std, as published
    for s in ("1", "2"):
        r = res["per_seed"][s]
        assert r["hm"] == pytest.approx(2 * r["base"] * r["novel"] / (r["base"] + r["novel"])
                                        if r["base"] + r["novel"] else 0.0)
        cfg = json.load(open(os.path.join(out, f"seed{s}", "config.json")))
        assert cfg["seed"] == int(s) and cfg["dataset"] == "eurosat" and cfg["recipe"] == "heba"
        assert os.path.isfile(os.path.join(out, f"seed{s}", "adapters.safetensors"))
        used = json.load(open(os.path.join(out, f"seed{s}", "split_base.json")))
        assert used == coop.build_split("eurosat", root, 2, int(s), "base").to_json()
        assert json.load(open(os.path.join(out, f"seed{s}", "split_new.json")))["test"]
    md = open(os.path.join(out, "base2novel.md")).read()
    assert "| seed | base | novel | hm |" in md and "mean +- std" in md
    # eurosat fixture: 5 classes -> 3 base, 2 new, as the published subsample_classes
    assert "5 classes, 3 trained, 2 shots" in stdout


def test_cross_dataset_and_domain_generalization(root, tmp_path, capsys):
    out = str(tmp_path / "xd")
    rc, stdout, err = run(["cross-dataset", "--root", root, "--targets", "eurosat", "dtd",
                           "--seeds", "1", *FAST, "-o", out], capsys)
    assert rc == 0, err
    res = json.load(open(os.path.join(out, "cross_dataset.json")))
    row = res["per_seed"]["1"]
    assert res["source"] == "imagenet" and set(row) == {"imagenet", "eurosat", "dtd", "average"}
    assert row["average"] == pytest.approx((row["eurosat"] + row["dtd"]) / 2)
    cfg = json.load(open(os.path.join(out, "seed1", "config.json")))
    assert cfg["split"] == "all" and cfg["dataset"] == "imagenet"      # all classes
    out = str(tmp_path / "dg")
    rc, stdout, err = run(["domain-generalization", "--root", root, "--targets",
                           "imagenet_sketch", "imagenet_a", "--seeds", "1", *FAST, "-o", out],
                          capsys)
    assert rc == 0, err
    res = json.load(open(os.path.join(out, "domain_generalization.json")))
    assert res["targets"] == ["imagenet_sketch", "imagenet_a"]
    assert "| seed | imagenet | imagenet_sketch | imagenet_a | average |" in open(
        os.path.join(out, "domain_generalization.md")).read()


def test_split_cli_writes_the_run_split(root, tmp_path, capsys):
    path = str(tmp_path / "split.json")
    rc, stdout, err = run(["split", "--dataset", "eurosat", "--root", root, "--shots", "2",
                           "--seed", "3", "--subsample", "base", "--json", path], capsys)
    assert rc == 0, err
    got = json.load(open(path))
    assert got == coop.build_split("eurosat", root, 2, 3, "base").to_json()
    assert all(os.path.isabs(p) for p, _, _ in got["train"] + got["test"])
    from heba.train import data as run_data
    from heba.train.config import make_config
    cfg = make_config("heba", source="coop", dataset="eurosat", root=root, shots=2, seed=3)
    ds = run_data.build(cfg).train                  # what a run trains on: the same images
    assert [[it.path, it.label, it.classname] for it in ds.items] == got["train"]


def _one_line(rc, err, *patterns):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("heba-train: error:"), err
    for p in patterns:
        assert p in lines[0], err


def test_bad_input_one_line_nothing_written(root, tmp_path, capsys):
    out = str(tmp_path / "o")
    base = ["--root", root, *FAST, "-o", out]
    _one_line(*run(["--dataset", "cifar", *base], capsys)[::2], "--dataset cifar",
              "CLIP backbone", "oxford_pets")
    _one_line(*run(["--dataset", "eurosat", *base, "--shots", "0"], capsys)[::2], "shots")
    _one_line(*run(["--dataset", "oxford_pets", *base], capsys)[::2], "oxford_pets")
    _one_line(*run(["cross-dataset", *base, "--targets", "eurosat", "oxford_pets"],
                   capsys)[::2], "oxford_pets")
    bad = tmp_path / "desc.py"
    bad.write_text("EUROSAT = {'Forest': ['trees'\n")
    _one_line(*run(["--dataset", "eurosat", *base, "--descriptions", str(bad)], capsys)[::2],
              "does not parse")
    _one_line(*run(["split", "--dataset", "eurosat", "--root", root, "--shots", "-1", "--seed",
                    "1", "--json", str(tmp_path / "s.json")], capsys)[::2], "shots")
    broken = tmp_path / "broken"
    make_dataset(broken, "dtd", images=False)
    split_file = [f for f in os.listdir(broken / "dtd") if f.startswith("split_zhou")][0]
    victim = json.load(open(broken / "dtd" / split_file))["test"][0][0]
    os.unlink(broken / "dtd" / "images" / victim)
    _one_line(*run(["--dataset", "dtd", "--root", str(broken), *FAST, "-o", out],
                   capsys)[::2], "missing")
    os.unlink(broken / "dtd" / split_file)
    _one_line(*run(["--dataset", "dtd", "--root", str(broken), *FAST, "-o", out],
                   capsys)[::2], "split")
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "s.json")


@pytest.mark.parametrize("command", [[], ["cross-dataset", "--targets", "eurosat"],
                                     ["domain-generalization", "--targets", "imagenet_a"]])
def test_repeated_seed_is_refused_before_anything_runs(root, tmp_path, capsys, command):
    """A seed given twice would train the same run twice into one folder and count it twice in
    the mean +- std: one line naming --seeds, exit 2, nothing written."""
    out = str(tmp_path / "o")
    data = [] if command else ["--dataset", "eurosat"]
    _one_line(*run([*command, *data, "--root", root, "--seeds", "1", "2", "1", *FAST,
                    "-o", out], capsys)[::2], "--seeds", "distinct", "[1, 2, 1]")
    assert not os.path.exists(out)


def test_repeated_seed_is_refused_for_a_classifier(tmp_path, capsys):
    """The classification protocol (a timm backbone) refuses a repeated seed the same way."""
    pytest.importorskip("timm", reason="needs timm (pip install 'heba[timm]')")
    from tests.heba.train.test_classify import TINY, image_folder
    folder = image_folder(tmp_path / "ds", n_train=2, n_test=1)
    out = str(tmp_path / "o")
    _one_line(*run([folder, *TINY, "--quiet", "--method", "head-only", "--epochs", "1",
                    "--seeds", "0", "0", "-o", out], capsys)[::2], "--seeds", "distinct")
    assert not os.path.exists(out)
