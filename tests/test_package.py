"""cachetrain as a package: ``pip install .`` gives every command, and every command answers --version.

The install goes into a fresh virtual environment that reuses this environment's installed
dependencies (a .pth file naming its site-packages) and builds without isolation, so it takes
seconds and downloads nothing; the shared environment itself is never installed into.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
from pathlib import Path

import pytest

from cachetrain import __version__

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
COMMANDS = PYPROJECT["project"]["scripts"]
TOP_LEVEL_SCRIPTS = sorted(path.stem for path in REPO.glob("*.py"))


def test_every_top_level_script_has_a_console_command_calling_the_same_function():
    assert TOP_LEVEL_SCRIPTS  # the scripts are there, and each has its command
    for script in TOP_LEVEL_SCRIPTS:
        assert COMMANDS.get(script) == f"cachetrain.commands:{script}", script
        source = (REPO / f"{script}.py").read_text(encoding="utf-8")
        assert f"from cachetrain.commands import {script}\n" in source and f"sys.exit({script}())" in source, script


def test_the_package_s_version_and_dependencies_come_from_one_place_each():
    assert PYPROJECT["project"]["name"] == "cachetrain"
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "cachetrain.__version__"}
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    assert any(requirement.startswith("bitsandbytes") for requirement in PYPROJECT["project"]["optional-dependencies"]["adamw8"])


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_answers_version_with_cachetrain_s(command, capsys):
    from importlib import import_module

    module, function = COMMANDS[command].split(":")
    with pytest.raises(SystemExit) as exit_info:
        getattr(import_module(module), function)(["--version"])
    assert exit_info.value.code == 0
    assert f"(cachetrain {__version__})" in capsys.readouterr().out


def _fresh_venv_sharing_dependencies(folder: Path) -> Path:
    """A venv of this Python, without pip, that sees this environment's site-packages after its own."""
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(folder)],
                   check=True, capture_output=True, timeout=120)
    python = folder / "bin" / "python"
    own_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              check=True, capture_output=True, text=True).stdout.strip()
    Path(own_site, "_shared_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n", encoding="utf-8")
    return python


def test_pip_install_into_a_fresh_venv_gives_working_commands(tmp_path):
    started = time.monotonic()
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info beside its sources
    shutil.copytree(REPO / "cachetrain", source / "cachetrain", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy2(REPO / name, source / name)
    python = _fresh_venv_sharing_dependencies(tmp_path / "venv")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-build-isolation", "--no-index", "--disable-pip-version-check", "-q", str(source)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    installed = time.monotonic() - started
    bin_dir = python.parent
    elsewhere = tmp_path / "elsewhere"  # not the checkout: the commands must not lean on the working tree
    elsewhere.mkdir()
    for command in COMMANDS:
        assert (bin_dir / command).is_file(), f"{command} not installed"
    located = subprocess.run([str(python), "-c", "import cachetrain, sys; print(cachetrain.__file__)"], cwd=elsewhere,
                             capture_output=True, text=True, check=True).stdout.strip()
    assert Path(located).is_relative_to(tmp_path / "venv"), located  # the installed copy, not the checkout
    version = subprocess.run([str(bin_dir / "train_from_cached"), "--version"], cwd=elsewhere, capture_output=True,
                             text=True, timeout=300)
    assert version.returncode == 0 and f"cachetrain {__version__}" in version.stdout
    # a command doing real work, with the package data (the demo VAE) coming from the install
    built = subprocess.run([str(bin_dir / "cachetrain-tiny"), "model", "tiny", "--trained_vae"], cwd=elsewhere,
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    assert (elsewhere / "tiny" / "vae" / "config.json").is_file()
    bad_flag = subprocess.run([str(bin_dir / "cachetrain-export"), "--no_such_flag"], cwd=elsewhere,
                              capture_output=True, text=True, timeout=300)
    assert bad_flag.returncode == 2 and len(bad_flag.stderr.strip().splitlines()) == 1
    assert installed < 60, f"the install took {installed:.0f} s"
