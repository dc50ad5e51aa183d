#!/usr/bin/env bash
# Set up (once) and run the test suite. Extra arguments go to pytest (e.g. -k sidecar; -n 0 for one process).
# Three worker processes by default (CACHETRAIN_TEST_WORKERS), even on two cores: each test uses one core
# (OMP_NUM_THREADS=1), but with two workers the cores stood idle a quarter of the run while tests waited on
# the processes they start (torchrun, signals, servers, polls); the third fills that time. Each file's tests run in one worker,
# which builds the session's tiny models once for itself; --no-loadscope-reorder keeps the order
# tests/conftest.py gives the files (those with slow tests first), which xdist would otherwise replace by
# the number of tests in each (a one-test file of 50 s then started last and ran alone).
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup_env.sh
./scripts/setup_browser.sh || echo "[setup] continuing without chromium: the browser tests will be skipped" >&2
./scripts/setup_system_tools.sh || true
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -n "${CACHETRAIN_TEST_WORKERS:-3}" --dist loadfile --no-loadscope-reorder "$@"
