#!/usr/bin/env bash
# Installs Debian's fuse3 (libfuse, fusermount3) and btrfs-progs (mkfs.btrfs) once, for the tests that mount a
# real file system: a FUSE mount whose file never answers a read, and a loop-mounted btrfs with reflinks.
# Quiet when both are there; without root or apt those tests are skipped, each naming why.
set -uo pipefail
command -v fusermount3 >/dev/null 2>&1 && command -v mkfs.btrfs >/dev/null 2>&1 && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "[setup] fuse3 / btrfs-progs missing and not installable here; their tests will be skipped" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "[setup] installing fuse3 and btrfs-progs for the mount tests"
for attempt in 1 2 3; do
    apt-get update -qq >/dev/null || echo "[setup] apt-get update failed" >&2
    if apt-get install -y -qq -o DPkg::Lock::Timeout=120 --no-install-recommends fuse3 btrfs-progs >/dev/null; then
        exit 0
    fi
    echo "[setup] install attempt $attempt failed; retrying" >&2
    sleep $((attempt * 5))
done
echo "[setup] could not install fuse3 / btrfs-progs; their tests will be skipped" >&2
exit 1
