"""A real file system whose chosen files never answer a read: the stand-in for a hung network or FUSE mount.

Run as a process of its own (``python -m tests.stalling_fs SOURCE MOUNTPOINT NAME...``): it mounts SOURCE
at MOUNTPOINT through FUSE (mfusepy over libfuse), and a read() of any file whose name is among
NAME never returns. Everything else (listing, stat, other files' reads) answers at once, as on a mount where
one file's server is stuck. Each read that stalls is logged, one line, to ``stalled_reads_log(MOUNTPOINT)``
(a test waits for it to know the reader is stuck). ``stalling_mount`` (a context manager) starts the server,
waits for the mount, and always takes it down: the process killed (every pending read then fails) and the
mount detached lazily.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def fuse_unavailable_reason() -> str | None:
    """Why a FUSE file system cannot be mounted here, or None when it can (root, /dev/fuse, libfuse, mfusepy)."""
    if not sys.platform.startswith("linux"):
        return "FUSE mounts are tested on Linux only"
    if os.geteuid() != 0:
        return "mounting a FUSE file system in the test needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    try:
        import mfusepy  # noqa: F401  (loads libfuse; fails without it)
    except (ImportError, OSError, EnvironmentError) as error:
        return f"no FUSE binding or libfuse here ({error}); install fuse3 and mfusepy"
    return None


def stalled_reads_log(mountpoint: Path) -> Path:
    """Where the server notes each read it leaves unanswered (beside the mount point)."""
    return Path(mountpoint).with_name(Path(mountpoint).name + ".stalled-reads")


def _unmount(mountpoint: Path) -> None:
    """Detach lazily, whatever tool is there; never blocks on a busy mount."""
    for command in (["fusermount3", "-uz"], ["fusermount", "-uz"], ["umount", "-l"]):
        if shutil.which(command[0]):
            done = subprocess.run([*command, str(mountpoint)], capture_output=True, timeout=30)
            if done.returncode == 0:
                return


@contextlib.contextmanager
def stalling_mount(source: Path, mountpoint: Path, stalled_names: list[str], ready_timeout: float = 30.0):
    """SOURCE mounted at MOUNTPOINT, reads of ``stalled_names`` never answered, for the ``with`` block."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([sys.executable, "-m", "tests.stalling_fs", str(source), str(mountpoint),
                               *stalled_names], cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + ready_timeout
        while not os.path.ismount(mountpoint):
            if server.poll() is not None:
                raise RuntimeError(f"the FUSE server ended before mounting: {server.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mountpoint} was not mounted within {ready_timeout} s")
            time.sleep(0.05)
        yield mountpoint
    finally:
        server.kill()  # pending reads of the stalled files fail at once (the connection is gone)
        server.wait(timeout=30)
        _unmount(mountpoint)


def _serve(source: str, mountpoint: str, stalled_names: set[str]) -> None:
    import mfusepy

    never = threading.Event()

    def passed_on(function, *args):
        try:
            return function(*args)
        except OSError as error:
            raise mfusepy.FuseOSError(error.errno) from None

    class StallingMirror(mfusepy.Operations):
        """SOURCE as it is (reads, writes, renames: what a cache build does), but a read of a stalled name
        never answers."""

        use_ns = True  # modification times to the nanosecond, as the cache's freshness rule stores them

        def _real(self, path: str) -> str:
            return os.path.join(source, path.lstrip("/"))

        def getattr(self, path, fh=None):
            st = passed_on(os.lstat, self._real(path))
            return {"st_mode": st.st_mode, "st_nlink": st.st_nlink, "st_size": st.st_size, "st_uid": st.st_uid,
                    "st_gid": st.st_gid, "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns,
                    "st_ctime": st.st_ctime_ns}

        def readdir(self, path, fh):
            return [".", "..", *passed_on(os.listdir, self._real(path))]

        def readlink(self, path):
            return passed_on(os.readlink, self._real(path))

        def open(self, path, flags):
            return passed_on(os.open, self._real(path), flags & ~(os.O_CREAT | os.O_EXCL))

        def create(self, path, mode, fi=None):
            return passed_on(os.open, self._real(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

        def read(self, path, size, offset, fh):
            if os.path.basename(path) in stalled_names:
                with open(stalled_reads_log(Path(mountpoint)), "a") as log:
                    log.write(path + "\n")
                never.wait()  # the read that never returns
            return passed_on(os.pread, fh, size, offset)

        def write(self, path, data, offset, fh):
            return passed_on(os.pwrite, fh, data, offset)

        def truncate(self, path, length, fh=None):
            passed_on(os.truncate, self._real(path), length)

        def flush(self, path, fh):
            return 0

        def fsync(self, path, datasync, fh):
            passed_on(os.fsync, fh)

        def release(self, path, fh):
            passed_on(os.close, fh)

        def rename(self, old, new):
            passed_on(os.replace, self._real(old), self._real(new))

        def unlink(self, path):
            passed_on(os.unlink, self._real(path))

        def mkdir(self, path, mode):
            passed_on(os.mkdir, self._real(path), mode)

        def rmdir(self, path):
            passed_on(os.rmdir, self._real(path))

        def chmod(self, path, mode):
            passed_on(os.chmod, self._real(path), mode)

        def chown(self, path, uid, gid):
            passed_on(os.chown, self._real(path), uid, gid)

        def utimens(self, path, times=None):
            if times is None:
                passed_on(os.utime, self._real(path))
            else:
                passed_on(lambda: os.utime(self._real(path), ns=(int(times[0]), int(times[1]))))

        def statfs(self, path):
            st = passed_on(os.statvfs, self._real(path))
            return {key: getattr(st, key) for key in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                                                      "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

    mfusepy.FUSE(StallingMirror(), mountpoint, foreground=True, nothreads=False)


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2], set(sys.argv[3:]))
