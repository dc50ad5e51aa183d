"""Reads with a time bound: a file whose read never returns (a hung network or FUSE mount) is named and passed
over instead of holding the process forever.

Python cannot cancel a blocked read, so the read runs on a daemon worker thread and the caller waits for it at
most ``timeout`` seconds. A read that does not finish in time raises ReadTimedOut (an OSError naming the file);
its worker is abandoned where it is stuck (a daemon thread never holds up the end of the process) and the next
read starts a fresh one. Finished workers are kept for the next read, so a read costs one hand-over between
threads, not a thread start. A file that did not answer is not waited for again by this process (nor by the
processes it forks later): each wait leaves a thread stuck, and on Linux a second open of a file whose read
hangs can block where no signal reaches it (the kernel waits on the page the first read holds), so that
process could not even end.

The bound is the process's (``set_read_timeout``, from the scripts' ``--read_timeout``); forked processes
(the DataLoader's workers) inherit it. What runs on the worker must block only in calls that release the GIL:
plain file reads do; a page fault on a memory-mapped file inside a C extension may not, so the readers here
read bytes and parse them afterwards instead of mapping the file.
"""

from __future__ import annotations

import errno
import os
import queue
import stat
import threading
from collections.abc import Callable
from typing import TypeVar

DEFAULT_READ_TIMEOUT = 120.0  # seconds; a healthy read of a sidecar or an image takes milliseconds

_read_timeout = DEFAULT_READ_TIMEOUT
T = TypeVar("T")


class ReadTimedOut(OSError):
    """A read that did not finish within the bound; ``filename`` names the file."""

    def __init__(self, path: os.PathLike | str, timeout: float):
        super().__init__(errno.ETIMEDOUT, f"did not answer within {timeout:g} s", os.fspath(path))
        self.timeout = timeout

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


class ReadAbandoned(ReadTimedOut):
    """A read no longer waited for: the process is stopping (abandon_waits)."""

    def __init__(self, path: os.PathLike | str):
        super().__init__(path, 0)
        self.strerror = "not waited for: stopping"


def set_read_timeout(seconds: float) -> None:
    """The bound on every read of this process from now on (0: none, reads run in the caller's thread)."""
    global _read_timeout
    if not seconds >= 0:
        raise ValueError(f"a read timeout must be 0 or more seconds, not {seconds}")
    _read_timeout = float(seconds)


def read_timeout() -> float:
    return _read_timeout


class _Worker:
    """One daemon thread that runs the jobs handed to it, one at a time."""

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self.abandoned = False  # its caller was told to stop waiting: never handed another job
        threading.Thread(target=self._run, name="cachetrain-bounded-read", daemon=True).start()

    def _run(self) -> None:
        _local.on_worker = True
        while True:
            function, args = self.jobs.get()
            try:
                self.results.put((True, function(*args)))
            except BaseException as error:  # handed back to the caller, raised there
                self.results.put((False, error))


_local = threading.local()
_unanswered: dict[str, float] = {}  # path -> the bound it did not answer within
_idle: list[_Worker] = []
_busy: set[_Worker] = set()  # workers a caller waits for now
_idle_lock = threading.RLock()  # re-entrant: abandon_waits may run in a signal handler
_ABANDONED = (False, None)  # handed to a waiting caller in place of a result by abandon_waits


def _forget_workers_after_fork() -> None:
    """A forked child has none of its parent's threads: start its own when it first reads."""
    global _idle, _busy, _idle_lock
    _idle, _busy, _idle_lock = [], set(), threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers_after_fork)


def call_bounded(path: os.PathLike | str, function: Callable[..., T], *args, timeout: float | None = None) -> T:
    """``function(*args)`` (a read of ``path``), given at most ``timeout`` seconds (the process's bound when None;
    0: no bound). Raises ReadTimedOut naming ``path`` when it does not finish in time; whatever ``function``
    raises is raised here. Called from a bounded read itself, it runs directly (already under a bound). A path
    that did not answer before raises ReadTimedOut at once."""
    timeout = _read_timeout if timeout is None else timeout
    if not timeout or getattr(_local, "on_worker", False):
        return function(*args)
    key = os.fspath(path)
    if key in _unanswered:
        raise ReadTimedOut(path, _unanswered[key])
    with _idle_lock:
        worker = _idle.pop() if _idle else _Worker()
        _busy.add(worker)
    worker.jobs.put((function, args))
    try:
        result = worker.results.get(timeout=timeout)
    except queue.Empty:
        _unanswered[key] = timeout
        raise ReadTimedOut(path, timeout) from None  # the worker stays stuck in that read, abandoned
    finally:
        with _idle_lock:
            _busy.discard(worker)
    if result is _ABANDONED:
        raise ReadAbandoned(path)
    with _idle_lock:
        if not worker.abandoned:  # else an _ABANDONED may still be on its way to it
            _idle.append(worker)
    finished, value = result
    if finished:
        return value
    raise value


def abandon_waits() -> None:
    """Stop waiting for the reads in progress: each of their callers gets ReadAbandoned at once (a stop of the
    whole run, where no result will be used). Callable from a signal handler."""
    with _idle_lock:
        for worker in _busy:
            worker.abandoned = True
            worker.results.put(_ABANDONED)


class NotRegularFile(OSError):
    """A path that is not a regular file (a named pipe, a socket, a device, a link loop): never read, since
    a read of a pipe or of a file that never answers would block forever."""


def open_regular(path: os.PathLike | str):
    """Open a regular file (or a link to one) for reading, without ever blocking on what is not one:
    opened non-blocking (a FIFO then opens at once), and refused with NotRegularFile unless fstat says
    regular. FileNotFoundError passes through."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise NotRegularFile(error.errno, "a loop of symbolic links", os.fspath(path)) from None
        raise
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "a socket or device"
        raise NotRegularFile(errno.EINVAL, f"not a regular file: {kind}", os.fspath(path))
    if hasattr(os, "set_blocking"):
        os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb")


def _read_all(path: os.PathLike | str) -> bytes:
    with open_regular(path) as handle:
        return handle.read()


def read_file_bytes(path: os.PathLike | str, timeout: float | None = None) -> bytes:
    """The whole content of a regular file, read within the bound (ReadTimedOut, NotRegularFile and the
    OSError of a failed open pass through)."""
    return call_bounded(path, _read_all, path, timeout=timeout)
