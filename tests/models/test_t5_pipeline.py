"""The StableDiffusionT5Pipeline and its projection: offline round trip, drawing, the documented init."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cachetrain.models.t5 import StableDiffusionT5Pipeline, T5Projection, load_t5_text_parts
from cachetrain.models.text_encoding import encode_t5_prompts, pad_text_embeddings

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def pipeline(tiny_t5_model):
    pipe = StableDiffusionT5Pipeline.from_pretrained(tiny_t5_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _draw(pipe, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 3, "guidance_scale": 5.0, **kwargs}
    image = pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **kwargs).images[0]
    return np.asarray(image)


def test_save_and_load_round_trip_offline_keeps_every_component(pipeline, tmp_path):
    from diffusers import DiffusionPipeline

    pipeline.save_pretrained(tmp_path / "copy")
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "copy")  # resolves the class: cachetrain.t5 is imported
    assert type(reloaded) is StableDiffusionT5Pipeline
    assert type(reloaded.t5_projection) is T5Projection
    for name in ("unet", "vae", "text_encoder", "t5_projection"):
        before, after = getattr(pipeline, name).state_dict(), getattr(reloaded, name).state_dict()
        assert before.keys() == after.keys(), name
        assert all(torch.equal(before[k], after[k]) for k in before), name
    assert dict(reloaded.t5_projection.config) == dict(pipeline.t5_projection.config) | {
        "_name_or_path": reloaded.t5_projection.config["_name_or_path"]}
    assert reloaded.tokenizer(PROMPT).input_ids == pipeline.tokenizer(PROMPT).input_ids
    assert dict(reloaded.scheduler.config) == dict(pipeline.scheduler.config)
    assert np.array_equal(_draw(reloaded), _draw(pipeline))


def test_a_fresh_process_loads_the_folder_once_cachetrain_t5_is_imported(tiny_t5_model):
    script = ("import sys, cachetrain.t5; from diffusers import DiffusionPipeline; "
              "p = DiffusionPipeline.from_pretrained(sys.argv[1]); print(type(p).__name__, type(p.t5_projection).__name__)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", script, str(tiny_t5_model)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["StableDiffusionT5Pipeline", "T5Projection"]


def test_drawing_is_deterministic_and_honours_size_negative_prompt_and_guidance(pipeline):
    first = _draw(pipeline, seed=3)
    assert first.shape == (64, 64, 3)  # default: the UNet's sample size times the VAE factor
    assert np.array_equal(first, _draw(pipeline, seed=3))
    assert not np.array_equal(first, _draw(pipeline, seed=4))
    assert _draw(pipeline, height=32, width=48).shape == (32, 48, 3)
    assert not np.array_equal(first, _draw(pipeline, seed=3, negative_prompt="a green square on a black background"))
    unguided = _draw(pipeline, seed=3, guidance_scale=1.0)
    assert unguided.shape == (64, 64, 3) and not np.array_equal(first, unguided)
    with pytest.raises(ValueError, match="multiples of 4"):
        _draw(pipeline, height=30)


def test_guided_conditioning_is_the_negatives_then_the_prompts_padded_together(pipeline):
    negative = "a green square on a black background"
    context, mask = pipeline.encode_prompt([PROMPT], do_classifier_free_guidance=True, negative_prompt=negative,
                                           num_images_per_prompt=2, device="cpu")
    parts = encode_t5_prompts(pipeline.tokenizer, pipeline.text_encoder, pipeline.t5_projection,
                              [negative, negative, PROMPT, PROMPT], pipeline.tokenizer.model_max_length)
    expected, expected_mask = pad_text_embeddings(parts)
    torch.testing.assert_close(context, expected)
    assert (mask is None and expected_mask is None) or torch.equal(mask, expected_mask)
    unguided, _ = pipeline.encode_prompt(PROMPT, device="cpu")
    torch.testing.assert_close(context[2:3, : unguided.shape[1]], unguided)


def test_a_new_projection_is_seeded_normal_with_variance_one_over_its_input_and_zero_bias():
    projection = T5Projection.initialised(256, 128, seed=5)
    assert torch.equal(projection.linear.weight, T5Projection.initialised(256, 128, seed=5).linear.weight)
    assert not torch.equal(projection.linear.weight, T5Projection.initialised(256, 128, seed=6).linear.weight)
    assert torch.count_nonzero(projection.linear.bias) == 0
    assert abs(projection.linear.weight.std().item() * 256 ** 0.5 - 1) < 0.02
    states = torch.randn(4, 10, 256)
    scaled = T5Projection.initialised(256, 128, scaling_factor=0.5, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(scaled(states), 0.5 * projection(states))
        assert abs(projection(states).std().item() - 1) < 0.05  # unit-variance states stay unit-variance


def test_the_trainers_pipeline_loader_opens_a_t5_folder_around_the_training_unet(tiny_t5_model):
    from diffusers import UNet2DConditionModel

    from cachetrain.models.loading import load_pipeline_around

    unet = UNet2DConditionModel.from_pretrained(tiny_t5_model, subfolder="unet")
    pipe = load_pipeline_around(str(tiny_t5_model), unet)
    assert type(pipe) is StableDiffusionT5Pipeline
    assert pipe.unet is unet


def test_loading_the_text_parts_names_what_a_folder_lacks(tiny_t5_model, tmp_path):
    tokenizer, text_encoder, projection = load_t5_text_parts(str(tiny_t5_model))
    assert projection.config.out_features == 24 and text_encoder.config.d_model == 16
    assert tokenizer(PROMPT).input_ids[-1] == tokenizer.eos_token_id
    with pytest.raises(FileNotFoundError, match="t5_projection"):
        (tmp_path / "tokenizer").mkdir()
        (tmp_path / "text_encoder").mkdir()
        load_t5_text_parts(str(tmp_path))
