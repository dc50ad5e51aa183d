"""Ctrl-C and SIGTERM caught for the length of a ``with`` block: the one mechanism the cache builds
and the trainer share (each says what a first and a second signal mean in ``on_signal``)."""

from __future__ import annotations

import signal


class SignalCatcher:
    """Installs ``on_signal(signum)`` for SIGINT and SIGTERM on entry and restores the previous handlers
    on exit. Outside the main thread (where Python allows no handler) it installs nothing."""

    def __init__(self):
        self._previous = {}

    def on_signal(self, signum: int) -> None:
        raise NotImplementedError

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, lambda signum, _frame: self.on_signal(signum))
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
