"""What the training tests share: the loss of a saved UNet on a fixed batch."""

from __future__ import annotations

from pathlib import Path

import torch


def fixed_batch_loss(unet_folder: Path, model: Path, data: Path, image_suffix: str, text_suffix: str,
                     expect_padding: bool = False) -> float:
    """Loss of a UNet on the first 8 pairs with fixed noise and timesteps (the same for every UNet),
    conditioned as the trainer conditions it (embeddings padded by the collate, mask passed on)."""
    from diffusers import UNet2DConditionModel

    from cachetrain.loader import CachedPairDataset, collate_pairs
    from cachetrain.models import load_training_scheduler, read_vae_scaling_factor
    from cachetrain.objective import DiffusionObjective
    from cachetrain.tree import index_training_pairs

    index, _ = index_training_pairs([data], image_suffix, text_suffix)
    batch = collate_pairs([CachedPairDataset(index)[i] for i in range(8)])
    assert (batch.attention_mask is not None) == expect_padding
    unet = UNet2DConditionModel.from_pretrained(unet_folder, subfolder="unet").eval()
    objective = DiffusionObjective(load_training_scheduler(str(model)))
    latents = batch.latents.float() * read_vae_scaling_factor(str(model))
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
    with torch.no_grad():
        prediction = unet(objective.add_noise(latents, noise, timesteps), timesteps, batch.embeddings.float(),
                          encoder_attention_mask=batch.attention_mask).sample
    loss, _ = objective.losses(prediction, objective.target(latents, noise, timesteps), timesteps)
    return loss.item()
