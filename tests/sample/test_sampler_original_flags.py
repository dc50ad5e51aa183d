"""sample_images.py takes the original imgsamplesd.py's command lines: --model M, several prompts after one
--prompt, --output_directory and its default (the model's folder), --vae_scaling, --seed_device, --offload, and a
folder with a pipeline.py taken as custom without a flag. Its stderr holds no import noise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cachetrain.models.sampling import sample_filename
from cachetrain.sample.sampler_cli import main
from tests.hubstyle_support import write_hubstyle_folder

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle on a blue background", "a yellow square on a black background"]
QUICK = ["--steps", "1", "--guidance", "1.0", "--width", "32", "--height", "32", "--seed", "3"]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


@pytest.fixture
def model_copy(tiny_sd_model, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_sd_model, folder)
    return folder


def test_the_original_command_line_draws_each_prompt_into_the_model_folder_and_prints_no_import_noise(model_copy):
    # as a user runs it: the script in a fresh process, transformers' warnings at their default verbosity
    env = {key: value for key, value in os.environ.items() if key != "TRANSFORMERS_VERBOSITY"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "sample_images.py", "--model", str(model_copy), "--prompt", *PROMPTS,
                           *QUICK], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for index, prompt in enumerate(PROMPTS):
        assert (model_copy / sample_filename(index, prompt)).is_file()
    assert "requires torchvision" not in done.stderr and "ImageProcessor" not in done.stderr, done.stderr


def test_output_directory_and_the_model_given_twice(model_copy, tmp_path, capsys):
    out = tmp_path / "elsewhere"
    assert main(["--model", str(model_copy), "--prompt", PROMPTS[0], "--output_directory", str(out), *QUICK]) == 0
    assert (out / sample_filename(0, PROMPTS[0])).is_file()
    with pytest.raises(SystemExit) as stopped:
        main([str(model_copy), "--model", str(model_copy), "--prompt", PROMPTS[0]])
    assert stopped.value.code == 2 and "give the model once" in capsys.readouterr().err


def test_vae_scaling_decodes_as_a_vae_config_with_that_factor_does(model_copy, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(model_copy, edited)
    config_path = edited / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["scaling_factor"] = 0.5
    config_path.write_text(json.dumps(config))
    name = sample_filename(0, PROMPTS[0])
    assert main([str(model_copy), "--prompt", PROMPTS[0], "--out", str(tmp_path / "own"), *QUICK]) == 0
    assert main([str(model_copy), "--prompt", PROMPTS[0], "--vae_scaling", "0.5", "--out", str(tmp_path / "flag"),
                 *QUICK]) == 0
    assert main([str(edited), "--prompt", PROMPTS[0], "--out", str(tmp_path / "config"), *QUICK]) == 0
    assert np.array_equal(pixels(tmp_path / "flag" / name), pixels(tmp_path / "config" / name))
    assert np.abs(pixels(tmp_path / "flag" / name) - pixels(tmp_path / "own" / name)).max() > 10


def test_seed_device_and_offload_on_the_cpu(model_copy, tmp_path, capsys):
    name = sample_filename(0, PROMPTS[0])
    assert main([str(model_copy), "--prompt", PROMPTS[0], "--out", str(tmp_path / "plain"), *QUICK]) == 0
    assert main([str(model_copy), "--prompt", PROMPTS[0], "--out", str(tmp_path / "flags"), "--seed_device", "cpu",
                 "--offload", *QUICK]) == 0
    assert "--offload: sampling on the CPU" in capsys.readouterr().err
    assert np.array_equal(pixels(tmp_path / "plain" / name), pixels(tmp_path / "flags" / name))
    if not __import__("torch").cuda.is_available():
        assert main([str(model_copy), "--prompt", PROMPTS[0], "--seed_device", "cuda", *QUICK]) == 2
        assert "--seed_device cuda: no CUDA device" in capsys.readouterr().err


def test_a_folder_with_a_pipeline_py_is_sampled_as_custom_without_the_flag_and_says_its_code_runs(
        tiny_t5_model, tmp_path, capsys):
    folder = write_hubstyle_folder(tiny_t5_model, tmp_path / "hub", "module-projection")
    assert main(["--model", str(folder), "--prompt", PROMPTS[0], *QUICK]) == 0
    err = capsys.readouterr().err
    assert f"{folder / 'pipeline.py'} found: a custom pipeline; its code will run" in err
    assert (folder / sample_filename(0, PROMPTS[0])).is_file()
