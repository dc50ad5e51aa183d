"""The top-level scripts as the seed's users call them: ``./name.py``, the seed's own flags, and one line of
set-up advice (not a traceback) from a Python that lacks the dependencies."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cachetrain import sidecar
from cachetrain.cache.text_cache import main_clip

from .conftest import REPO_ROOT

SCRIPTS = ("create_img_sdvae.py", "create_img_sdxl.py", "create_clipl.py", "create_t5cache_768.py",
           "train_from_cached.py", "compare_imgdirs.py", "assemble_t5_pipeline.py")
IMAGES = 48


def python_without_torch() -> str | None:
    """A Python 3.10+ on this machine that cannot import torch (the system one, usually)."""
    for candidate in ("python3", "/usr/bin/python3", "/usr/local/bin/python3", "python3.11", "python3.10"):
        found = shutil.which(candidate)
        if not found:
            continue
        probe = subprocess.run([found, "-c", "import importlib.util, sys; print(sys.executable); "
                                "sys.exit(sys.version_info < (3, 10) or importlib.util.find_spec('torch') is not None)"],
                               capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
        if probe.returncode == 0:
            return probe.stdout.strip()
    return None


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_is_executable_with_a_python_shebang_in_git_too(script):
    path = REPO_ROOT / script
    assert path.read_text().startswith("#!/usr/bin/env python3\n")
    assert os.access(path, os.X_OK)
    staged = subprocess.run(["git", "ls-files", "-s", script], cwd=REPO_ROOT, capture_output=True, text=True)
    if staged.stdout:  # a checkout without git metadata has only the file mode to check
        assert staged.stdout.split()[0] == "100755", staged.stdout


def test_run_without_the_dependencies_each_script_prints_one_line_saying_how_to_set_up(tmp_path):
    bare_python = python_without_torch()
    if bare_python is None:
        pytest.skip("every Python on this machine has torch")
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "python3").symlink_to(bare_python)  # what `env python3` in the shebang finds first
    env = {"PATH": f"{bin_folder}:/usr/bin:/bin", "HOME": str(tmp_path)}
    for script in SCRIPTS:
        done = subprocess.run([f"./{script}", "--help"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2, (script, done.stderr)
        assert done.stdout == ""
        lines = done.stderr.splitlines()
        assert len(lines) == 1, (script, done.stderr)
        assert lines[0].startswith("error: torch") and "not installed" in lines[0]
        assert lines[0].endswith("./scripts/setup_env.sh, then run: source .venv/bin/activate")


def test_every_scripts_help_comes_without_importing_diffusers():
    """--help answers in the time of torch's import: diffusers' own imports cost ~4 s on 2 cores."""
    probe = ("import runpy, sys\n"
             "for script in sys.argv[1:]:\n"
             "    sys.argv = [script, '--help']\n"
             "    try:\n"
             "        runpy.run_path(script, run_name='__main__')\n"
             "    except SystemExit as leaving:\n"
             "        assert leaving.code == 0, script\n"
             "    loaded = sorted(name for name in ('diffusers', 'transformers', 'peft') if name in sys.modules)\n"
             "    print(script, *loaded, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", probe, *SCRIPTS, "sample_images.py"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.splitlines() == [*SCRIPTS, "sample_images.py"]  # no library named after any script


@pytest.fixture
def custom_pipeline_folder(tiny_sd_model, tmp_path) -> Path:
    """A hub-style custom pipeline folder: the parts in subfolders and the pipeline's code at its root."""
    folder = tmp_path / "custom-pipeline"
    shutil.copytree(tiny_sd_model, folder)
    (folder / "pipeline.py").write_text("raise RuntimeError('the cache scripts never run this code')\n")
    return folder


def test_the_seeds_command_with_a_bare_custom_runs_as_dot_slash_script_in_the_activated_environment(
        custom_pipeline_folder, shapes_dataset):
    venv_bin = REPO_ROOT / ".venv" / "bin"
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "VIRTUAL_ENV": str(REPO_ROOT / ".venv"),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["./create_img_sdxl.py", "--model", str(custom_pipeline_folder), "--data_root",
                           str(shapes_dataset), "--custom", "--resolution", "64", "--num_workers", "0",
                           "--no_progress"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    written = sorted(shapes_dataset.rglob("*.img_sdxl"))
    assert len(written) == IMAGES
    assert sidecar.read_metadata(written[0])["encoder"] == str(custom_pipeline_folder)


def test_a_bare_custom_takes_the_clip_parts_of_the_model_folder_and_custom_folder_still_works(
        capsys, custom_pipeline_folder, shapes_dataset):
    common = ["--data_root", str(shapes_dataset), "--no_progress"]
    assert main_clip(["--model", str(custom_pipeline_folder), "--custom", *common]) == 0
    first = sorted(shapes_dataset.rglob("*.txt_clipl"))
    assert len(first) == IMAGES + 1  # and the root's hidden empty prompt
    assert sidecar.read_metadata(first[0])["encoder"] == str(custom_pipeline_folder)
    # --custom FOLDER: the parts come from FOLDER whatever --model says
    assert main_clip(["--model", "no/such-hub-model", "--custom", str(custom_pipeline_folder), *common,
                      "--overwrite"]) == 0
    assert sidecar.read_metadata(first[0])["encoder"] == str(custom_pipeline_folder)


def test_a_bare_custom_on_a_model_that_is_not_a_pipeline_folder_is_one_line_and_exit_2(capsys, tmp_path,
                                                                                        shapes_dataset):
    from cachetrain.cache.image_cache import main as image_main
    import create_img_sdxl

    empty = tmp_path / "empty"
    empty.mkdir()
    assert image_main(["--model", str(empty), "--custom", "--data_root", str(shapes_dataset)],
                      create_img_sdxl.DEFAULTS) == 2
    assert capsys.readouterr().err == f"error: --model {empty}: no vae/ folder in it\n"
    assert main_clip(["--model", "some/hub-id", "--custom", "--data_root", str(shapes_dataset)]) == 2
    assert capsys.readouterr().err == \
        "error: --model some/hub-id: --custom wants a pipeline folder, and this is none\n"


@pytest.mark.parametrize("command", ["train_from_cached", "sample_images", "create_img_sdvae", "create_img_sdxl",
                                     "create_clipl", "create_t5cache_768"])
def test_every_script_that_loads_a_model_folder_shows_custom_first_and_keeps_is_custom(command, capsys):
    from cachetrain import commands
    from cachetrain.train.config import TRUST_HELP

    with pytest.raises(SystemExit) as done:
        getattr(commands, command)(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert re.search(r"--custom( \[FOLDER\])?, --is_custom( \[FOLDER\])? ", text), text
    if command in ("train_from_cached", "sample_images"):  # the two that run a folder's code only when told
        assert TRUST_HELP in text


def test_is_custom_and_custom_are_one_flag_in_the_sampler_and_the_cache_scripts():
    from cachetrain.cache.build import CUSTOM_IS_MODEL, add_custom_flag
    from cachetrain.cli import ArgumentParser
    from cachetrain.sample.sampler_cli import build_parser

    assert build_parser().parse_args(["m", "--is_custom"]).custom
    assert build_parser().parse_args(["m", "--custom"]).custom
    parser = ArgumentParser()
    add_custom_flag(parser, "VAE")
    assert parser.parse_args(["--is_custom"]).custom is CUSTOM_IS_MODEL
    assert parser.parse_args(["--is_custom", "F"]).custom == "F"
