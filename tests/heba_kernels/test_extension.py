"""How the CUDA backend reaches a process after any install (heba_kernels/_extension.py, setup.py).

The decision logic (prebuilt, JIT-cached, JIT-buildable, unavailable and why),
the cache key, the one log line and the one-line errors are tested here with the
compilation mocked, so these tests run anywhere in a few seconds. The real
compilation (about a minute) runs on demand:

    HEBA_TEST_CUDA_BUILD=1 pytest tests/heba_kernels/test_extension.py -m cuda_build

It needs nvcc and a CUDA build of torch, not a GPU: the library loads without one.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import runpy
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from heba import backends
from heba_kernels import _extension

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"


@pytest.fixture
def jit_env(tmp_path, monkeypatch):
    """A machine where the extension is not prebuilt, with a fake toolkit and an empty cache."""
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "nvcc").write_text("#!/bin/sh\nexit 1\n")
    monkeypatch.setenv("CUDA_HOME", str(home))
    monkeypatch.setenv("HEBA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "12.4")
    monkeypatch.setattr(_extension, "_PREBUILT",
                        {"ok": False, "why": "heba_kernels._C was not built at install"})
    monkeypatch.setattr(_extension, "_FAILED", {})
    monkeypatch.setattr(_extension, "loaded", lambda: False)
    real_which = shutil.which
    monkeypatch.setattr(_extension.shutil, "which",
                        lambda name: "/usr/bin/" + name if name in ("ninja", "c++")
                        else real_which(name))
    return tmp_path


# ---------------------------------------------------------------------------
# status(): which route, never compiling
# ---------------------------------------------------------------------------

def test_status_jit_buildable_names_the_cache(jit_env, monkeypatch):
    monkeypatch.setattr(_extension, "_build", lambda *a: pytest.fail("status() compiled"))
    st = _extension.status()
    assert st.state == "jit-buildable", st
    assert "compiles on first use" in st.detail and str(jit_env / "cache") in st.detail


def test_status_jit_cached_once_the_library_exists(jit_env):
    lib = _extension._cached_library_path()
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"not really a library")
    st = _extension.status()
    assert st.state == "jit-cached" and str(lib) in st.detail, st


@pytest.mark.parametrize("case, expected", [
    ("cpu_torch", "is a CPU-only build"),
    ("no_nvcc", "nvcc was not found: CUDA_HOME=/nonexistent has no bin/nvcc"),
    ("no_sources", "the CUDA sources (csrc) are not installed"),
    ("no_ninja", "ninja is not installed (pip install ninja)"),
    ("no_compiler", "no C++ compiler"),
])
def test_status_unavailable_says_why_in_one_line(jit_env, monkeypatch, case, expected):
    if case == "cpu_torch":
        monkeypatch.setattr(torch.version, "cuda", None)
    elif case == "no_nvcc":
        monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    elif case == "no_sources":
        monkeypatch.setattr(_extension, "source_dir", lambda: None)
    elif case == "no_ninja":
        monkeypatch.setattr(_extension.shutil, "which", lambda name: None if name == "ninja"
                            else "/usr/bin/" + name)
        monkeypatch.setitem(sys.modules, "ninja", None)  # import ninja -> ImportError
    elif case == "no_compiler":
        monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    st = _extension.status()
    assert st.state == "unavailable", st
    assert expected in st.detail and "\n" not in st.detail, st.detail
    with pytest.raises(_extension.ExtensionUnavailableError, match=re.escape(expected)):
        _extension.load()


def test_status_prebuilt_wins(monkeypatch):
    monkeypatch.setattr(_extension, "_PREBUILT", {"ok": True, "why": "prebuilt heba_kernels._C"})
    assert _extension.status().state == "prebuilt"


def test_cuda_home_wrapper_script_on_path_is_not_a_toolkit(tmp_path, monkeypatch):
    """A ``nvcc`` wrapper in /usr/local/bin must not make /usr/local the toolkit root."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\n")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(_extension.shutil, "which", lambda name: str(tmp_path / "bin" / name))
    home, how = _extension.find_cuda_home()
    assert home != str(tmp_path), (home, how)
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    assert _extension.find_cuda_home()[0] == str(tmp_path)


