"""Shared test helpers: docs/semantics.md tolerances, verbose comparisons, reference runs."""

from __future__ import annotations

import os

import pytest
import torch

from heba import ops

# docs/semantics.md section 3: ||out - ref|| / ||ref|| per tensor against a float64 reference.
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.float64: "fp64"}

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                                  reason="needs a CUDA GPU; none is visible on this machine")
requires_triton_cpu = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available(),
    reason="the triton backend needs a CUDA GPU or TRITON_INTERPRET=1 (the interpreter)")


def gpu_plans_in_interpreter(monkeypatch, sms: int = 4) -> None:
    """Make heba's Triton launchers take the launch plan of a GPU with ``sms`` SMs (its
    block sizes, grids and tiles) while Triton's interpreter runs them: the GPU's block
    choices checked on a CPU. Float32 operands only: with a GPU's plan, 16-bit operands
    would reach the interpreter's ``tl.dot``, which is wrong on them."""
    import heba_kernels._triton_common as tc
    from heba_kernels import heba_text, heba_visual, low_rank
    for mod in (tc, heba_text, heba_visual, low_rank):
        monkeypatch.setattr(mod, "plan_device", lambda device: (sms, True))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def assert_rel_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float):
    """Fail with which tensor, how far off and where, if the relative error passes ``tol``."""
    assert actual.shape == expected.shape, \
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad = ~torch.isfinite(a) & torch.isfinite(e)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{name}: {int(bad.sum())} non-finite values where the reference "
                             f"is finite, first at {idx} ({a[idx].item()})")
    err = rel_err(a, e)
    if not err <= tol:
        diff = (a - e).abs()
        idx = tuple(int(i) for i in (diff == diff.max()).nonzero()[0])
        raise AssertionError(
            f"{name}: relative error {err:.3e} > tol {tol:.1e}; largest difference "
            f"{diff.max().item():.3e} at {idx} (got {a[idx].item():.6g}, "
            f"expected {e[idx].item():.6g}); ||expected|| = {e.norm().item():.4g}")


def forward_backward(fn, x, params: dict, grad_out=None, seed=0):
    """Run ``fn(x, **params)`` and backward with ``grad_out`` (random if None).

    Returns (out, grad_out, {"x": dx, name: dparam...}). Inputs are leaf copies.
    """
    x = x.detach().clone().requires_grad_(True)
    params = {k: (None if v is None else v.detach().clone().requires_grad_(True))
              for k, v in params.items()}
    out = fn(x, **params)
    if grad_out is None:
        g = torch.Generator(device="cpu").manual_seed(seed + 12345)
        grad_out = torch.randn(out.shape, generator=g, dtype=torch.float32).to(out)
    out.backward(grad_out.to(out.dtype))
    grads = {"x": x.grad}
    grads.update({k: v.grad for k, v in params.items() if v is not None})
    return out.detach(), grad_out, grads


def check_against_reference(op_name: str, backend: str, x, params: dict, dtype=None,
                            tol=None, autocast_dtype=None, **kwargs):
    """Compare ``heba.ops.<op_name>`` on ``backend`` with the float64 reference.

    Every output and every gradient (x and each parameter) is compared by
    relative error with docs/semantics.md's tolerance for ``dtype`` (x's dtype by default,
    the autocast dtype under autocast).
    """
    op = getattr(ops, op_name)
    dtype = dtype or (autocast_dtype or x.dtype)
    tol = tol if tol is not None else TOL[dtype]

    def run(xx, **pp):
        return op(xx, **pp, **kwargs, backend=backend)

    if autocast_dtype is not None:
        with torch.autocast(x.device.type, dtype=autocast_dtype):
            out, g, grads = forward_backward(run, x, params)
    else:
        out, g, grads = forward_backward(run, x, params)
    assert out.dtype == x.dtype, f"output dtype {out.dtype} != x dtype {x.dtype}"

    def ref(xx, **pp):
        return op(xx, **pp, **kwargs, backend="reference")

    to64 = {k: (None if v is None else v.detach().double()) for k, v in params.items()}
    rout, _, rgrads = forward_backward(ref, x.detach().double(), to64, grad_out=g.double())
    assert_rel_close("out", out, rout, tol)
    for k, rg in rgrads.items():
        assert grads[k] is not None, f"grad of {k} is None"
        assert grads[k].dtype == (x.dtype if k == "x" else params[k].dtype), \
            f"grad of {k} has dtype {grads[k].dtype}"
        assert_rel_close(f"grad {k}", grads[k], rg, tol)
    return out, grads


