"""A top-level script run in this process, as its file runs it: what it printed and its exit status.

Each script file is two lines: ``sys.exit(command())`` with a function of ``cachetrain.commands``.
``run_script`` calls that same function with the same arguments, so a test sees what a user sees
(stdout, stderr, a traceback as text, the status) without an interpreter start and the imports of torch,
diffusers and transformers: several seconds a run on 2 cores. ``tests/test_scripts.py`` and
``tests/test_package.py`` run the files and the console commands themselves as processes; tests that
need a process of their own (signals, kills, torchrun, a second run holding a lock) start one.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

from cachetrain import commands
from tests.conftest import REPO_ROOT

SCRIPT_COMMANDS = {
    "create_img_sdvae.py": commands.create_img_sdvae,
    "create_img_sdxl.py": commands.create_img_sdxl,
    "create_clipl.py": commands.create_clipl,
    "create_t5cache_768.py": commands.create_t5cache_768,
    "train_from_cached.py": commands.train_from_cached,
    "compare_imgdirs.py": commands.compare_imgdirs,
    "assemble_t5_pipeline.py": commands.assemble_t5_pipeline,
    "sample_images.py": commands.sample_images,
    "cachetrain.export": commands.export_single_file,
    "cachetrain.models.export": commands.export_single_file,
    "cachetrain.inspect": commands.inspect,
    "cachetrain.view.inspect": commands.inspect,
}


@contextlib.contextmanager
def _environment(cwd: os.PathLike | str | None, env: dict[str, str] | None, argv: list[str]) -> Iterator[None]:
    """The working folder, environment variables and sys.argv of the run, put back afterwards."""
    before_cwd, before_env, before_argv = os.getcwd(), dict(os.environ), sys.argv
    sys.argv = argv  # argparse names the program after sys.argv[0]
    try:
        if cwd is not None:
            os.chdir(cwd)
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        yield
    finally:
        sys.argv = before_argv
        os.chdir(before_cwd)
        if env is not None:
            os.environ.clear()
            os.environ.update(before_env)


def run_script(script: str | os.PathLike, *args: str, cwd: os.PathLike | str | None = REPO_ROOT,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` (a top-level script's file name or path, or a ``python -m`` module name) with ``args``.

    The status is what the interpreter would exit with: the command's return value, a SystemExit's code
    (argparse's usage errors: 2), or 1 with the traceback on stderr for an exception it let escape."""
    if script == "-m":  # run_script("-m", "cachetrain.export", ...) as "python -m cachetrain.export ..."
        script, *args = args
    name = Path(script).name if str(script).endswith(".py") else str(script)
    command = SCRIPT_COMMANDS[name]
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = [str(script), *map(str, args)]
    with _environment(cwd, env, argv), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = command(argv[1:])
        except SystemExit as leaving:
            code = leaving.code
            status = code if isinstance(code, int) else (0 if code is None else 1)
            if code is not None and not isinstance(code, int):
                print(code, file=stderr)
        except Exception:  # what the interpreter prints for an exception nobody caught
            traceback.print_exc(file=stderr)
            status = 1
    return subprocess.CompletedProcess(argv, status or 0, stdout.getvalue(), stderr.getvalue())