# ---------------------------------------------------------------------------
# The cache key and directory
# ---------------------------------------------------------------------------

def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("HEBA_CACHE_DIR", raising=False)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert _extension.cache_root() == tmp_path / "xdg" / "torch_extensions" / "heba"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "te"))
    assert _extension.cache_root() == tmp_path / "te" / "heba"
    monkeypatch.setenv("HEBA_CACHE_DIR", str(tmp_path / "mine"))
    assert _extension.cache_root() == tmp_path / "mine"


def test_build_dir_is_keyed_by_torch_cuda_arch_python_and_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("HEBA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6;9.0+PTX")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    src = tmp_path / "csrc"
    shutil.copytree(CSRC, src)
    name = _extension.build_dir(src).name
    for part in (f"torch{torch.__version__}", "cuda12.4", "sm8.6_9.0PTX",
                 f"py{sys.version_info.major}{sys.version_info.minor}"):
        assert part in name, (part, name)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert _extension.build_dir(src).name != name
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6;9.0+PTX")
    (src / "kernels.h").write_text((src / "kernels.h").read_text() + "\n// changed\n")
    assert _extension.build_dir(src).name != name, "a changed header must give a new build"


# ---------------------------------------------------------------------------
# load(): one log line while it builds, one-line errors, once per process
# ---------------------------------------------------------------------------

def _fake_cpp_extension(monkeypatch, load):
    fake = types.ModuleType("torch.utils.cpp_extension")
    fake.load, fake.CUDA_HOME = load, None
    monkeypatch.setitem(sys.modules, "torch.utils.cpp_extension", fake)
    monkeypatch.setattr(torch.utils, "cpp_extension", fake, raising=False)
    return fake


def test_load_compiles_once_with_one_log_line(jit_env, monkeypatch, capsys):
    calls = []

    def load(**kw):
        calls.append(dict(kw, arch=os.environ["TORCH_CUDA_ARCH_LIST"],
                          cuda_home=os.environ["CUDA_HOME"]))
        Path(kw["build_directory"], "_C.so").write_bytes(b"")

    _fake_cpp_extension(monkeypatch, load)
    sentinel = types.ModuleType("heba_kernels._C")
    monkeypatch.setattr(_extension, "_import_library", lambda path: (sentinel, path)[0])
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert _extension.load() is sentinel
    assert len(calls) == 1
    kw = calls[0]
    assert kw["name"] == "_C" and kw["is_python_module"] is False
    assert Path(kw["build_directory"]) == _extension.build_dir(_extension.source_dir())
    assert Path(kw["build_directory"]).parent == jit_env / "cache"
    assert sorted(Path(s).name for s in kw["sources"]) == sorted(
        p.name for p in CSRC.iterdir() if p.suffix in (".cpp", ".cu"))
    assert kw["arch"] == "9.0" and kw["cuda_home"] == str(jit_env / "cuda")
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("heba: compiling the CUDA backend"), err
    # the next process finds it in the cache: no compilation, no nvcc needed
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    assert _extension.status().state == "jit-cached"
    assert _extension.load() is sentinel and len(calls) == 1


def test_load_compiler_error_is_one_line_with_the_log(jit_env, monkeypatch, capsys):
    calls = []
    output = ("Error building extension '_C': [1/4] /usr/local/cuda/bin/nvcc -c low_rank.cu\n"
              "FAILED: low_rank.cuda.o\n"
              "low_rank.cu(12): error: identifier \"blockDimx\" is undefined\n"
              "1 error detected in the compilation of \"low_rank.cu\".\n"
              "ninja: build stopped: subcommand failed.\n")

    def load(**kw):
        calls.append(kw)
        raise RuntimeError(output)

    _fake_cpp_extension(monkeypatch, load)
    with pytest.raises(_extension.ExtensionUnavailableError) as info:
        _extension.load()
    msg = str(info.value)
    assert "\n" not in msg and 'error: identifier "blockDimx" is undefined' in msg, msg
    log = Path(msg.split("full log: ")[1])
    assert log.is_file() and "1 error detected" in log.read_text()
    with pytest.raises(_extension.ExtensionUnavailableError, match="full log"):
        _extension.load()  # remembered: no second attempt in this process
    assert len(calls) == 1
    assert _extension.status().state == "unavailable"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"  # restored after the build