def visual_params(dim, reduction=4, device="cpu", dtype=torch.float32, seed=0):
    """Fresh random, non-zero visual weights scaled so that every term matters."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = dim // reduction
    p = dict(
        down_weight=torch.randn(h, dim, 1, 1, generator=g) / dim ** 0.5,
        mid_weight=torch.randn(h, 1, 3, 3, generator=g) / 3.0,
        up_weight=torch.randn(dim, h, 1, 1, generator=g) / h ** 0.5,
        norm_weight=1.0 + 0.5 * torch.randn(dim, generator=g),
        norm_bias=0.5 * torch.randn(dim, generator=g),
    )
    return {k: v.to(device=device, dtype=dtype) for k, v in p.items()}


def text_params(dim, reduction=4, device="cpu", dtype=torch.float32, seed=0):
    p = visual_params(dim, reduction, "cpu", torch.float32, seed)
    p["down_weight"] = p["down_weight"].flatten(1)
    p["up_weight"] = p["up_weight"].flatten(1)
    del p["mid_weight"]
    return {k: v.to(device=device, dtype=dtype) for k, v in p.items()}


def low_rank_params(dim, rank, device="cpu", dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator(device="cpu").manual_seed(seed)
    p = dict(
        down_weight=torch.randn(rank, dim, generator=g) / dim ** 0.5,
        down_bias=0.5 * torch.randn(rank, generator=g) if bias else None,
        up_weight=torch.randn(dim, rank, generator=g) / rank ** 0.5,
        up_bias=0.5 * torch.randn(dim, generator=g) if bias else None,
    )
    return {k: (None if v is None else v.to(device=device, dtype=dtype)) for k, v in p.items()}


def tokens(*shape, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def assert_tensor_scale_bitwise(op_name: str, backend: str, x, params: dict, scale: float,
                                **kwargs):
    """``heba.ops.<op_name>`` with ``scale`` as a Python float and as a 0-d float32 tensor
    on x's device: the output and every gradient must be bitwise equal.

    ``scale`` must be representable in float32 (a tensor scale is read as float32).
    The same incoming gradient drives both backward passes.
    """
    assert float(torch.tensor(scale, dtype=torch.float32)) == scale, scale
    op = getattr(ops, op_name)
    runs = []
    for s in (scale, torch.tensor(scale, dtype=torch.float32, device=x.device)):
        out, _, grads = forward_backward(
            lambda xx, **pp: op(xx, **pp, scale=s, **kwargs, backend=backend), x, params)
        runs.append((out, grads))
    (out_f, grads_f), (out_t, grads_t) = runs
    assert torch.equal(out_f, out_t), \
        f"out differs: max |diff| {(out_f.double() - out_t.double()).abs().max().item():.3e}"
    for k in grads_f:
        assert torch.equal(grads_f[k], grads_t[k]), \
            f"grad {k} differs between float and tensor scale " \
            f"(max |diff| {(grads_f[k].double() - grads_t[k].double()).abs().max().item():.3e})"


class LaunchRecorder:
    """Records every Triton launch of ``modules`` and whether it ran inside the
    launcher's ``device_guard`` (monkeypatched), and which devices the guard was given."""

    def __init__(self, monkeypatch, modules):
        import contextlib

        import heba_kernels._triton_common as tc
        self.guard_devices, self.launches, self._depth = [], [], 0
        self.kernels = set()

        @contextlib.contextmanager
        def guard(t):
            self.guard_devices.append(t.device)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1

        for m in modules:
            monkeypatch.setattr(m, "device_guard", guard)
        for m in (*modules, tc):
            for name, obj in list(vars(m).items()):
                if "_kernel" in name and hasattr(obj, "arg_names") and hasattr(obj, "run"):
                    if m is not tc:
                        self.kernels.add(name)
                    monkeypatch.setattr(m, name, self._wrap(name, obj))

    def _wrap(self, name, kernel):
        recorder = self

        class Recorded:
            def __getitem__(self, grid):
                launch = kernel[grid]

                def run(*args, **kwargs):
                    recorder.launches.append((name, recorder._depth > 0))
                    return launch(*args, **kwargs)
                return run
        return Recorded()

    def assert_all_guarded(self, device):
        assert self.launches, "no Triton launch was recorded"
        outside = [n for n, inside in self.launches if not inside]
        assert not outside, f"launched outside the device guard: {outside}"
        assert self.guard_devices and all(d == device for d in self.guard_devices), \
            self.guard_devices
        missed = self.kernels - {n for n, _ in self.launches}
        assert not missed, f"kernels never launched by this run: {missed}"


def sm90_compile_lines(only: str) -> list[str]:
    """The report lines of ``scripts/triton_aot_check.py --only ONLY``: the kernels whose case
    names contain ``only``, lowered to sm_90 cubins as a launch would (no GPU needed); fails
    the test if the script does."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "scripts/triton_aot_check.py", "--only", only,
                          "--jobs", "1"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    return [ln for ln in res.stdout.splitlines() if only in ln]
