#!/usr/bin/env bash
# Creates .venv (once), installs cachetrain's requirements into it, then cachetrain itself (editable:
# the console commands train_from_cached, create_img_sdvae, ... run this checkout's code).
# Where no NVIDIA GPU is visible, torch is pinned to the CPU build first, so that the
# open-ended requirement below does not pull a multi-GB CUDA build onto a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CACHETRAIN_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.cachetrain-installed"
WANT="$(cat requirements.txt requirements-test.txt pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
fi
pip_install() {
    # this machine's pip config names local mirrors that may be absent; their warnings are noise
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-warn-script-location "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] no NVIDIA GPU found: installing the CPU build of torch"
    pip_install "torch==2.13.0" || pip_install --index-url https://download.pytorch.org/whl/cpu torch
fi
echo "[setup] installing requirements"
pip_install -r requirements.txt -r requirements-test.txt
# bitsandbytes (--optimizer adamw8, tested) goes to a folder of its own, not site-packages: where it is
# importable, diffusers and peft import it in every process, and it imports torch's compiler (2 s of each
# script start here). The tests that use it put this folder on their path (tests/conftest.py).
# One installed into site-packages (by an older set-up, or by a user for adamw8) is kept, with a word.
if "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('bitsandbytes') is None)"; then
    echo "[setup] note: bitsandbytes is in $VENV's site-packages: kept; every process that imports diffusers" \
         "imports it (~2 s a start); '$VENV/bin/pip uninstall bitsandbytes' if you do not use --optimizer adamw8"
fi
pip_install --no-deps --upgrade --target "$VENV/optional-packages" "bitsandbytes>=0.50"
echo "[setup] installing cachetrain (editable) and its commands"
pip_install --no-deps -e .
echo "$WANT" > "$STAMP"
