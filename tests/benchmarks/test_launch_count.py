"""The dispatch recorder counts what launches: views and allocations not, in-place ops and a
custom op's inner ops yes, a Triton launch once (not the interpreter's copies around it)."""

import pytest
import torch

from benchmarks.launch_count import count_launches


@torch.library.custom_op("heba_bench_test::scaled_sum", mutates_args=())
def _scaled_sum(x: torch.Tensor) -> torch.Tensor:
    return (x * 2).sum(0)                          # two kernels inside one custom op


@_scaled_sum.register_fake
def _(x):
    return x.new_empty(x.shape[1:])


def test_views_and_allocations_do_not_launch():
    x = torch.randn(3, 5)
    c = count_launches(lambda: (x.t(), x.view(5, 3), x[1:], x.expand(2, 3, 5), torch.empty(4),
                                x.detach(), x.unsqueeze(0)))
    assert c["launches"] == 0 and c["dispatches"] >= 7, c


def test_each_kernel_op_counts_once_and_host_reads_apart():
    x = torch.randn(3, 5)
    c = count_launches(lambda: (x + 1, x.add_(1), torch.zeros(3), x.float().sum().item()))
    # add, add_, zeros, sum (float() of a float32 tensor dispatches nothing); item: a host read
    assert c["aten_kernels"] == 4 and c["host_reads"] == 1, c["by_op"]


def test_backward_is_counted():
    w = torch.randn(4, 4, requires_grad=True)
    c = count_launches(lambda: (w @ w).sum().backward())
    # forward mm + sum; backward ones_like-free expand (a view), two mm, accumulate add
    assert c["by_op"]["aten.mm"] == 3 and c["launches"] == c["aten_kernels"] >= 5, c["by_op"]


def test_custom_op_inner_ops_counted():
    x = torch.randn(3, 5)
    c = count_launches(lambda: _scaled_sum(x))
    assert c["custom"] == 1 and c["by_op"]["aten.mul"] == 1 and c["by_op"]["aten.sum"] == 1, c


def test_triton_launch_counted_once_without_interpreter_copies(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton = pytest.importorskip("triton", reason="needs triton")
    import triton.language as tl

    @triton.jit
    def _add_one_kernel(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)

    from heba_kernels.runtime import launch          # how heba's launchers launch

    x = torch.randn(37)
    want = x + 1
    c = count_launches(lambda: launch(_add_one_kernel, (3,), x, 37, BLOCK=16))
    torch.testing.assert_close(x, want)
    assert c["triton"] == 1 and c["aten_kernels"] == 0, c["by_op"]
