"""The diffusion objectives: noise, timesteps, prediction target, per-sample weights, loss.

Two objectives share one interface (``training_inputs`` then ``losses_for``):

- ``DiffusionObjective``: DDPM, from the model's own training schedule (its scheduler config): the
  cumulative alphas, the number of training timesteps and the prediction type (epsilon or v).
- ``FlowMatchingObjective``: rectified flow, x_t = (1 - s) x0 + s noise, target noise - x0.

The worker draws each sample's noise and one uniform number u in [0, 1) from (seed, epoch, sample)
(``draw_sample_noise``); the objective maps u to a timestep or sigma on the device, so every
objective resumes exactly and the draws do not depend on which objective trains.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from ..models.schedulers import is_flow_config, is_flow_scheduler  # noqa: F401  (part of this module's API)
from .config import LOSS_TYPES, TIMESTEP_SAMPLINGS

DEBIASED_SNR_CAP = 1000.0


def sample_key(seed: int, epoch: int, sample: int) -> int:
    """A 63-bit RNG seed for one sample's draws in one epoch.

    Noise, timestep and caption dropout are functions of (seed, epoch, sample) alone, so they do not
    depend on batch size, accumulation, process count, worker scheduling or where a run resumed.
    """
    digest = hashlib.blake2b(f"{seed}/{epoch}/{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def draw_sample_noise(shape: tuple[int, ...], noise_offset: float, key: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(noise, timestep draw, dropout draw) for one sample, drawn on the CPU from ``key``.

    The timestep draw is a 0-dim float32 uniform in [0, 1): the objective turns it into a DDPM
    timestep or a flow sigma. The dropout draw, a uniform float in [0, 1), decides caption
    dropout. Offset noise adds one shared value per channel, scaled by ``noise_offset``.
    """
    generator = torch.Generator().manual_seed(key)
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        noise += noise_offset * torch.randn((shape[0],) + (1,) * (len(shape) - 1), generator=generator)
    timestep_draw = torch.rand((), generator=generator)
    uniform = torch.rand((), generator=generator).item()
    return noise, timestep_draw, uniform


def debiased_weights(snr: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """[B] debiased-estimation weights (--debiased_estimation_loss) of samples whose timesteps have
    signal-to-noise ratio ``snr``: 1 / sqrt(SNR) for epsilon, 1 / sqrt(SNR + 1) for v-prediction, SNR
    capped at 1000 so the first timesteps (SNR in the thousands) are not weighted to nothing."""
    capped = snr.clamp(max=DEBIASED_SNR_CAP)
    return 1.0 / torch.sqrt(capped + 1.0 if v_prediction else capped)


def evenly_spread_draws(position: int, count: int) -> torch.Tensor:
    """The timestep draw of held-out sample ``position`` of ``count``: spread evenly over [0, 1)."""
    return torch.tensor((position + 0.5) / count, dtype=torch.float32)


@dataclass
class TrainingInputs:
    noisy: torch.Tensor  # what the UNet sees
    timesteps: torch.Tensor  # [B] what the UNet is told the timestep is
    target: torch.Tensor  # what it should predict
    weights: torch.Tensor  # [B] per-sample loss weights (min-SNR, debiased estimation; ones without them)


def masked_loss_weights(masks: torch.Tensor, unmasked_weight: float = 0.0, normalize: bool = False) -> torch.Tensor:
    """[B, 1, h, w] weights of each latent cell from masks in [0, 1]: w + (1 - w) m, ``w`` the unmasked weight.

    ``normalize`` divides each sample's weights by their mean, so the weighted mean over its cells is the
    mean over its masked area alone: a small mask then trains as strongly as a whole image. A sample
    whose weights are all zero stays zero (it teaches nothing)."""
    weights = unmasked_weight + (1.0 - unmasked_weight) * masks.float()
    if normalize:
        weights = weights / weights.mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return weights


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "mse",
                    huber_c: float = 0.1, cell_weights: torch.Tensor | None = None) -> torch.Tensor:
    """[B] mean over each sample's elements of the chosen loss (each element times its cell's weight, when
    ``cell_weights`` [B, 1, h, w] is given: masked_loss_weights).

    huber is the pseudo-Huber loss 2c (sqrt(e^2 + c^2) - c): e^2 for small errors, like MSE, and
    2c|e| for large ones, so outliers pull less.
    """
    error = prediction.float() - target.float()
    if loss_type == "mse":
        elementwise = error.square()
    elif loss_type == "l1":
        elementwise = error.abs()
    elif loss_type == "huber":
        elementwise = 2 * huber_c * (torch.sqrt(error.square() + huber_c ** 2) - huber_c)
    else:
        raise ValueError(f"unknown loss type {loss_type!r} ({'|'.join(LOSS_TYPES)})")
    if cell_weights is not None:
        elementwise = elementwise * cell_weights
    return elementwise.flatten(1).mean(dim=1)


