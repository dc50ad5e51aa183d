"""Ctrl-C / SIGTERM during a cache build: the first stops after the sidecar in hand (what is written stays,
the summary says how many files were not attempted); a second stops at once (CacheStopNow), the writes
already queued still finished or removed, never half a file. Before encoding (the walk, the freshness
checks) nothing is written yet: the first stops the walk or the checks at once, reads in progress no longer
waited for, and the summary follows. While the queued writes finish a second raises nothing (they must not
stop halfway): it is kept, the summary says the stop was at once, and the index is not updated. After
encoding (the data index's update) the first stops waiting for reads that do not answer (their folders are
read again at the next start); the second leaves the index as it was. One catcher spans the whole build.
"""

from __future__ import annotations

import signal
import sys

from tqdm import tqdm

from ..bounded_read import abandon_waits
from ..stop_signals import SignalCatcher


UPDATING_INDEX = "updating the data index"
FINISHING = "finishing the writes"


class CacheStopNow(BaseException):
    """A second signal: leave the encode loop at once. A BaseException, so no ``except Exception`` keeps it."""


class CacheStopSignal(SignalCatcher):
    def __init__(self):
        super().__init__()
        self.requested: str | None = None  # the first signal's name
        self.phase: str | None = "walking the data roots"  # what the build does before encoding; None: encoding
        self.found = self.decided_before = 0  # sources found by the walk; outcomes counted before the checks
        # False while the writer and the decoders close and while a launch sums up, which must not be left
        # halfway: a second signal then raises nothing, it is kept in ``again`` and the index is not updated
        self.interruptible = True
        self.again: str | None = None  # a second signal's name

    def on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            # again here: this handler may have interrupted the first one's abandon_waits halfway (signals
            # sent back to back), and a read still waited for would hold the stop up to the read bound
            abandon_waits()
            self.again = name
            if self.interruptible:
                raise CacheStopNow(name)
            return
        self.requested = name
        if self.phase == UPDATING_INDEX:  # every sidecar is written: only the index's reads are left
            abandon_waits()
            tqdm.write(f"[cache] {name} received while {self.phase}: files it could not read are read again at the "
                       "next start (send it again to stop now)", file=sys.stderr)
            return
        if self.phase == FINISHING:  # every sidecar is encoded: the queued writes finish, then the index
            tqdm.write(f"[cache] {name} received while {self.phase}: they are kept (send it again to leave the data "
                       "index as it is)", file=sys.stderr)
            return
        if self.phase:
            abandon_waits()  # a freshness check's read of a file that does not answer: its result is not needed
            tqdm.write(f"[cache] {name} received while {self.phase}: stopping before any encoding "
                       "(send it again to stop now)", file=sys.stderr)
            return
        tqdm.write(f"[cache] {name} received: stopping after the current sidecar (send it again to stop now)",
                   file=sys.stderr)

    def should_stop(self) -> bool:
        return self.requested is not None
