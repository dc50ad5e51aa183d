"""A single file (the original SD layout) holds weights only: its configs and tokenizer come from
--single_file_config, SD1.5's hub id by default. Offline, with no config folder given, every script that
loads one refuses in one line naming the file and the flag, not with the hub's traceback.

The tests run offline (conftest: HF_HUB_OFFLINE and an empty hub cache), as a user without network does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cachetrain.models import export
from cachetrain.tiny.models import build_tiny_sd
from tests.conftest import cache_shapes
from tests.script_runs import run_script

TRAIN_FLAGS = ("--num_workers", "0", "--no_progress", "--learning_rate", "1e-3", "--batch_size", "4",
               "--max_steps", "1", "--save_steps", "0")
CACHE_FLAGS = ("--num_workers", "0", "--no_progress", "--save_dtype", "float32")


@pytest.fixture(scope="module")
def sd15_model(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("sd15-structure") / "model", seed=3, sd15_structure=True)


@pytest.fixture(scope="module")
def single_file(sd15_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "sd15.safetensors"
    assert export.main([str(sd15_model), str(out), "--dtype", "fp32"]) == 0
    return out


@pytest.fixture(scope="module")
def sd15_cached(sd15_model, _shapes_template, tmp_path_factory) -> Path:
    return cache_shapes(sd15_model, _shapes_template, tmp_path_factory.mktemp("sd15-cached") / "data",
                        resolution=64)


def the_error_line(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def assert_names_the_missing_configs_and_the_fix(line: str, single_file: Path, part: str) -> None:
    assert f"{single_file}: a single file holds weights only" in line
    assert f"its {part} config comes from stable-diffusion-v1-5/stable-diffusion-v1-5" in line
    assert "could not be fetched from the hub (HF_HUB_OFFLINE is set)" in line
    assert "--single_file_config FOLDER, or make the hub reachable" in line


def test_training_from_a_single_file_offline_without_its_config_folder_is_refused_in_one_line(
        single_file, sd15_cached, tmp_path):
    output = tmp_path / "run"
    result = run_script("train_from_cached.py", "--pretrained_model", str(single_file), "--train_data_dir",
                        str(sd15_cached), "--output_dir", str(output), *TRAIN_FLAGS)
    assert result.returncode == 2, result.stderr[-3000:]
    line = the_error_line(result)
    assert line.startswith(f"error: --pretrained_model {single_file}: ")
    assert_names_the_missing_configs_and_the_fix(line, single_file, "unet")
    assert not list(output.glob("checkpoint-*")) and not (output / "unet").exists()
    assert not (output / "tensorboard").exists() and not (output / "train_summary.json").exists()


@pytest.mark.parametrize(("script", "part", "suffix", "extra"), [
    ("create_img_sdvae.py", "vae", ".img_sdvae", ("--resolution", "64")),
    ("create_clipl.py", "tokenizer", ".txt_clipl", ()),
])
def test_the_cache_scripts_given_a_single_file_offline_without_its_config_folder_refuse_in_one_line(
        single_file, shapes_dataset, script, part, suffix, extra):
    result = run_script(script, "--model", str(single_file), "--data_root", str(shapes_dataset), *CACHE_FLAGS, *extra)
    assert result.returncode == 2, result.stderr[-3000:]
    assert_names_the_missing_configs_and_the_fix(the_error_line(result), single_file, part)
    assert not list(shapes_dataset.rglob(f"*{suffix}"))


def test_a_config_folder_without_a_tokenizer_is_refused_not_cached_with_an_empty_vocabulary(
        sd15_model, single_file, shapes_dataset, tmp_path):
    # transformers builds a tokenizer of the special tokens alone, silently, when its files are missing
    configs = tmp_path / "configs"
    shutil.copytree(sd15_model, configs)
    shutil.rmtree(configs / "tokenizer")
    result = run_script("create_clipl.py", "--model", str(single_file), "--single_file_config", str(configs),
                        "--data_root", str(shapes_dataset), *CACHE_FLAGS)
    assert result.returncode == 2, result.stderr[-3000:]
    line = the_error_line(result)
    assert f"{single_file}: a single file holds weights only; its tokenizer config comes from the folder {configs}, " \
           "which lacks it (no tokenizer files" in line
    assert "--single_file_config FOLDER" in line
    assert not list(shapes_dataset.rglob("*.txt_clipl"))
