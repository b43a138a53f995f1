"""The L2 probe of benchmarks/ceilings.py reads what it claims: every program sums the whole
buffer ``repeats`` times (float32 accumulation), from any starting block, with a partial last
block; and bad arguments fail in one line naming the argument.

Tiny shapes: on the CPU these run in Triton's interpreter (``TRITON_INTERPRET=1``)."""

import pytest
import torch

from benchmarks import ceilings
from tests.helpers import requires_triton_cpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@requires_triton_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,programs,repeats,block", [
    (3000, 3, 2, 256),       # a partial last block; programs start at blocks 0, 4 and 8
    (2048, 5, 1, 256),       # whole blocks only (the unmasked loads); starts 0, 1, 3, 4, 6
    (40, 2, 3, 64),          # fewer elements than one block
])
def test_every_program_sums_the_whole_buffer(dtype, n, programs, repeats, block):
    torch.manual_seed(0)
    buf = torch.randn(n, device=DEVICE).to(dtype)
    out = ceilings.l2_sweep(buf, programs, repeats, block=block, num_warps=2)
    assert out.shape == (programs,) and out.dtype == torch.float32
    ref = repeats * buf.double().sum().item()
    scale = repeats * buf.double().abs().sum().item()
    for p, got in enumerate(out.tolist()):
        assert abs(got - ref) <= 1e-5 * scale, (p, got, ref, scale)


@requires_triton_cpu
def test_sums_depend_on_every_element():
    """A change of one element, anywhere, changes every program's sum (no load skipped)."""
    buf = torch.ones(3000, device=DEVICE)
    for i in (0, 1234, 2999):
        b = buf.clone()
        b[i] = 1001.0
        out = ceilings.l2_sweep(b, 3, 2, block=256, num_warps=2)
        assert out.tolist() == [2 * 4000.0] * 3, (i, out.tolist())


@pytest.mark.parametrize("buf,programs,repeats,block,name", [
    (torch.ones(64), 2, 0, 64, "repeats"),
    (torch.ones(64), 2, -1, 64, "repeats"),
    (torch.ones(64), 0, 1, 64, "programs"),
    (torch.ones(64), 2.0, 1, 64, "programs"),
    (torch.ones(8, 8), 2, 1, 64, "buf"),
    (torch.ones(64, 2)[:, 0], 2, 1, 64, "buf"),             # not contiguous
    (torch.ones(0), 2, 1, 64, "buf"),
    (torch.ones(64, dtype=torch.int32), 2, 1, 64, "buf"),
    (torch.ones(64), 2, 1, 48, "block"),
])
def test_bad_arguments_fail_in_one_line(buf, programs, repeats, block, name):
    with pytest.raises(ValueError) as err:
        ceilings.l2_sweep(buf, programs, repeats, block=block)
    msg = str(err.value)
    assert msg.startswith(f"{name} must ") and "\n" not in msg, msg
