"""The output folder's lock: one run at a time in a folder.

An advisory ``fcntl.flock`` on ``output_dir/.run.lock``, taken once by the main process before the
run picks a checkpoint or writes anything. The OS releases it when the process ends, however it ends,
so a killed run never leaves a stale lock; the file itself stays and names the last holder. A second
run (a requeued job while the first still runs, two fresh starts at once) is refused at once.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

LOCK_FILE = ".run.lock"


class RunLockedError(RuntimeError):
    """Another live process holds the output folder."""


class RunLock:
    """Held from ``take`` until ``release`` (or the end of the process)."""

    def __init__(self, descriptor: int | None):
        self._descriptor = descriptor

    @classmethod
    def take(cls, output_dir: Path) -> RunLock:
        try:
            import fcntl
        except ImportError:  # no flock on this system: nothing to hold
            return cls(None)
        path = Path(output_dir) / LOCK_FILE
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(descriptor, 256, 0).decode("utf-8", "replace").split()
            os.close(descriptor)
            pid, host = (holder + ["?", "?"])[:2]
            raise RunLockedError(f"--output_dir {output_dir} is in use by another run (pid {pid} on host {host}, "
                                 f"holding {LOCK_FILE}); wait for it to end, stop it, or choose another "
                                 "--output_dir") from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        return cls(descriptor)

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing the only descriptor drops the flock
            self._descriptor = None


def is_main_launch_process() -> bool:
    """Whether this is the main process of its launch (torchrun / accelerate set RANK), known before
    the accelerator exists."""
    return int(os.environ.get("RANK", "0")) == 0
