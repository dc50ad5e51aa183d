"""Reads with a time bound: a file whose read never returns (a hung network or FUSE mount) is named and passed
over instead of holding the process forever.

Python cannot cancel a blocked read, so reads run on a daemon worker thread and the caller waits at most
``timeout`` seconds for each. A read that does not finish in time raises ReadTimedOut (an OSError naming the
file); its worker is abandoned where it is stuck (a daemon thread never holds up the end of the process) and
the next read starts on a fresh one. Idle workers are kept for the next read, so a read costs one hand-over
between threads, not a thread start; ``call_bounded_each`` hands a whole list of reads (a folder's headers) over
at once: the worker notes each answer as it comes and the caller, waking once for the list, counts each read's
bound from the answer before it. A file that did not answer is not waited for again by this process (nor by the
processes it forks later): each wait leaves a thread stuck, and on Linux a second open of a file whose read
hangs can block where no signal reaches it (the kernel waits on the page the first read holds), so that
process could not even end. ``abandon_waits`` (a stop) ends every wait at once with ReadAbandoned.

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
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple, TypeVar

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


class Answer(NamedTuple):
    """What the read of one path gave: its value, or the error it raised (ReadTimedOut when it did not answer)."""

    path: os.PathLike | str
    value: object = None
    error: BaseException | None = None

    def result(self):
        """The value, or the read's error raised here."""
        if self.error is not None:
            raise self.error
        return self.value


class _Batch:
    """Reads handed to a worker in one go: it appends each answer as it finishes and notes when, and says on
    ``wakeups`` when it is through (or abandon_waits says the caller should stop waiting)."""

    def __init__(self, paths: list, function: Callable):
        self.paths = paths
        self.function = function
        self.answers: list[Answer] = []
        self.progress = (0, time.monotonic())  # (answers so far, when the last came): one tuple, read whole
        self.wakeups: queue.SimpleQueue = queue.SimpleQueue()  # reentrant put: abandon_waits may be a signal handler
        self.abandoned = False  # nobody waits for the rest any more: the worker leaves it


class _Worker:
    """One daemon thread that runs the batches handed to it, one at a time, and offers itself again after each."""

    def __init__(self):
        self.batches: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="cachetrain-bounded-read", daemon=True).start()

    def _run(self) -> None:
        _local.on_worker = True
        while True:
            batch = self.batches.get()
            for path in batch.paths:
                if batch.abandoned:
                    break
                batch.answers.append(_answer_directly(path, batch.function))
                batch.progress = (len(batch.answers), time.monotonic())
            batch.wakeups.put(_THROUGH)
            with _idle_lock:  # each batch has its own channels: a late worker can take the next one safely
                _idle.append(self)


_local = threading.local()
_unanswered: dict[str, float] = {}  # path -> the bound it did not answer within
_idle: list[_Worker] = []
_waited: set[_Batch] = set()  # batches a caller waits for now
_idle_lock = threading.RLock()  # re-entrant: abandon_waits may run in a signal handler
_THROUGH, _ABANDONED, _STUCK = "through", "abandoned", "stuck"  # what ends a wait on a batch


def _forget_workers_after_fork() -> None:
    """A forked child has none of its parent's threads: start its own when it first reads."""
    global _idle, _waited, _idle_lock
    _idle, _waited, _idle_lock = [], set(), threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers_after_fork)


def _answer_directly(path: os.PathLike | str, function: Callable) -> Answer:
    key = os.fspath(path)
    if key in _unanswered:
        return Answer(path, error=ReadTimedOut(path, _unanswered[key]))
    try:
        return Answer(path, function(path))
    except BaseException as error:  # handed back to the caller, raised there if it asks for the value
        return Answer(path, error=error)


def call_bounded_each(paths: Iterable[os.PathLike | str], function: Callable[[os.PathLike | str], T],
                      timeout: float | None = None) -> list[Answer]:
    """``function(path)`` for each of ``paths``, in order, on one worker thread: one hand-over for the whole
    batch. Each read is given at most ``timeout`` seconds (the process's bound when None; 0: no bound, run here),
    counted from the previous answer. A path that does not answer in time gets ReadTimedOut (and is never waited
    for again); its worker is abandoned where it is stuck and the rest go on on a fresh one. A path that did not
    answer before gets ReadTimedOut at once; what ``function`` raises is that path's answer only. abandon_waits
    ends the wait at once: the path in progress gets ReadAbandoned, and the rest are still read."""
    paths = list(paths)
    timeout = _read_timeout if timeout is None else timeout
    if not timeout or getattr(_local, "on_worker", False):
        return [_answer_directly(path, function) for path in paths]
    answers: list[Answer] = []
    while len(answers) < len(paths):
        batch = _Batch(paths[len(answers):], function)
        with _idle_lock:
            worker = _idle.pop() if _idle else _Worker()
            _waited.add(batch)
        worker.batches.put(batch)
        try:
            woken_by, answered = _wait(batch, timeout)
        finally:
            batch.abandoned = True  # read or given up on: the worker leaves whatever is left of it
            with _idle_lock:
                _waited.discard(batch)
        answers.extend(batch.answers[:answered])
        if answered == len(batch.paths):
            continue
        path = batch.paths[answered]
        if woken_by == _STUCK:
            _unanswered[os.fspath(path)] = timeout
            answers.append(Answer(path, error=ReadTimedOut(path, timeout)))
        else:  # a batch ends short only when abandoned (it may say so before abandon_waits' own wake-up comes)
            answers.append(Answer(path, error=ReadAbandoned(path)))
    return answers


def _wait(batch: _Batch, timeout: float) -> tuple[str, int]:
    """Wait for ``batch`` until it is through or abandoned, or until one of its reads has taken ``timeout``
    seconds: (what ended the wait, how many answers had come then). The caller wakes once per batch, not once
    per answer: the deadline moves with the answers the worker notes."""
    while True:
        answered, last_answer_at = batch.progress
        left = last_answer_at + timeout - time.monotonic()
        if left <= 0:
            return _STUCK, answered
        try:
            woken_by = batch.wakeups.get(timeout=left)
        except queue.Empty:
            continue
        return woken_by, batch.progress[0]


def call_bounded(path: os.PathLike | str, function: Callable[..., T], *args, timeout: float | None = None) -> T:
    """``function(*args)`` (a read of ``path``), given at most ``timeout`` seconds (the process's bound when None;
    0: no bound). Raises ReadTimedOut naming ``path`` when it does not finish in time; whatever ``function``
    raises is raised here. Called from a bounded read itself, it runs directly (already under a bound). A path
    that did not answer before raises ReadTimedOut at once."""
    timeout = _read_timeout if timeout is None else timeout
    if not timeout or getattr(_local, "on_worker", False):
        return function(*args)
    (answer,) = call_bounded_each([path], lambda _path: function(*args), timeout=timeout)
    return answer.result()


def abandon_waits() -> None:
    """Stop waiting for the reads in progress: each of their callers gets ReadAbandoned at once for the read it
    waited for (a stop of the whole run, where no result will be used). Callable from a signal handler."""
    with _idle_lock:
        for batch in _waited:
            batch.abandoned = True
            batch.wakeups.put(_ABANDONED)


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
