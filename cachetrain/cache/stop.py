"""Ctrl-C / SIGTERM during a cache build: the first stops after the sidecar in hand (what is written stays,
the summary says how many files were not attempted); a second stops at once (CacheStopNow), the writes
already queued still finished or removed, never half a file.
"""

from __future__ import annotations

import signal
import sys

from tqdm import tqdm

from ..stop_signals import SignalCatcher


class CacheStopNow(BaseException):
    """A second signal: leave the encode loop at once. A BaseException, so no ``except Exception`` keeps it."""


class CacheStopSignal(SignalCatcher):
    def __init__(self):
        super().__init__()
        self.requested: str | None = None  # the first signal's name

    def on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            raise CacheStopNow(name)
        self.requested = name
        tqdm.write(f"[cache] {name} received: stopping after the current sidecar (send it again to stop now)",
                   file=sys.stderr)
