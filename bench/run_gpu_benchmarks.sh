#!/usr/bin/env bash
# Run both GPU benchmarks as one command that ends within about 8 minutes, keeping their output.
# Usage: bench/run_gpu_benchmarks.sh [OUT_DIR]   (default: bench-results/)
#   WHEELS=.whl   wheels to install first (from scripts/offline_wheels.sh), for a machine without network
#   PYTHON=python3   the interpreter whose torch sees the GPU
#   TRAIN_ARGS / ENCODE_ARGS   more flags for bench/gpu_train.py / bench/gpu_encode.py (e.g. --tiny)
#   TRAIN_SECONDS=320 / ENCODE_SECONDS=140   each part's time limit in seconds (lower where the GPU is lent for less)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-bench-results}"
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"
mkdir -p "$OUT_DIR"
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/cachetrain-site "$WHEELS"/*.whl && export PYTHONPATH="/tmp/cachetrain-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT_DIR/gpu.txt"
# the versions the figures were taken with; a package that does not import shows here, not minutes later
"$PYTHON" -c 'import importlib.metadata as m, sys
print("python", sys.version.split()[0])
for name in ("torch", "diffusers", "transformers", "huggingface-hub", "accelerate", "peft", "bitsandbytes", "lion-pytorch"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "MISSING")
import diffusers, cachetrain.train.step' 2>&1 | tee "$OUT_DIR/versions.txt"
# training first: it is the goal; each part has its own limit so one slow part cannot eat the other's time
# shellcheck disable=SC2086
timeout "${TRAIN_SECONDS:-320}" "$PYTHON" bench/gpu_train.py --json "$OUT_DIR/gpu_train.jsonl" ${TRAIN_ARGS:-} 2>&1 | tee "$OUT_DIR/gpu_train.log"
# shellcheck disable=SC2086
timeout "${ENCODE_SECONDS:-140}" "$PYTHON" bench/gpu_encode.py ${ENCODE_ARGS:-} 2>&1 | tee "$OUT_DIR/gpu_encode.log"
echo "results in $OUT_DIR/"
