"""Flow-matching models drawn the plain way: checkpoints saved as StableDiffusionFlowPipeline, the UNet told
s x (T - 1) as in training, the Euler ODE of the velocity written out here, and the T5 pipeline alike."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cachetrain.train.config import parse_train_args
from cachetrain.train.trainer import train
from tests.training_support import flow_model_folder
from tests.training_support import train_args as _args

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a red circle"

# what the README tells a user to run: nothing of cachetrain but the import
PLAIN_LOAD = """
import sys, torch
import cachetrain.flow
from diffusers import DiffusionPipeline
prompt, seed, steps, guidance, *folders_and_outs = sys.argv[1:]
for folder, out in zip(folders_and_outs[::2], folders_and_outs[1::2]):
    pipeline = DiffusionPipeline.from_pretrained(folder)
    print(type(pipeline).__name__, type(pipeline.scheduler).__name__)
    image = pipeline(prompt, num_inference_steps=int(steps), guidance_scale=float(guidance),
                     generator=torch.Generator().manual_seed(int(seed))).images[0]
    image.save(out)
"""


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _timesteps_told_to(unet) -> tuple[list[float], object]:
    seen: list[float] = []
    handle = unet.register_forward_pre_hook(lambda module, args, kwargs: seen.extend(args[1].flatten().tolist()),
                                            with_kwargs=True)
    return seen, handle


@pytest.mark.slow  # a training run and a fresh interpreter
def test_a_flow_checkpoint_loaded_plainly_draws_the_sample_the_trainer_drew(tiny_sd_model, cached_dataset,
                                                                            tmp_path):
    from cachetrain.models.sampling import read_sample_metadata

    model = flow_model_folder(tiny_sd_model, tmp_path / "flow")
    run = tmp_path / "run"
    train(parse_train_args(_args(model, cached_dataset, run, "--batch_size", "8", "--max_steps", "2",
                                 "--sample_prompt", PROMPT, "--sampler_steps", "3", "--guidance_scale", "2.5")))
    checkpoint = run / "checkpoint-00002"
    (drawn,) = checkpoint.glob("*.png")
    metadata = read_sample_metadata(drawn)
    # the checkpoint and the run's final model, each drawn into a file of its own
    folders = {checkpoint: tmp_path / "checkpoint.png", run: tmp_path / "final.png"}
    for folder in folders:
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "StableDiffusionFlowPipeline"
        assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert scheduler_config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
        assert "init_noise_sigma" not in scheduler_config  # a plain scheduler, as other tools read it

    # one fresh interpreter draws both (an interpreter start is most of the cost)
    done = subprocess.run([sys.executable, "-c", PLAIN_LOAD, metadata.prompt, str(metadata.seed),
                           str(metadata.sampler_steps), str(metadata.guidance_scale),
                           *[str(path) for pair in folders.items() for path in pair]],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["StableDiffusionFlowPipeline FlowMatchEulerDiscreteScheduler"] * 2
    for out in folders.values():
        np.testing.assert_array_equal(_pixels(out), _pixels(drawn))


def _euler_by_hand(unet, noise: torch.Tensor, context: torch.Tensor, steps: int, shift: float = 1.0,
                   num_train_timesteps: int = 1000) -> tuple[torch.Tensor, list[float]]:
    """The ODE dx/ds = v from s = 1 to 0, Euler steps at FlowMatchEulerDiscreteScheduler's sigmas, the UNet
    told s (T - 1) as FlowMatchingObjective trains it. The scheduler's sigmas: linspace(1, k(1/T)) shifted
    by k (k(s) = k s / (1 + (k - 1) s)); its smallest training sigma is already shifted once."""
    shifted = lambda s: shift * s / (1 + (shift - 1) * s)  # noqa: E731
    sigmas = list(shifted(np.linspace(1.0, shifted(1.0 / num_train_timesteps), steps))) + [0.0]
    x, told = noise, []
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            t = torch.tensor(s * (num_train_timesteps - 1), dtype=torch.float32)
            told.append(float(t))
            velocity = unet(x, t, encoder_hidden_states=context).sample
            x = x + (s_next - s) * velocity
    return x, told


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_flow_pipeline_follows_the_trained_velocity_and_tells_the_unet_s_times_999(tiny_sd_model, tmp_path,
                                                                                        shift):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    from cachetrain.models.flow import StableDiffusionFlowPipeline, flow_pipeline

    plain = DiffusionPipeline.from_pretrained(flow_model_folder(tiny_sd_model, tmp_path / "flow", shift=shift))
    assert type(plain) is StableDiffusionPipeline
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with pytest.raises(AttributeError, match="init_noise_sigma"):  # why a stock pipeline cannot draw it
        plain(PROMPT, num_inference_steps=2, guidance_scale=1.0, latents=noise.clone(), output_type="latent")

    pipeline = flow_pipeline(plain)
    assert isinstance(pipeline, StableDiffusionFlowPipeline) and pipeline.unet is plain.unet
    seen, handle = _timesteps_told_to(pipeline.unet)
    drawn = pipeline(PROMPT, num_inference_steps=4, guidance_scale=1.0, latents=noise.clone(),
                     output_type="latent").images
    handle.remove()
    context = pipeline.encode_prompt(PROMPT, torch.device("cpu"), 1, False)[0]
    expected, told = _euler_by_hand(pipeline.unet, noise, context, 4, shift=shift)
    assert seen == pytest.approx(told, abs=1e-3) and seen[0] == pytest.approx(999.0)
    torch.testing.assert_close(drawn, expected, rtol=1e-4, atol=1e-5)
    assert type(pipeline.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"  # what it saves, unwrapped


def test_a_t5_pipeline_draws_a_flow_scheduler_as_training_taught(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from cachetrain.models.t5 import StableDiffusionT5Pipeline
    from cachetrain.tiny.models import build_tiny_t5

    pipeline = StableDiffusionT5Pipeline.from_pretrained(build_tiny_t5(tmp_path / "t5"))
    pipeline.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    pipeline.set_progress_bar_config(disable=True)
    shape = (1, pipeline.unet.config.in_channels, pipeline.unet.config.sample_size, pipeline.unet.config.sample_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    drawn = pipeline(PROMPT, num_inference_steps=3, guidance_scale=1.0, latents=noise.clone(),
                     output_type="latent").images
    context, mask = pipeline.encode_prompt(PROMPT, torch.device("cpu"))
    assert mask is None  # one prompt: nothing padded, so the hand-written loop needs no mask
    expected, _ = _euler_by_hand(pipeline.unet, noise, context, 3)
    torch.testing.assert_close(drawn, expected, rtol=1e-4, atol=1e-5)
    assert isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler)
