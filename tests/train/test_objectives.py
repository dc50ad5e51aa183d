"""The objectives: DDPM (epsilon, v, zero terminal SNR, min-SNR weights) and flow matching, each against
formulas written out here; loss types; timestep ranges; per-sample noise from (seed, epoch, sample) and
offset noise; which scheduler configs train as what; and short runs that learn.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
import torch

from cachetrain.train.config import parse_train_args
from cachetrain.train.trainer import train
from tests.training_support import flow_model_folder
from tests.training_support import logged as _logged
from tests.training_support import train_args as _args
from tests.script_runs import run_script
from tests.training_support import train_caption_probe


@pytest.fixture(scope="module")
def tiny_flow_model(tiny_sd_model, tmp_path_factory) -> Path:
    return flow_model_folder(tiny_sd_model, tmp_path_factory.mktemp("flow") / "model")


def _run(*args: str) -> subprocess.CompletedProcess:
    return run_script("train_from_cached.py", *args)


def _scheduler_config(folder: Path) -> dict:
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())


def _batch(seed: int = 0, size: int = 6):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(size, 4, 8, 8, generator=generator)
    noise = torch.randn(size, 4, 8, 8, generator=generator)
    prediction = torch.randn(size, 4, 8, 8, generator=generator)
    return latents.double(), noise.double(), prediction.double()


# ---------------------------------------------------------------------------------------------
# DDPM


def _sd15_alphas_cumprod(zero_terminal_snr: bool) -> torch.Tensor:
    """SD1.5's scaled-linear schedule; zero terminal SNR per Lin et al. 2023, Algorithm 1."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    if zero_terminal_snr:
        root = alpha_bar.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * first / (first - last)
        alpha_bar = root ** 2
    return alpha_bar


@pytest.mark.parametrize("prediction_type, zero_terminal_snr", [("epsilon", False), ("v_prediction", False),
                                                                ("v_prediction", True)])
def test_ddpm_inputs_target_and_weights_from_draws_equal_the_formulas(tiny_sd_model, prediction_type,
                                                                      zero_terminal_snr):
    from cachetrain.models.loading import load_training_scheduler
    from cachetrain.train.objective import DiffusionObjective

    scheduler = load_training_scheduler(str(tiny_sd_model), prediction_type, zero_terminal_snr)
    objective = DiffusionObjective(scheduler, snr_gamma=5.0, min_timestep=100, max_timestep=899)
    latents, noise, prediction = _batch()
    draws = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.9, 0.999999])
    inputs = objective.training_inputs(latents.float(), noise.float(), draws)

    timesteps = torch.tensor([100 + math.floor(u * 800) for u in draws.tolist()])  # uniform over 100..899
    alpha_bar = _sd15_alphas_cumprod(zero_terminal_snr)[timesteps]
    a, s = alpha_bar.sqrt().view(-1, 1, 1, 1), (1 - alpha_bar).sqrt().view(-1, 1, 1, 1)
    target = noise if prediction_type == "epsilon" else a * noise - s * latents
    snr = alpha_bar / (1 - alpha_bar)
    weights = torch.clamp(snr, max=5.0) / (snr if prediction_type == "epsilon" else snr + 1)

    assert torch.equal(inputs.timesteps, timesteps)
    torch.testing.assert_close(inputs.noisy.double(), a * latents + s * noise, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inputs.target.double(), target, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inputs.weights.double(), weights, rtol=1e-4, atol=1e-7)
    loss, raw = objective.losses_for(prediction.float(), inputs)
    per_sample = (prediction - target).square().mean(dim=(1, 2, 3))
    assert loss.item() == pytest.approx((per_sample * weights).mean().item(), rel=1e-4)
    assert raw.item() == pytest.approx(per_sample.mean().item(), rel=1e-4)


def test_zero_terminal_snr_makes_the_last_timestep_pure_noise(tiny_sd_model):
    from cachetrain.models.loading import load_training_scheduler

    rescaled = load_training_scheduler(str(tiny_sd_model), "v_prediction", zero_terminal_snr=True)
    assert rescaled.alphas_cumprod[-1].item() == 0.0
    assert load_training_scheduler(str(tiny_sd_model)).alphas_cumprod[-1].item() > 0.004


