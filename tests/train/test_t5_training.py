"""A short training run of the tiny T5 model on .img_sdxl + .txt_t5cache sidecars."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cachetrain import sidecar
from tests.training_support import fixed_batch_loss, record_unet_text_inputs

STEPS = 40


@pytest.fixture(scope="module")
def t5_run(tiny_t5_model, t5_cached_template, tmp_path_factory) -> Path:
    """40 optimizer steps of the tiny T5 model, checkpoints at 20 and 40 (read-only for the tests)."""
    from cachetrain.train.trainer import main

    output = tmp_path_factory.mktemp("t5-run") / "run"
    code = main(["--pretrained_model", str(tiny_t5_model), "--train_data_dir", str(t5_cached_template),
                 "--imgcache_suffix", sidecar.SDXL_VAE_SUFFIX, "--txtcache_suffix", sidecar.T5_SUFFIX,
                 "--output_dir", str(output), "--batch_size", "8", "--max_steps", str(STEPS), "--save_steps", "20",
                 "--learning_rate", "1e-3", "--scheduler", "cosine", "--warmup_steps", "5", "--use_snr",
                 "--log_every", "10", "--num_workers", "0", "--no_progress",
                 "--sample_prompt", "a red circle on a blue background", "--sampler_steps", "3"])
    assert code == 0
    return output


def test_a_short_t5_run_lowers_the_loss_on_a_fixed_padded_batch(t5_run, tiny_t5_model, t5_cached_template):
    # the captions differ in length: the batch is padded and the mask reaches the UNet
    suffixes = (sidecar.SDXL_VAE_SUFFIX, sidecar.T5_SUFFIX)
    before = fixed_batch_loss(tiny_t5_model, tiny_t5_model, t5_cached_template, *suffixes, expect_padding=True)
    after = fixed_batch_loss(t5_run, tiny_t5_model, t5_cached_template, *suffixes, expect_padding=True)
    assert after < 0.7 * before, (before, after)


def test_t5_checkpoints_are_t5_pipeline_folders_that_load_and_draw(t5_run):
    from cachetrain.models.t5 import StableDiffusionT5Pipeline

    checkpoints = sorted(t5_run.glob("checkpoint-*"))
    assert [p.name for p in checkpoints] == ["checkpoint-00020", "checkpoint-00040"]
    for checkpoint in checkpoints:
        index = json.loads((checkpoint / "model_index.json").read_text(encoding="utf-8"))
        assert index["_class_name"] == "StableDiffusionT5Pipeline"
        assert index["t5_projection"] == ["cachetrain.t5", "T5Projection"]
        assert len(list(checkpoint.glob("sample-*.png"))) == 1  # drawn at save time with the T5 pipeline
    pipe = StableDiffusionT5Pipeline.from_pretrained(checkpoints[-1])
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a yellow square on a black background", num_inference_steps=3,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert np.asarray(image).std() > 0  # an image, not a blank
    final = StableDiffusionT5Pipeline.from_pretrained(t5_run)  # the final model at the top of output_dir
    assert all(torch.equal(a, b) for a, b in zip(final.unet.state_dict().values(), pipe.unet.state_dict().values()))


def _first_losses(model: Path, data: Path, output: Path, *extra: str) -> list[float]:
    from cachetrain.train.config import parse_train_args
    from cachetrain.train.trainer import train

    config = parse_train_args(["--pretrained_model", str(model), "--train_data_dir", str(data),
                               "--imgcache_suffix", sidecar.SDXL_VAE_SUFFIX, "--txtcache_suffix", sidecar.T5_SUFFIX,
                               "--output_dir", str(output), "--batch_size", "8", "--max_steps", "2", "--save_steps",
                               "0", "--learning_rate", "1e-3", "--log_every", "1", "--num_workers", "0",
                               "--no_progress", *extra])
    return [entry["train/loss"] for entry in train(config).logged]


def test_the_trainer_masks_padding_so_padding_more_does_not_change_the_loss(tiny_t5_model, t5_cached_template,
                                                                             tmp_path):
    padded_per_batch = _first_losses(tiny_t5_model, t5_cached_template, tmp_path / "a")
    padded_to_60 = _first_losses(tiny_t5_model, t5_cached_template, tmp_path / "b", "--force_toklen", "60")
    assert len(padded_per_batch) == 2
    assert padded_to_60 == pytest.approx(padded_per_batch, rel=1e-4)


def test_a_text_scale_multiplies_what_the_step_feeds_the_unet_and_is_kept_in_the_projection(
        tiny_t5_model, t5_cached_template, tmp_path, monkeypatch):
    contexts = record_unet_text_inputs(monkeypatch)  # per training call of the UNet: its text conditioning
    _first_losses(tiny_t5_model, t5_cached_template, tmp_path / "plain")
    plain, contexts[:] = list(contexts), []
    _first_losses(tiny_t5_model, t5_cached_template, tmp_path / "run", "--text_scaling_factor", "2")
    assert len(contexts) == len(plain) == 2  # same seed: the same pairs, in the same order
    for scaled, unscaled in zip(contexts, plain):
        assert unscaled.abs().sum() > 0
        assert torch.equal(scaled, 2 * unscaled)  # exact: a power of two
    original = json.loads((tiny_t5_model / "t5_projection" / "config.json").read_text())["scaling_factor"]
    saved = json.loads((tmp_path / "run" / "checkpoint-00002" / "t5_projection" / "config.json").read_text())
    assert saved["scaling_factor"] == pytest.approx(2 * original)


def _train_t5(model: Path, data: Path, output: Path, *extra: str):
    from cachetrain.train.config import parse_train_args
    from cachetrain.train.trainer import train

    return train(parse_train_args(["--pretrained_model", str(model), "--train_data_dir", str(data),
                                   "--imgcache_suffix", sidecar.SDXL_VAE_SUFFIX, "--txtcache_suffix",
                                   sidecar.T5_SUFFIX, "--output_dir", str(output), "--batch_size", "8",
                                   "--num_workers", "0", "--no_progress", "--save_steps", "1", *extra]))


def test_a_run_with_force_toklen_saves_a_pipeline_that_conditions_on_that_many_tokens(tiny_t5_model,
                                                                                    t5_cached_template, tmp_path):
    from cachetrain.models.t5 import StableDiffusionT5Pipeline

    def recorded(folder):
        return StableDiffusionT5Pipeline.from_pretrained(folder).t5_projection.config.token_length

    output = tmp_path / "run"
    _train_t5(tiny_t5_model, t5_cached_template, output, "--max_steps", "1", "--force_toklen", "3")
    final = StableDiffusionT5Pipeline.from_pretrained(output)
    assert final.t5_projection.config.token_length == 3
    context, mask = final.encode_prompt(["a red circle on a blue background", "a square"], device="cpu")
    assert context.shape[1] == 3 and mask is None  # both captions have at least 3 tokens: cut, nothing padded
    untouched = StableDiffusionT5Pipeline.from_pretrained(tiny_t5_model)  # trained without: whole prompts
    assert untouched.t5_projection.config.token_length is None
    assert untouched.encode_prompt(["a red circle on a blue background"], device="cpu")[0].shape[1] > 3

    # resumed without the flag: what is saved from then on says so (the saved parts are rebuilt)
    _train_t5(tiny_t5_model, t5_cached_template, output, "--max_steps", "2", "--resume")
    assert recorded(output / "checkpoint-00001") == 3 and recorded(output / "checkpoint-00002") is None
    assert recorded(output) is None
    # trained on from a model that recorded a length, without the flag: the length is not inherited
    onward = _train_t5(output / "checkpoint-00001", t5_cached_template, tmp_path / "onward", "--max_steps", "1",
                       "--sample_prompt", "a red circle on a blue background", "--sampler_steps", "1")
    assert recorded(tmp_path / "onward") is None and onward.steps == 1


def test_text_sidecars_of_another_text_encoder_are_refused_at_start_naming_both_widths(
        tiny_sd_model, tiny_t5_model, t5_cached_template, cached_dataset, tmp_path, capsys):
    """T5 sidecars for SD1.5's UNet, CLIP-L sidecars for the T5 model: one line and status 2 before step 1,
    not a matrix-shape traceback at it."""
    from cachetrain.train.trainer import main

    def start(model, data, output, *suffixes):
        capsys.readouterr()
        status = main(["--pretrained_model", str(model), "--train_data_dir", str(data), "--output_dir", str(output),
                       *suffixes, "--batch_size", "4", "--max_steps", "1", "--num_workers", "0", "--no_progress"])
        return status, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]

    t5_width = json.loads((tiny_t5_model / "unet" / "config.json").read_text())["cross_attention_dim"]
    clip_width = json.loads((tiny_sd_model / "unet" / "config.json").read_text())["cross_attention_dim"]
    assert t5_width != clip_width
    cases = [(tiny_sd_model, t5_cached_template, ("--imgcache_suffix", sidecar.SDXL_VAE_SUFFIX, "--txtcache_suffix",
                                                  sidecar.T5_SUFFIX), t5_width, clip_width),
             (tiny_t5_model, cached_dataset, (), clip_width, t5_width)]
    for number, (model, data, suffixes, sidecar_width, unet_width) in enumerate(cases):
        output = tmp_path / f"run{number}"
        status, errors = start(model, data, output, *suffixes)
        assert status == 2 and len(errors) == 1, errors
        assert (f"the run's text sidecars are {sidecar_width} wide, and {model}'s UNet takes text {unet_width} "
                "wide") in errors[0]
        assert not list(output.glob("checkpoint-*")) and not (output / "unet").exists()
