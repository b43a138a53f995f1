"""heba.train.plots: a run's PNG of loss, lr and accuracy; a protocol's per-seed figure.

The inputs are written here in the formats runs and protocols write (metrics.jsonl
records, the protocol's JSON table), with fresh random values; the figures must
be real PNGs, and without matplotlib each function says so in one line.
"""

from __future__ import annotations

import json
import random
import sys

import pytest

from heba.train import plots

PNG = b"\x89PNG\r\n\x1a\n"


def _run(tmp_path, epochs=4, evals=("base", "novel", "hm")):
    rng = random.Random()
    lines = [dict(event="eval", epoch=0, **{k: rng.uniform(10, 90) for k in evals})]
    for e in range(1, epochs + 1):
        lines.append(dict(event="train", epoch=e, step=8 * e, loss=rng.uniform(1, 5),
                          lr=rng.uniform(1e-4, 1e-2), img_per_s=100.0))
        lines.append(dict(event="eval", epoch=e, **{k: rng.uniform(10, 90) for k in evals}))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return tmp_path


def test_read_metrics_keeps_accuracies_per_epoch(tmp_path):
    train, evals = plots.read_metrics(str(_run(tmp_path, epochs=3)))
    assert sorted(train) == [1, 2, 3] and sorted(evals) == [0, 1, 2, 3]
    assert set(evals[0]) == {"base", "novel", "hm"}


@pytest.mark.parametrize("evals", [("base", "novel", "hm"), ("top1", "top5")])
def test_run_plot_is_a_png(tmp_path, evals):
    pytest.importorskip("matplotlib", reason="needs matplotlib (pip install 'heba[plots]')")
    path = plots.write_run_plot(str(_run(tmp_path, evals=evals)), log=lambda *a: None)
    assert path == str(tmp_path / "metrics.png")
    data = open(path, "rb").read()
    assert data.startswith(PNG) and len(data) > 5000


def test_protocol_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="needs matplotlib (pip install 'heba[plots]')")
    rng = random.Random()
    per_seed = {str(s): {k: rng.uniform(30, 90) for k in ("base", "novel", "hm")}
                for s in (1, 2, 3)}
    result = dict(protocol="base2novel", dataset="demo", per_seed=per_seed,
                  mean={k: rng.uniform(30, 90) for k in ("base", "novel", "hm")},
                  std={k: rng.uniform(0, 3) for k in ("base", "novel", "hm")})
    table = tmp_path / "base2novel.json"
    table.write_text(json.dumps(result))
    path = plots.write_protocol_plot(str(table), log=lambda *a: None)
    assert path == str(tmp_path / "base2novel.png")
    assert open(path, "rb").read().startswith(PNG)


def test_without_matplotlib_one_line_and_no_file(tmp_path, monkeypatch):
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # import matplotlib fails
    said = []
    assert plots.write_run_plot(str(_run(tmp_path)), log=said.append) is None
    assert said == [plots.MISSING] and not (tmp_path / "metrics.png").exists()


def test_empty_metrics_say_so(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    said = []
    assert plots.write_run_plot(str(tmp_path), log=said.append) is None
    assert len(said) == 1 and "no epoch records" in said[0]
