#!/usr/bin/env bash
# Runs the main job on a fresh machine: sets up .venv (scripts/setup.sh), then
# `heba-train` with the given arguments. With none, the built-in demo: a tiny
# CLIP on a generated data set, about a minute on 2 CPU cores.
#
#   bash scripts/train.sh                                   # the built-in default
#   bash scripts/train.sh --dataset eurosat --root /data --seeds 1 2 3   # HeBA base-to-novel
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh >/dev/null
VENV="${HEBA_VENV:-.venv}"
exec "$VENV/bin/heba-train" "$@"