# ---------------------------------------------------------------------------
# backends: the build starts only when the CUDA backend is requested
# ---------------------------------------------------------------------------

@pytest.fixture
def no_cuda_loaded(monkeypatch):
    """The registry as after a pure-Python install: no cuda (and no triton) ops loaded."""
    monkeypatch.setattr(backends.registry, "fns",
                        {k: v for k, v in backends.registry.fns.items() if k[0] == "reference"})
    monkeypatch.setattr(backends.registry, "cuda_failed", None)


def test_explicit_cuda_on_a_cuda_tensor_compiles_then_dispatches(no_cuda_loaded, monkeypatch):
    calls = []
    monkeypatch.setattr(_extension, "load", lambda: calls.append("load"))
    fake_ops = types.SimpleNamespace(heba_visual="V", heba_text="T", low_rank="L")
    monkeypatch.setattr(backends, "importlib",
                        types.SimpleNamespace(import_module=lambda name: fake_ops))
    cuda = torch.device("cuda")  # a device object only; nothing runs on it
    assert backends.resolve("heba_text", "cuda", cuda) == ("cuda", "T")
    assert backends.resolve("low_rank", "cuda", cuda) == ("cuda", "L")
    assert calls == ["load"], "the extension is loaded once, for all three ops"


def test_explicit_cuda_failure_is_one_line(no_cuda_loaded, monkeypatch):
    def load():
        raise _extension.ExtensionUnavailableError("the CUDA extension cannot be compiled: "
                                                   "nvcc was not found: CUDA_HOME=/x has no bin/nvcc")
    monkeypatch.setattr(_extension, "load", load)
    with pytest.raises(backends.BackendUnavailableError) as info:
        backends.resolve("heba_visual", "cuda", torch.device("cuda"))
    assert str(info.value).startswith("backend='cuda' cannot run heba_visual: ")
    assert "nvcc was not found" in str(info.value) and "\n" not in str(info.value)


def test_auto_tries_cuda_once_then_falls_back_with_one_warning(no_cuda_loaded, monkeypatch):
    calls = []

    def load():
        calls.append(1)
        raise _extension.ExtensionUnavailableError("compiling the CUDA extension failed (x)")
    monkeypatch.setattr(_extension, "load", load)
    with pytest.warns(RuntimeWarning, match="uses the reference"):
        name, _ = backends.resolve("heba_visual", "auto", torch.device("cuda"))
    assert name == "reference"
    assert backends.resolve("heba_text", "auto", torch.device("cuda"))[0] == "reference"
    assert len(calls) == 1


def test_no_build_for_cpu_tensors_or_when_triton_wins(monkeypatch):
    monkeypatch.setattr(backends.registry, "cuda_failed", None)
    monkeypatch.setattr(_extension, "load", lambda: pytest.fail("compiled without a request"))
    loaded = {k: v for k, v in backends.registry.fns.items() if k[0] != "cuda"}
    loaded[("triton", "heba_visual")] = "triton-visual"
    monkeypatch.setattr(backends.registry, "fns", loaded)
    assert backends.resolve("heba_visual", "auto", torch.device("cpu"))[0] == "reference"
    assert backends.resolve("heba_visual", "auto", torch.device("cuda")) == \
        ("triton", "triton-visual")
    with pytest.raises(backends.BackendUnavailableError, match="cpu tensor"):
        backends.resolve("heba_visual", "cuda", torch.device("cpu"))


