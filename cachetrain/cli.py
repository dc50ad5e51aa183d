"""What every command-line entry point shares: a parser whose errors are one line, not a page of usage."""

from __future__ import annotations

import argparse
import sys

from . import __version__


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a bad flag prints one line naming it (and where --help is), exit status 2.

    Users of long runs paste the last lines of a log; 48 lines of usage before the one that matters
    bury it. Every command also answers ``--version`` (the installed cachetrain's).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=f"%(prog)s (cachetrain {__version__})")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def print_error(message: str) -> None:
    """The one line a failed command leaves for its user."""
    print(f"error: {message}", file=sys.stderr)
