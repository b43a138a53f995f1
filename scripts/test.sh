#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine, then runs them.
#
#   bash scripts/test.sh            # all tests, on every core (extra args go to pytest)
#
# scripts/setup.sh makes .venv with the pinned requirements-dev.txt and installs
# heba into it; then pytest runs tests/. Without a GPU, set TRITON_INTERPRET=1
# so that the Triton kernels run in Triton's CPU interpreter (.ci/run does).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
VENV="${HEBA_VENV:-.venv}"
"$VENV/bin/python" -m heba.info
echo "== pytest"
# pytest-xdist (requirements-dev.txt) spreads the tests over the machine's cores; -n 0
# (or HEBA_TEST_WORKERS=0) runs them in this one process.
exec "$VENV/bin/python" -m pytest tests -n "${HEBA_TEST_WORKERS:-auto}" "$@"
