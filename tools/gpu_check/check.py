"""The GPU check: build, every GPU test, a correctness sweep and the benchmarks in one run.

    bash scripts/gpu_check.sh --out DIR [--wheels DIR]        # what you run
    python -m tools.gpu_check --out DIR [--budget S] [--stages a,b]

Stages, in order, each in its own process with its own timeout, each run even
when an earlier one failed: ``versions``, ``build`` (the CUDA extension in place
for this GPU's arch, every core), ``info`` (``python -m heba.info``), ``tests``
(every GPU test, pytest-xdist where installed), ``sweep`` (every op x fused
backend x dtype against the float64 reference, :mod:`tools.gpu_check.sweep`),
``memcheck`` and ``racecheck`` (the small sweep under compute-sanitizer),
``bench-ops`` (benchmarks/test_adapters.py) and ``bench-e2e``
(benchmarks/test_train_step.py, needs open_clip). One more stage runs only when
``--stages`` names it, so the default run is the one above: ``tune``
(:mod:`tools.gpu_check.tune`: the visual adapter's launch-plan variants, each plan
choice of heba_kernels/heba_visual.py flipped in turn, checked against the shipped
plan, then timed forward + backward beside the roofline model's floor for the same
plan, in the report's "Launch-plan variants" section and ``tune.json``; run as
``--stages tune``, or with others, e.g. ``--stages build,tune``). A global budget
(``--budget``, default 480 s) bounds the run: a stage gets at most what is left less
a reserve for the stages after it (the benchmarks are last and must not starve),
pytest stages stop starting tests before their limit so their results are still
written, and a stage that is cut says so. After every stage DIR gets
``gpu_check.md`` (the report), ``gpu_check.json`` (everything, raw) and
``gpu_check.log`` (every stage's output); at the end also the tests' junit XML,
the benchmarks' JSON and PNG plots, all at the top of DIR (no sub-folders).

``HEBA_GPU_CHECK_DRY_RUN=1`` runs the same stages on a CPU at tiny shapes in
Triton's interpreter, without the CUDA build, the sanitizer and the
torch.compile contenders. Switches for tests of this tool:
``HEBA_GPU_CHECK_INJECT_FAIL=stage[,stage]`` makes those stages fail
(``tests`` adds a failing test, ``sweep`` perturbs one output, ``tune`` one
variant's output, any other stage runs a failing command instead),
``HEBA_GPU_CHECK_TIMEOUTS=stage=seconds,...`` overrides stage timeouts,
``HEBA_GPU_CHECK_TESTS`` replaces the tests stage's pytest arguments,
``HEBA_GPU_CHECK_BENCH_K`` the op benchmarks' ``-k`` selection. This module
imports only the standard library at the top, so it reports even when torch
itself is broken.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLUGIN = ["-p", "tools.gpu_check.plugin", "-p", "no:cacheprovider"]
GRACE = 20          # seconds a pytest stage keeps to finish after its deadline
RESERVE = 10        # seconds of the global budget kept for the final report
HARNESS_TESTS = ("tests/tools", "tests/benchmarks")   # CPU dry runs of what the stages run


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


@dataclass
class Stage:
    name: str
    title: str
    timeout: int          # seconds on a GPU
    dry_timeout: int      # seconds in a dry run
    reserve: int = 0      # seconds on a GPU that earlier stages leave to this one
    default: bool = True  # run when --stages is not given


STAGES = [
    Stage("versions", "versions of Python, torch, Triton, CUDA and the GPU", 45, 60),
    Stage("build", "build the CUDA extension in place", 200, 30),
    Stage("info", "python -m heba.info", 30, 45),
    Stage("tests", "every GPU test", 120, 60, reserve=60),
    Stage("sweep", "correctness sweep against the float64 reference", 90, 90, reserve=40),
    Stage("memcheck", "small sweep under compute-sanitizer memcheck", 50, 30, reserve=20),
    Stage("racecheck", "small sweep under compute-sanitizer racecheck", 40, 30, reserve=20),
    Stage("bench-ops", "op benchmarks (benchmarks/test_adapters.py)", 150, 90, reserve=90),
    Stage("bench-e2e", "training-step benchmark (benchmarks/test_train_step.py)", 150, 90,
          reserve=60),
    Stage("tune", "launch-plan variants of the visual adapter, timed beside the model",
          420, 150, reserve=60, default=False),
]


@dataclass
class Result:
    name: str
    status: str = "not run"     # passed | failed | cut | skipped | not run
    seconds: float = 0.0
    timeout: float = 0.0
    note: str = ""
    commands: list = field(default_factory=list)
    tail: str = ""
    data: dict = field(default_factory=dict)


class Context:
    """What the stages share: modes, folders, the budget, the combined log."""

    def __init__(self, out, work, budget, dry):
        self.out, self.work, self.dry = out, work, dry
        self.py = sys.executable
        self.t0 = time.time()
        self.started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self.budget = budget
        self.deadline = self.t0 + budget - RESERVE
        self.inject = [s for s in os.environ.get("HEBA_GPU_CHECK_INJECT_FAIL", "").split(",")
                       if s]
        self.versions: dict = {}
        self.log_path = os.path.join(out, "gpu_check.log")
        open(self.log_path, "w").close()

    def env(self, **extra):
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("TRITON_INTERPRET", None)
        if self.dry:
            env.update(TRITON_INTERPRET="1", HEBA_BENCH_DRY_RUN="1")
        env.update({k: str(v) for k, v in extra.items() if v is not None})
        return env

    def run(self, res: Result, cmd, timeout, env=None, stage=None):
        """Run ``cmd`` in its own process group; kill the group at ``timeout``.

        Returns (exit code or None when cut, output). The output goes to the log.
        """
        if stage in self.inject and stage not in ("tests", "sweep", "tune"):
            cmd = [self.py, "-c", f"raise SystemExit('injected failure of stage {stage} "
                                  f"(HEBA_GPU_CHECK_INJECT_FAIL)')"]
        res.commands.append(" ".join(shlex.quote(str(c)) for c in cmd))
        with tempfile.TemporaryFile("w+") as buf:
            proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env or self.env(),
                                    stdout=buf, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
            buf.seek(0)
            text = buf.read()
        with open(self.log_path, "a") as log:
            log.write(f"\n===== {res.name}: {res.commands[-1]}\n{text}")
            log.write(f"===== exit {'(cut at %.0f s)' % timeout if rc is None else rc}\n")
        return rc, text

    def left(self) -> float:
        return self.deadline - time.time()


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def _has(module: str) -> bool:
    if module == "open_clip" and _flag("HEBA_HIDE_OPEN_CLIP"):
        return False
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _simple(ctx, res, cmd, timeout, env=None, stage=None):
    """Run one command; passed on exit 0, failed otherwise, cut at the timeout."""
    rc, text = ctx.run(res, cmd, timeout, env=env, stage=stage or res.name)
    res.tail = _tail(text)
    if rc is None:
        res.status, res.note = "cut", f"stopped at its limit of {timeout:.0f} s"
    else:
        res.status = "passed" if rc == 0 else "failed"
        if rc:
            res.note = f"exit status {rc}"
    return rc, text


# --- stages 1-3: versions, build, heba.info ----------------------------------------------------

def stage_versions(ctx, res, timeout):
    path = os.path.join(ctx.work, "versions.json")
    rc, _ = _simple(ctx, res, [ctx.py, "-m", "tools.gpu_check", "--probe", path], timeout)
    if os.path.exists(path):
        with open(path) as f:
            ctx.versions = json.load(f)
    res.data = ctx.versions


def probe(path):
    """Write the versions and the machine's facts to ``path`` (the versions stage)."""
    import platform
    import shutil
    info = {"python": platform.python_version(), "executable": sys.executable,
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "carried wheels": os.environ.get("HEBA_GPU_CHECK_WHEELS", "none")}
    try:
        import torch
        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                    cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2 ** 30, 1),
                        capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count)
    except Exception as err:
        info["torch_error"] = f"{type(err).__name__}: {err}"
    for mod, dist in (("triton", "triton"), ("pytest", "pytest"), ("xdist", "pytest-xdist"),
                      ("pytest_benchmark", "pytest-benchmark"),
                      ("pytest_timeout", "pytest-timeout"), ("open_clip", "open_clip_torch"),
                      ("matplotlib", "matplotlib"), ("ninja", "ninja")):
        info[dist] = _module_version(mod, dist)
    nvcc = _nvcc()
    info["nvcc"] = _first_line([nvcc, "--version"], last=True) if nvcc else "not found"
    info["driver"] = _first_line(["nvidia-smi", "--query-gpu=driver_version,name,memory.total",
                                  "--format=csv,noheader"]) if shutil.which("nvidia-smi") \
        else "nvidia-smi not found"
    sanitizer = _sanitizer()
    info["compute-sanitizer"] = _first_line([sanitizer, "--version"], last=True) \
        if sanitizer else "not found"
    with open(path, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))


