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


def first_line(error: BaseException) -> str:
    """The first line of an error's message, for one-line reports ("no message" for an empty one)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"


def print_error(message: str) -> None:
    """The one line a failed command leaves for its user."""
    print(f"error: {message}", file=sys.stderr)


# What every script needs at import time; find_spec only looks, it imports nothing.
REQUIRED_MODULES = ("torch", "diffusers", "transformers", "safetensors", "PIL")
SETUP_HINT = "set up the environment once with ./scripts/setup_env.sh, then run: source .venv/bin/activate"


def require_dependencies(modules: tuple[str, ...] = REQUIRED_MODULES) -> None:
    """Exit (status 2) with one line saying how to set up when a dependency is missing from this Python.

    Called by each top-level script before it imports torch: ``./create_img_sdxl.py`` run outside the
    environment would otherwise end in a ModuleNotFoundError traceback. Standard library only.
    """
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: {', '.join(missing)} not installed for {sys.executable}; {SETUP_HINT}", file=sys.stderr)
        sys.exit(2)
