#!/usr/bin/env bash
# Download the wheels that a GPU machine without network access needs, beyond a CUDA PyTorch image
# with transformers, accelerate and friends, to run cachetrain's GPU benchmarks:
#   diffusers and peft (the versions in this .venv; peft for the LoRA configurations, the image's own may
#   be older), lion-pytorch, bitsandbytes (8-bit AdamW). Their other needs
#   (requests, filelock, regex, huggingface-hub >= 1.32, safetensors >= 0.8, Pillow, packaging) are
#   expected there; importlib-metadata is not needed on Python >= 3.8 and its current release would not
#   import without a further package, so it is left out.
# Usage: scripts/offline_wheels.sh [DIR] [PYTHON_VERSION]   (defaults: .whl and 3.12; x86-64 Linux)
# Then on that machine: bench/run_gpu_benchmarks.sh installs them from DIR before it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.whl}"
PYVER="${2:-3.12}"
DIFFUSERS_VERSION="$(.venv/bin/python -c 'import diffusers; print(diffusers.__version__)' 2>/dev/null || echo 0.42.1)"
PEFT_VERSION="$(.venv/bin/python -c 'import peft; print(peft.__version__)' 2>/dev/null || echo 0.18.1)"
mkdir -p "$DIR"
python3 -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any \
    -d "$DIR" "diffusers==$DIFFUSERS_VERSION" "peft==$PEFT_VERSION" lion-pytorch bitsandbytes \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
ls -1 "$DIR"
