"""Real small, full and read-only disks for fault tests: a tmpfs mounted for the test.

Mounting needs root (and a kernel that lets this process mount); where it cannot, the test is skipped.
As root, file modes stop nothing, so a read-only folder is a read-only mount: the kernel refuses the write.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest


def can_mount(folder: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = folder / f"probe-{uuid.uuid4().hex[:6]}"
    probe.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True)
    if mounted.returncode == 0:
        subprocess.run(["umount", str(probe)], check=True)
    probe.rmdir()
    return mounted.returncode == 0


@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    if not can_mount(folder.parent):
        pytest.skip("needs root and a kernel that allows mounting a tmpfs")
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(disk: Path, leave_pages: int) -> None:
    """Fill a tmpfs to its last page, then free ``leave_pages`` pages."""
    filler = disk / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)
    with contextlib.suppress(OSError):
        while True:
            os.write(descriptor, b"\0" * 4096)
    os.close(descriptor)
    os.truncate(filler, filler.stat().st_size - leave_pages * 4096)


def make_read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    with pytest.raises(OSError):  # the kernel, not file modes, refuses the write (chmod does not stop root)
        (folder / "probe").write_text("x")


@contextlib.contextmanager
def read_only_folder(folder: Path):
    """An empty folder nobody may write into: a read-only tmpfs as root, a folder without write
    permission otherwise."""
    if os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    with tmpfs(folder, "64k"):
        make_read_only(folder)
        yield folder
