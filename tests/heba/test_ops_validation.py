"""Bad input fails with a clear error naming the argument, before any backend runs."""

import pytest
import torch

import heba
import heba.backends
import heba.nn
from heba import ops
from tests.helpers import tokens


@pytest.fixture(autouse=True)
def no_backend_may_run(monkeypatch):
    """Every call in this file must fail in validation: a backend call is a test failure."""
    def boom(*args, **kwargs):
        raise AssertionError("a backend ran before the input was validated")
    for key in list(heba.backends.registry.fns):
        monkeypatch.setitem(heba.backends.registry.fns, key, boom)


def visual(dim=16, **kw):
    return heba.nn.HeBAAdapter(dim, modality="visual", **kw)


@pytest.mark.parametrize("make,x,match", [
    (lambda: visual(16), tokens(2, 17, 12), r"last dimension dim=16"),
    (lambda: heba.nn.HeBAAdapter(16, modality="text"), tokens(2, 7, 8), r"last dimension dim=16"),
    (lambda: heba.nn.LowRankAdapter(16, 4), tokens(5, 15), r"last dimension dim=16"),
    (lambda: visual(16), tokens(17, 16), r"3-D tokens"),
    (lambda: visual(16), tokens(1, 2, 17, 16), r"3-D tokens"),
    (lambda: heba.nn.HeBAAdapter(16, modality="text"), tokens(16), r"at least 2 dimensions"),
    (lambda: visual(16, grid=(3, 4)), tokens(2, 1 + 11, 16), r"num_prefix_tokens \+ H\*W"),
    (lambda: visual(16), tokens(2, 1 + 15, 16), r"not a perfect square.*grid=\(H, W\)"),
    (lambda: visual(16, num_prefix_tokens=3), tokens(2, 3, 16), r"no patch tokens"),
    (lambda: visual(16, batch_first=False), tokens(16, 2, 16), r"not a perfect square"),
], ids=["visual-dim", "text-dim", "lowrank-dim", "rank2", "rank4", "text-rank1", "grid-count",
        "non-square", "only-prefix", "seq-first-count"])
def test_shape_errors(make, x, match):
    with pytest.raises(ValueError, match=match):
        make()(x)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=str)
def test_non_float_dtype(dtype):
    x = torch.ones(2, 17, 16, dtype=dtype)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        visual(16)(x)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        heba.nn.LowRankAdapter(16, 4)(x)


def test_dtype_mismatch_outside_autocast():
    a = visual(16)
    with pytest.raises(TypeError, match=r"down_weight has dtype torch.float32 but x has dtype "
                                        r"torch.float64"):
        a(tokens(2, 17, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="up_weight has dtype"):
        l = heba.nn.LowRankAdapter(16, 4).half()
        l.up.float()
        l(tokens(3, 16, dtype=torch.float16))


def test_device_mismatch():
    a = visual(16)
    x = torch.empty(2, 17, 16, device="meta")
    with pytest.raises(ValueError, match=r"down_weight is on cpu but x is on meta"):
        a(x)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        visual(16)([[1.0] * 16])


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=18, reduction=4), r"dim=18 must be divisible by reduction=4"),
    (dict(dim=16, modality="audio"), r"modality must be 'visual' or 'text'"),
    (dict(dim=16, init="normal"), r"init must be 'kaiming' or 'zero'"),
    (dict(dim=16, backend="tpu"), r"backend must be one of"),
    (dict(dim=16, grid=(4,)), r"grid must be \(H, W\)"),
    (dict(dim=16, grid=(0, 4)), r"grid must be \(H, W\)"),
    (dict(dim=16, num_prefix_tokens=-1), r"num_prefix_tokens must be an int >= 0"),
    (dict(dim=0), r"dim must be a positive int"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        heba.nn.HeBAAdapter(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=16, rank=0), r"rank must be a positive int"),
    (dict(dim=16, rank=4, init="kaiming"), r"init must be 'zero' or 'small'"),
    (dict(dim=16, rank=4, backend="gpu"), r"backend must be one of"),
])
def test_low_rank_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        heba.nn.LowRankAdapter(**kwargs)


