#!/usr/bin/env bash
# heba's GPU check: versions, the CUDA build, heba.info, every GPU test, the correctness
# sweep (and under compute-sanitizer), the op and training-step benchmarks, and a report,
# in one run under a global budget (default 480 s; --budget changes it).
#
#   bash scripts/gpu_check.sh --out DIR [--wheels DIR] [--budget SECONDS] [--stages a,b,...]
#
# --out DIR      where gpu_check.md (the report), gpu_check.json, gpu_check.log, junit XML,
#                the benchmarks' JSON and PNG plots go (all at the top of DIR)
# --wheels DIR   install these wheels first, offline (--no-index --no-deps), into a
#                private folder put on PYTHONPATH: for a machine without network that
#                lacks some of heba's dependencies (open_clip_torch, ftfy, wcwidth, ...)
# --stages a,b   only these stages: versions,build,info,tests,sweep,memcheck,racecheck,
#                bench-ops,bench-e2e (the default), and tune (opt-in: the visual launch
#                plan's variants timed against the shipped one and the model)
# $PYTHON        the interpreter (default python3): its torch, Triton and pytest are used
# HEBA_GPU_CHECK_DRY_RUN=1   the same stages on a CPU, tiny shapes (tests of the check)
#
# Exit status 0 when every stage passed or was skipped with its reason, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR=""
WHEELS=""
REST=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT_DIR="${2:-}"; shift 2 ;;
        --wheels) WHEELS="${2:-}"; shift 2 ;;
        --budget|--stages) REST+=("$1" "${2:-}"); shift 2 ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (expected --out DIR [--wheels DIR]" \
                "[--budget S] [--stages a,b])" >&2; exit 2 ;;
    esac
done
if [ -z "$OUT_DIR" ]; then
    echo "gpu_check.sh: --out DIR is required (the folder for the report)" >&2
    exit 2
fi
if [ -n "$WHEELS" ]; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "gpu_check.sh: --wheels $WHEELS holds no .whl files" >&2
        exit 2
    fi
    SITE="$(mktemp -d "${TMPDIR:-/tmp}/heba-gpu-check-site.XXXXXX")"
    echo "== installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE (offline)"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --disable-pip-version-check --target "$SITE" "$WHEELS"/*.whl; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        export HEBA_GPU_CHECK_WHEELS="$(cd "$WHEELS" && ls *.whl | tr '\n' ' ')"
    else
        echo "gpu_check.sh: installing the wheels failed; going on without them" >&2
        export HEBA_GPU_CHECK_WHEELS="install failed (see the output above)"
    fi
fi
exec "$PY" -m tools.gpu_check --out "$OUT_DIR" "${REST[@]}"