class _Objective:
    """What every objective shares: the loss and its reduction."""

    num_train_timesteps: int
    loss_type: str = "mse"
    huber_c: float = 0.1

    def training_inputs(self, latents: torch.Tensor, noise: torch.Tensor, draws: torch.Tensor,
                        perturbation: torch.Tensor | None = None) -> TrainingInputs:
        """``perturbation`` (--ip_noise_gamma's g * e) is added to the noise the input is made with, not
        to the noise the target is made of."""
        raise NotImplementedError

    def losses_for(self, prediction: torch.Tensor, inputs: TrainingInputs,
                   cell_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted loss to optimise, loss without the per-sample weights for logging), both scalars;
        ``cell_weights`` (--masked_loss) weigh both."""
        per_sample = per_sample_loss(prediction, inputs.target, self.loss_type, self.huber_c, cell_weights)
        return (per_sample * inputs.weights).mean(), per_sample.mean()

    def to(self, device: torch.device):
        return self


def _timestep_range(num_train_timesteps: int, min_timestep: int, max_timestep: int | None) -> tuple[int, int]:
    last = num_train_timesteps - 1
    high = last if max_timestep is None else max_timestep
    if not 0 <= min_timestep <= high <= last:
        raise ValueError(f"--min_timestep {min_timestep} / --max_timestep {high}: need "
                         f"0 <= min <= max <= {last} (this model trains {num_train_timesteps} timesteps)")
    return min_timestep, high


class DiffusionObjective(_Objective):
    """DDPM: x_t = sqrt(a) x0 + sqrt(1 - a) noise, a the cumulative alpha of timestep t."""

    def __init__(self, scheduler, snr_gamma: float | None = None, loss_type: str = "mse", huber_c: float = 0.1,
                 min_timestep: int = 0, max_timestep: int | None = None, debiased_estimation: bool = False):
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().to(torch.float32)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} (epsilon or v_prediction)")
        if self.prediction_type == "epsilon" and float(self.alphas_cumprod[-1]) == 0.0:
            raise ValueError("a zero-terminal-SNR schedule needs v-prediction: at the last step the input is pure "
                             "noise, so an epsilon target teaches nothing; add --prediction_type v_prediction")
        self.snr_gamma = snr_gamma
        self.debiased_estimation = debiased_estimation
        self.loss_type, self.huber_c = loss_type, huber_c
        self.min_timestep, self.max_timestep = _timestep_range(self.num_train_timesteps, min_timestep, max_timestep)

    def to(self, device: torch.device) -> DiffusionObjective:
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    def timesteps_from_draws(self, draws: torch.Tensor) -> torch.Tensor:
        """Uniform draws in [0, 1) -> integer timesteps, uniform over [min_timestep, max_timestep]."""
        span = self.max_timestep - self.min_timestep + 1
        return (self.min_timestep + (draws.double() * span).long()).clamp(max=self.max_timestep)  # exact floor

    def _coefficients(self, timesteps: torch.Tensor, ndim: int):
        alpha_bar = self.alphas_cumprod[timesteps].view(-1, *([1] * (ndim - 1)))
        return alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        signal, sigma = self._coefficients(timesteps, latents.ndim)
        return signal * latents + sigma * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        signal, sigma = self._coefficients(timesteps, latents.ndim)
        return signal * noise - sigma * latents  # velocity

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.alphas_cumprod[timesteps]
        return alpha_bar / (1.0 - alpha_bar)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """min-SNR-gamma weights: min(snr, g)/snr for epsilon, min(snr, g)/(snr + 1) for v; ones without gamma;
        times the debiased-estimation weights when asked for (debiased_weights)."""
        weights = torch.ones(timesteps.shape, device=timesteps.device)
        if self.snr_gamma is None and not self.debiased_estimation:
            return weights
        snr = self.snr(timesteps)
        if self.snr_gamma is not None:
            clipped = torch.clamp(snr, max=self.snr_gamma)
            weights = clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1.0)
        if self.debiased_estimation:
            weights = weights * debiased_weights(snr, self.prediction_type == "v_prediction")
        return weights

    def training_inputs(self, latents, noise, draws, perturbation=None) -> TrainingInputs:
        timesteps = self.timesteps_from_draws(draws)
        input_noise = noise if perturbation is None else noise + perturbation
        return TrainingInputs(self.add_noise(latents, input_noise, timesteps), timesteps,
                              self.target(latents, noise, timesteps), self.loss_weights(timesteps))

    def losses(self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor):
        """(weighted loss, unweighted loss) at given integer timesteps, both scalars."""
        per_sample = per_sample_loss(prediction, target, self.loss_type, self.huber_c)
        return (per_sample * self.loss_weights(timesteps)).mean(), per_sample.mean()


class FlowMatchingObjective(_Objective):
    """Rectified flow: x_s = (1 - s) x0 + s noise, target noise - x0, UNet timestep s (T - 1).

    s is drawn uniform or logit-normal, moved by the shift s' = k s / (1 + (k - 1) s), and kept in
    [min_sigma, 1 - min_sigma] and in the --min_timestep/--max_timestep range (as s (T - 1)). The
    range truncates the distribution (the draw is mapped through its inverse CDF), it does not pile
    probability up at the edges.

    min-SNR: the signal-to-noise ratio of x_s is ((1 - s) / s)^2. The velocity error is the x0 error
    divided by s, so min-SNR-gamma of the x0 error, min(SNR, gamma) |x0 error|^2, weighs the
    velocity loss by min(SNR, gamma) s^2.
    """

    def __init__(self, num_train_timesteps: int = 1000, snr_gamma: float | None = None, loss_type: str = "mse",
                 huber_c: float = 0.1, min_timestep: int = 0, max_timestep: int | None = None,
                 min_sigma: float = 1e-5, timestep_sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0, shift: float = 1.0):
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"unknown --timestep_sampling {timestep_sampling!r} ({'|'.join(TIMESTEP_SAMPLINGS)})")
        if not 0 <= min_sigma < 0.5:
            raise ValueError(f"--min_sigma {min_sigma}: must be in [0, 0.5)")
        if shift <= 0 or logit_std <= 0:
            raise ValueError("--flow_shift and --logit_std must be > 0")
        self.num_train_timesteps = int(num_train_timesteps)
        self.snr_gamma = snr_gamma
        self.loss_type, self.huber_c = loss_type, huber_c
        self.timestep_sampling, self.logit_mean, self.logit_std, self.shift = (timestep_sampling, logit_mean,
                                                                               logit_std, shift)
        low, high = _timestep_range(self.num_train_timesteps, min_timestep, max_timestep)
        last = self.num_train_timesteps - 1
        self.min_s, self.max_s = max(min_sigma, low / last), min(1.0 - min_sigma, high / last)
        if self.min_s > self.max_s:
            raise ValueError(f"--min_timestep/--max_timestep leave no sigma in [{min_sigma}, {1 - min_sigma}]")

    def _base_cdf(self, s: float) -> float:
        """CDF of the unshifted draw at s."""
        if self.timestep_sampling == "uniform":
            return s
        if s <= 0.0 or s >= 1.0:
            return 0.0 if s <= 0.0 else 1.0
        z = (math.log(s / (1.0 - s)) - self.logit_mean) / self.logit_std
        return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))

    def _unshift(self, s: float) -> float:
        return s / (self.shift - (self.shift - 1.0) * s)

    def sigmas_from_draws(self, draws: torch.Tensor) -> torch.Tensor:
        """Uniform draws in [0, 1) -> sigmas of the (shifted, truncated) distribution."""
        low, high = self._base_cdf(self._unshift(self.min_s)), self._base_cdf(self._unshift(self.max_s))
        position = low + draws.float() * (high - low)
        if self.timestep_sampling == "uniform":
            base = position
        else:
            base = torch.sigmoid(self.logit_mean + self.logit_std * torch.special.ndtri(position))
        shifted = self.shift * base / (1.0 + (self.shift - 1.0) * base)
        return shifted.clamp(self.min_s, self.max_s)

    def training_inputs(self, latents, noise, draws, perturbation=None) -> TrainingInputs:
        sigmas = self.sigmas_from_draws(draws)
        s = sigmas.view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1.0 - s) * latents + s * (noise if perturbation is None else noise + perturbation)
        return TrainingInputs(noisy, sigmas * (self.num_train_timesteps - 1), noise - latents,
                              self.loss_weights(sigmas))

    def loss_weights(self, sigmas: torch.Tensor) -> torch.Tensor:
        if self.snr_gamma is None:
            return torch.ones(sigmas.shape, device=sigmas.device)
        snr = ((1.0 - sigmas) / sigmas).square()
        return torch.clamp(snr, max=self.snr_gamma) * sigmas.square()


def objective_kind(scheduler, requested: str | None) -> str:
    """'ddpm' or 'flow': the flag's choice, else what the model's scheduler is."""
    model_kind = "flow" if is_flow_scheduler(scheduler) else "ddpm"
    if requested == "ddpm" and model_kind == "flow":
        raise ValueError(f"--objective ddpm: this model's scheduler is {type(scheduler).__name__}, a flow-matching "
                         "schedule with no DDPM noise levels to train with; use --objective flow (its default)")
    return requested or model_kind


def flow_shift_for(scheduler, flow_shift: float | None) -> float:
    """--flow_shift, else the shift a flow model's scheduler config names, else 1 (no shift)."""
    if flow_shift is not None:
        return flow_shift
    return float(scheduler.config.get("shift", 1.0)) if is_flow_scheduler(scheduler) else 1.0


