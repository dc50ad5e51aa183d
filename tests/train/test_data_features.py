"""Caption variants, horizontal flips and masked loss in training: drawn per sample from (seed, epoch,
sample), resumed exactly, and learning what they should on held-out checks.

Expected values are computed here directly, not with the trainer's own helpers.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from cachetrain.commands import create_clipl, create_img_sdvae
from cachetrain.train.config import parse_train_args
from cachetrain.train.trainer import main, train
from tests.training_support import logged, record_unet_text_inputs, train_args, unet_weights

CACHE = ["--num_workers", "0", "--no_progress", "--save_dtype", "float32"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def _square_on_the_left(rng: random.Random) -> Image.Image:
    """A red block in the left half of a blue picture: its mirror image has it on the right."""
    image = Image.new("RGB", (64, 64), (30, 30, 200))
    x, y = rng.randint(0, 4), rng.randint(0, 24)
    ImageDraw.Draw(image).rectangle((x, y, x + 26, y + 38), fill=(230, 40, 40))
    return image


@pytest.fixture(scope="module")
def featured_template(tiny_sd_model, tmp_path_factory) -> Path:
    """16 pictures cached with --flip and --mask, captions with --caption_variants: every other caption has
    two lines, one names a side (no mirrored latent), four images have a mask (the left half)."""
    data = tmp_path_factory.mktemp("featured") / "data"
    data.mkdir()
    rng = random.Random(4)
    for i in range(16):
        _square_on_the_left(rng).save(data / f"img{i:02d}.png")
        caption = f"a red square {i}" if i % 2 else f"a red square {i}\na crimson box {i} on blue"
        (data / f"img{i:02d}.txt").write_text("a red square on the left" if i == 3 else caption)
        if i % 4 == 0:
            mask = Image.new("L", (64, 64), 0)
            mask.paste(255, (0, 0, 32, 64))
            mask.save(data / f"img{i:02d}.mask.png")
    common = ["--model", str(tiny_sd_model), "--data_root", str(data), *CACHE]
    assert create_img_sdvae(common + ["--resolution", "64", "--flip", "--mask"]) == 0
    assert create_clipl(common + ["--caption_variants"]) == 0
    return data


@pytest.fixture
def featured(featured_template, tmp_path) -> Path:
    shutil.copytree(featured_template, tmp_path / "data")
    return tmp_path / "data"


def test_each_sample_trains_on_one_of_its_caption_variants_drawn_per_epoch(tiny_sd_model, featured, tmp_path,
                                                                         monkeypatch):
    contexts = record_unet_text_inputs(monkeypatch)
    assert main(train_args(tiny_sd_model, featured, tmp_path / "run", "--batch_size", "8", "--max_steps", "6")) == 0
    rows = torch.cat(contexts)  # 6 steps x 8 rows: 3 epochs of the 16 samples
    sidecars = [_tensors(path) for path in sorted(featured.glob("img*.txt_clipl"))]
    uses = {key: sum(int(torch.equal(row, sidecar[key])) for row in rows for sidecar in sidecars if key in sidecar)
            for key in ("emb", "emb_1")}
    print(f"rows trained on a first variant, on a second: {uses}")
    assert sum(isinstance(sidecar.get("emb_1"), torch.Tensor) for sidecar in sidecars) == 8
    # each row is one sample's variant (the captions differ), and the 8 two-caption samples drew both kinds
    assert uses["emb"] + uses["emb_1"] == len(rows) == 48
    assert uses["emb_1"] >= 4 and uses["emb"] - 24 >= 4  # 24 draws of one-caption samples are all "emb"


def test_flip_draws_are_a_function_of_seed_epoch_and_sample_and_carry_the_mask(featured):
    from cachetrain.train.loader import CachedPairDataset, NoisePlan
    from cachetrain.tree import index_training_pairs

    index, _ = index_training_pairs([featured], ".img_sdvae", ".txt_clipl")
    dataset = CachedPairDataset(index, NoisePlan(seed=9, flip_p=0.5, masked_loss=True))
    draws = {}
    for epoch in range(8):
        for i in range(len(index)):
            latent, _emb, _noise, _timestep, _i, _perturbation, mask, _problem = dataset[(epoch, i)]
            stored = _tensors(Path(index[i][0]))
            flipped = "latent_flipped" in stored and torch.equal(latent, stored["latent_flipped"])
            assert flipped or torch.equal(latent, stored["latent"])
            expected_mask = stored.get("mask", torch.ones(1, *latent.shape[1:]))
            assert torch.equal(mask, expected_mask.flip(-1) if flipped else expected_mask)
            draws[(epoch, i)] = flipped
    again = CachedPairDataset(index, NoisePlan(seed=9, flip_p=0.5, masked_loss=True))
    assert all(torch.equal(again[key][0], dataset[key][0]) for key in [(0, 1), (5, 7), (7, 15)])
    side = next(i for i in range(len(index)) if index[i][0].endswith("img03.img_sdvae"))
    assert not any(draws[(epoch, side)] for epoch in range(8))  # its caption names a side: never mirrored
    share = sum(draws.values()) / (8 * (len(index) - 1))
    print(f"share of draws mirrored at --flip_p 0.5: {share:.2f}")
    assert 0.35 < share < 0.65


def test_masked_loss_weights_match_an_independent_computation():
    from cachetrain.train.objective import masked_loss_weights, per_sample_loss

    masks = torch.rand(3, 1, 4, 4)
    masks[2] = 0
    prediction, target = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    for unmasked, normalize in ((0.0, False), (0.25, False), (0.25, True), (0.0, True)):
        got = per_sample_loss(prediction, target, "mse", cell_weights=masked_loss_weights(masks, unmasked, normalize))
        for b in range(3):
            weights = [unmasked + (1 - unmasked) * float(masks[b, 0, y, x]) for y in range(4) for x in range(4)]
            squared = [[float(prediction[b, c, y, x] - target[b, c, y, x]) ** 2 for y in range(4) for x in range(4)]
                       for c in range(4)]
            total = sum(w * e for channel in squared for w, e in zip(weights, channel))
            expected = total / sum(weights) / 4 if normalize and sum(weights) else total / 64
            assert got[b].item() == pytest.approx(expected, rel=1e-5, abs=1e-7), (unmasked, normalize, b)


def test_masked_loss_through_the_trainer_weights_the_loss_by_the_cached_masks(tiny_sd_model, cached_dataset,
                                                                            tmp_path):
    """All-zero masks: --masked_loss trains nothing; an unmasked weight of 0.25 gives a quarter of the loss;
    normalised, the same weights are the whole loss again (the same draws at step 1 in every run)."""
    from cachetrain.sidecar import write_sidecar

    for path in cached_dataset.rglob("*.img_sdvae"):
        with safe_open(str(path), framework="pt") as handle:
            metadata, latent = handle.metadata(), handle.get_tensor("latent")
        write_sidecar(path, {"latent": latent, "mask": torch.zeros(1, *latent.shape[1:])}, metadata)
    common = ("--batch_size", "8", "--max_steps", "1", "--log_every", "1")
    runs = {name: train(parse_train_args(train_args(tiny_sd_model, cached_dataset, tmp_path / name, *common, *flags)))
            for name, flags in (("plain", ()), ("zero", ("--masked_loss",)),
                                ("quarter", ("--masked_loss", "--masked_loss_unmasked_weight", "0.25")),
                                ("normalized", ("--masked_loss", "--masked_loss_unmasked_weight", "0.25",
                                                "--masked_loss_normalize")))}
    loss = {name: logged(run, "train/loss")[0][1] for name, run in runs.items()}
    assert loss["zero"] == 0.0
    assert loss["quarter"] == pytest.approx(0.25 * loss["plain"], rel=1e-5)
    assert loss["normalized"] == pytest.approx(loss["plain"], rel=1e-5)


def test_masked_loss_options_without_masked_loss_are_refused_at_start(tiny_sd_model, cached_dataset, tmp_path,
                                                                     capsys):
    assert main(train_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--masked_loss_normalize")) == 2
    assert "--masked_loss_normalize apply with --masked_loss only" in capsys.readouterr().err


def test_a_stopped_and_resumed_run_with_variants_flips_and_masks_equals_one_that_never_stopped(
        tiny_sd_model, featured, tmp_path):
    common = ("--batch_size", "4", "--max_steps", "7", "--log_every", "1", "--flip_p", "0.5", "--masked_loss",
              "--masked_loss_unmasked_weight", "0.1", "--caption_dropout", "0.2")
    straight = train(parse_train_args(train_args(tiny_sd_model, featured, tmp_path / "straight", *common)))
    stopped = train(parse_train_args(train_args(tiny_sd_model, featured, tmp_path / "resumed", *common)),
                    interrupt_after_batches=5)
    assert stopped.interrupted and stopped.steps == 5  # inside the second epoch (4 batches each)
    resumed = train(parse_train_args(train_args(tiny_sd_model, featured, tmp_path / "resumed", *common, "--resume")))
    assert resumed.steps == 7
    assert logged(stopped, "train/loss") + logged(resumed, "train/loss") == logged(straight, "train/loss")
    a, b = unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "resumed")
    assert all(torch.equal(a[name], b[name]) for name in a)


# ---------------------------------------------------------------------------------------------
# Held-out checks: what a flipped or masked run learns


def _denoising_error(unet, model: Path, latents: torch.Tensor, embeddings: torch.Tensor,
                     timesteps=(200, 400, 600)) -> torch.Tensor:
    """[B, 1, h, w]: each latent cell's epsilon error, averaged over channels and a few fixed noise levels."""
    from cachetrain.models.loading import load_training_scheduler

    alpha_bar = load_training_scheduler(str(model)).alphas_cumprod
    total = torch.zeros(latents.shape[0], 1, *latents.shape[2:])
    for timestep in timesteps:
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(timestep))
        steps = torch.full((latents.shape[0],), timestep)
        a = alpha_bar[steps].view(-1, 1, 1, 1)
        with torch.no_grad():
            prediction = unet(a.sqrt() * latents + (1 - a).sqrt() * noise, steps, embeddings).sample
        total += (prediction - noise).square().mean(dim=1, keepdim=True)
    return total / len(timesteps)


