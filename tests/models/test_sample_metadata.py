"""Samples carry their facts: PNG text chunks round-trip, and checkpoint samples reach tensorboard."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cachetrain.models.sampling import SampleMetadata, read_sample_metadata, save_sample_png
from cachetrain.train.telemetry import Telemetry


def _read_tensorboard_images(log_dir) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    return {tag: events.Images(tag) for tag in events.Tags()["images"]}


def _decode(encoded: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))


def test_sample_metadata_round_trips_through_png_text_chunks(tmp_path):
    metadata = SampleMetadata(prompt="a red circle, on blue", negative_prompt="blurry", seed=1235, step=300,
                              sampler_steps=20, guidance_scale=7.5)
    path = tmp_path / "sample-00-a-red-circle.png"
    save_sample_png(Image.new("RGB", (8, 8), (200, 10, 10)), path, metadata)

    assert read_sample_metadata(path) == metadata
    # the chunks themselves are plain text under these names, for any PNG reader to show
    with Image.open(path) as image:
        assert image.text == {"prompt": "a red circle, on blue", "negative_prompt": "blurry", "seed": "1235",
                              "step": "300", "sampler_steps": "20", "guidance_scale": "7.5"}


def test_the_token_length_of_a_force_toklen_run_is_recorded_and_older_pngs_still_read(tmp_path):
    metadata = SampleMetadata(prompt="a red circle", negative_prompt="", seed=3, step=10, sampler_steps=2,
                              guidance_scale=1.0, token_length=60)
    path = tmp_path / "sample.png"
    save_sample_png(Image.new("RGB", (8, 8)), path, metadata)
    assert read_sample_metadata(path) == metadata
    with Image.open(path) as image:
        assert image.text["token_length"] == "60"
    older = {"prompt": "p", "negative_prompt": "", "seed": "1", "step": "2", "sampler_steps": "3",
             "guidance_scale": "1.5"}  # written before the field existed, or by a run without --force_toklen
    assert SampleMetadata.from_png_text(older).token_length is None


def test_a_png_without_sample_metadata_is_refused_naming_what_is_missing(tmp_path):
    bare = tmp_path / "bare.png"
    Image.new("RGB", (4, 4)).save(bare)
    with pytest.raises(ValueError, match="lack prompt, negative_prompt, seed, step, sampler_steps, guidance_scale"):
        read_sample_metadata(bare)
    with pytest.raises(ValueError, match="malformed"):
        SampleMetadata.from_png_text({"prompt": "p", "negative_prompt": "", "seed": "one", "step": "1",
                                      "sampler_steps": "2", "guidance_scale": "1.0"})


def test_telemetry_logs_each_image_under_its_prompt_at_its_step(tmp_path):
    red = Image.new("RGB", (6, 4), (255, 0, 0))
    saved = tmp_path / "green.png"
    Image.new("RGB", (6, 4), (0, 255, 0)).save(saved)
    telemetry = Telemetry(tmp_path / "tb", torch.device("cpu"))
    telemetry.add_images(12, {"a red thing": red, "a green thing": saved})
    telemetry.close()

    logged = _read_tensorboard_images(tmp_path / "tb")
    assert sorted(logged) == ["samples/a green thing", "samples/a red thing"]
    (red_event,) = logged["samples/a red thing"]
    assert (red_event.step, red_event.width, red_event.height) == (12, 6, 4)
    assert np.array_equal(_decode(red_event.encoded_image_string), np.asarray(red))
    (green_event,) = logged["samples/a green thing"]
    assert _decode(green_event.encoded_image_string)[0, 0].tolist() == [0, 255, 0]


def test_checkpoint_samples_carry_their_facts_and_reach_tensorboard(tiny_sd_model, tmp_path):
    from cachetrain.models import loading as models
    from cachetrain.train.config import parse_train_args
    from cachetrain.train.sample_drawer import SampleDrawer

    prompts = ["a red circle on a blue background", "a yellow square on a black background"]
    config = parse_train_args(["--pretrained_model", str(tiny_sd_model), "--train_data_dir", str(tmp_path),
                               "--output_dir", str(tmp_path / "run"), "--sample_prompt", *prompts,
                               "--sampler_steps", "2", "--sample_seed", "40", "--guidance_scale", "3.0"])
    telemetry = Telemetry(tmp_path / "run" / "tensorboard", torch.device("cpu"))
    sampler = SampleDrawer(config, torch.device("cpu"), telemetry)
    paths = sampler.sample(models.load_unet(str(tiny_sd_model)), 100, tmp_path / "run" / "checkpoint-00100")
    telemetry.close()

    assert [read_sample_metadata(p) for p in paths] == [
        SampleMetadata(prompt=prompt, negative_prompt="", seed=40 + i, step=100, sampler_steps=2, guidance_scale=3.0,
                       scheduler="PNDMScheduler")  # no --sample_scheduler: the model's own, by its class
        for i, prompt in enumerate(prompts)]
    logged = _read_tensorboard_images(tmp_path / "run" / "tensorboard")
    assert sorted(logged) == [f"samples/{p}" for p in sorted(prompts)]
    for prompt, path in zip(prompts, paths):
        (event,) = logged[f"samples/{prompt}"]
        assert event.step == 100
        assert np.array_equal(_decode(event.encoded_image_string), np.asarray(Image.open(path).convert("RGB")))
