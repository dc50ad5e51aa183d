"""The original scripts' command lines, with their original flags, through train_from_cached.py's main():
the one its train_sd.sh and train-t5.sh wrappers build, and one with each flag this package took from it."""

from __future__ import annotations

import json
import shutil

from cachetrain.commands import train_from_cached
from tests.conftest import CACHED_LATENT_SHAPE


def _run(argv: list[str]) -> int:
    return train_from_cached(argv)


def test_the_original_train_sd_wrappers_command_line_runs_as_it_is(tiny_sd_model, cached_dataset, tmp_path):
    # train_sd.sh's line, with its flags and its habits: two folders in one --train_data_dir, the
    # settings file archived, samples of two prompts at each checkpoint (sizes made tiny)
    settings = tmp_path / "train_sd.sh"
    settings.write_text("LR=3e-5\n")
    output = tmp_path / "sd_test_b4a2_3e-5_constant2"
    status = _run(["--pretrained_model", str(tiny_sd_model), "--imgcache_suffix", ".img_sdvae",
                   "--txtcache_suffix", ".txt_clipl", "--optimizer", "lion", "--output_dir", str(output),
                   "--copy_config", str(settings), "--batch_size", "4", "--gradient_accum", "2",
                   "--max_steps", "2", "--save_on_epoch", "--warmup_steps", "0", "--learning_rate", "3e-5",
                   "--scheduler", "constant", "--gradient_checkpointing", "--cpu_offload",
                   "--use_snr", "--noise_gamma", "5", "--sample_prompt", "woman", "a beautiful woman",
                   "--sampler_steps", "2", "--num_workers", "0", "--no_progress",
                   "--train_data_dir", str(cached_dataset / "part0"), str(cached_dataset / "part1")])
    assert status == 0
    assert (output / "train_sd.sh").exists()
    assert len(list((output / "checkpoint-00002").glob("*.png"))) == 2


def test_an_original_command_line_with_each_flag_taken_from_it_runs(tiny_sd_model, cached_dataset, tmp_path):
    empty = tmp_path / "null.txt_clipl"
    shutil.copyfile(cached_dataset / ".empty_prompt.txt_clipl", empty)
    output = tmp_path / "run"
    status = _run(["--pretrained_model", str(tiny_sd_model), "--output_dir", str(output),
                   "--txtcache_suffix", ".txt_clipl", "--optimizer", "d_lion", "--initial_d", "1e-6",
                   "--learning_rate", "1.0", "--betas", "0.95", "0.98", "--scheduler", "rex", "--warmup_steps", "1",
                   "--rex_start_factor", "0.5", "--rex_end_factor", "--min_lr_ratio", "0.05",
                   "--scale_loss_with_accum", "--gradient_accum", "2", "--batch_size", "4", "--max_steps", "3",
                   "--force_txtcache", str(empty), "--data_balance", "round_robin",
                   "--train_data_dir", str(cached_dataset / "part0"), "--train_data_dir", str(cached_dataset / "part1"),
                   "--num_workers", "0", "--no_progress", "--save_steps", "0"])
    assert status == 0
    saved = json.loads((output / "checkpoint-00003" / "unet" / "config.json").read_text())
    assert saved["sample_size"] == CACHED_LATENT_SHAPE[-1]  # the cache's square latents


def test_the_original_train_t5_wrappers_flags_parse_with_their_meaning():
    from cachetrain.train.config import parse_train_args

    config = parse_train_args(["--pretrained_model", "m", "--train_data_dir", "/d", "--output_dir", "./t5_run",
                               "--batch_size", "40", "--gradient_accum", "1", "--max_steps", "100_000",
                               "--save_steps", "500", "--warmup_steps", "0", "--learning_rate", "6.1e-5",
                               "--noise_gamma", "4", "--scheduler", "constant", "--gradient_checkpointing",
                               "--use_snr", "--cpu_offload", "--sample_prompt", "woman"])
    assert config.max_optimizer_steps(batches_per_epoch=10) == 100_000
    assert (config.noise_gamma, config.use_snr, config.save_steps, config.sample_prompt) == (4.0, True, 500, ["woman"])
