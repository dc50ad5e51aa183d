"""Sample images at checkpoints: fixed seeds, so the same prompt can be compared across steps."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo


def sample_filename(index: int, prompt: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "empty"
    return f"sample-{index:02d}-{slug}.png"


def draw_samples(pipeline, prompts: list[str], out_dir: Path, *, step: int, seed: int, sampler_steps: int,
                 guidance_scale: float, negative_prompt: str = "", device: torch.device,
                 autocast_dtype: torch.dtype | None = None) -> list[Path]:
    """One PNG per prompt in ``out_dir``; each PNG's text chunks say how it was made."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    pipeline.set_progress_bar_config(disable=True)
    for index, prompt in enumerate(prompts):
        generator = torch.Generator(device=device).manual_seed(seed + index)
        with torch.no_grad(), autocast:
            image = pipeline(prompt, negative_prompt=negative_prompt or None, num_inference_steps=sampler_steps,
                             guidance_scale=guidance_scale, generator=generator).images[0]
        info = PngInfo()
        for key, value in (("prompt", prompt), ("negative_prompt", negative_prompt), ("seed", seed + index),
                           ("step", step), ("sampler_steps", sampler_steps), ("guidance_scale", guidance_scale)):
            info.add_text(key, str(value))
        path = out_dir / sample_filename(index, prompt)
        image.save(path, pnginfo=info)
        paths.append(path)
    return paths
