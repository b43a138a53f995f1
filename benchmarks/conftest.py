import pytest
import torch

from benchmarks.cases import DRY_RUN


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or DRY_RUN:
        return
    skip = pytest.mark.skip(reason="the benchmarks time CUDA kernels and no CUDA GPU is visible "
                                   "(HEBA_BENCH_DRY_RUN=1 exercises the harness on the CPU at "
                                   "tiny shapes, without meaningful numbers)")
    for item in items:
        if not getattr(item.module, "CPU_BENCHMARK", False):   # e.g. the data pipeline's
            item.add_marker(skip)
