"""Ctrl-C / SIGTERM during a cache build: the first stops after the sidecar in hand (what is written stays,
the summary says how many files were not attempted); a second stops at once (CacheStopNow), the writes
already queued still finished or removed, never half a file.
"""

from __future__ import annotations

import signal
import sys

from tqdm import tqdm


class CacheStopNow(BaseException):
    """A second signal: leave the encode loop at once. A BaseException, so no ``except Exception`` keeps it."""


class CacheStopSignal:
    def __init__(self):
        self.requested: str | None = None  # the first signal's name
        self._previous = {}

    def _handle(self, signum, _frame):
        name = signal.Signals(signum).name
        if self.requested:
            raise CacheStopNow(name)
        self.requested = name
        tqdm.write(f"[cache] {name} received: stopping after the current sidecar (send it again to stop now)",
                   file=sys.stderr)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