@pytest.mark.parametrize("loss_type", ["l1", "huber"])
def test_l1_and_pseudo_huber_losses_equal_their_formulas(tiny_sd_model, loss_type):
    from cachetrain.models.loading import load_training_scheduler
    from cachetrain.train.objective import DiffusionObjective

    objective = DiffusionObjective(load_training_scheduler(str(tiny_sd_model)), loss_type=loss_type, huber_c=0.3)
    latents, noise, prediction = _batch(1)
    inputs = objective.training_inputs(latents.float(), noise.float(), torch.linspace(0, 0.99, 6))
    error = prediction - noise
    if loss_type == "l1":
        expected = error.abs().mean(dim=(1, 2, 3))
    else:
        expected = (2 * 0.3 * ((error ** 2 + 0.09).sqrt() - 0.3)).mean(dim=(1, 2, 3))
    loss, raw = objective.losses_for(prediction.float(), inputs)
    assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-5)
    assert raw.item() == pytest.approx(expected.mean().item(), rel=1e-5)


def test_the_validation_draws_spread_timesteps_evenly_as_before(tiny_sd_model):
    from cachetrain.models.loading import load_training_scheduler
    from cachetrain.train.objective import DiffusionObjective, evenly_spread_draws

    objective = DiffusionObjective(load_training_scheduler(str(tiny_sd_model)))
    draws = torch.stack([evenly_spread_draws(i, 12) for i in range(12)])
    assert objective.timesteps_from_draws(draws).tolist() == [int((i + 0.5) * 1000 / 12) for i in range(12)]


# ---------------------------------------------------------------------------------------------
# Flow matching


def test_flow_inputs_target_timesteps_and_weights_equal_the_formulas():
    from cachetrain.train.objective import FlowMatchingObjective

    objective = FlowMatchingObjective(1000, snr_gamma=5.0, min_sigma=0.01)
    latents, noise, prediction = _batch(2)
    draws = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.8, 0.999])
    inputs = objective.training_inputs(latents.float(), noise.float(), draws)

    sigma = 0.01 + draws.double() * 0.98  # uniform over [min_sigma, 1 - min_sigma]
    s = sigma.view(-1, 1, 1, 1)
    snr = ((1 - sigma) / sigma) ** 2
    weights = torch.clamp(snr, max=5.0) * sigma ** 2
    torch.testing.assert_close(inputs.timesteps.double(), sigma * 999, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(inputs.noisy.double(), (1 - s) * latents + s * noise, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inputs.target.double(), noise - latents, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(inputs.weights.double(), weights, rtol=1e-4, atol=1e-7)
    loss, _ = objective.losses_for(prediction.float(), inputs)
    per_sample = (prediction - (noise - latents)).square().mean(dim=(1, 2, 3))
    assert loss.item() == pytest.approx((per_sample * weights).mean().item(), rel=1e-4)


def test_flow_logit_normal_shift_and_timestep_range_follow_their_distributions():
    from cachetrain.train.objective import FlowMatchingObjective

    draws = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000  # quantiles of the uniform
    normal = statistics.NormalDist(mu=0.5, sigma=0.8)
    logit_normal = FlowMatchingObjective(1000, timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8,
                                         min_sigma=0.0)
    expected = torch.tensor([1 / (1 + math.exp(-normal.inv_cdf(u))) for u in draws[::1000].tolist()])
    torch.testing.assert_close(logit_normal.sigmas_from_draws(draws[::1000]).double(), expected.double(),
                               rtol=1e-4, atol=1e-5)

    shifted = FlowMatchingObjective(1000, shift=3.0, min_sigma=0.0).sigmas_from_draws(draws[::1000]).double()
    torch.testing.assert_close(shifted, 3 * draws[::1000] / (1 + 2 * draws[::1000]), rtol=1e-5, atol=1e-6)

    # a timestep range truncates the distribution: every sigma inside, none piled up at the edges
    ranged = FlowMatchingObjective(1000, timestep_sampling="logit_normal", min_timestep=200, max_timestep=600)
    sigmas = ranged.sigmas_from_draws(draws.float()).double()
    assert sigmas.min() >= 200 / 999 - 1e-6 and sigmas.max() <= 600 / 999 + 1e-6
    assert (sigmas <= 200 / 999 + 1e-4).float().mean() < 0.001 and (sigmas >= 600 / 999 - 1e-4).float().mean() < 0.001
    low, high = (statistics.NormalDist().cdf(math.log(x / (1 - x))) for x in (200 / 999, 600 / 999))
    median = 1 / (1 + math.exp(-statistics.NormalDist().inv_cdf((low + high) / 2)))  # of the truncated law
    assert sigmas.median().item() == pytest.approx(median, abs=2e-3)


def test_a_flow_model_trains_flow_matching_and_its_checkpoints_sample_with_a_flow_scheduler(
        tiny_flow_model, cached_dataset, tmp_path):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    from cachetrain.models.loading import load_training_scheduler
    from cachetrain.train.objective import FlowMatchingObjective
    from cachetrain.train.objective import objective_for

    assert isinstance(load_training_scheduler(str(tiny_flow_model)), FlowMatchEulerDiscreteScheduler)
    args = _args(tiny_flow_model, cached_dataset, tmp_path / "run", "--batch_size", "8", "--max_steps", "2",
                 "--sample_prompt", "a red circle", "--sampler_steps", "2")
    assert isinstance(objective_for(load_training_scheduler(str(tiny_flow_model)), parse_train_args(args)),
                      FlowMatchingObjective)
    result = train(parse_train_args(args))
    final = tmp_path / "run" / "checkpoint-00002"
    assert result.steps == 2 and list(final.glob("*.png"))
    assert _scheduler_config(final)["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert isinstance(DiffusionPipeline.from_pretrained(final).scheduler, FlowMatchEulerDiscreteScheduler)


def test_objective_flow_on_a_ddpm_model_saves_a_flow_scheduler_with_its_shift(tiny_sd_model, cached_dataset,
                                                                              tmp_path):
    train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--batch_size", "8",
                                 "--max_steps", "1", "--objective", "flow", "--flow_shift", "3",
                                 "--timestep_sampling", "logit_normal")))
    config = _scheduler_config(tmp_path / "run" / "checkpoint-00001")
    assert config["_class_name"] == "FlowMatchEulerDiscreteScheduler" and config["shift"] == 3.0