def _module_version(mod, dist):
    """The installed version of ``dist`` (whose module is ``mod``), without importing it."""
    import importlib.metadata
    if not _has(mod):
        hidden = mod == "open_clip" and _flag("HEBA_HIDE_OPEN_CLIP")
        return "missing" + (" (hidden by HEBA_HIDE_OPEN_CLIP=1)" if hidden else "")
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "present (no package metadata)"


def _first_line(cmd, last=False):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    lines = out.splitlines() or [""]
    return lines[-1] if last else lines[0]


def _nvcc():
    import shutil
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    cand = os.path.join(home, "bin", "nvcc")
    return cand if os.path.exists(cand) else shutil.which("nvcc")


def _sanitizer():
    import shutil
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    cand = os.path.join(home, "bin", "compute-sanitizer")
    return cand if os.path.exists(cand) else shutil.which("compute-sanitizer")


def stage_build(ctx, res, timeout):
    if ctx.dry:
        res.status, res.note = "skipped", "dry run: no CUDA build"
        return
    nvcc = _nvcc()
    if not nvcc:
        res.status, res.note = "failed", "nvcc not found (set CUDA_HOME)"
        return
    arch = ctx.versions.get("capability") or _first_line(
        ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"])
    if not arch.replace(".", "").isdigit():
        arch = None                       # setup.py's default list
    env = ctx.env(HEBA_BUILD_CUDA="force", MAX_JOBS=os.cpu_count(), TORCH_CUDA_ARCH_LIST=arch,
                  CUDA_HOME=os.path.dirname(os.path.dirname(nvcc)))
    t0 = time.time()
    rc, _ = _simple(ctx, res, [ctx.py, "setup.py", "build_ext", "--inplace"], timeout, env=env)
    res.data = {"build_seconds": round(time.time() - t0, 1), "arch": arch or "setup.py default",
                "jobs": os.cpu_count()}
    if rc == 0:
        rc, _ = _simple(ctx, res, [ctx.py, "-c", "import torch, heba_kernels._C"],
                        max(5, timeout - (time.time() - t0)))
        if rc:
            res.note = "built, but heba_kernels._C does not import"
    res.note = (res.note + "; " if res.note else "") + \
        f"{res.data['build_seconds']} s with {os.cpu_count()} jobs for arch {res.data['arch']}"


def stage_info(ctx, res, timeout):
    _, text = _simple(ctx, res, [ctx.py, "-m", "heba.info"], timeout)
    res.data = {"output": text.strip()}


# --- pytest stages: junit XML, deadlines ---------------------------------------------------------

def parse_junit(path) -> dict:
    """Counts, every failure (node id and message) and skip reasons (with counts)."""
    import xml.etree.ElementTree as ET
    out = {"total": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "cut": 0,
           "failures": [], "skips": {}}
    try:
        cases = list(ET.parse(path).getroot().iter("testcase")) if os.path.exists(path) else []
    except ET.ParseError as err:          # pytest killed while writing it
        out["failures"].append({"test": path, "kind": "unreadable junit XML", "message": str(err)})
        cases = []
    for case in cases:
        out["total"] += 1
        node = "::".join(p for p in (case.get("classname"), case.get("name")) if p)
        bad = case.find("failure")
        err = case.find("error")
        skip = case.find("skipped")
        if bad is not None or err is not None:
            el = bad if bad is not None else err
            out["failed" if bad is not None else "errors"] += 1
            msg = (el.get("message") or (el.text or "")).strip().splitlines()
            out["failures"].append({"test": node, "kind": el.tag,
                                    "message": (msg[0] if msg else "")[:400]})
        elif skip is not None:
            reason = _skip_reason(skip)
            from tools.gpu_check.plugin import CUT_REASON
            if CUT_REASON in reason:
                out["cut"] += 1
            else:
                out["skipped"] += 1
                out["skips"][reason[:300]] = out["skips"].get(reason[:300], 0) + 1
        else:
            out["passed"] += 1
    return out


def _skip_reason(el) -> str:
    """A skip's reason; a module skipped at collection keeps it in the element's text."""
    import re
    reason = (el.get("message") or "").strip()
    if reason in ("", "collection skipped"):
        text = (el.text or "").strip()
        found = re.search(r"Skipped: (.*)['\"]\)$", text)
        reason = found.group(1) if found else text
    return reason


def run_pytest(ctx, res, args, timeout, junit, env=None):
    """pytest with the plugin, a deadline ``GRACE`` s before the hard limit, junit XML."""
    deadline = time.time() + max(1.0, timeout - GRACE)
    env = env or ctx.env()
    env["HEBA_PYTEST_DEADLINE"] = str(deadline)
    cmd = [ctx.py, "-m", "pytest", *PLUGIN, "-q", "-rfEs", f"--junitxml={junit}", *args]
    rc, text = _simple(ctx, res, cmd, timeout, env=env)
    summary = parse_junit(junit)
    res.data["junit"] = summary
    if rc == 5:                                   # pytest: no tests collected
        res.status, res.note = "failed", "no tests were collected"
    elif rc == 0 and summary["total"] and not summary["passed"]:
        res.status = "skipped"                    # nothing ran: the skip reasons say why
    if summary["cut"]:
        res.status = "cut"
        res.note = (f"{summary['cut']} tests not run: the stage reached its limit of "
                    f"{timeout:.0f} s")
    elif rc not in (None, 5):
        res.note = (f"{summary['passed']} passed, {summary['failed']} failed, "
                    f"{summary['errors']} errors, {summary['skipped']} skipped"
                    + (f"; exit status {rc}" if rc not in (0, 1) else ""))
    return rc, text


def collect(ctx, res, args, timeout=90):
    """Node ids that ``pytest --collect-only -q <args>`` finds (empty on failure)."""
    rc, text = ctx.run(res, [ctx.py, "-m", "pytest", *PLUGIN, "--collect-only", "-q", *args],
                       timeout, stage="collect")
    return [line.strip() for line in text.splitlines() if "::" in line and " " not in line]


def stage_tests(ctx, res, timeout):
    if os.environ.get("HEBA_GPU_CHECK_TESTS"):
        args = shlex.split(os.environ["HEBA_GPU_CHECK_TESTS"])
    elif ctx.dry:
        args = ["tests/heba/test_ops_validation.py"]
    else:
        args = ["tests"] + [f"--ignore={t}" for t in HARNESS_TESTS]
    if _has("xdist"):
        args += ["-n", str(min(16, os.cpu_count() or 1) if not ctx.dry else 2)]
    if _has("pytest_timeout"):
        args += ["--timeout", "120"]
    if "tests" in ctx.inject:
        path = os.path.join(ctx.work, "test_injected_failure.py")
        with open(path, "w") as f:
            f.write("def test_injected_failure():\n"
                    "    assert False, 'injected failure (HEBA_GPU_CHECK_INJECT_FAIL=tests)'\n")
        args += [path, "--rootdir", ROOT]
    res.data["xdist"] = _has("xdist")
    run_pytest(ctx, res, args, timeout, os.path.join(ctx.work, "junit-tests.xml"))


# --- stage 5: correctness sweep, sanitizers ------------------------------------------------------

def _sweep_summary(path):
    if not os.path.exists(path):
        return {"rows": []}
    with open(path) as f:
        data = json.load(f)
    return data


def stage_sweep(ctx, res, timeout):
    path = os.path.join(ctx.work, "sweep.json")
    jobs = 2 if ctx.dry else min(8, os.cpu_count() or 1)
    cmd = [ctx.py, "-m", "tools.gpu_check.sweep", "--out", path, "--size",
           "tiny" if ctx.dry else "clip", "--jobs", jobs,
           "--deadline", time.time() + max(1.0, timeout - GRACE)]
    rc, _ = _simple(ctx, res, cmd, timeout)
    if rc is None:              # killed: keep the rows the workers wrote
        from tools.gpu_check.sweep import read_rows
        res.data = {"rows": read_rows(path + ".jsonl")}
    else:
        res.data = _sweep_summary(path)
    _sweep_status(res)


def _sweep_status(res):
    rows = res.data.get("rows", [])
    n = {s: sum(r["status"] == s for r in rows) for s in ("pass", "FAIL", "error", "cut",
                                                         "skipped")}
    res.data["counts"] = n
    if n["cut"] and res.status != "failed":
        res.status = "cut"
    res.note = (f"{n['pass']} pass, {n['FAIL'] + n['error']} fail, {n['skipped']} skipped, "
                f"{n['cut']} cut" + (f"; {res.note}" if res.note else ""))
    if not rows and res.status == "passed":
        res.status = "failed"
    elif rows and res.status == "passed" and n["skipped"] == len(rows):
        res.status = "skipped"                    # no backend could run: the rows say why


def stage_sanitizer(tool):
    def stage(ctx, res, timeout):
        if ctx.dry:
            res.status, res.note = "skipped", "dry run: no sanitizer"
            return
        cs = _sanitizer()
        if not cs:
            res.status, res.note = "skipped", "compute-sanitizer not found"
            return
        path = os.path.join(ctx.work, f"{tool}.json")
        cmd = [cs, "--tool", tool, "--error-exitcode", "9", "--print-limit", "20",
               "--target-processes", "application-only",
               ctx.py, "-m", "tools.gpu_check.sweep", "--out", path, "--size", "small",
               "--jobs", "1", "--deadline", time.time() + max(1.0, timeout - GRACE)]
        # No caching allocator: every buffer is its own allocation, so memcheck sees overruns.
        env = ctx.env(PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        rc, text = _simple(ctx, res, cmd, timeout, env=env)
        res.data = _sweep_summary(path)
        summary = [line for line in text.splitlines() if "ERROR SUMMARY" in line]
        res.data["sanitizer"] = summary[-1].strip(" =") if summary else "no ERROR SUMMARY line"
        _sweep_status(res)
        res.note = f"{res.data['sanitizer']}; {res.note}"
    return stage


# --- stage 6: benchmarks ---------------------------------------------------------------------

def _warm_compile(ctx, res, ids, timeout):
    """Compile the torch.compile contenders side by side first (CPU-bound; the timed run
    then finds them in Inductor's and Triton's caches). Their timings are thrown away."""
    groups = [ids[i::min(8, len(ids))] for i in range(min(8, len(ids)))]
    env = ctx.env()
    procs = []
    for k, group in enumerate(groups):
        log = open(os.path.join(ctx.work, f"warm-{res.name}-{k}.log"), "w+")
        cmd = [ctx.py, "-m", "pytest", *PLUGIN, "-q", "--benchmark-disable", *group]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True), log))
    end = time.time() + timeout
    for proc, log in procs:
        try:
            proc.wait(timeout=max(0.1, end - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.seek(0)
        with open(ctx.log_path, "a") as f:
            f.write(f"\n===== {res.name} compile warm-up (exit {proc.returncode})\n{log.read()}")
        log.close()
    res.commands.append(f"(warm-up: {len(ids)} torch.compile contenders in {len(groups)} "
                        f"processes side by side)")


def stage_bench_ops(ctx, res, timeout):
    end = time.time() + timeout
    sel = os.environ.get("HEBA_GPU_CHECK_BENCH_K") or (
        "bf16 and fwdbwd and not compile and (visual-attn or text or lowrank-r16)" if ctx.dry
        else "bf16 and not lowrank-r64")
    ids = collect(ctx, res, ["benchmarks/test_adapters.py", "-k", sel])
    if not ids:
        res.status, res.note = "failed", f"no benchmark collected for -k {sel!r}"
        return
    compiled = [i for i in ids if "-compile-" in i]
    if compiled and not ctx.dry:
        _warm_compile(ctx, res, compiled, 0.4 * (end - time.time()))
    parts = [[i for i in ids if i not in compiled],              # torch.compile last,
             [i for i in compiled if i.endswith("-fwdbwd]")],      # forward+backward first
             [i for i in compiled if not i.endswith("-fwdbwd]")]]
    path = bench_parts(ctx, res, parts, end, "bench_adapters")
    if path:
        from benchmarks import report as ops_report
        res.data["device"], res.data["rows"] = ops_report.load(path)


def bench_parts(ctx, res, parts, end, name, env=None):
    """Run benchmark node-id lists one pytest process after the other (torch.compile last),
    each with its own JSON, merged into ``<work>/<name>.json``: a part cut while it
    compiles loses its own numbers only. Returns the merged path (None if nothing ran)."""
    merged, summaries = None, []
    for k, ids in enumerate(p for p in parts if p):
        path = os.path.join(ctx.work, f"{name}-{k}.json")
        run_pytest(ctx, res, ids + ["--benchmark-only", f"--benchmark-json={path}"],
                   end - time.time(), os.path.join(ctx.work, f"junit-{name}-{k}.xml"), env=env)
        summaries.append((res.status, res.note, res.data.pop("junit")))
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            if merged is None:
                merged = data
            else:
                merged["benchmarks"] += data["benchmarks"]
    order = ("skipped", "passed", "failed", "cut")     # the worst part decides
    res.status, res.note, _ = max(summaries, key=lambda s: order.index(s[0]) if s[0] in order
                                  else 0, default=(res.status, res.note, None))
    res.data["junit"] = _merge_junit([s[2] for s in summaries])
    j = res.data["junit"]
    if res.status != "cut":
        res.note = (f"{j['passed']} passed, {j['failed']} failed, {j['errors']} errors, "
                    f"{j['skipped']} skipped")
    if merged is None:
        return None
    out = os.path.join(ctx.work, f"{name}.json")
    with open(out, "w") as f:
        json.dump(merged, f)
    return out


def _merge_junit(summaries):
    total = {"total": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "cut": 0,
             "failures": [], "skips": {}}
    for s in summaries:
        for key in ("total", "passed", "failed", "errors", "skipped", "cut"):
            total[key] += s[key]
        total["failures"] += s["failures"]
        for reason, n in s["skips"].items():
            total["skips"][reason] = total["skips"].get(reason, 0) + n
    return total


E2E_METHODS = ("adaptertune-r16", "heba")      # longest prefix first when parsing ids


def _e2e_ids(ids, methods, impls):
    """The ``test_train_step[<method>-<impl>]`` ids for ``methods`` x ``impls``, in that order."""
    found = {}
    for node in ids:
        if "::test_train_step[" not in node:
            continue
        inner = node.split("[", 1)[1].rstrip("]")
        for method in E2E_METHODS:
            if inner.startswith(method + "-"):
                found[(method, inner[len(method) + 1:])] = node
                break
    return [found[(m, i)] for m in methods for i in impls if (m, i) in found]


def stage_bench_e2e(ctx, res, timeout):
    if not _has("open_clip"):
        res.status = "skipped"
        res.note = ("open_clip is not installed here" +
                    (" (hidden by HEBA_HIDE_OPEN_CLIP=1)" if _flag("HEBA_HIDE_OPEN_CLIP") else "")
                    + ": carry its wheels with --wheels DIR (README, 'GPU check')")
        return
    end = time.time() + timeout
    env = ctx.env()
    env.pop("TRITON_INTERPRET", None)     # a whole CLIP in the interpreter is too slow
    ids = collect(ctx, res, ["benchmarks/test_train_step.py"])
    methods = os.environ.get("HEBA_GPU_CHECK_E2E_METHODS",
                             "adaptertune-r16" if ctx.dry else "heba").split(",")
    impls = os.environ.get("HEBA_GPU_CHECK_E2E_IMPLS", "eager,heba" if ctx.dry
                           else "eager,heba,heba-triton,heba-cuda,compile,compile-ro").split(",")
    chosen = _e2e_ids(ids, methods, impls)
    if not chosen:
        res.status, res.note = "failed", f"no training-step benchmark for {methods} x {impls}"
        return
    compiled = [i for i in chosen if i.endswith("-compile]")]
    path = bench_parts(ctx, res, [[i for i in chosen if i not in compiled], compiled], end,
                       "bench_train", env=env)
    if path:
        from benchmarks import train_report
        res.data["device"], res.data["steps"], res.data["batches"] = train_report.load(path)


# --- opt-in stage: launch-plan variants -------------------------------------------------------

def stage_tune(ctx, res, timeout):
    from tools.gpu_check import tune
    path = os.path.join(ctx.work, "tune.json")
    cmd = [ctx.py, "-m", "tools.gpu_check.tune", "--out", path, "--size",
           "tiny" if ctx.dry else "clip", "--device", "cpu" if ctx.dry else "cuda",
           "--deadline", time.time() + max(1.0, timeout - GRACE)]
    rc, _ = _simple(ctx, res, cmd, timeout)
    if rc is not None and os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    else:                       # killed or crashed: the rows written so far, and what was not
        from tools.gpu_check.sweep import read_rows
        todo = []
        if os.path.exists(path + ".todo"):
            with open(path + ".todo") as f:
                todo = json.load(f)
        why = (f"the stage was stopped at its limit of {timeout:.0f} s while this ran"
               if rc is None else f"the tune process stopped (exit {rc}) while this ran")
        data = {"rows": tune.stopped(read_rows(path + ".jsonl"), todo, why), "dry": ctx.dry}
    res.data = {"tune": data}
    rows = data["rows"]
    n = tune.counts(rows)
    if n["not run"] and res.status == "passed":
        res.status = "cut"
    if not rows and res.status == "passed":
        res.status = "failed"
    best = "; ".join(f"{case}: {b['variant']}" for case, b in data.get("fastest", {}).items())
    res.note = (f"{n['pass']} timed, {n['same']} same as shipped, {n['FAIL']} wrong, "
                f"{n['error']} errors, {n['not run']} not run"
                + (f"; fastest: {best}" if best else "") + (f"; {res.note}" if res.note else ""))


RUNNERS = {"versions": stage_versions, "build": stage_build, "info": stage_info,
           "tests": stage_tests, "sweep": stage_sweep, "memcheck": stage_sanitizer("memcheck"),
           "racecheck": stage_sanitizer("racecheck"), "bench-ops": stage_bench_ops,
           "bench-e2e": stage_bench_e2e, "tune": stage_tune}


# --- driver --------------------------------------------------------------------------------------

def _timeouts(dry):
    over = {}
    for item in filter(None, os.environ.get("HEBA_GPU_CHECK_TIMEOUTS", "").split(",")):
        name, _, secs = item.partition("=")
        over[name.strip()] = float(secs)
    return {s.name: over.get(s.name, s.dry_timeout if dry else s.timeout) for s in STAGES}


def run_stage(ctx, stage, limit, later_reserve=0):
    """Run one stage within ``limit`` seconds and the global budget, leaving
    ``later_reserve`` seconds to the stages after it (but taking 15 s at least); never raises."""
    res = Result(stage.name)
    timeout = min(limit, max(ctx.left() - later_reserve, min(15, ctx.left())))
    res.timeout = max(0.0, timeout)
    if ctx.left() < 5:
        res.status = "not run"
        res.note = f"the global budget of {ctx.budget:.0f} s was spent before this stage"
        return res
    t0 = time.time()
    try:
        RUNNERS[stage.name](ctx, res, timeout)
    except Exception as err:      # the driver's own bug: report it, go on with the next stage
        import traceback
        res.status, res.note = "failed", f"gpu_check error: {type(err).__name__}: {err}"
        res.tail = traceback.format_exc()
    res.seconds = time.time() - t0
    if res.status == "cut" and limit > timeout + 1:
        res.note += " (cut short by the global budget)"
    return res


def write_outputs(ctx, results, final=False):
    """gpu_check.md and gpu_check.json now; at the end also the benchmarks' JSON and plots."""
    from dataclasses import asdict
    from tools.gpu_check import report as check_report
    meta = {"dry": ctx.dry, "budget": ctx.budget, "seconds": time.time() - ctx.t0,
            "started": ctx.started}
    dicts = [asdict(r) for r in results]
    with open(os.path.join(ctx.out, "gpu_check.json"), "w") as f:
        json.dump({**meta, "work": ctx.work, "stages": dicts}, f, indent=1, default=str)
    with open(os.path.join(ctx.out, "gpu_check.md"), "w") as f:
        f.write(check_report.render(meta, dicts))
    if final:
        _final_artifacts(ctx, {r.name: r for r in results})


def _final_artifacts(ctx, by):
    import shutil
    for name, dst in (("bench_adapters.json",) * 2, ("bench_train.json",) * 2,
                      ("junit-tests.xml", "junit_tests.xml"), ("tune.json",) * 2):
        src = os.path.join(ctx.work, name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(ctx.out, dst))
    try:
        from benchmarks import report as ops_report, train_report
        ops, e2e = by.get("bench-ops"), by.get("bench-e2e")
        if ops and ops.data.get("rows"):
            ops_report.plot(ops.data["rows"], os.path.join(ctx.out, "adapters.png"),
                            ops.data["device"])
        if e2e and e2e.data.get("steps"):
            train_report.plot(e2e.data["steps"], os.path.join(ctx.out, "train.png"),
                              e2e.data["device"])
    except Exception as err:
        print(f"gpu_check: plots failed: {type(err).__name__}: {err}", file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for the report (created)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run (default 480 on a GPU, 280 in a dry run)")
    ap.add_argument("--stages", default=None,
                    help="comma-separated, run in the usual order (default: every stage but "
                         "the opt-in tune)")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        return probe(args.probe)
    if not args.out:
        ap.error("--out DIR is required")
    dry = _flag("HEBA_GPU_CHECK_DRY_RUN")
    names = [s.name for s in STAGES]
    chosen = args.stages.split(",") if args.stages else [s.name for s in STAGES if s.default]
    bad = [n for n in chosen if n not in names]
    if bad:
        ap.error(f"--stages: unknown {bad}; expected some of {','.join(names)}")
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="heba-gpu-check-")
    budget = args.budget or float(os.environ.get("HEBA_GPU_CHECK_BUDGET", 280 if dry else 480))
    ctx = Context(os.path.abspath(args.out), work, budget, dry)
    limits, results = _timeouts(dry), []
    todo = [s for s in STAGES if s.name in chosen]
    for k, stage in enumerate(todo):
        print(f"== {stage.name}: {stage.title} ...", flush=True)
        reserve = 0 if dry else sum(s.reserve for s in todo[k + 1:])
        res = run_stage(ctx, stage, limits[stage.name], reserve)
        results.append(res)
        print(f"   {res.status} in {res.seconds:.1f} s  {res.note}", flush=True)
        write_outputs(ctx, results)
    write_outputs(ctx, results, final=True)
    _print_summary(ctx, results)
    return 0 if all(r.status in ("passed", "skipped") for r in results) else 1


def _print_summary(ctx, results):
    from tools.gpu_check import report as check_report
    print(f"\nreport: {os.path.join(ctx.out, 'gpu_check.md')}  (work files: {ctx.work})")
    print(check_report.render({"dry": ctx.dry, "budget": ctx.budget,
                                   "seconds": time.time() - ctx.t0, "started": ctx.started},
                                  [r.__dict__ for r in results]).split("\n## Versions")[0])
    for r in results:             # the failures last: a reader of the tail sees them
        bad = [f"{f['test']}: {f['message'][:160]}" for f in
               r.data.get("junit", {}).get("failures", [])]
        bad += [f"{x['op']} {x['case']} {x['backend']} {x['dtype']}: {x['message'][:160]}"
                for x in r.data.get("rows", []) if x.get("status") in ("FAIL", "error")]
        bad += [f"tune {x['case']} {x['variant']}: {x.get('message', '')[:160]}"
                for x in r.data.get("tune", {}).get("rows", [])
                if x.get("status") in ("FAIL", "error")]
        if bad:
            print(f"\n{r.name}: {len(bad)} failures" + "".join(f"\n  {b}" for b in bad[:15]))
    ops = next((r for r in results if r.name == "bench-ops"), None)
    if ops and ops.data.get("rows"):
        print("\n" + check_report.targets_table(ops.data["rows"]))
    tuned = next((r for r in results if r.name == "tune"), None)
    if tuned and tuned.data.get("tune", {}).get("rows"):
        from tools.gpu_check import tune
        data = tuned.data["tune"]
        print("\n" + "\n".join(tune.fastest_line(case, data.get("fastest", {}).get(case))
                               for case in dict.fromkeys(x["case"] for x in data["rows"])))


if __name__ == "__main__":
    sys.exit(main())
