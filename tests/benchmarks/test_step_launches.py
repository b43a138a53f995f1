"""Launches per published HeBA step, counted on the CPU by the dispatch recorder.

The whole step with the fused Triton adapters (in Triton's interpreter, the tiny CLIP: the
ViT-B/16 widths take minutes there) equals, exactly, the frozen backbone's launches (the
reference step less its adapter calls) plus each adapter call's own fused launches: the
decomposition ``python -m benchmarks.step_launches`` applies at ViT-B/16 widths, and each
adapter call launches what the roofline model (:mod:`benchmarks.roofline`) says, so the model's
per-adapter counts times the adapters plus the backbone is the step's count.
"""

import pytest
pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")

from benchmarks import step_launches  # noqa: E402
from heba.backends import backend_status  # noqa: E402


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, why = backend_status("triton", "cpu")
    if not ok:
        pytest.skip(f"the triton backend is unavailable on the CPU: {why}")


def test_fused_step_is_backbone_plus_adapter_calls(capsys):
    r = step_launches.published_step("tiny", "triton", measure_fused=True, batch=2, classes=6)
    with capsys.disabled():
        print(f"\n[launches per step, tiny CLIP 2+2 blocks, counted on the CPU] reference "
              f"{r['step_reference']}, triton {r['fused_step_measured']} (backbone "
              f"{r['backbone']}; per adapter call, triton {r['fused_per_call']}, reference "
              f"{r['reference_per_call']})")
    assert r["adapter_calls"] == 8                     # 2 blocks x 2 positions x 2 towers
    assert r["fused_step_measured"] == r["fused_step"], r
    # each adapter call launches what the roofline model's launch plan says it does
    assert r["fused_per_call"] == r["roofline_per_call"], r
    assert all(n > 0 for n in r["fused_per_call"] + r["reference_per_call"]), r
    assert 0 < r["backbone"] < r["step_reference"], r
    by_op = r["backbone_by_op"]
    assert sum(by_op.values()) == r["backbone"] and min(by_op.values()) > 0, by_op
    # per tower: each of 2 blocks' attention sum + ln_2, and the one block boundary's MLP
    # sum + ln_1, fused (forward and backward)
    assert by_op["triton:_add_layer_norm_fwd_kernel"] == 6, by_op
    assert by_op["triton:_add_layer_norm_bwd_kernel"] == 6, by_op


def test_counts_do_not_depend_on_batch_when_every_class_is_a_candidate():
    """Why the small test batch stands for the published 16 images / 50 classes."""
    a = step_launches.published_step("tiny", "reference", batch=2, classes=6)
    b = step_launches.published_step("tiny", "reference", batch=3, classes=10)
    assert (a["step_reference"], a["reference_per_call"]) == \
        (b["step_reference"], b["reference_per_call"]), (a, b)
