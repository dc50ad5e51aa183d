"""assemble_t5_pipeline.py: a T5 pipeline folder from parts, and clear words when parts do not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cachetrain.models.assemble import main as assemble
from cachetrain.models.t5 import StableDiffusionT5Pipeline, T5Projection


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    """The SD1.5 tiny model: its UNet cross-attends to 32-dim tokens, the T5 tiny projection gives 24."""
    from cachetrain.tiny.models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model")


def _assemble(out: Path, **parts: str) -> int:
    argv = [item for name, value in parts.items() for item in (f"--{name}", str(value))]
    return assemble(argv + ["--out", str(out)])


def test_a_t5_encoder_without_its_tokenizer_is_refused_not_given_an_empty_vocabulary(tiny_t5_model, tmp_path,
                                                                                      capsys):
    assert _assemble(tmp_path / "assembled", unet=tiny_t5_model, vae=tiny_t5_model,
                     t5=tiny_t5_model / "text_encoder") == 2
    assert "maps every word to <unk>" in capsys.readouterr().err


def test_parts_given_as_bare_folders_make_a_pipeline_with_a_new_seeded_projection(tiny_t5_model, tmp_path):
    out = tmp_path / "assembled"
    assert _assemble(out, unet=tiny_t5_model / "unet", vae=tiny_t5_model / "vae", t5=tiny_t5_model,
                     projection_seed=7) == 0
    pipe = StableDiffusionT5Pipeline.from_pretrained(out)
    expected = T5Projection.initialised(16, 24, seed=7)
    assert torch.equal(pipe.t5_projection.linear.weight, expected.linear.weight)
    original = StableDiffusionT5Pipeline.from_pretrained(tiny_t5_model)
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), original.unet.state_dict().values()))
    assert pipe.vae.config.scaling_factor == original.vae.config.scaling_factor
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"  # a bare UNet brings no schedule: SD1.5's DDIM


def test_whole_pipelines_as_parts_give_their_unet_vae_t5_projection_and_scheduler(tiny_t5_model, tmp_path):
    out = tmp_path / "assembled"
    assert _assemble(out, unet=tiny_t5_model, vae=tiny_t5_model, t5=tiny_t5_model, projection=tiny_t5_model) == 0
    pipe = StableDiffusionT5Pipeline.from_pretrained(out)
    original = StableDiffusionT5Pipeline.from_pretrained(tiny_t5_model)
    for name in ("unet", "vae", "text_encoder", "t5_projection"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(pipe, name).state_dict().values(),
                                                     getattr(original, name).state_dict().values())), name
    assert dict(pipe.scheduler.config) == dict(original.scheduler.config)


def test_a_unet_whose_cross_attention_width_differs_from_the_projection_is_refused(tiny_t5_model, tiny_sd,
                                                                                 tmp_path, capsys):
    out = tmp_path / "assembled"
    assert _assemble(out, unet=tiny_sd, vae=tiny_t5_model, t5=tiny_t5_model, projection=tiny_t5_model) == 2
    error = capsys.readouterr().err
    assert "gives 24-dim tokens (out_features)" in error
    assert "cross-attends to 32-dim tokens (cross_attention_dim)" in error
    assert not out.exists()


def test_a_vae_with_other_latent_channels_is_refused_naming_both_parts(tiny_t5_model, tmp_path, capsys):
    from diffusers import AutoencoderKL

    from cachetrain.tiny.models import TINY_SDXL_VAE

    wide_vae = tmp_path / "vae16"
    AutoencoderKL(**{**TINY_SDXL_VAE, "latent_channels": 16}).save_pretrained(wide_vae)
    assert _assemble(tmp_path / "assembled", unet=tiny_t5_model, vae=wide_vae, t5=tiny_t5_model) == 2
    error = capsys.readouterr().err
    assert f"the UNet ({tiny_t5_model}/unet) has in_channels=4 but the VAE ({wide_vae}) makes 16-channel latents" in error
    assert "out_channels=4" in error


def test_a_projection_made_for_another_t5_width_is_refused(tiny_t5_model, tmp_path, capsys):
    other = tmp_path / "projection"
    T5Projection.initialised(32, 24).save_pretrained(other)
    assert _assemble(tmp_path / "assembled", unet=tiny_t5_model, vae=tiny_t5_model, t5=tiny_t5_model,
                     projection=other) == 2
    error = capsys.readouterr().err
    assert "takes 32-dim input (in_features) but the T5 encoder" in error and "16-dim states (d_model)" in error


def test_a_part_of_the_wrong_kind_is_named_with_every_place_looked_in(tiny_t5_model, tiny_sd, tmp_path, capsys):
    assert _assemble(tmp_path / "assembled", unet=tiny_t5_model, vae=tiny_t5_model, t5=tiny_sd) == 2
    error = capsys.readouterr().err
    assert f"no T5 encoder found in {tiny_sd}" in error
    assert f"{tiny_sd}/text_encoder: a clip_text_model model, not a T5 encoder" in error


def test_an_existing_output_folder_is_kept_unless_overwrite_is_given(tiny_t5_model, tmp_path, capsys):
    out = tmp_path / "assembled"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    assert _assemble(out, unet=tiny_t5_model, vae=tiny_t5_model, t5=tiny_t5_model) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert assemble(["--unet", str(tiny_t5_model), "--vae", str(tiny_t5_model), "--t5", str(tiny_t5_model),
                     "--out", str(out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists() and (out / "model_index.json").exists()


def test_an_sdxl_style_unet_that_needs_extra_conditioning_is_refused(tiny_t5_model, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    config = dict(UNet2DConditionModel.load_config(tiny_t5_model, subfolder="unet"))
    config.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=8 * 6 + 24)
    UNet2DConditionModel.from_config(config).save_pretrained(tmp_path / "sdxl_like_unet")
    assert _assemble(tmp_path / "assembled", unet=tmp_path / "sdxl_like_unet", vae=tiny_t5_model,
                     t5=tiny_t5_model) == 2
    message = capsys.readouterr().err
    assert "is not an SD1.5-architecture UNet" in message and "addition_embed_type='text_time'" in message
