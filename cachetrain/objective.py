"""The diffusion objective: noise, timesteps, prediction target, min-SNR weights, loss.

Everything comes from the model's own DDPM training schedule (its scheduler config): the
cumulative alphas, the number of training timesteps and the prediction type.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F


def sample_key(seed: int, epoch: int, sample: int) -> int:
    """A 63-bit RNG seed for one sample's draws in one epoch.

    Noise, timestep and caption dropout are functions of (seed, epoch, sample) alone, so they do not
    depend on batch size, accumulation, process count, worker scheduling or where a run resumed.
    """
    digest = hashlib.blake2b(f"{seed}/{epoch}/{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def draw_sample_noise(shape: tuple[int, ...], num_train_timesteps: int, noise_offset: float,
                      key: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(noise, timestep, uniform) for one sample, drawn on the CPU from ``key``.

    The uniform number in [0, 1) decides caption dropout. Offset noise adds one shared value per
    channel, scaled by ``noise_offset``.
    """
    generator = torch.Generator().manual_seed(key)
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        noise += noise_offset * torch.randn((shape[0],) + (1,) * (len(shape) - 1), generator=generator)
    timestep = torch.randint(0, num_train_timesteps, (), generator=generator)
    uniform = torch.rand((), generator=generator).item()
    return noise, timestep, uniform


class DiffusionObjective:
    def __init__(self, scheduler, snr_gamma: float | None = None):
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().to(torch.float32)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} (epsilon or v_prediction)")
        self.snr_gamma = snr_gamma

    def to(self, device: torch.device) -> DiffusionObjective:
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

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
        """min-SNR-gamma weights: min(snr, g)/snr for epsilon, min(snr, g)/(snr + 1) for v; ones without gamma."""
        if self.snr_gamma is None:
            return torch.ones(timesteps.shape, device=timesteps.device)
        snr = self.snr(timesteps)
        clipped = torch.clamp(snr, max=self.snr_gamma)
        return clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1.0)

    def losses(self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor):
        """(weighted loss to optimise, raw unweighted MSE for logging), both scalars."""
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
        raw = per_sample.mean()
        weighted = (per_sample * self.loss_weights(timesteps)).mean()
        return weighted, raw
