"""The shared weight-gradient reduction ``atb`` (``C = scale * A^T B``, column sums), its
two-product launch ``atb_pair_partials`` and the launch that also sums, ``atb_pair_sums``,
against torch in float64, at the tile sizes their plans pick (TRITON_INTERPRET=1 on the
CPU; every fresh buffer NaN-filled, tests/heba_kernels/conftest.py)."""

import pytest
import torch

from heba_kernels._triton_common import (REDUCE_BLOCK, Partial, Sum, atb, atb_pair_partials,
                                         atb_pair_plan, atb_pair_sum_plan, atb_pair_sums,
                                         atb_plan, reduce_partials)
from heba_kernels.runtime import Scale, record_launches
from tests.helpers import DTYPE_NAMES, TOL, assert_rel_close, requires_gpu, requires_triton_cpu

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


def _pair_operands(I, J, dtype, seed, device=DEVICE, B=3, R=37):
    """The pair's four operands, each on strides of its own (as in the test above)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, 1 + R, I, generator=g).to(device, dtype)[:, 1:]
    b = torch.randn(B, R, J, generator=g).to(device, dtype)
    a2 = torch.randn(2 + R, B, I, generator=g).to(device, dtype)[2:].transpose(0, 1)
    b2 = torch.randn(B, R, J + 3, generator=g).to(device, dtype)[..., :J]
    return a, b, a2, b2


def _extras(n, seed, device=DEVICE):
    """``n`` other partial buffers: a few slots each, sizes across ``REDUCE_BLOCK``, scaled
    and not, in the weights' dtypes."""
    g = torch.Generator().manual_seed(seed)
    spec = [((5, 3, 9), torch.bfloat16, True), ((4, REDUCE_BLOCK + 7), torch.float32, False),
            ((7, 33), torch.float32, True)][:n]
    return [Partial(torch.randn(shape, generator=g).to(device), shape[1:], dt, scaled)
            for shape, dt, scaled in spec]


@pytest.mark.parametrize("scale", ["float", "tensor"])
@pytest.mark.parametrize("colsum,n_extras", [(False, 3), (True, 0), (True, 2)],
                         ids=["weights-extras3", "weights-biases", "weights-biases-extras2"])
