"""heba.train.predict: a run folder becomes a ready classifier; images in, top-k classes out.

One tiny run is trained here (the built-in tiny CLIP, 1 epoch, 2 shots); the
classifier loaded from its folder must reproduce the run's own recorded base
accuracy, and ``predict`` must agree with the classifier's scores.
"""

from __future__ import annotations

import csv
import io
import json
import os

import pytest
import torch

pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")

from heba.train import predict  # noqa: E402
from heba.train.config import UsageError  # noqa: E402

SHOTS, PER_CLASS = 2, 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from heba.cli import main
    out = str(tmp_path_factory.mktemp("predict") / "run")
    assert main(["-o", out, "--epochs", "1", "--shots", str(SHOTS), "--test-per-class",
                 str(PER_CLASS), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from heba.clip import synthetic
    root = tmp_path_factory.mktemp("images")
    return synthetic.save_png_folder(str(root), synthetic.all_classes()[:3], 2, seed=5)


def _final_accuracy(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        evals = [json.loads(line) for line in f if '"eval"' in line]
    return evals[-1]


def test_classifier_reproduces_the_runs_base_accuracy(run):
    from heba.data.demo import demo_splits
    classes, _, test = demo_splits(SHOTS, 1, PER_CLASS)
    base = classes[:len(classes) // 2]
    clf = predict.load_classifier(run, classnames=base, device="cpu")
    ds = test.subset(list(range(len(base))))
    pred = clf.scores(ds.images).argmax(1)
    acc = 100.0 * pred.eq(ds.labels).float().mean().item()
    assert acc == pytest.approx(_final_accuracy(run)["base"], abs=1e-6)


def test_default_classes_and_text_classifier(run):
    clf = predict.load_classifier(run, device="cpu")
    from heba.clip import synthetic
    assert clf.classnames == synthetic.all_classes()          # base then novel: every class
    assert clf.text.shape[0] == 64 and clf.precision == "fp32" and not clf.model.training
    torch.testing.assert_close(clf.text.norm(dim=-1), torch.ones(64))


def _args(*argv):
    from heba.cli import parse_args
    return parse_args(["predict", *argv])


def test_the_trained_run_has_its_figure(run):
    with open(os.path.join(run, "metrics.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_predict_csv_and_json_agree_with_scores(run, images, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    first = sorted(os.listdir(images))[0]
    one = os.path.join(images, first, sorted(os.listdir(os.path.join(images, first)))[0])
    listing.write_text(one + "\n")
    rows = predict.run_predict(_args("--run", run, images, str(listing), "--top-k", "3",
                                     "--batch-size", "4", "--device", "cpu"))
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 7 and len(table) == 21 and rows[-1]["path"] == one
    clf = predict.load_classifier(run, device="cpu")
    from PIL import Image
    with Image.open(one) as im:
        expect = clf.scores(clf.preprocess(im.convert("RGB"))[None])[0]
    top = expect.topk(3)
    assert rows[-1]["classes"] == [clf.classnames[i] for i in top.indices.tolist()]
    torch.testing.assert_close(torch.tensor(rows[-1]["scores"]), top.values, rtol=1e-5,
                               atol=1e-6)
    assert all(r["scores"] == sorted(r["scores"], reverse=True) for r in rows)
    assert [t["class"] for t in table[-3:]] == rows[-1]["classes"]
    out = tmp_path / "preds.json"                   # `heba-train predict` itself
    from heba.cli import main
    assert main(["predict", "--run", run, one, "--top-k", "2", "--out", str(out),
                 "--classes", "red circle,blue square"]) == 0
    data = json.loads(out.read_text())
    assert len(data) == 1 and sorted(data[0]["classes"]) == ["blue square", "red circle"]
    assert sum(data[0]["scores"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("argv, msg", [
    (["/no/such/image.png"], "no such image, folder or list file"),
    (["IMAGES", "--top-k", "0"], "--top-k and --batch-size must be >= 1"),
])
def test_bad_input_is_one_clear_error(run, images, argv, msg, capsys):
    argv = [images if a == "IMAGES" else a for a in argv]
    with pytest.raises(UsageError, match=msg):
        predict.run_predict(_args("--run", run, *argv))
    from heba.cli import main
    capsys.readouterr()
    assert main(["predict", "--run", run, *argv]) == 2       # the command line: one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0] and err[0].startswith("heba-train: error: ")