def test_import_and_info_never_compile():
    """In a fresh process without a prebuilt extension: import, CPU calls and heba.info."""
    code = textwrap.dedent("""
        from heba_kernels import _extension
        _extension._PREBUILT.update(ok=False, why="heba_kernels._C was not built at install")
        def boom(*a):
            raise SystemExit("compiled at import")
        _extension._build = boom
        import torch, heba, heba.nn, heba.info
        x = torch.randn(2, 5, 8)
        heba.nn.LowRankAdapter(8, rank=2)(x)
        try:
            heba.nn.LowRankAdapter(8, rank=2, backend="cuda")(x)
        except heba.BackendUnavailableError as err:
            print("ERR", err)
        print(heba.info.report())
        print("STATE", _extension.status().state)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ERR backend='cuda'" in proc.stdout and "cpu tensor" in proc.stdout
    state = re.search(r"STATE (\S+)", proc.stdout).group(1)
    words = {"jit-buildable": "JIT-buildable", "jit-cached": "JIT-cached",
             "unavailable": "unavailable"}
    assert state in words and f"heba_kernels._C {words[state]}" in proc.stdout, proc.stdout


# ---------------------------------------------------------------------------
# setup.py: build at install when it can, fall back in one line when it cannot
# ---------------------------------------------------------------------------

def _run_setup(monkeypatch, capsys, **env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    seen = {}
    monkeypatch.setattr("setuptools.setup", lambda **kw: seen.update(kw))
    monkeypatch.setattr(sys, "argv", ["setup.py", "bdist_wheel"])
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return seen, capsys.readouterr().err


def test_setup_without_nvcc_installs_pure_python_saying_why(monkeypatch, capsys):
    seen, err = _run_setup(monkeypatch, capsys, CUDA_HOME="/nonexistent", HEBA_BUILD_CUDA="auto")
    assert seen["ext_modules"] == [] and "build_py" in seen["cmdclass"]
    lines = [ln for ln in err.splitlines() if ln.startswith("heba setup:")]
    assert len(lines) == 1 and "CUDA_HOME=/nonexistent has no bin/nvcc" in lines[0], err


def test_setup_force_without_nvcc_fails_loudly(monkeypatch, capsys):
    with pytest.raises(SystemExit, match="HEBA_BUILD_CUDA=force but the CUDA backend cannot"):
        _run_setup(monkeypatch, capsys, CUDA_HOME="/nonexistent", HEBA_BUILD_CUDA="force")
    with pytest.raises(SystemExit, match="HEBA_BUILD_CUDA must be"):
        _run_setup(monkeypatch, capsys, HEBA_BUILD_CUDA="maybe")


def test_setup_with_a_toolkit_builds_an_optional_extension(monkeypatch, capsys, tmp_path):
    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)  # setup.py sets it
    if torch.version.cuda is None:
        monkeypatch.setattr(torch.version, "cuda", "12.4")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\n")
    seen, err = _run_setup(monkeypatch, capsys, CUDA_HOME=str(tmp_path), HEBA_BUILD_CUDA="auto",
                           TORCH_CUDA_ARCH_LIST="9.0")
    (ext,) = seen["ext_modules"]
    assert ext.name == "heba_kernels._C" and ext.optional  # a failed compile falls back
    assert sorted(Path(s).name for s in ext.sources) == sorted(
        p.name for p in CSRC.iterdir() if p.suffix in (".cpp", ".cu"))
    assert "building the CUDA backend" in err


def test_wheel_ships_the_cuda_sources(monkeypatch, capsys, tmp_path):
    seen, _ = _run_setup(monkeypatch, capsys, HEBA_BUILD_CUDA="skip")
    from setuptools import Distribution
    from setuptools.command.build_py import build_py
    monkeypatch.setattr(build_py, "run", lambda self: None)
    cmd = seen["cmdclass"]["build_py"](Distribution({"name": "heba"}))
    cmd.initialize_options()
    cmd.build_lib = str(tmp_path)
    cmd.run()
    shipped = sorted(p.name for p in (tmp_path / "heba_kernels" / "csrc").iterdir())
    expected = sorted(p.name for p in CSRC.iterdir()
                      if p.suffix in (".cpp", ".cu", ".h", ".cuh", ".md"))
    assert shipped == expected
    assert "recursive-include csrc" in (ROOT / "MANIFEST.in").read_text()  # and in the sdist


# ---------------------------------------------------------------------------
# Dependencies: what heba imports is declared; heba-train's are core
# ---------------------------------------------------------------------------

def _imported(nodes) -> set[str]:
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _third_party_imports(*packages: str) -> set[str]:
    """Top-level third-party modules imported by ``packages``, except inside ``try:`` (optional)."""
    names = set()
    for pkg in packages:
        for path in (ROOT / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text())
            optional = _imported(n for t in ast.walk(tree) if isinstance(t, ast.Try)
                                 for stmt in t.body for n in ast.walk(stmt))
            names |= _imported(ast.walk(tree)) - optional
    return {n for n in names if n not in sys.stdlib_module_names
            and n not in ("heba", "heba_kernels", "__future__")}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared():
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    parse = lambda reqs: {_norm(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in reqs}
    extras = set().union(*(parse(v) for v in project["optional-dependencies"].values()))
    return parse(project["dependencies"]), extras


def test_every_import_is_a_declared_dependency():
    core, extras = _declared()
    dists = importlib.metadata.packages_distributions()
    missing = []
    for name in sorted(_third_party_imports("heba", "heba_kernels")):
        declared = {_norm(d) for d in dists.get(name, [name])}
        if not declared & (core | extras):
            missing.append(f"{name} (distribution {sorted(declared)})")
    assert not missing, f"imported by heba but declared nowhere in pyproject.toml: {missing}"


def test_heba_train_dependencies_are_core():
    core, _ = _declared()
    for dist in ("torch", "open-clip-torch", "tqdm", "safetensors", "pillow", "ninja"):
        assert dist in core, f"{dist} must be a core dependency (heba-train / the CUDA JIT)"


# ---------------------------------------------------------------------------
# The real compilation, on demand
# ---------------------------------------------------------------------------

@pytest.mark.cuda_build
@pytest.mark.skipif(os.environ.get("HEBA_TEST_CUDA_BUILD") != "1",
                    reason="compiles the CUDA extension for real (about a minute); "
                           "run with HEBA_TEST_CUDA_BUILD=1 pytest tests/heba_kernels/test_extension.py -m cuda_build")
def test_real_jit_build_then_cached_load(tmp_path):
    code = textwrap.dedent("""
        import sys, torch
        from heba_kernels import _extension
        _extension._PREBUILT.update(ok=False, why="heba_kernels._C was not built at install")
        print("BEFORE", _extension.status().state)
        mod = _extension.load()
        import heba_kernels._C, heba_kernels.cuda_ops
        names = ["cuda_visual_fwd", "cuda_visual_bwd", "cuda_text_fwd", "cuda_text_bwd",
                 "cuda_low_rank_fwd", "cuda_low_rank_bwd"]
        print("OPS", all(hasattr(torch.ops.heba, n) for n in names), mod.__file__)
        print("AFTER", _extension.status().state)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HEBA_CACHE_DIR=str(tmp_path),
               TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"),
               MAX_JOBS=os.environ.get("MAX_JOBS", "2"), OMP_NUM_THREADS="1")
    env.pop("CUDA_HOME", None)
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                           timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "BEFORE jit-buildable" in first.stdout and "OPS True" in first.stdout, first.stdout
    assert "heba: compiling the CUDA backend" in first.stderr
    # A second process loads the cached library, even without nvcc.
    env["CUDA_HOME"] = "/nonexistent"
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "BEFORE jit-cached" in second.stdout and "OPS True" in second.stdout, second.stdout
    assert "compiling" not in second.stderr


# ---------------------------------------------------------------------------
# The semantics page is in the project, and every pointer to it resolves
# ---------------------------------------------------------------------------

def test_semantics_page_and_pointers_to_it():
    page = (ROOT / "docs" / "semantics.md").read_text()
    sections = set(re.findall(r"^## (\d+)\.", page, re.MULTILINE))
    assert sections == {"1", "2", "3", "4", "5"}, sections
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        tracked = None
    if tracked is None or tracked.returncode != 0:
        pytest.skip("not a git checkout: cannot list the project's files")
    old_name = "SPEC" + ".md"  # the contract's old home, outside the project
    for rel in tracked.stdout.split():
        path = ROOT / rel
        if path.suffix not in (".py", ".md", ".sh", ".toml", ".txt") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        assert old_name not in text, f"{rel} points to {old_name}; use docs/semantics.md"
        for num in re.findall(r"docs/semantics\.md,? (?:section )?(\d+)", text):
            assert num in sections, f"{rel} points to docs/semantics.md section {num}"