def test_scale_float_or_0d_tensor_on_x_device():
    """scale: a Python float or a 0-d floating tensor on x's device; anything else fails
    in one line naming ``scale``, before any backend runs."""
    a = visual(16)
    x = tokens(2, 17, 16)
    with pytest.raises(TypeError, match=r"scale must be a Python float or a 0-d floating "
                                        r"tensor, got str"):
        a(x, scale="0.1")
    with pytest.raises(TypeError, match=r"scale must be .* got a tensor of dtype torch.int64"):
        a(x, scale=torch.tensor(1))
    with pytest.raises(ValueError, match=r"scale must be a Python float or a 0-d tensor, got "
                                         r"a tensor of shape \(1,\)"):
        a(x, scale=torch.tensor([0.1]))
    with pytest.raises(ValueError, match=r"scale is a tensor on meta but x is on cpu"):
        a(x, scale=torch.tensor(0.1, device="meta"))
    with pytest.raises(ValueError, match="scale must be finite"):
        a(x, scale=float("nan"))
    with pytest.raises(TypeError, match=r"alpha must be a Python float"):
        ops.low_rank(x, torch.randn(4, 16), None, torch.randn(16, 4), None,
                     alpha=torch.tensor(0.5))


def test_tensor_scale_reaches_the_backend_as_0d_float32(monkeypatch):
    """The convention every backend relies on: a float stays a float; a tensor arrives
    detached, 0-d, float32, contiguous, on x's device, whatever its dtype was."""
    seen = []

    def record(x, *params, scale, **kwargs):
        seen.append(scale)
        return x
    for key in list(heba.backends.registry.fns):
        monkeypatch.setitem(heba.backends.registry.fns, key, record)
    a, t = visual(16), heba.nn.HeBAAdapter(16, modality="text")
    x = tokens(2, 17, 16)
    a(x, scale=0.25)
    for dtype in (torch.float64, torch.bfloat16, torch.float32):
        s = torch.tensor(0.25, dtype=dtype, requires_grad=dtype == torch.float64)
        a(x, scale=s)
        t(x, scale=s)
    assert seen[0] == 0.25 and type(seen[0]) is float
    for s in seen[1:]:
        assert isinstance(s, torch.Tensor) and s.dim() == 0 and s.dtype == torch.float32
        assert s.is_contiguous() and s.device == x.device and not s.requires_grad
        assert s.item() == 0.25


def test_weight_shape_errors_in_functional_api():
    x = tokens(2, 17, 16)
    w = dict(down_weight=torch.randn(4, 16, 1, 1), mid_weight=torch.randn(4, 1, 3, 3),
             up_weight=torch.randn(16, 4, 1, 1), norm_weight=torch.randn(16),
             norm_bias=torch.randn(16))
    with pytest.raises(ValueError, match=r"visual weights must be"):
        ops.heba_visual(x, **{**w, "mid_weight": torch.randn(4, 1, 5, 5)})
    with pytest.raises(ValueError, match=r"norm_bias must be \[16\]"):
        ops.heba_visual(x, **{**w, "norm_bias": torch.randn(8)})
    with pytest.raises(ValueError, match=r"up_bias must be \[16\]"):
        ops.low_rank(x, torch.randn(4, 16), None, torch.randn(16, 4), torch.randn(4))


def test_unavailable_backend_says_why(monkeypatch):
    x = tokens(2, 17, 16)
    if not heba.backends.triton_interpreting():
        with pytest.raises(heba.BackendUnavailableError, match=r"TRITON_INTERPRET=1"):
            visual(16, backend="triton")(x)
    if not heba.backends.backend_status("cuda")[0]:
        with pytest.raises(heba.BackendUnavailableError,
                           match=r"backend='cuda' cannot run heba_visual: .*"):
            visual(16, backend="cuda")(x)
    with pytest.raises(heba.BackendUnavailableError, match=r"runs on CUDA tensors|was not built"):
        heba.nn.LowRankAdapter(16, 4, backend="cuda")(x)
