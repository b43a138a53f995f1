"""The scale policy: published constants, slow-fast draw frequency, construction from a
configuration. (The device stream's bits, resume and graph replay: tests/test_graph_step.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from heba.adapters import ScalePolicy
from heba.adapters import policy as policy_module


def test_scale_policy(monkeypatch):
    # 4000 forwards: the stream's element-wise form (the one-launch kernel draws the same
    # bits, tests/heba_kernels/test_slow_fast.py; in Triton's CPU interpreter it is slow)
    monkeypatch.setattr(policy_module, "_one_launch", lambda device: False)
    pol = ScalePolicy(seed=0)
    assert pol.scale(False) == 0.025
    pol.set_mode("novel")
    assert pol.scale(False) == 0.010
    pol.bind("text", 1)
    draws = []
    for _ in range(4000):           # one draw per block and tower forward (tests/test_graph_step)
        draws.append(float(pol.scale(True, "text", 0)))   # block 0: a new forward's draw
    assert set(draws) == {float(torch.tensor(0.025)), float(torch.tensor(0.025 * 2.25))}
    frac_fast = sum(d > 0.03 for d in draws) / len(draws)
    assert abs(frac_fast - 0.2) < 0.03, frac_fast
    assert {ScalePolicy(slow_fast_ratio=1.0).scale(True) for _ in range(100)} == {0.025}
    with pytest.raises(ValueError):
        pol.set_mode("all")


def test_from_config_reads_the_run_fields():
    cfg = SimpleNamespace(base_scale=0.03, novel_scale=0.02, scale_factor=1.5,
                          slow_fast_ratio=0.25, seed=11, slow_fast_draw="call", other=1)
    pol = ScalePolicy.from_config(cfg)
    assert (pol.base_scale, pol.novel_scale, pol.scale_factor, pol.slow_fast_ratio, pol.seed,
            pol.per_block, pol.draws) == (0.03, 0.02, 1.5, 0.25, 11, False, "device")
    assert ScalePolicy.from_config(SimpleNamespace(slow_fast_draw="block")).per_block
    assert repr(ScalePolicy.from_config(SimpleNamespace(seed=0))) == repr(ScalePolicy(seed=0))
    with pytest.raises(ValueError, match=r"slow_fast_ratio must be a probability in \[0, 1\], got 1.5"):
        ScalePolicy.from_config(SimpleNamespace(slow_fast_ratio=1.5))


@pytest.mark.parametrize("start", [2, 3])
def test_towers_adapted_from_a_later_block_redraw_every_forward(monkeypatch, start):
    """HeBA in blocks ``start..4`` only (``--start > 1``): each tower forward still draws anew
    for every adapted block, the published rule (one draw per block and forward, shared by
    its two adapters), at the stream's position of that block and forward."""
    pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")
    from heba.clip import attach_heba
    from tests.clip_utils import images, randomize_adapters, texts, tiny_clip
    from tests.heba.adapters.test_policy_stream import _spy, host_scales
    model = tiny_clip(layers=4)
    attach_heba(model, start=start, policy=ScalePolicy(seed=5, slow_fast_ratio=0.5),
                backend="reference")
    randomize_adapters(model).train()
    seen = _spy(monkeypatch)
    blocks = range(start - 1, 4)                         # 0-based adapted blocks
    per_forward = []
    for f in range(8):
        seen.clear()
        model.encode_image(images(2))
        model.encode_text(texts())
        got = [float(s) for _, s in seen]                # att, mlp of each block, per tower
        assert len(got) == 2 * 2 * len(blocks)
        assert got[0::2] == got[1::2], "a block's two adapters drew separately"
        want = [float(torch.tensor(host_scales(5, tower, 4, f, ratio=0.5)[b]))
                for tower in ("visual", "text") for b in blocks]
        assert got[0::2] == want, f"forward {f}"
        per_forward.append(tuple(got))
    assert len(set(per_forward)) > 1                     # the draws do change across forwards
    assert model.heba_policy.state_dict()["counters"] == [8, 8]
