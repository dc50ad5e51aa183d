"""What the training tests share: the trainer's flags for a quiet tiny run and what it leaves (logged
scalars, saved UNet weights); the loss of a saved UNet on a fixed batch; a probe of whether a run learned
to use its captions."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file


def train_args(model, data, output, *extra) -> list[str]:
    """Flags of a short, quiet, single-worker run of the tiny model (no checkpoints between, no clipping)."""
    return ["--pretrained_model", str(model), "--train_data_dir", str(data), "--output_dir", str(output),
            "--num_workers", "0", "--no_progress", "--learning_rate", "1e-3", "--save_steps", "0",
            "--gradient_clip", "0", *extra]


def unet_weights(folder: Path, component: str = "unet") -> dict[str, torch.Tensor]:
    return load_file(folder / component / "diffusion_pytorch_model.safetensors")


def logged(result, name: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar, as the run logged it."""
    return [(entry["step"], entry[name]) for entry in result.logged if name in entry]


def flow_model_folder(source: Path, destination: Path, shift: float = 1.0) -> Path:
    """The tiny SD model with a FlowMatchEulerDiscreteScheduler config, as a flow model folder has."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    shutil.copytree(source, destination)
    shutil.rmtree(destination / "scheduler")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).save_pretrained(destination / "scheduler")
    index = json.loads((destination / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (destination / "model_index.json").write_text(json.dumps(index))
    return destination


def record_unet_text_inputs(monkeypatch) -> list[torch.Tensor]:
    """A list that fills, while the test trains, with the text conditioning the UNet is given at each
    training call (one [B, T, D] tensor a call, in order; calls in eval mode, as samples make, are not kept)."""
    from diffusers import UNet2DConditionModel

    contexts: list[torch.Tensor] = []
    unet_forward = UNet2DConditionModel.forward

    def recording_forward(unet, sample, timestep, encoder_hidden_states, *args, **kwargs):
        if unet.training:
            contexts.append(encoder_hidden_states.detach().clone())
        return unet_forward(unet, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording_forward)
    return contexts


def fixed_batch_loss(unet_folder: Path, model: Path, data: Path, image_suffix: str, text_suffix: str,
                     expect_padding: bool = False) -> float:
    """Loss of a UNet on the first 8 pairs with fixed noise and timesteps (the same for every UNet),
    conditioned as the trainer conditions it (embeddings padded by the collate, mask passed on)."""
    from diffusers import UNet2DConditionModel

    from cachetrain.train.loader import CachedPairDataset, collate_pairs
    from cachetrain.models.loading import load_training_scheduler, read_vae_scaling_factor
    from cachetrain.train.objective import DiffusionObjective
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


@dataclass
class CaptionProbe:
    """The held-out pairs of a short run on the synthetic shapes, at fixed noise, each with its own
    caption's embedding and another caption's: what a test of "the run learned to use its text" needs."""

    unet: torch.nn.Module
    latents: torch.Tensor  # scaled as training scales them
    noise: torch.Tensor
    true_embeddings: torch.Tensor
    other_embeddings: torch.Tensor
    result: object  # the run's TrainResult

    def true_caption_wins(self, per_sample_loss: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float, float]:
        """(mean loss with the true caption, with another one, share of pairs the true one wins)."""
        true_loss, other_loss = per_sample_loss(self.true_embeddings), per_sample_loss(self.other_embeddings)
        wins = (true_loss < other_loss).float().mean().item()
        print(f"held-out loss: true caption {true_loss.mean():.5f}, another caption {other_loss.mean():.5f}, "
              f"true caption better on {wins:.0%} of {len(true_loss)} pairs")
        return true_loss.mean().item(), other_loss.mean().item(), wins


def train_caption_probe(model: Path, tmp_path: Path, train_args: Callable[[Path, Path], list[str]]) -> CaptionProbe:
    """Cache 96 synthetic pairs with ``model``, train on 3/4 of them (``train_args(data, output)`` gives
    the trainer's flags; they must hold --validation_split 0.25), and probe the quarter held out."""
    from diffusers import UNet2DConditionModel

    from cachetrain.train.config import parse_train_args
    from cachetrain.cache.image_cache import main as image_main
    from cachetrain.train.loader import CachedPairDataset, NoisePlan, collate_pairs
    from cachetrain.models.loading import read_vae_scaling_factor
    from cachetrain.cache.text_cache import main_clip
    from cachetrain.tiny.models import make_shapes_dataset
    from cachetrain.train.trainer import train
    from cachetrain.tree import index_training_pairs
    from cachetrain.train.validation import VALIDATION_EPOCH, split_validation
    from create_img_sdvae import DEFAULTS

    data = tmp_path / "data"
    # the background - most of the image - is named by a word no shape colour uses
    make_shapes_dataset(data, count=96, seed=3, colours=("red", "yellow", "green"), backgrounds=("blue", "black", "white"))
    cache = ["--model", str(model), "--data_root", str(data), "--num_workers", "0", "--no_progress",
             "--save_dtype", "float32"]
    # 32 px: 8x8 latents, a quarter of the UNet work of 64 px; the shapes and their colours still show
    assert image_main(cache + ["--resolution", "32"], DEFAULTS) == 0 and main_clip(cache) == 0
    flags = train_args(data, tmp_path / "run")
    assert "--validation_split" in flags and flags[flags.index("--validation_split") + 1] == "0.25"
    result = train(parse_train_args(flags))

    index, _ = index_training_pairs([data], ".img_sdvae", ".txt_clipl")
    _, held_out = split_validation(index, 0.25, seed=0)  # the pairs the run did not train on
    dataset = CachedPairDataset(held_out, NoisePlan(seed=11))
    dataset.epoch = VALIDATION_EPOCH
    batch = collate_pairs([dataset[i] for i in range(len(dataset))])
    captions = [Path(held_out[i][1]).with_suffix(".txt").read_text() for i in range(len(held_out))]
    other = [next(j for j in range(1, len(captions)) if captions[(i + j) % len(captions)] != captions[i])
             for i in range(len(captions))]
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "run", subfolder="unet").eval()
    return CaptionProbe(unet=unet, latents=batch.latents.float() * read_vae_scaling_factor(str(model)),
                        noise=batch.noise, true_embeddings=batch.embeddings.float(),
                        other_embeddings=batch.embeddings[[(i + j) % len(captions) for i, j in enumerate(other)]].float(),
                        result=result)
