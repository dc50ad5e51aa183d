"""Noise and loss variants: pyramid noise, input perturbation and debiased estimation, each checked
against a computation written here, drawn from (seed, epoch, sample) alone, and trained through the
trainer with an exact resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cachetrain.train.config import ConfigError, parse_train_args
from cachetrain.train.trainer import train
from tests.training_support import logged, train_args, unet_weights


# ---------------------------------------------------------------------------------------------
# The formulas, against independent computations


def _bilinear(field: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of [C, h, w] to [C, height, width] with half-pixel centres (edge pixels held)."""
    _, h, w = field.shape

    def taps(size_in: int, size_out: int):
        source = np.maximum((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0.0)
        low = np.minimum(np.floor(source).astype(int), size_in - 1)
        high = np.minimum(low + 1, size_in - 1)
        return low, high, source - low

    y0, y1, fy = taps(h, height)
    x0, x1, fx = taps(w, width)
    rows = field[:, y0, :] * (1 - fy)[None, :, None] + field[:, y1, :] * fy[None, :, None]
    return rows[:, :, x0] * (1 - fx)[None, None, :] + rows[:, :, x1] * fx[None, None, :]


@pytest.mark.parametrize("iterations, discount, shape", [(6, 0.3, (4, 16, 24)), (2, 0.8, (4, 8, 8)),
                                                        (10, 0.5, (2, 40, 12))])
def test_pyramid_noise_is_the_discounted_sum_of_upsampled_coarse_noise_at_unit_std(iterations, discount, shape):
    from cachetrain.train.noise_variants import pyramid_noise

    base = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    made = pyramid_noise(base, torch.Generator().manual_seed(5), iterations, discount)

    generator = torch.Generator().manual_seed(5)  # the same draws, in the order the formula makes them
    channels, height, width = shape
    total = base.double().numpy().copy()
    levels = 0
    for level in range(iterations):
        ratio = 2 + 2 * torch.rand((), generator=generator).item()
        h, w = max(1, math.floor(height / ratio ** level)), max(1, math.floor(width / ratio ** level))
        coarse = torch.randn((1, channels, h, w), generator=generator)[0].double().numpy()
        total += discount ** level * _bilinear(coarse, height, width)
        levels += 1
        if h == 1 or w == 1:
            break
    expected = total / total.std(ddof=1)
    np.testing.assert_allclose(made.double().numpy(), expected, rtol=1e-4, atol=1e-5)
    assert abs(float(made.std()) - 1.0) < 1e-5
    if shape == (2, 40, 12):
        assert levels < iterations  # stopped at the first level one pixel wide


def _alphas_cumprod() -> torch.Tensor:
    """SD's scaled_linear schedule, written out here."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


@pytest.fixture(scope="module")
def sd_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_input_perturbation_noises_the_input_and_leaves_the_target_to_the_plain_noise(sd_scheduler, prediction_type):
    from cachetrain.train.objective import DiffusionObjective, FlowMatchingObjective

    generator = torch.Generator().manual_seed(2)
    latents, noise, extra = (torch.randn((3, 4, 8, 8), generator=generator) for _ in range(3))
    draws = torch.tensor([0.05, 0.5, 0.95])
    scheduler = sd_scheduler.__class__.from_config(sd_scheduler.config, prediction_type=prediction_type)
    inputs = DiffusionObjective(scheduler).training_inputs(latents, noise, draws, 0.1 * extra)
    t = (draws.double() * 1000).long()
    a = _alphas_cumprod()[t].view(-1, 1, 1, 1)
    x0, eps = latents.double(), noise.double()
    torch.testing.assert_close(inputs.noisy.double(), a.sqrt() * x0 + (1 - a).sqrt() * (eps + 0.1 * extra.double()),
                               rtol=1e-5, atol=1e-5)
    target = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(inputs.target.double(), target, rtol=1e-5, atol=1e-5)
    # flow matching: x_s = (1 - s) x0 + s (noise + g e), target noise - x0
    flow = FlowMatchingObjective().training_inputs(latents, noise, draws, 0.1 * extra)
    s = draws.double().view(-1, 1, 1, 1)
    torch.testing.assert_close(flow.noisy.double(), (1 - s) * x0 + s * (eps + 0.1 * extra.double()),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(flow.target.double(), eps - x0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_debiased_estimation_weighs_each_sample_by_one_over_root_snr_capped_at_1000(sd_scheduler, prediction_type):
    from cachetrain.train.objective import DiffusionObjective

    scheduler = sd_scheduler.__class__.from_config(sd_scheduler.config, prediction_type=prediction_type)
    timesteps = torch.tensor([0, 1, 10, 250, 500, 999])
    a = _alphas_cumprod()[timesteps]
    snr = a / (1 - a)
    assert snr[0] > 1000  # the first timestep is capped
    capped = snr.clamp(max=1000)
    debiased = 1 / capped.sqrt() if prediction_type == "epsilon" else 1 / (capped + 1).sqrt()
    weights = DiffusionObjective(scheduler, debiased_estimation=True).loss_weights(timesteps)
    torch.testing.assert_close(weights.double(), debiased, rtol=1e-4, atol=0)
    # with min-SNR the two weights multiply
    min_snr = snr.clamp(max=5) / (snr if prediction_type == "epsilon" else snr + 1)
    both = DiffusionObjective(scheduler, snr_gamma=5.0, debiased_estimation=True).loss_weights(timesteps)
    torch.testing.assert_close(both.double(), min_snr * debiased, rtol=1e-4, atol=0)
    assert torch.equal(DiffusionObjective(scheduler).loss_weights(timesteps), torch.ones(6))


# ---------------------------------------------------------------------------------------------
# The draws: a function of (seed, epoch, sample) alone


def test_noise_variant_draws_depend_on_seed_epoch_and_sample_alone_and_leave_the_other_draws_as_they_were(
        cached_dataset):
    from cachetrain.train.loader import CachedPairDataset, NoisePlan
    from cachetrain.train.noise_variants import NoiseVariants
    from cachetrain.tree import index_training_pairs

    index, _ = index_training_pairs([cached_dataset], ".img_sdvae", ".txt_clipl")
    plain = CachedPairDataset(index, NoisePlan(seed=3))
    varied = CachedPairDataset(index, NoisePlan(seed=3, variants=NoiseVariants(4, 0.3, 0.1)))
    again = CachedPairDataset(index, NoisePlan(seed=3, variants=NoiseVariants(4, 0.3, 0.1)))
    perturbed_only = CachedPairDataset(index, NoisePlan(seed=3, variants=NoiseVariants(0, 0.3, 0.1)))
    for epoch, sample in ((0, 0), (0, 5), (2, 5)):
        first, second = varied[epoch, sample], again[epoch, sample]
        base = plain[epoch, sample]
        assert torch.equal(first[2], second[2]) and torch.equal(first[5], second[5])  # same key, same draws
        assert torch.equal(first[3], base[3])  # the timestep draw is untouched
        assert not torch.allclose(first[2], base[2])  # pyramid noise is not the plain noise
        only = perturbed_only[epoch, sample]
        assert torch.equal(only[2], base[2]) and torch.equal(only[5], first[5])  # perturbation alone: noise kept
        assert abs(float(only[5].std()) - 0.1) < 0.03
    assert not torch.equal(varied[0, 5][5], varied[2, 5][5])  # another epoch, another draw
    assert not torch.equal(varied[0, 5][2], varied[0, 6][2])  # another sample, another draw
    assert base[5] is None  # no variant, no perturbation


# ---------------------------------------------------------------------------------------------
# Through the trainer


VARIANTS = ("--multires_noise_iterations", "6", "--multires_noise_discount", "0.3", "--ip_noise_gamma", "0.1",
            "--debiased_estimation_loss")


@pytest.mark.slow
def test_noise_variants_change_what_trains_and_a_stopped_run_resumes_to_the_same_weights(
        tiny_sd_model, cached_dataset, tmp_path):
    common = ("--batch_size", "4", "--gradient_accum", "2", "--max_steps", "8", "--log_every", "1", *VARIANTS)
    straight = train(parse_train_args(train_args(tiny_sd_model, cached_dataset, tmp_path / "straight", *common)))
    stopped = train(parse_train_args(train_args(tiny_sd_model, cached_dataset, tmp_path / "resumed", *common)),
                    interrupt_after_batches=7)
    assert stopped.interrupted and stopped.steps == 4
    resumed = train(parse_train_args(train_args(tiny_sd_model, cached_dataset, tmp_path / "resumed", *common,
                                                "--resume")))
    assert resumed.steps == 8
    assert logged(stopped, "train/loss") + logged(resumed, "train/loss") == logged(straight, "train/loss")
    a, b = unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "resumed")
    assert all(torch.equal(a[name], b[name]) for name in a)
    # debiased estimation weighs the optimised loss, not the logged raw one
    assert all(abs(w - r) > 1e-6 for (_, w), (_, r) in zip(logged(straight, "train/loss"),
                                                            logged(straight, "train/loss_raw")))


@pytest.mark.parametrize("variant", [("--multires_noise_iterations", "6"), ("--ip_noise_gamma", "0.1"),
                                     ("--debiased_estimation_loss",)], ids=lambda flags: flags[0])
def test_each_noise_variant_changes_the_trained_weights(tiny_sd_model, cached_dataset, tmp_path, variant):
    from cachetrain.commands import train_from_cached

    common = ("--batch_size", "4", "--max_steps", "2")
    assert train_from_cached(train_args(tiny_sd_model, cached_dataset, tmp_path / "plain", *common)) == 0
    assert train_from_cached(train_args(tiny_sd_model, cached_dataset, tmp_path / "varied", *common, *variant)) == 0
    a, b = unet_weights(tmp_path / "plain"), unet_weights(tmp_path / "varied")
    assert any(not torch.equal(a[name], b[name]) for name in a)


def test_bad_variant_values_and_debiased_estimation_with_flow_matching_are_refused(tiny_sd_model, cached_dataset,
                                                                                   tmp_path, capsys):
    from cachetrain.commands import train_from_cached

    with pytest.raises(ConfigError, match="--multires_noise_discount must be in"):
        parse_train_args(train_args(tiny_sd_model, cached_dataset, tmp_path / "r", "--multires_noise_discount", "0"))
    with pytest.raises(ConfigError, match="--ip_noise_gamma must be >= 0"):
        parse_train_args(train_args(tiny_sd_model, cached_dataset, tmp_path / "r", "--ip_noise_gamma", "-1"))
    status = train_from_cached(train_args(tiny_sd_model, cached_dataset, tmp_path / "flow", "--objective", "flow",
                                          "--debiased_estimation_loss", "--max_steps", "1"))
    assert status == 2
    assert "--debiased_estimation_loss weights DDPM timesteps" in capsys.readouterr().err
