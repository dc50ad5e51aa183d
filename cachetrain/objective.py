"""The diffusion objective: noise, timesteps, prediction target, min-SNR weights, loss.

Everything comes from the model's own DDPM training schedule (its scheduler config): the
cumulative alphas, the number of training timesteps and the prediction type.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class DiffusionObjective:
    def __init__(self, scheduler, snr_gamma: float | None = None, noise_offset: float = 0.0):
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().to(torch.float32)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} (epsilon or v_prediction)")
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset

    def to(self, device: torch.device) -> DiffusionObjective:
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    def draw_noise_and_timesteps(self, latents: torch.Tensor, generator: torch.Generator | None = None):
        """Gaussian noise (plus offset noise if set) and uniform timesteps, drawn on the latents' device."""
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype, generator=generator)
        if self.noise_offset:
            offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device,
                                 dtype=latents.dtype, generator=generator)
            noise = noise + self.noise_offset * offset
        timesteps = torch.randint(0, self.num_train_timesteps, (latents.shape[0],), device=latents.device,
                                  generator=generator)
        return noise, timesteps

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
