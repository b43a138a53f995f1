"""The one-launch slow-fast draw against the stream's element-wise form and its host form:
the same bits, the same scales, the counter advanced by one.

Runs in Triton's interpreter on a CPU (``TRITON_INTERPRET=1``) or on a GPU.
"""

import pytest
import torch

from heba.adapters.policy import ScalePolicy, slow_fast_bits, slow_fast_key
from heba_kernels.runtime import record_launches
from tests.helpers import requires_triton_cpu, sm90_compile_lines

pytestmark = requires_triton_cpu
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VALUES = torch.tensor([0.025, 0.025 * 2.25], dtype=torch.float32)


def _draw():
    from heba_kernels.slow_fast import draw_scales
    return draw_scales


def _keys(seed, tower, n_blocks):
    return torch.tensor([[slow_fast_key(seed, tower, b, pos) for pos in (0, 1)]
                         for b in range(n_blocks)], device=DEVICE)


# counters near every 32-bit edge (the hash takes the counter's low 32 bits)
COUNTERS = [0, 1, 2, 255, 2 ** 16 + 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 40 + 5,
            2 ** 62 + 12345]


@pytest.mark.parametrize("n_blocks", [1, 12, 33], ids=["1-block", "12-blocks", "33-blocks"])
@pytest.mark.parametrize("seed", [0, 2 ** 40 + 3])
def test_same_bits_as_the_element_wise_stream(seed, n_blocks):
    draw_scales = _draw()
    keys = _keys(seed, "text", n_blocks)
    values = VALUES.to(DEVICE)
    for ratio in (0.8, 0.3):
        threshold = ScalePolicy(slow_fast_ratio=ratio)._threshold()
        for c in COUNTERS:
            counters = torch.tensor([5, c], device=DEVICE)
            got = draw_scales(keys, counters, 1, values, threshold)
            want = torch.where(slow_fast_bits(keys, torch.tensor(c, device=DEVICE)) >= threshold,
                               values[1], values[0])
            assert got.dtype == torch.float32 and torch.equal(got, want), (c, ratio)
            assert counters.tolist() == [5, c + 1]                     # only its tower's


def test_policy_draws_equal_with_and_without_the_kernel(monkeypatch):
    """A policy's forwards draw the same scales with the one-launch kernel as with the
    element-wise tensor ops and as the host stream (float32 of its floats)."""
    from heba.adapters import policy
    runs = []
    for one in (True, False):
        monkeypatch.setattr(policy, "_one_launch", lambda device, one=one: one)
        pol = ScalePolicy(seed=11, slow_fast_ratio=0.5)
        pol.bind("visual", 6)
        pol.bind("text", 4, first=(1, 0))
        runs.append([torch.stack([pol.scale(True, tw, b, device=torch.device(DEVICE))
                                  for b in order]).cpu()
                     for _ in range(30)
                     for tw, order in (("visual", range(6)), ("text", (1, 2, 3, 0)))])
        assert pol.state_dict()["counters"] == [30, 30]
    host = ScalePolicy(seed=11, slow_fast_ratio=0.5, draws="host")
    host.bind("visual", 6)
    host.bind("text", 4, first=(1, 0))
    want = [torch.tensor([host.scale(True, tw, b) for b in order], dtype=torch.float32)
            for _ in range(30) for tw, order in (("visual", range(6)), ("text", (1, 2, 3, 0)))]
    assert len({float(s) for r in want for s in r}) == 2                 # both scales drawn
    for a, b, c in zip(runs[0], runs[1], want):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_one_launch_per_tower_forward():
    pol = ScalePolicy(seed=2, slow_fast_ratio=0.8)
    pol.bind("visual", 12)
    with record_launches() as rec:
        pol.begin("visual", torch.device(DEVICE), True)
    assert rec == [("_slow_fast_draw_kernel", (1,))]


def test_bad_input_is_one_line():
    draw_scales = _draw()
    keys = _keys(0, "visual", 2)
    counters = torch.zeros(2, dtype=torch.long, device=DEVICE)
    with pytest.raises(TypeError, match=r"^draw_scales: keys and counters must be int64 and "
                                        r"values float32, got torch.int64, torch.int64, "
                                        r"torch.float64$"):
        draw_scales(keys, counters, 0, VALUES.double().to(DEVICE), 1)
    with pytest.raises(ValueError, match=r"^draw_scales: tower must index counters \(2\)"):
        draw_scales(keys, counters, 2, VALUES.to(DEVICE), 1)


def test_opcheck():
    keys = _keys(3, "visual", 3)
    torch.library.opcheck(torch.ops.heba.triton_slow_fast_draw,
                          (keys, torch.tensor([4, 9], device=DEVICE), 0, VALUES.to(DEVICE),
                           1 << 23))


def test_kernel_compiles_for_sm90():
    """Lowered to an sm_90 cubin (scripts/triton_aot_check.py): its 64-bit integer hash
    through Triton's real compiler, which the interpreter never runs."""
    lines = sm90_compile_lines("slow_fast")
    assert len(lines) == 1 and lines[0].startswith("ok ") and "spill 0 B" in lines[0], lines
