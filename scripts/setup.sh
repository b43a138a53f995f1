#!/usr/bin/env bash
# Creates (or refreshes) the pinned virtual environment and installs heba into it.
# Sourced by scripts/test.sh and scripts/train.sh; safe to run again.
#
# .venv (HEBA_VENV overrides) gets requirements-dev.txt (torch 2.14.1,
# torchvision 0.29.1, open_clip 3.3.0, pytest, ...) and heba in editable mode,
# building the CUDA extension when nvcc and a CUDA build of torch are there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${HEBA_VENV:-.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi
echo "== installing the pinned environment (requirements-dev.txt)" >&2
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-dev.txt
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
fi
echo "== installing heba (editable)" >&2
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
