"""Where a run executes: devices, DistributedDataParallel, CPU threads, autocast precision."""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from heba.train.config import UsageError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def set_cpu_threads(n: Optional[int]) -> int:
    """Intra-op threads on the CPU: ``n``, or as many cores as other processes leave idle.

    Measured on a 2-core machine whose other processes kept ~4 threads busy:
    a tiny-CLIP training step took 0.37 s with 1 thread and 8 s with 2 (OpenMP
    threads spin-waiting for a core), so a busy machine gets fewer threads.
    """
    if n is None:
        cores = os.cpu_count() or 1
        try:
            idle = cores - os.getloadavg()[0]
        except OSError:
            idle = cores
        n = max(1, min(torch.get_num_threads(), int(idle + 0.5)))
    torch.set_num_threads(n)
    return n


def setup_distributed(device_arg: str):
    """``(rank, world, device)``; joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA GPU is visible")
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        rank = dist.get_rank()
        local = int(os.environ.get("LOCAL_RANK", rank))
        if want_cuda:
            torch.cuda.set_device(local)
            return rank, world, torch.device("cuda", local)
        return rank, world, torch.device("cpu")
    return 0, 1, torch.device("cuda" if want_cuda else "cpu")


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def resolve_precision(precision: str, device, gpu_precision: str = "fp16") -> str:
    """``auto``: ``gpu_precision`` on CUDA (the heba recipe: fp16, the published "amp";
    bf16 needs no loss scaling, so its step can be a CUDA graph), fp32 on the CPU."""
    if precision == "auto":
        return gpu_precision if device.type == "cuda" else "fp32"
    return precision


def autocast_ctx(device, precision: str, cache: bool = True):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision], cache_enabled=cache)
