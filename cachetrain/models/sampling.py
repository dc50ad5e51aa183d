"""Sample images at checkpoints: fixed seeds, so the same prompt can be compared across steps.

The trainer and sample_images.py both draw through ``draw_samples`` with schedulers built by
``build_sampling_scheduler``, so a sample drawn later from a checkpoint is the image the trainer
would have drawn at it: same file name, same PNG text chunks, same pixels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..atomic import write_atomically
from .prompts import SamplePrompt, as_sample_prompt
from .schedulers import SAMPLE_SCHEDULERS, is_flow_config


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
    scheduler: str | None = None  # the --sample_scheduler / --scheduler name, or the model's own scheduler class
    width: int | None = None  # the size asked for (a prompt line's --w/--h or the flags); None: the model's own
    height: int | None = None

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
    """Written under a temporary name and renamed: a sampler stopped mid-write leaves no half PNG."""
    encoded = io.BytesIO()
    image.save(encoded, format="PNG", pnginfo=metadata.png_info())
    write_atomically(path, encoded.getvalue(), fsync=False)


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


# ---------------------------------------------------------------------------------------------
# Schedulers to sample with, built from the model's own scheduler config

# name -> (diffusers class, settings the name implies over the model's config)
SCHEDULER_CLASSES = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    # the PRK warm-up steps fail for a few sampler steps and stock SD1.5 folders skip them
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
}
assert tuple(SCHEDULER_CLASSES) == SAMPLE_SCHEDULERS
FLOW_SCHEDULER_NAMES = ("flow_euler",)


class SchedulerChoiceError(ValueError):
    """A sampler that cannot draw this model (a DDPM sampler for a flow model, or the reverse)."""


def scheduler_choice_problem(name: str, scheduler_config) -> str | None:
    """Why the sampler ``name`` cannot draw the model whose scheduler config this is, if it cannot."""
    config = dict(scheduler_config)
    own = config.get("_class_name", "an unnamed scheduler")
    if name not in SCHEDULER_CLASSES:
        return f"unknown sampler {name!r}; choose one of {', '.join(SAMPLE_SCHEDULERS)}"
    flow = is_flow_config(config)
    if flow and name not in FLOW_SCHEDULER_NAMES:
        return (f"{name} is a DDPM sampler and this model is a flow-matching one ({own}); "
                f"use {' or '.join(FLOW_SCHEDULER_NAMES)}")
    if not flow and name in FLOW_SCHEDULER_NAMES:
        return (f"{name} samples flow-matching models and this one is a DDPM model ({own}); use one of "
                f"{', '.join(n for n in SAMPLE_SCHEDULERS if n not in FLOW_SCHEDULER_NAMES)}")
    if config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in _init_keys(name):
        supported = [n for n in SAMPLE_SCHEDULERS if "rescale_betas_zero_snr" in _init_keys(n)]
        return (f"{name} cannot keep this model's zero-terminal-SNR betas (rescale_betas_zero_snr); "
                f"use one of {', '.join(supported)}")
    return None


def _scheduler_class(name: str):
    import diffusers

    return getattr(diffusers, SCHEDULER_CLASSES[name][0])


def _init_keys(name: str) -> set[str]:
    return set(inspect.signature(_scheduler_class(name).__init__).parameters) - {"self"}


def build_sampling_scheduler(name: str, scheduler_config):
    """The sampler ``name`` with the model's betas, prediction type, zero-SNR rescaling, timestep
    spacing and offsets (whatever of its scheduler config the sampler's class takes).

    SchedulerChoiceError when the sampler cannot draw this kind of model.
    """
    problem = scheduler_choice_problem(name, scheduler_config)
    if problem:
        raise SchedulerChoiceError(problem)
    accepted = _init_keys(name)
    settings = {key: value for key, value in dict(scheduler_config).items() if key in accepted}
    if name == "ddim":
        settings.setdefault("clip_sample", False)  # DDIM's default clips x0 to [-1, 1]: right for pixels, not latents
    settings.update(SCHEDULER_CLASSES[name][1])
    return _scheduler_class(name).from_config(settings)


# ---------------------------------------------------------------------------------------------
# Drawing


def sample_plan(prompts: list[str | SamplePrompt], *, step: int, seed: int, sampler_steps: int,
                guidance_scale: float, negative_prompt: str = "", token_length: int | None = None,
                scheduler_name: str | None = None, increment_seed: bool = True, width: int | None = None,
                height: int | None = None) -> list[tuple[str, SampleMetadata]]:
    """(file name, metadata) of each sample to draw: prompt i gets seed + i (or ``seed`` for all), and
    the run's settings, but for those its prompts-file line gives."""
    plan = []
    for index, given in enumerate(prompts):
        line = as_sample_prompt(given)
        own = lambda value, default: default if value is None else value  # noqa: E731
        plan.append((sample_filename(index, line.prompt), SampleMetadata(
            prompt=line.prompt, negative_prompt=own(line.negative_prompt, negative_prompt),
            seed=own(line.seed, seed + index if increment_seed else seed), step=step,
            sampler_steps=own(line.steps, sampler_steps), guidance_scale=own(line.guidance_scale, guidance_scale),
            token_length=token_length, scheduler=scheduler_name, width=own(line.width, width),
            height=own(line.height, height))))
    return plan


def draw_samples(pipeline, prompts: list[str | SamplePrompt], out_dir: Path, *, step: int, seed: int, sampler_steps: int,
                 guidance_scale: float, negative_prompt: str = "", device: torch.device,
                 autocast_dtype: torch.dtype | None = None, token_length: int | None = None,
                 scheduler=None, scheduler_name: str | None = None, height: int | None = None,
                 width: int | None = None, increment_seed: bool = True, generator_device: torch.device | None = None,
                 on_failure: typing.Callable[[int, str, Exception], None] | None = None) -> list[Path]:
    """One PNG per prompt in ``out_dir``; each PNG's text chunks say how it was made.

    ``token_length``: the --force_toklen training used, so samples see the conditioning it saw.
    ``scheduler`` (from build_sampling_scheduler, named ``scheduler_name``) draws in place of the
    pipeline's own for these samples only; the pipeline keeps its own (it is what checkpoints save).
    ``height``/``width`` default to the pipeline's: the UNet's sample_size (the training size, as the
    trainer records it) times the VAE's factor. A prompts-file line's own settings (SamplePrompt)
    replace the arguments for its sample.
    ``on_failure(index, prompt, error)``, if given, is told of an image that could not be drawn, and the
    others are still drawn; without it the first failure raises.
    """
    from .flow import drawing_scheduler

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    pipeline.set_progress_bar_config(disable=True)
    drawing = scheduler if scheduler is not None else pipeline.scheduler
    name = scheduler_name or type(drawing).__name__
    plan = sample_plan(prompts, step=step, seed=seed, sampler_steps=sampler_steps, guidance_scale=guidance_scale,
                       negative_prompt=negative_prompt, token_length=token_length, scheduler_name=name,
                       increment_seed=increment_seed, width=width, height=height)
    with drawing_scheduler(pipeline, drawing):  # a flow scheduler wrapped as the pipeline asks for it
        for index, (filename, metadata) in enumerate(plan):
            path = out_dir / filename
            try:
                generator = torch.Generator(device=generator_device or device).manual_seed(metadata.seed)
                size = {key: value for key, value in (("height", metadata.height), ("width", metadata.width))
                        if value is not None}
                with torch.no_grad(), autocast:
                    text = prompt_arguments(pipeline, metadata.prompt, metadata.negative_prompt,
                                            metadata.guidance_scale > 1.0, token_length, device)
                    image = pipeline(**text, num_inference_steps=metadata.sampler_steps,
                                     guidance_scale=metadata.guidance_scale, generator=generator, **size).images[0]
                save_sample_png(image, path, metadata)
            except Exception as error:  # CUDA out of memory is a RuntimeError too; a full disk an OSError
                if on_failure is None:
                    raise
                with contextlib.suppress(OSError):  # no half-written PNG for a comparison page to trip on
                    path.unlink(missing_ok=True)
                on_failure(index, metadata.prompt, error)
                continue
            paths.append(path)
    return paths