def _held_out_latents(data: Path, model: Path, keys: tuple[str, ...]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The run's held-out quarter (--validation_split 0.25): the latent tensors ``keys`` (scaled as training
    scales them) and the caption embeddings."""
    from cachetrain.models.loading import read_vae_scaling_factor
    from cachetrain.train.validation import split_validation
    from cachetrain.tree import index_training_pairs

    index, _ = index_training_pairs([data], ".img_sdvae", ".txt_clipl")
    _, held_out = split_validation(index, 0.25, seed=0)
    scale = read_vae_scaling_factor(str(model))
    latents = [torch.stack([_tensors(Path(held_out[i][0]))[key] for i in range(len(held_out))]) * scale
               for key in keys]
    embeddings = torch.stack([_tensors(Path(held_out[i][1]))["emb"] for i in range(len(held_out))])
    return latents, embeddings


def _trained_unet(data: Path, model: Path, output: Path, *flags: str):
    from diffusers import UNet2DConditionModel

    assert main(train_args(model, data, output, "--batch_size", "8", "--max_steps", "40", "--validation_split", "0.25",
                           *flags)) == 0
    return UNet2DConditionModel.from_pretrained(output, subfolder="unet").eval()


@pytest.mark.slow
def test_a_run_that_always_flips_learns_the_mirrored_composition(tiny_sd_model, tmp_path):
    """Every picture has its red block on the left. On held-out pictures, a run with --flip_p 1 (trained only
    on the mirrored latents) denoises the mirrored composition (block on the right) better, relative to the
    original, than the same run with --flip_p 0 does."""
    data = tmp_path / "data"
    data.mkdir()
    rng = random.Random(0)
    for i in range(32):
        _square_on_the_left(rng).save(data / f"img{i:03d}.png")
        (data / f"img{i:03d}.txt").write_text("a red square")
    common = ["--model", str(tiny_sd_model), "--data_root", str(data), *CACHE]
    assert create_img_sdvae(common + ["--resolution", "32", "--flip"]) == 0 and create_clipl(common) == 0  # 8x8 latents
    (original, mirrored), embeddings = _held_out_latents(data, tiny_sd_model, ("latent", "latent_flipped"))
    ratios = {}  # held-out error on the mirrored latents / on the originals
    for flip_p in ("1", "0"):
        unet = _trained_unet(data, tiny_sd_model, tmp_path / f"run{flip_p}", "--flip_p", flip_p)
        errors = [_denoising_error(unet, tiny_sd_model, latents, embeddings, (600, 800)).mean().item()
                  for latents in (original, mirrored)]
        ratios[flip_p] = errors[1] / errors[0]
        print(f"--flip_p {flip_p}: held-out error original {errors[0]:.5f}, mirrored {errors[1]:.5f}")
    assert ratios["1"] < 1 < ratios["0"]
    assert ratios["1"] < 0.95 * ratios["0"]


@pytest.mark.slow
def test_a_masked_run_learns_inside_its_masks_and_not_outside(tiny_sd_model, tmp_path):
    """Masks cover the left half of each picture (unmasked weight 0). On held-out pictures, against the same
    run without --masked_loss: inside the masks the error is about as low, outside it stays higher."""
    data = tmp_path / "data"
    data.mkdir()
    rng = random.Random(1)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    for i in range(32):
        image = _square_on_the_left(rng)
        x, y = rng.randint(36, 42), rng.randint(4, 36)  # something else, unmasked, on the right
        ImageDraw.Draw(image).ellipse((x, y, x + 18, y + 22), fill=(40, 220, 60))
        image.save(data / f"img{i:03d}.png")
        mask.save(data / f"img{i:03d}.mask.png")
        (data / f"img{i:03d}.txt").write_text("a red square and a green circle")
    common = ["--model", str(tiny_sd_model), "--data_root", str(data), *CACHE]
    assert create_img_sdvae(common + ["--resolution", "32", "--mask"]) == 0 and create_clipl(common) == 0  # 8x8 latents
    (latents,), embeddings = _held_out_latents(data, tiny_sd_model, ("latent",))
    half = latents.shape[-1] // 2
    errors = {}  # (inside the masks, outside)
    for name, flags in (("masked", ("--masked_loss",)), ("unmasked", ())):
        cells = _denoising_error(_trained_unet(data, tiny_sd_model, tmp_path / name, *flags), tiny_sd_model,
                                 latents, embeddings)
        errors[name] = (cells[..., :half].mean().item(), cells[..., half:].mean().item())
        print(f"{name}: held-out error inside the masks {errors[name][0]:.5f}, outside {errors[name][1]:.5f}")
    inside = errors["masked"][0] / errors["unmasked"][0]
    outside = errors["masked"][1] / errors["unmasked"][1]
    assert outside > 1.1 * inside