def sampling_scheduler(scheduler, kind: str, *, prediction_type: str | None = None, zero_terminal_snr: bool = False,
                       flow_shift: float | None = None):
    """The scheduler that undoes the noise training adds: stored in the pipeline that draws samples
    and is saved with every checkpoint. ``scheduler`` is the model's own sampling scheduler.

    Flow runs get FlowMatchEulerDiscreteScheduler (with the run's shift). A DDPM run keeps the
    model's scheduler, with the prediction type it trained and, for zero terminal SNR, rescaled
    betas and trailing timesteps; a scheduler class without that option (PNDM) becomes DDIM.
    """
    import inspect

    import diffusers

    if kind == "flow":
        config = dict(scheduler.config) if is_flow_scheduler(scheduler) else {
            "num_train_timesteps": int(scheduler.config.num_train_timesteps)}
        config["shift"] = flow_shift_for(scheduler, flow_shift)
        # a plain one, as saved; what a pipeline needs to draw with it is flow.drawable's to add
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    overrides = {}
    if prediction_type:
        overrides["prediction_type"] = prediction_type
    if zero_terminal_snr:
        overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if not overrides:
        return scheduler
    scheduler_class = type(scheduler)
    if zero_terminal_snr and "rescale_betas_zero_snr" not in inspect.signature(scheduler_class.__init__).parameters:
        scheduler_class = diffusers.DDIMScheduler
        # what SD's own DDIM configs say; DDIM's defaults (clip the predicted latents to [-1, 1], a final
        # alpha of one) are for pixel-space models and spoil the colours of latent samples
        overrides = {"clip_sample": False, "set_alpha_to_one": False, **overrides}
        overrides = {key: value for key, value in overrides.items()
                     if key not in scheduler.config or key in ("prediction_type", "rescale_betas_zero_snr",
                                                               "timestep_spacing")}
    return scheduler_class.from_config(scheduler.config, **overrides)