def test_zero_terminal_snr_is_saved_in_the_checkpoints_scheduler_and_lowers_the_loss(tiny_sd_model, cached_dataset,
                                                                                   tmp_path):
    result = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--batch_size", "8",
                                          "--max_steps", "12", "--zero_terminal_snr", "--prediction_type",
                                          "v_prediction", "--validation_split", "0.25", "--validation_steps", "12",
                                          "--use_snr", "--loss_type", "huber")))
    config = _scheduler_config(tmp_path / "run" / "checkpoint-00012")
    # PNDM (the tiny model's, as SD1.5's) has no zero-SNR option, so the samples' scheduler becomes DDIM
    assert config["_class_name"] == "DDIMScheduler"
    assert config["rescale_betas_zero_snr"] is True and config["timestep_spacing"] == "trailing"
    assert config["prediction_type"] == "v_prediction"
    # as SD's own DDIM configs: DDIM's defaults would clip the predicted latents to [-1, 1] (pixel-space
    # models' setting), which spoils the colours of every sample
    assert config["clip_sample"] is False and config["set_alpha_to_one"] is False
    values = [value for _, value in _logged(result, "val/loss")]
    assert values[-1] < values[0]


# ---------------------------------------------------------------------------------------------
# Refusals, through the script


def test_zero_terminal_snr_with_an_epsilon_model_is_refused_naming_the_flag(tiny_sd_model, cached_dataset, tmp_path):
    done = _run(*_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--zero_terminal_snr"))
    assert done.returncode == 2
    assert "needs v-prediction" in done.stderr and "--prediction_type v_prediction" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_scheduler_we_cannot_train_is_refused_by_name(tiny_sd_model, cached_dataset, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_sd_model, model)
    config = _scheduler_config(model)
    config["_class_name"] = "ScoreSdeVeScheduler"
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    done = _run(*_args(model, cached_dataset, tmp_path / "run", "--max_steps", "1"))
    assert done.returncode == 2
    assert "ScoreSdeVeScheduler, which this trainer cannot train" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("flags, message", [
    (["--objective", "ddpm", "--timestep_sampling", "logit_normal"], "flow-matching options"),
    (["--objective", "flow", "--zero_terminal_snr"], "DDPM options"),
    (["--zero_terminal_snr", "--prediction_type", "epsilon"], "needs v-prediction"),
    (["--min_timestep", "500", "--max_timestep", "100"], "--min_timestep/--max_timestep"),
    (["--huber_c", "0"], "--huber_c must be > 0"),
])
def test_contradicting_objective_flags_fail_at_start(flags, message, tmp_path):
    done = _run("--pretrained_model", str(tmp_path / "none"), "--train_data_dir", str(tmp_path), *flags)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_objective_ddpm_on_a_flow_model_is_refused(tiny_flow_model, cached_dataset, tmp_path):
    done = _run(*_args(tiny_flow_model, cached_dataset, tmp_path / "run", "--objective", "ddpm"))
    assert done.returncode == 2 and "FlowMatchEulerDiscreteScheduler, a flow-matching schedule" in done.stderr


# ---------------------------------------------------------------------------------------------
# Learning


@pytest.mark.slow
def test_a_short_flow_run_learns_to_use_its_text(tiny_flow_model, tmp_path):
    """On held-out pairs, at fixed noise and sigmas, the true caption beats another caption."""
    probe = train_caption_probe(tiny_flow_model, tmp_path, lambda data, output: _args(
        tiny_flow_model, data, output, "--batch_size", "8", "--max_steps", "300", "--validation_split", "0.25",
        "--learning_rate", "2e-3", "--log_every", "50"))
    losses = [value for _, value in _logged(probe.result, "train/loss")]
    assert losses[-1] < 0.8 * losses[0]
    sigmas = torch.linspace(0.3, 0.7, len(probe.latents))
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * probe.latents + s * probe.noise
    velocity = probe.noise - probe.latents

    def per_sample_loss(embeddings):
        with torch.no_grad():
            return (probe.unet(noisy, sigmas * 999, embeddings).sample - velocity).square().mean(dim=(1, 2, 3))

    true_loss, other_loss, wins = probe.true_caption_wins(per_sample_loss)
    assert true_loss < 0.99 * other_loss
    assert wins >= 0.75


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_and_min_snr_weights_equal_a_direct_computation(tiny_sd_model, prediction_type):
    from diffusers import DDPMScheduler

    from cachetrain.train.objective import DiffusionObjective

    scheduler = DDPMScheduler.from_pretrained(tiny_sd_model, subfolder="scheduler", prediction_type=prediction_type)
    objective = DiffusionObjective(scheduler, snr_gamma=5.0)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(6, 4, 8, 8, generator=generator), torch.randn(6, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 10, 200, 500, 800, 999])
    prediction = torch.randn(6, 4, 8, 8, generator=generator)

    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    a, s = alpha_bar.sqrt().view(-1, 1, 1, 1), (1 - alpha_bar).sqrt().view(-1, 1, 1, 1)
    noisy = a * latents.double() + s * noise.double()
    target = noise.double() if prediction_type == "epsilon" else a * noise.double() - s * latents.double()
    snr = alpha_bar / (1 - alpha_bar)
    weights = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64))
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    per_sample = (prediction.double() - target).square().mean(dim=(1, 2, 3))

    torch.testing.assert_close(objective.add_noise(latents, noise, timesteps).double(), noisy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(objective.target(latents, noise, timesteps).double(), target, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(objective.loss_weights(timesteps).double(), weights, rtol=1e-5, atol=1e-7)
    loss, raw = objective.losses(prediction, objective.target(latents, noise, timesteps), timesteps)
    assert loss.item() == pytest.approx((per_sample * weights).mean().item(), rel=1e-5)
    assert raw.item() == pytest.approx(per_sample.mean().item(), rel=1e-5)


def test_noise_is_a_function_of_seed_epoch_and_sample_only():
    from cachetrain.train.objective import draw_sample_noise, sample_key

    first = draw_sample_noise((4, 2, 2), 0.0, sample_key(3, 1, 17))
    again = draw_sample_noise((4, 2, 2), 0.0, sample_key(3, 1, 17))
    other_epoch = draw_sample_noise((4, 2, 2), 0.0, sample_key(3, 2, 17))
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert not torch.equal(first[0], other_epoch[0])


def test_offset_noise_adds_one_shared_value_per_channel():
    from cachetrain.train.objective import draw_sample_noise, sample_key

    key = sample_key(0, 0, 5)
    plain, _, _ = draw_sample_noise((4, 8, 8), 0.0, key)
    offset, _, _ = draw_sample_noise((4, 8, 8), 0.1, key)
    shift = offset - plain  # the same key draws the same base noise; the offset comes on top
    assert torch.allclose(shift, shift[:, :1, :1].expand_as(shift))  # constant over each channel
    assert 0 < shift.abs().max() < 1
