#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine, then runs them.
#
#   bash scripts/test.sh            # all tests (extra args go to pytest)
#
# It creates a virtual environment in .venv (HEBA_VENV overrides the path) with
# the pinned requirements-dev.txt, installs heba into it in editable mode
# (building the CUDA extension when nvcc and a CUDA build of torch are there),
# and runs pytest on tests/. Without a GPU, set TRITON_INTERPRET=1 so that the
# Triton kernels run in Triton's CPU interpreter (.ci/run does).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${HEBA_VENV:-.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PY" -m venv "$VENV"
fi
echo "== installing the pinned test environment (requirements-dev.txt)"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-dev.txt
echo "== installing heba (editable)"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
"$VENV/bin/python" -m heba.info
echo "== pytest"
exec "$VENV/bin/python" -m pytest tests "$@"
