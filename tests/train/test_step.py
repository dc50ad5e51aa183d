"""One training step's device work on the tiny model: the latent scale it applies, the speed flags
(channels-last, torch.compile) that must train the same model, and the skip of a step with NaN/Inf gradients.
"""

from __future__ import annotations

import json

import pytest
import torch

from cachetrain.train.config import parse_train_args
from cachetrain.train.trainer import train
from tests.conftest import CACHED_LATENT_SHAPE
from tests.training_support import logged as _logged
from tests.training_support import train_args as _args
from tests.training_support import unet_weights as _unet_weights


def test_a_vae_scale_override_scales_the_latents_the_step_trains_on_and_is_saved(tiny_sd_model, cached_dataset,
                                                                                 tmp_path, monkeypatch):
    from cachetrain.models.loading import read_vae_scaling_factor
    from cachetrain.train.objective import DiffusionObjective
    from cachetrain.sidecar import read_sidecar

    trained_on = []  # the latents the step hands the objective (which noises them for the UNet)
    training_inputs = DiffusionObjective.training_inputs

    def recording_training_inputs(objective, latents, noise, draws):
        trained_on.extend(latents.detach().clone())
        return training_inputs(objective, latents, noise, draws)

    monkeypatch.setattr(DiffusionObjective, "training_inputs", recording_training_inputs)
    train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--batch_size", "8",
                                 "--max_steps", "1", "--vae_scaling_factor", "0.5")))
    assert read_vae_scaling_factor(str(tiny_sd_model)) != 0.5  # the override, not the model's own value
    cached = [read_sidecar(path, "latent").float() for path in sorted(cached_dataset.rglob("*.img_sdvae"))]
    assert len(trained_on) == 8
    for latent in trained_on:  # each is one cached latent times 0.5, exactly (a power of two)
        assert sum(torch.equal(latent, 0.5 * sidecar) for sidecar in cached) == 1
    config = json.loads((tmp_path / "run" / "checkpoint-00001" / "vae" / "config.json").read_text())
    assert config["scaling_factor"] == 0.5


# --compile through dynamo's tracing and autograd (aot_eager): inductor's kernel generation for a CPU
# takes 90-300 s here and is not what a GPU run compiles; the device check compiles with inductor
@pytest.mark.parametrize("flag", ["--channels_last", "--compile"])
def test_speed_flags_train_the_same_model(tiny_sd_model, cached_dataset, tmp_path, flag, monkeypatch):
    from diffusers import UNet2DConditionModel
    from torch._dynamo.utils import counters

    layouts = []  # per UNet call: are its input and first convolution's weight channels-last?
    unet_forward = UNet2DConditionModel.forward

    def recording_forward(unet, sample, *args, **kwargs):
        layouts.append((sample.is_contiguous(memory_format=torch.channels_last),
                        unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)))
        return unet_forward(unet, sample, *args, **kwargs)

    if flag == "--channels_last":
        monkeypatch.setattr(UNet2DConditionModel, "forward", recording_forward)
    common = ("--batch_size", "8", "--max_steps", "3", "--log_every", "1")
    plain = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "plain", *common)))
    plain_layouts, layouts[:] = list(layouts), []
    counters.clear()
    flags = ("--dynamo_backend", "aot_eager") if flag == "--compile" else (flag,)  # kohya's flag alone compiles
    fast = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "fast", *common, *flags)))
    # the flag did take effect
    if flag == "--channels_last":
        assert set(plain_layouts) == {(False, False)} and set(layouts) == {(True, True)}
    else:
        assert counters["stats"]["unique_graphs"] >= 1  # the UNet went through torch.compile
    plain_losses, fast_losses = _logged(plain, "train/loss"), _logged(fast, "train/loss")
    assert [step for step, _ in fast_losses] == [1, 2, 3]
    assert [value for _, value in fast_losses] == pytest.approx([value for _, value in plain_losses], rel=1e-3)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8"])  # skipped on the device / on the host
def test_nan_gradients_skip_the_step_and_are_counted(tiny_sd_model, cached_dataset, tmp_path, optimizer):
    from cachetrain.sidecar import read_metadata, write_sidecar

    # finite but huge, so the loader lets it through (NaN/Inf latents are bad data, skipped in the
    # worker); the UNet's activations overflow and the gradients come out NaN/Inf
    poisoned = sorted(cached_dataset.rglob("*.img_sdvae"))[0]
    write_sidecar(poisoned, {"latent": torch.full(CACHED_LATENT_SHAPE, 3e38)}, read_metadata(poisoned))
    result = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--batch_size", "8",
                                          "--max_steps", "12", "--log_every", "12", "--optimizer", optimizer)))
    skipped = _logged(result, "train/skipped_steps")
    assert skipped == [(12, 2.0)]  # the poisoned sample is in one batch per epoch; 2 epochs
    weights = _unet_weights(tmp_path / "run")
    assert all(torch.isfinite(t).all() for t in weights.values())