@pytest.mark.parametrize("I,J", [(128, 256), (150, 10)], ids=["tiles128-1x2", "tiles64x16-3x1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
def test_atb_pair_sums(I, J, dtype, colsum, n_extras, scale):
    """One launch: both products, their column sums and an op's other partial buffers,
    summed, scaled where asked and written in their dtypes and shapes. Against float64
    torch, and bitwise against the two-launch path (the partial slots and one
    ``reduce_partials``): the last split to arrive sums the slots in their order."""
    a, b, a2, b2 = _pair_operands(I, J, dtype, seed=I + J)
    extras = _extras(n_extras, seed=I)
    sc = Scale(0.37, None) if scale == "float" else \
        Scale(0.0, torch.tensor(0.37, device=DEVICE))
    sums = [Sum((I, J), torch.float32, True), Sum((J, I, 1, 1), dtype)]
    if colsum:
        sums += [Sum((I,), dtype, True), Sum((J,), torch.float32)]
    with record_launches() as rec:
        got = atb_pair_sums(a, b, a2, b2, dtype, sums, extras, sc, colsum)
    assert [name for name, _ in rec] == ["_atb_kernel"]
    assert [(t.shape, t.dtype) for t in got] == \
        [(torch.Size(sm.shape), sm.dtype) for sm in sums] + \
        [(torch.Size(p.shape), p.dtype) for p in extras]
    ra, rb = a.double().reshape(-1, I), b.double().reshape(-1, J)
    ra2, rb2 = a2.double().reshape(-1, I), b2.double().reshape(-1, J)
    ref = [0.37 * ra.T @ rb, (rb2.T @ ra2).reshape(J, I, 1, 1)]
    if colsum:
        ref += [0.37 * ra.sum(0), rb2.sum(0)]
    ref += [(0.37 if p.scaled else 1.0) * p.part.double().sum(0) for p in extras]
    names = ["a^T b", "b2^T a2", "a.sum(0)", "b2.sum(0)"][:len(sums)] + \
        [f"extra {k}" for k in range(n_extras)]
    for name, t, r in zip(names, got, ref):
        assert_rel_close(name, t, r, max(TOL[dtype], TOL[t.dtype]))
    c, c2, s, s2 = atb_pair_partials(a, b, a2, b2, dtype, colsum)
    parts = [Partial(t, sm.shape, sm.dtype, sm.scaled)
             for t, sm in zip((c, c2, s, s2), sums)]
    two = reduce_partials(parts, sc) + (reduce_partials(extras, sc) if extras else [])
    for name, t, r in zip(names, got, two):
        assert torch.equal(t, r), f"{name}: not bitwise the two-launch sum"


def test_atb_pair_sums_again_and_again():
    """The arrival counters are left at zero by each launch's last arrivals: the same call
    three times gives the same bits (a counter left behind would leave an output unsummed,
    NaN here)."""
    a, b, a2, b2 = _pair_operands(64, 48, torch.float32, seed=3)
    sums = [Sum((64, 48), torch.float32), Sum((48, 64), torch.float32)]
    first = atb_pair_sums(a, b, a2, b2, torch.float32, sums, _extras(1, 4))
    for _ in range(2):
        again = atb_pair_sums(a, b, a2, b2, torch.float32, sums, _extras(1, 4))
        assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert all(torch.isfinite(t).all() for t in first)


def test_atb_pair_sums_without_tokens():
    """No tokens: zero gradients in the sums' dtypes, the extras still summed."""
    z = torch.empty(0, 8, device=DEVICE)
    extras = _extras(2, seed=5)
    got = atb_pair_sums(z, torch.empty(0, 4, device=DEVICE), z, torch.empty(0, 4, device=DEVICE),
                        torch.float32, [Sum((8, 4), torch.bfloat16), Sum((4, 8), torch.float32)],
                        extras)
    assert got[0].dtype == torch.bfloat16 and not got[0].any() and not got[1].any()
    for t, p in zip(got[2:], extras):
        assert_rel_close("extra", t, p.part.double().sum(0), TOL[p.dtype])


def test_atb_pair_sums_rejects_bad_outputs():
    a, b = torch.randn(10, 8, device=DEVICE), torch.randn(10, 4, device=DEVICE)
    with pytest.raises(ValueError, match="sums must be 2 outputs of"):
        atb_pair_sums(a, b, a, b, torch.float32, [Sum((8, 4), torch.float32)])
    with pytest.raises(ValueError, match="sums must be 4 outputs of"):
        atb_pair_sums(a, b, a, b, torch.float32,
                      [Sum((8, 4), torch.float32), Sum((4, 8), torch.float32)], colsum=True)
    with pytest.raises(ValueError, match="sums must be 2 outputs of"):
        atb_pair_sums(a, b, a, b, torch.float32,
                      [Sum((8, 4), torch.float32), Sum((4, 9), torch.float32)])
    with pytest.raises(ValueError, match="at most 3 extras"):
        atb_pair_sums(a, b, a, b, torch.float32,
                      [Sum((8, 4), torch.float32), Sum((4, 8), torch.float32)],
                      _extras(3, 1) + _extras(1, 2))


def test_atb_pair_sum_plan():
    """The pair's tiles and splits, ``REDUCE``, and beyond the splits just enough of the
    grid's third axis for the extras' ``REDUCE_BLOCK``-wide blocks (the visual adapter's
    dWm and LayerNorm partials at ViT-B/16's attention position, 132 SMs)."""
    grid, meta = atb_pair_plan(50176, 768, 192, torch.bfloat16, 132, True)
    extras = ((132, 192 * 9), (132, 768), (132, 768))           # 2 + 1 + 1 blocks
    step = atb_pair_sum_plan(50176, 768, 192, torch.bfloat16, 132, True, extras)
    assert step.grid == (*grid[:2], grid[2] + 1) and step.work == extras
    assert step.meta == dict(meta, REDUCE=True) and step.meta["SPLITS"] * 2 == grid[2]
    many = [(4, REDUCE_BLOCK * 20)] * 2                          # 40 blocks, 36 per slice
    assert atb_pair_sum_plan(50176, 768, 192, torch.bfloat16, 132, True, many).grid[2] == \
        grid[2] + 2
    assert atb_pair_sum_plan(50176, 768, 192, torch.bfloat16, 132, True).grid == grid


@requires_gpu
def test_atb_pair_sums_on_a_gpu_bitwise_every_time():
    """The GPU's programs arrive in any order and at once: many launches of a shape with
    many splits per tile, each bitwise the two-launch sum; and a captured CUDA graph (whose
    counters are its own) replayed with new operands."""
    a, b, a2, b2 = _pair_operands(192, 768, torch.bfloat16, seed=7, device="cuda", B=64,
                                  R=196)
    sums = [Sum((192, 768), torch.bfloat16), Sum((768, 192), torch.bfloat16)]
    extras = _extras(3, seed=8, device="cuda")
    c, c2, _, _ = atb_pair_partials(a, b, a2, b2, torch.bfloat16)
    two = reduce_partials([Partial(c, (192, 768), torch.bfloat16),
                           Partial(c2, (768, 192), torch.bfloat16)] + extras)
    for _ in range(20):
        got = atb_pair_sums(a, b, a2, b2, torch.bfloat16, sums, extras)
        assert all(torch.equal(x, y) for x, y in zip(got, two))
    static = [t.clone() for t in (a, b, a2, b2)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        atb_pair_sums(*static, torch.bfloat16, sums, extras)               # warm-up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = atb_pair_sums(*static, torch.bfloat16, sums, extras)
    for seed in (9, 10):
        for dst, src in zip(static, _pair_operands(192, 768, torch.bfloat16, seed, "cuda",
                                                   B=64, R=196)):
            dst.copy_(src)
        graph.replay()
        want = atb_pair_sums(*static, torch.bfloat16, sums, extras)
        assert all(torch.equal(x, y) for x, y in zip(out, want))
