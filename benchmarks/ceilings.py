"""The ceilings a GPU run measures for the roofline model (benchmarks/roofline.py).

:func:`measure_ceilings` measures, on one CUDA device, the three rates that bound the
model's floor, each timed by the caller's ``bench_ms`` (median milliseconds of a call;
by default ``triton.testing.do_bench``: CUDA events after warm-up, median):

* ``copy_gbs``: HBM bandwidth, bytes read plus bytes written by a 512 MiB bf16 copy
  (``GPU.hbm``);
* ``matmul_tflops``: dense bf16 rate of an 8192 x 8192 x 8192 matmul (``GPU.bf16``);
* ``l2_gbs``: L2-to-SM read bandwidth (``GPU.l2_bw``), :func:`measure_l2_gbs`.

benchmarks/test_adapters.py records them in every row (``measured_copy_gbs``,
``measured_matmul_tflops``, ``measured_l2_gbs``) and the GPU check's launch-plan
variants (tools/gpu_check/tune.py) model their floors with them;
:func:`benchmarks.roofline.measured_gpu` turns them into the model's GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["BLOCK", "NUM_WARPS", "PROGRAMS_PER_SM", "l2_sweep", "measure_l2_gbs",
           "measure_ceilings", "do_bench_ms"]

BLOCK = 4096              # elements per load of the L2 probe (16 float32 per thread at 8 warps)
NUM_WARPS = 8
PROGRAMS_PER_SM = 4       # programs of the probe per SM, fewer where an SM cannot hold four
L2_FRACTION = 4           # the probe's buffer: a quarter of the L2
TARGET_BYTES = 1e10       # bytes one probe launch reads: about 1 ms at 10 TB/s


def do_bench_ms(fn) -> float:
    """Median milliseconds of ``fn``: CUDA events after warm-up (``triton.testing.do_bench``)."""
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


@triton.jit(do_not_specialize=["repeats"])      # one compiled kernel for every repeats
def _l2_sweep_kernel(buf_ptr, out_ptr, n, repeats, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    """Program ``p`` reads all ``n`` elements of ``buf`` ``repeats`` times, block by block,
    starting at block ``p * blocks // programs`` and wrapping around, and writes their float32
    sum to ``out[p]``. ``.cg`` loads are cached in L2 only, so every block comes from L2."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(n, BLOCK)
    first = pid * blocks // tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(repeats):
        for i in range(blocks):
            b = first + i
            b = tl.where(b < blocks, b, b - blocks)
            offs = b * BLOCK + cols
            if EVEN:
                x = tl.load(buf_ptr + offs, cache_modifier=".cg")
            else:
                x = tl.load(buf_ptr + offs, mask=offs < n, other=0.0, cache_modifier=".cg")
            acc += x.to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def _check_sweep(buf: torch.Tensor, programs: int, repeats: int, block: int):
    if not isinstance(buf, torch.Tensor) or buf.dim() != 1 or buf.numel() == 0:
        shape = tuple(buf.shape) if isinstance(buf, torch.Tensor) else type(buf).__name__
        raise ValueError(f"buf must be a non-empty 1-D tensor, got {shape}")
    if not buf.is_contiguous():
        raise ValueError(f"buf must be contiguous, got stride {buf.stride()}")
    if not buf.dtype.is_floating_point or buf.dtype == torch.float64:
        raise ValueError(f"buf must be float32, float16 or bfloat16, got {buf.dtype}")
    if buf.numel() >= 2 ** 31:
        raise ValueError(f"buf must hold fewer than 2**31 elements, got {buf.numel()}")
    if not isinstance(programs, int) or programs < 1:
        raise ValueError(f"programs must be an int >= 1, got {programs!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if not isinstance(block, int) or block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block!r}")


def _launch(buf, out, repeats, block, num_warps):
    """One launch of the probe, ``out.numel()`` programs; the compiled kernel."""
    n = buf.numel()
    return _l2_sweep_kernel[(out.numel(),)](buf, out, n, repeats, BLOCK=block,
                                            EVEN=n % block == 0, num_warps=num_warps)


def l2_sweep(buf: torch.Tensor, programs: int, repeats: int, block: int = BLOCK,
             num_warps: int = NUM_WARPS) -> torch.Tensor:
    """The L2 probe's result: a float32 ``[programs]`` tensor whose every entry is
    ``repeats * buf.sum()``, summed in float32 (each program read all of ``buf``, a 1-D
    contiguous float32, float16 or bfloat16 tensor, ``repeats`` times in ``block``-element
    loads). ``programs * repeats * buf.nbytes`` bytes read. Runs wherever Triton does
    (a CUDA device, or the CPU under ``TRITON_INTERPRET=1``)."""
    _check_sweep(buf, programs, repeats, block)
    out = torch.empty(programs, dtype=torch.float32, device=buf.device)
    if buf.device.type == "cuda":
        with torch.cuda.device(buf.device):
            _launch(buf, out, repeats, block, num_warps)
    else:
        _launch(buf, out, repeats, block, num_warps)
    return out


