"""Samples at the size trained: non-square latents give non-square samples at checkpoints, the
checkpoint's UNet config records sample_size [H, W], and sample_images.py draws at it."""

from __future__ import annotations

import json
import shutil

from PIL import Image

from cachetrain.commands import create_clipl, create_img_sdvae, sample_images
from cachetrain.train.config import parse_train_args
from cachetrain.train.trainer import train
from tests.training_support import train_args as _args


def test_non_square_latents_give_non_square_samples_and_checkpoints(tiny_sd_model, _shapes_template, tmp_path):
    data = tmp_path / "wide"
    shutil.copytree(_shapes_template, data)
    common = ["--model", str(tiny_sd_model), "--data_root", str(data), "--num_workers", "0", "--no_progress",
              "--save_dtype", "float32"]
    assert create_img_sdvae(common + ["--target_width", "48", "--target_height", "32"]) == 0
    assert create_clipl(common) == 0
    result = train(parse_train_args(_args(tiny_sd_model, data, tmp_path / "run", "--batch_size", "8", "--max_steps",
                                          "1", "--sample_prompt", "a red circle", "--sampler_steps", "2")))
    assert result.exit_status == 0
    checkpoint = tmp_path / "run" / "checkpoint-00001"
    # the tiny VAE divides by 4: 48x32 pixels are 12x8 latents, [H, W] = [8, 12]
    assert json.loads((checkpoint / "unet" / "config.json").read_text())["sample_size"] == [8, 12]
    drawn = sorted(checkpoint.glob("*.png"))
    assert drawn and all(Image.open(path).size == (48, 32) for path in drawn)
    out = tmp_path / "later"
    assert sample_images([str(checkpoint), "--prompt", "a red circle", "--steps", "2", "--out", str(out),
                          "--device", "cpu"]) == 0
    later = sorted(out.rglob("*.png"))
    assert later and all(Image.open(path).size == (48, 32) for path in later)


def test_with_aspect_buckets_checkpoints_record_the_commonest_bucket_not_the_first_met(tiny_sd_model, tmp_path):
    from cachetrain.tiny.models import write_random_pairs

    # the rarer shape comes first in the walk: a rule taking the first pair's shape would record [12, 8]
    write_random_pairs(tmp_path / "data" / "a_tall", 4, latent_shape=(4, 12, 8), folders=1, seed=1)
    write_random_pairs(tmp_path / "data" / "b_wide", 12, latent_shape=(4, 8, 12), folders=1, seed=2)
    result = train(parse_train_args(_args(tiny_sd_model, tmp_path / "data", tmp_path / "run", "--batch_size", "4",
                                          "--max_steps", "1", "--aspect_buckets")))
    assert result.exit_status == 0
    config = json.loads((tmp_path / "run" / "checkpoint-00001" / "unet" / "config.json").read_text())
    assert config["sample_size"] == [8, 12]
