#!/usr/bin/env bash
# GPU figures at CogVideoX-2B scale (see bench/gpu_check.py), then 2B sampling (49x480x720, bf16, 10 DDIM steps with
# CFG) by vdm and diffusers side by side, uncached and under each step cache (bench/sample_speed.py --cache);
# prints a message and exits 0 without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" bench/gpu_check.py "$@"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    "$PY" bench/sample_speed.py --config 2b --dtype bf16 --steps 10 --repeats 1 \
        --cache none first_block:0.1 pab:2 teacache:0.1
fi
