#!/usr/bin/env bash
# Installs Debian's chromium (once), for the tests that load pages in a real headless browser.
# Quiet when it is already there. Retries apt, because a mirror hiccup must not turn the browser
# tests into skips on CI; exits non-zero only when installation is truly impossible.
set -uo pipefail
BROWSER=/usr/bin/chromium
[ -x "$BROWSER" ] && exit 0

if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
    echo "[setup] $BROWSER is missing and installing it needs root; browser tests will be skipped" >&2
    exit 1
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
export DEBIAN_FRONTEND=noninteractive
echo "[setup] installing chromium for the browser tests"
for attempt in 1 2 3; do
    # a failed update may still leave usable package lists from before: try the install regardless
    $SUDO apt-get update -qq >/dev/null || echo "[setup] apt-get update failed" >&2
    if $SUDO apt-get install -y -qq -o DPkg::Lock::Timeout=120 --no-install-recommends chromium fonts-dejavu-core >/dev/null \
        && [ -x "$BROWSER" ]; then
        exit 0
    fi
    echo "[setup] chromium install attempt $attempt failed; retrying" >&2
    sleep $((attempt * 5))
done
echo "[setup] could not install chromium; browser tests will be skipped" >&2
exit 1