def _programs_per_sm(kernel, props, num_warps) -> int:
    """How many programs of the compiled probe an SM holds at once, at most
    :data:`PROGRAMS_PER_SM` (registers, threads and shared memory per SM)."""
    threads = 32 * num_warps
    fit = min(PROGRAMS_PER_SM, props.max_threads_per_multi_processor // threads)
    regs = getattr(kernel, "n_regs", 0)
    if regs:
        fit = min(fit, props.regs_per_multiprocessor // (-(-regs // 8) * 8 * threads))
    shared = getattr(getattr(kernel, "metadata", None), "shared", 0)
    if shared:
        fit = min(fit, props.shared_memory_per_multiprocessor // shared)
    return max(1, fit)


def measure_l2_gbs(device, bench_ms=do_bench_ms) -> float:
    """L2-to-SM read bandwidth of ``device``, GB/s (1e9 bytes/s): the roofline's ``l2_bw``
    ceiling (:class:`benchmarks.roofline.GPU`), measured.

    A float32 buffer of a quarter of the L2 the device reports (12.5 MiB of a 50 MiB L2;
    a whole number of :data:`BLOCK`-element blocks) is read by a persistent grid of
    :data:`PROGRAMS_PER_SM` programs per SM (fewer where the compiled kernel's registers
    allow fewer at once, so the grid is one wave), every program sweeping the WHOLE buffer
    ``repeats`` times from its own starting block, so that the SMs read different L2 slices
    at once. Each program streams far more than an SM's L1 holds (256 KB on Hopper), and
    its loads are cached in L2 only, so every byte comes from L2: what is measured is the
    rate at which L2 serves reads of a resident buffer to all SMs together. ``repeats``
    makes one launch read about :data:`TARGET_BYTES` (about 1 ms at 10 TB/s). A first
    launch compiles the kernel and leaves the buffer in L2; then ``bench_ms`` times it.
    GB/s = programs * repeats * buffer bytes / median seconds / 1e9. (A cache flush
    between timed launches, as ``triton.testing.do_bench`` does, costs one read of the
    buffer from HBM, some microseconds of the launch's milliseconds.)"""
    dev = torch.device(device)
    props = torch.cuda.get_device_properties(dev)
    elem = 4
    n = max(1, props.L2_cache_size // L2_FRACTION // elem // BLOCK) * BLOCK
    buf = torch.randn(n, dtype=torch.float32, device=dev)
    _check_sweep(buf, 1, 1, BLOCK)
    with torch.cuda.device(dev):
        out = torch.empty(1, dtype=torch.float32, device=dev)
        kernel = _launch(buf, out, 1, BLOCK, NUM_WARPS)        # compiles
        programs = props.multi_processor_count * _programs_per_sm(kernel, props, NUM_WARPS)
        repeats = max(1, math.ceil(TARGET_BYTES / (programs * n * elem)))
        out = torch.empty(programs, dtype=torch.float32, device=dev)

        def probe():
            _launch(buf, out, repeats, BLOCK, NUM_WARPS)

        probe()                                                 # the buffer is now in L2
        ms = bench_ms(probe)
    return programs * repeats * n * elem / ms / 1e6


def measure_ceilings(device, bench_ms=do_bench_ms) -> dict:
    """The roofline's ceilings on CUDA ``device``, measured now, each timed by ``bench_ms``
    (median ms of a call): ``copy_gbs`` (GB/s: bytes read plus written by a 512 MiB bf16
    copy), ``matmul_tflops`` (an 8192^3 bf16 matmul), ``l2_gbs`` (:func:`measure_l2_gbs`),
    with the device's name, SM count (``sms``) and L2 bytes (``l2_bytes``)."""
    dev = torch.device(device)
    a = torch.empty(2 ** 28, dtype=torch.bfloat16, device=dev)        # 512 MiB
    b = torch.empty_like(a)
    copy_gbs = 2 * a.numel() * 2 / bench_ms(lambda: b.copy_(a)) / 1e6
    del a, b
    m = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    matmul_tflops = 2 * 8192 ** 3 / bench_ms(lambda: m @ m) / 1e9
    del m
    props = torch.cuda.get_device_properties(dev)
    return {"copy_gbs": copy_gbs, "matmul_tflops": matmul_tflops,
            "l2_gbs": measure_l2_gbs(dev, bench_ms), "device": torch.cuda.get_device_name(dev),
            "sms": props.multi_processor_count, "l2_bytes": props.L2_cache_size}
