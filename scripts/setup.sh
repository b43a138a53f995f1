#!/usr/bin/env bash
# Creates (or refreshes) the pinned virtual environment and installs heba into it.
# Sourced by scripts/test.sh and scripts/train.sh; safe to run again.
#
# .venv (HEBA_VENV overrides) gets requirements-dev.txt (torch 2.14.1,
# torchvision 0.29.1, open_clip 3.3.0, pytest, ...) and heba in editable mode,
# building the CUDA extension when nvcc and a CUDA build of torch are there.
# The set-up is paid once: a stamp in the venv records a hash of what it depends on
# (requirements-dev.txt, setup.py, pyproject.toml, csrc/, the installed torch, the
# CUDA toolkit and the build switches); while that hash is unchanged, the pip
# installs and the CUDA build are skipped. HEBA_SETUP_FORCE=1 redoes them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${HEBA_VENV:-.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.heba-setup-stamp"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
fi

# One hash of everything the installs and the CUDA build depend on.
setup_hash() {
    "$VENV/bin/python" - <<'PY'
import glob, hashlib, importlib.metadata as md, os, shutil, subprocess, sys
h = hashlib.sha256()
for path in ["requirements-dev.txt", "setup.py", "pyproject.toml"] + sorted(
        p for p in glob.glob("csrc/**/*", recursive=True) if os.path.isfile(p)):
    h.update(path.encode())
    with open(path, "rb") as f:
        h.update(f.read())
try:
    torch = md.version("torch")
except md.PackageNotFoundError:
    torch = "none"
home = os.environ.get("CUDA_HOME", "")
nvcc = os.path.join(home, "bin", "nvcc") if home else (shutil.which("nvcc") or "")
try:
    nvcc_version = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                                  timeout=30).stdout if nvcc else ""
except OSError:
    nvcc_version = ""
for part in (os.getcwd(), sys.version, torch, home, nvcc_version,
             os.environ.get("HEBA_BUILD_CUDA", ""), os.environ.get("TORCH_CUDA_ARCH_LIST", "")):
    h.update(part.encode() + b"\0")
print(h.hexdigest())
PY
}

if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi
if [ "${HEBA_SETUP_FORCE:-0}" = "0" ] && [ -f "$STAMP" ] \
        && [ "$(cat "$STAMP")" = "$(setup_hash)" ]; then
    echo "== reusing $VENV: nothing changed (requirements, setup, csrc/, torch, CUDA)" >&2
else
    rm -f "$STAMP"
    echo "== installing the pinned environment (requirements-dev.txt)" >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-dev.txt
    echo "== installing heba (editable)" >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation \
        --no-deps -e .
    setup_hash > "$STAMP"
fi
