"""Sample images at checkpoints: fixed seeds, so the same prompt can be compared across steps."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo


@dataclass(frozen=True)
class SampleMetadata:
    """How a sample image was made; stored in the PNG's text chunks, one chunk per field."""

    prompt: str
    negative_prompt: str
    seed: int
    step: int
    sampler_steps: int
    guidance_scale: float
    token_length: int | None = None  # the --force_toklen its conditioning was cut or padded to, if any

    def png_info(self) -> PngInfo:
        info = PngInfo()
        for field in dataclasses.fields(self):
            if getattr(self, field.name) is not None:  # an optional fact that does not apply has no chunk
                info.add_text(field.name, str(getattr(self, field.name)))
        return info

    @classmethod
    def from_png_text(cls, text: dict[str, str]) -> SampleMetadata:
        """Parse the text chunks of a sample PNG; ValueError names what is missing or malformed."""
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in text]
        if missing:
            raise ValueError(f"PNG text chunks lack {', '.join(missing)}")
        hints = typing.get_type_hints(cls)
        try:
            return cls(**{f.name: _parse_type(hints[f.name])(text[f.name]) for f in fields if f.name in text})
        except ValueError as error:
            raise ValueError(f"malformed PNG text chunk ({error})") from None


def _parse_type(hint) -> type:
    """str, int or float, also out of an optional one (int | None): each parses its own text."""
    return next((arg for arg in typing.get_args(hint) if arg is not type(None)), hint)


def save_sample_png(image: Image.Image, path: os.PathLike | str, metadata: SampleMetadata) -> None:
    image.save(path, format="PNG", pnginfo=metadata.png_info())


def read_sample_metadata(path: os.PathLike | str) -> SampleMetadata:
    """The metadata a sample PNG carries. ValueError if it carries none (or not all of it)."""
    with Image.open(path) as image:
        return SampleMetadata.from_png_text(dict(getattr(image, "text", {})))


def sample_filename(index: int, prompt: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "empty"
    return f"sample-{index:02d}-{slug}.png"


def prompt_arguments(pipeline, prompt: str, negative_prompt: str, guided: bool, token_length: int | None,
                     device: torch.device) -> dict:
    """The pipeline's text arguments for a prompt, conditioning the UNet on ``token_length`` tokens
    when given, as training with --force_toklen does.

    A pipeline that takes ``token_length`` (the T5 one) applies the pad rule itself. For another
    (SD1.5's, 77 CLIP tokens), a shorter length truncates its encoded prompts; a longer one would
    only add masked padding, which changes nothing.
    """
    arguments = {"prompt": prompt, "negative_prompt": negative_prompt or None}
    if token_length is None:
        return arguments
    if "token_length" in inspect.signature(pipeline.__call__).parameters:
        return {**arguments, "token_length": token_length}
    positive, negative = pipeline.encode_prompt(prompt, device, 1, guided, negative_prompt or None)
    if token_length >= positive.shape[1]:
        return arguments
    return {"prompt_embeds": positive[:, :token_length],
            "negative_prompt_embeds": negative[:, :token_length] if negative is not None else None}


def draw_samples(pipeline, prompts: list[str], out_dir: Path, *, step: int, seed: int, sampler_steps: int,
                 guidance_scale: float, negative_prompt: str = "", device: torch.device,
                 autocast_dtype: torch.dtype | None = None, token_length: int | None = None,
                 on_failure: typing.Callable[[int, str, Exception], None] | None = None) -> list[Path]:
    """One PNG per prompt in ``out_dir``; each PNG's text chunks say how it was made.

    ``token_length``: the --force_toklen training used, so samples see the conditioning it saw.
    ``on_failure(index, prompt, error)``, if given, is told of a prompt that could not be drawn, and the
    other prompts are still drawn; without it the first failure raises."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    pipeline.set_progress_bar_config(disable=True)
    for index, prompt in enumerate(prompts):
        generator = torch.Generator(device=device).manual_seed(seed + index)
        path = out_dir / sample_filename(index, prompt)
        try:
            with torch.no_grad(), autocast:
                text = prompt_arguments(pipeline, prompt, negative_prompt, guidance_scale > 1.0, token_length, device)
                image = pipeline(**text, num_inference_steps=sampler_steps, guidance_scale=guidance_scale,
                                 generator=generator).images[0]
            metadata = SampleMetadata(prompt=prompt, negative_prompt=negative_prompt, seed=seed + index, step=step,
                                      sampler_steps=sampler_steps, guidance_scale=guidance_scale,
                                      token_length=token_length)
            save_sample_png(image, path, metadata)
        except Exception as error:  # CUDA out of memory is a RuntimeError too; a full disk an OSError
            if on_failure is None:
                raise
            with contextlib.suppress(OSError):  # no half-written PNG for a comparison page to trip on
                path.unlink(missing_ok=True)
            on_failure(index, prompt, error)
            continue
        paths.append(path)
    return paths