def objective_for(scheduler, config) -> DiffusionObjective | FlowMatchingObjective:
    """The objective ``scheduler`` (the model's training schedule) or --objective names, with the run's
    options (``config``: a TrainConfig). Raises ValueError for options of the other kind."""
    kind = objective_kind(scheduler, config.objective)
    if kind == "flow" and config.debiased_estimation_loss:
        raise ValueError("--debiased_estimation_loss weights DDPM timesteps by their SNR; this run trains flow "
                         "matching (--use_snr is its SNR weighting)")
    common = dict(snr_gamma=config.noise_gamma if config.use_snr else None, loss_type=config.loss_type,
                  huber_c=config.huber_c, min_timestep=config.min_timestep, max_timestep=config.max_timestep)
    if kind == "flow":
        return FlowMatchingObjective(int(scheduler.config.num_train_timesteps), min_sigma=config.min_sigma,
                                     timestep_sampling=config.timestep_sampling, logit_mean=config.logit_mean,
                                     logit_std=config.logit_std, shift=flow_shift_for(scheduler, config.flow_shift),
                                     **common)
    if config.timestep_sampling != "uniform" or config.flow_shift is not None:
        raise ValueError("--timestep_sampling/--flow_shift are flow-matching options; this model trains DDPM "
                         "(add --objective flow to train it as a flow model)")
    return DiffusionObjective(scheduler, debiased_estimation=config.debiased_estimation_loss, **common)
