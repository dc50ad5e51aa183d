"""Prompts-file lines with their own settings (kohya's --n --d --l --s --w --h): parsed in one place, drawn
as they say by sample_images.py and by the trainer's samples, and recorded in each PNG's metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cachetrain.models.prompts import PromptsFileError, SamplePrompt, parse_prompt_line, read_prompts_file
from cachetrain.models.sampling import SampleMetadata, read_sample_metadata, sample_filename

RED = "a red circle on a blue background"
YELLOW = "a yellow square on a black background"


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(f"# each line may carry its own settings\n{RED} --n blurry, text --d 42 --l 2.5 --s 3 --w 32 --h 48\n"
                    f"{YELLOW}\n", encoding="utf-8")
    return path


def test_a_prompt_line_carries_its_negative_prompt_seed_guidance_steps_and_size():
    assert parse_prompt_line(f"{RED} --n blurry, low quality --d 42 --l 5.5 --s 20 --w 512 --h 768") == SamplePrompt(
        RED, negative_prompt="blurry, low quality", seed=42, guidance_scale=5.5, steps=20, width=512, height=768)
    assert parse_prompt_line(f"{RED}  --h 64 --s 1") == SamplePrompt(RED, steps=1, height=64)  # any order, any subset
    assert parse_prompt_line("a cat--d not an option") == SamplePrompt("a cat--d not an option")
    assert parse_prompt_line("a cat --n") == SamplePrompt("a cat", negative_prompt="")


@pytest.mark.parametrize("line, message", [
    ("a cat --x 3", "unknown option --x"), ("a cat --s 0", "--s wants a whole number >= 1, got '0'"),
    ("a cat --d 1.5", "--d wants a whole number, got '1.5'"), ("a cat --l high", "--l wants a number, got 'high'"),
    ("a cat --s 2 --s 3", "--s given twice"), ("--s 3", "no prompt before the options"),
])
def test_a_bad_option_is_refused_naming_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "prompts.txt"
    path.write_text(f"# first\n{RED}\n{line}\n", encoding="utf-8")
    with pytest.raises(PromptsFileError, match=f"{path}:3: {message}"):
        read_prompts_file(path)


def test_sample_images_draws_each_line_as_it_says_and_records_what_it_used(tiny_sd_model, tmp_path):
    from cachetrain.sample.sampler_cli import main

    out = tmp_path / "lines"
    assert main([str(tiny_sd_model), "--prompts_file", str(_prompts(tmp_path)), "--seed", "9", "--steps", "2",
                 "--guidance", "4.0", "--negative_prompt", "dark", "--device", "cpu", "--out", str(out)]) == 0
    own, plain = out / sample_filename(0, RED), out / sample_filename(1, YELLOW)
    assert read_sample_metadata(own) == SampleMetadata(prompt=RED, negative_prompt="blurry, text", seed=42, step=0,
                                                       sampler_steps=3, guidance_scale=2.5, scheduler="PNDMScheduler",
                                                       width=32, height=48)
    assert read_sample_metadata(plain) == SampleMetadata(prompt=YELLOW, negative_prompt="dark", seed=10, step=0,
                                                         sampler_steps=2, guidance_scale=4.0, scheduler="PNDMScheduler")
    assert _pixels(own).shape == (48, 32, 3)
    # the same image as the flags would draw it
    flags = tmp_path / "flags"
    assert main([str(tiny_sd_model), "--prompt", RED, "--negative_prompt", "blurry, text", "--seed", "42", "--steps",
                 "3", "--guidance", "2.5", "--width", "32", "--height", "48", "--device", "cpu",
                 "--out", str(flags)]) == 0
    assert np.array_equal(_pixels(own), _pixels(flags / sample_filename(0, RED)))


def test_sample_images_refuses_a_line_size_the_vae_cannot_make_with_status_2(tiny_sd_model, tmp_path, capsys):
    from cachetrain.sample.sampler_cli import main

    prompts = tmp_path / "odd.txt"
    prompts.write_text(f"{RED} --w 33\n", encoding="utf-8")
    assert main([str(tiny_sd_model), "--prompts_file", str(prompts), "--device", "cpu", "--out",
                 str(tmp_path / "o")]) == 2
    assert "--w 33: must be a multiple of" in capsys.readouterr().err


@pytest.mark.slow
def test_the_trainer_draws_prompt_lines_with_their_own_settings(tiny_sd_model, cached_dataset, tmp_path, capsys):
    from cachetrain.commands import train_from_cached
    from tests.training_support import train_args

    run = tmp_path / "run"
    assert train_from_cached(train_args(tiny_sd_model, cached_dataset, run, "--max_steps", "1", "--batch_size", "4",
                                        "--sample_prompts_file", str(_prompts(tmp_path)), "--sampler_steps", "2",
                                        "--sample_seed", "5", "--guidance_scale", "3.0")) == 0
    checkpoint = run / "checkpoint-00001"
    own, plain = checkpoint / sample_filename(0, RED), checkpoint / sample_filename(1, YELLOW)
    assert read_sample_metadata(own) == SampleMetadata(prompt=RED, negative_prompt="blurry, text", seed=42, step=1,
                                                       sampler_steps=3, guidance_scale=2.5, scheduler="PNDMScheduler",
                                                       width=32, height=48)
    assert read_sample_metadata(plain) == SampleMetadata(prompt=YELLOW, negative_prompt="", seed=6, step=1,
                                                         sampler_steps=2, guidance_scale=3.0, scheduler="PNDMScheduler")
    assert _pixels(own).shape == (48, 32, 3)
    # sample_images redraws the trainer's image of that line from the checkpoint
    from cachetrain.sample.sampler_cli import main

    assert main([str(checkpoint), "--prompts_file", str(_prompts(tmp_path)), "--device", "cpu",
                 "--out", str(tmp_path / "again")]) == 0
    assert np.array_equal(_pixels(own), _pixels(tmp_path / "again" / own.name))
    # a line size the VAE cannot make is refused before step 1
    odd = tmp_path / "odd.txt"
    odd.write_text(f"{RED} --h 33\n", encoding="utf-8")
    capsys.readouterr()
    assert train_from_cached(train_args(tiny_sd_model, cached_dataset, tmp_path / "odd", "--max_steps", "1",
                                        "--sample_prompts_file", str(odd))) == 2
    assert "--h 33: must be a multiple of" in capsys.readouterr().err
