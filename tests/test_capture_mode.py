"""CUDA-graph captures in heba.clip.fast are thread-local.

With the default ("global") capture mode, any other thread's CUDA call that is
unsafe during a capture (the DataLoader's pin-memory thread allocating pinned
memory) aborts the capture (error 900). The capture must pass
``capture_error_mode="thread_local"``. No GPU here: ``torch.cuda.graph`` and
friends are replaced by recorders, and the captured step runs on the CPU.
"""

from __future__ import annotations

import contextlib

import torch

from heba.clip import fast


@contextlib.contextmanager
def _recording_graph(calls):
    def graph(cuda_graph, **kwargs):
        calls.append(kwargs)
        return contextlib.nullcontext()
    mp = torch.cuda
    saved = (mp.graph, mp.CUDAGraph, mp.graph_pool_handle)
    mp.graph, mp.CUDAGraph, mp.graph_pool_handle = graph, object, lambda: "pool"
    try:
        yield
    finally:
        mp.graph, mp.CUDAGraph, mp.graph_pool_handle = saved


def test_train_step_captures_thread_local():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    step = fast.TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), cuda_graphs=True)
    step.loss = lambda *args, **kwargs: (model(torch.randn(2, 4)) ** 2).sum()
    calls = []
    with _recording_graph(calls):
        step._capture("key", torch.randn(2, 4), torch.ones(3, 5, dtype=torch.long),
                      torch.zeros(2, dtype=torch.long), torch.ones(3, dtype=torch.bool), 5)
    assert calls == [{"pool": "pool", "capture_error_mode": "thread_local"}], calls
    assert "key" in step._graphs


def test_graphed_step_captures_thread_local():
    w = torch.randn(3, requires_grad=True)
    graphed = fast.GraphedStep(lambda x: ((x * w).sum(),), [w])
    calls = []
    with _recording_graph(calls):
        graphed._capture("key", [torch.randn(3)])
    assert calls == [{"pool": "pool", "capture_error_mode": "thread_local"}], calls
    assert w.grad is not None and "key" in graphed._graphs
