#!/usr/bin/env bash
# GPU figures at CogVideoX-2B scale (see bench/gpu_check.py); prints a message and exits 0 without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec "$PY" bench/gpu_check.py "$@"
