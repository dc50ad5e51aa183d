"""Noise variants drawn per sample in the loader's worker: multi-resolution (pyramid) noise and input
perturbation. (The debiased-estimation loss weight is the objective's: objective.debiased_weights.)

Each draws from a generator of its own, seeded from the sample's key (``objective.sample_key``
of (seed, epoch, draw)), after and apart from the sample's noise, timestep and dropout draws: they are
functions of (seed, epoch, sample) alone, so a resumed run draws them again exactly, and switching a
variant on leaves every other draw as it was.

- Pyramid noise (``--multires_noise_iterations N``, ``--multires_noise_discount d``): to the sample's
  Gaussian noise add, for levels i = 0 .. N-1, d^i times a Gaussian field of size
  max(1, floor(H / r_i^i)) x max(1, floor(W / r_i^i)) bilinearly upsampled to H x W, r_i uniform in
  [2, 4); stop after the first level one pixel high or wide; then scale the sum to unit standard
  deviation (per sample, so it does not depend on the batch). Coarse levels carry low-frequency noise
  that plain Gaussian noise, white at every scale, barely has.
- Input perturbation (``--ip_noise_gamma g``): the UNet's input is noised with noise + g * e (e another
  Gaussian draw) while the target stays the plain noise (epsilon) or is built from it (v, flow).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .objective import sample_key


@dataclass(frozen=True)
class NoiseVariants:
    multires_iterations: int = 0  # 0: plain Gaussian noise
    multires_discount: float = 0.3
    ip_noise_gamma: float = 0.0  # 0: no input perturbation

    @property
    def active(self) -> bool:
        return self.multires_iterations > 0 or self.ip_noise_gamma > 0


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """``noise`` [C, H, W] with ``iterations`` levels of coarser noise added, scaled to unit std."""
    channels, height, width = noise.shape
    total = noise.clone()
    for level in range(iterations):
        ratio = 2.0 + 2.0 * float(torch.rand((), generator=generator))
        size = (max(1, int(height / ratio ** level)), max(1, int(width / ratio ** level)))
        coarse = torch.randn((1, channels, *size), generator=generator)
        total += discount ** level * F.interpolate(coarse, size=(height, width), mode="bilinear",
                                                   align_corners=False)[0]
        if min(size) == 1:
            break
    return total / total.std()


def draw_noise_variants(noise: torch.Tensor, key: int, variants: NoiseVariants) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the sample's noise, its input perturbation g * e or None), drawn from a generator keyed by ``key``."""
    def generator(name: str) -> torch.Generator:  # one per variant: each draws the same with or without the other
        return torch.Generator().manual_seed(sample_key(key, -1, name))

    if variants.multires_iterations:
        noise = pyramid_noise(noise, generator("multires_noise"), variants.multires_iterations,
                              variants.multires_discount)
    perturbation = None
    if variants.ip_noise_gamma:
        perturbation = variants.ip_noise_gamma * torch.randn(noise.shape, generator=generator("ip_noise"))
    return noise, perturbation
