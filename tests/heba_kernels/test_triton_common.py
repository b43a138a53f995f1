"""The shared weight-gradient reduction ``atb`` (``C = scale * A^T B``, column sums) and its
two-product launch ``atb_pair_partials`` against torch in float64, at the tile sizes their
plans pick (TRITON_INTERPRET=1 on the CPU)."""

import pytest
import torch

from heba_kernels._triton_common import atb, atb_pair_partials, atb_pair_plan, atb_plan
from heba_kernels.runtime import Scale
from tests.helpers import DTYPE_NAMES, TOL, assert_rel_close, requires_triton_cpu

pytestmark = requires_triton_cpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("I,J", [(128, 256), (192, 64), (40, 10)],
                         ids=["tiles128", "tiles64", "tiles16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
def test_atb_against_torch(I, J, dtype):
    """Rows of a strided 3-D view (the grid tokens of a ``[B, N, D]`` tensor), several token
    splits, both tile rules of the plan; every output against float64 torch."""
    g = torch.Generator().manual_seed(I + J)
    a_full = torch.randn(3, 1 + 37, I, generator=g).to(DEVICE, dtype)
    b = torch.randn(3, 37, J, generator=g).to(DEVICE, dtype)
    a = a_full[:, 1:]                                    # strided rows, unit last stride
    c, s = atb(a, b, dtype, torch.float32, Scale(0.37, None), colsum=True)
    ref_a, ref_b = a.double().reshape(-1, I), b.double().reshape(-1, J)
    assert_rel_close("a^T b", c, 0.37 * ref_a.T @ ref_b, TOL[dtype])
    assert_rel_close("colsum", s, 0.37 * ref_a.sum(0), TOL[dtype])


def test_atb_plan_tiles():
    """128 x 128 tiles only where they pad nothing and fill the GPU alone (the MLP-position
    dWu at ViT-B/16 widths on 132 SMs); 64 x 64 at h=192 (128 would pad to 256)."""
    grid, meta = atb_plan(50176, 3072, 768, torch.bfloat16, 132, True)
    assert (meta["BLOCK_I"], meta["BLOCK_J"], grid[:2]) == (128, 128, (24, 6))
    grid, meta = atb_plan(50176, 768, 192, torch.bfloat16, 132, True)
    assert (meta["BLOCK_I"], meta["BLOCK_J"], grid[:2]) == (64, 64, (12, 3))
    grid, meta = atb_plan(39424, 512, 128, torch.bfloat16, 132, True)   # 4 tiles of 128
    assert (meta["BLOCK_I"], meta["BLOCK_J"]) == (64, 64)


@pytest.mark.parametrize("colsum", [False, True], ids=["weights", "weights-and-biases"])
@pytest.mark.parametrize("I,J", [(128, 256), (40, 10)], ids=["tiles128", "tiles16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
def test_atb_pair_against_torch(I, J, dtype, colsum):
    """One launch, two products: ``a^T b`` ``[I, J]`` and ``b2^T a2`` ``[J, I]`` (a visual
    adapter's dWu and dWd; with ``colsum`` also ``a.sum(0)`` and ``b2.sum(0)``, the low-rank
    adapter's two biases), each operand with strides of its own (``a`` the grid tokens of a
    ``[B, N, D]`` tensor, ``a2`` of a sequence-first one, ``b2`` rows of a wider buffer), the
    token rows split across programs: every partial sum against float64 torch."""
    g = torch.Generator().manual_seed(I * J)
    B, R = 3, 37
    a = torch.randn(B, 1 + R, I, generator=g).to(DEVICE, dtype)[:, 1:]
    b = torch.randn(B, R, J, generator=g).to(DEVICE, dtype)
    a2 = torch.randn(2 + R, B, I, generator=g).to(DEVICE, dtype)[2:].transpose(0, 1)
    b2 = torch.randn(B, R, J + 3, generator=g).to(DEVICE, dtype)[..., :J]
    grid, meta = atb_pair_plan(B * R, I, J, dtype, 1, False)
    assert grid[2] == 2 * atb_plan(B * R, I, J, dtype, 1, False)[0][2] and meta["PAIR"]
    c, c2, s, s2 = atb_pair_partials(a, b, a2, b2, dtype, colsum=colsum)
    assert c.shape == (grid[2] // 2, I, J) and c2.shape == (grid[2] // 2, J, I)
    ra, rb = a.double().reshape(-1, I), b.double().reshape(-1, J)
    ra2, rb2 = a2.double().reshape(-1, I), b2.double().reshape(-1, J)
    assert_rel_close("a^T b", c.sum(0), ra.T @ rb, TOL[dtype])
    assert_rel_close("b2^T a2", c2.sum(0), rb2.T @ ra2, TOL[dtype])
    if colsum:
        assert_rel_close("a.sum(0)", s.sum(0), ra.sum(0), TOL[dtype])
        assert_rel_close("b2.sum(0)", s2.sum(0), rb2.sum(0), TOL[dtype])
    else:
        assert s is None and s2 is None


def test_atb_pair_rejects_mismatched_operands():
    a, b = torch.randn(10, 8), torch.randn(10, 4)
    with pytest.raises(ValueError, match="a2, b2 must match a, b"):
        atb_pair_partials(a, b, torch.randn(10, 4), torch.randn(10, 8), torch.float32)
