"""Samples drawn from one model or checkpoint folder, as sample_images.py is asked to draw them.

What a folder says about itself (its scheduler, the token length it was trained to) is read from its
config files without loading any weights; then its pipeline is loaded (the EMA UNet when there is one)
and drawn by the trainer's own ``draw_samples``. sampler_cli adds ``--watch`` and the command line.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from ..atomic import writable_problem
from ..train import checkpoint as ckpt
from ..train.run_dir import ARGS_FILE
from ..models.sampling import SampleMetadata, draw_samples, sample_plan, scheduler_choice_problem

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class SamplerInputError(ValueError):
    """A flag or input refused at start (exit status 2); the message names it."""


@dataclass(frozen=True)
class SampleSettings:
    """How to draw: one value per flag, the same for every folder sampled."""

    prompts: list  # str (as written) or SamplePrompt (a prompts-file line and its own settings)
    negative_prompt: str = ""
    seed: int = 1234
    increment_seed: bool = True
    scheduler: str | None = None  # None: the model's own scheduler
    steps: int = 30
    guidance: float = 7.5
    width: int | None = None
    height: int | None = None
    device: torch.device = torch.device("cpu")
    weight_dtype: torch.dtype = torch.float32
    autocast_dtype: torch.dtype | None = None
    token_length: int | None = None  # None: as the model was trained (its projection, or its run's settings)
    use_ema: bool = True
    custom: bool = False
    offload: bool = False  # on CUDA: each module moved to the GPU only while it runs
    vae_scaling: float | None = None  # None: the VAE config's own scaling factor
    seed_device: torch.device | None = None  # where the noise is drawn; None: the sampling device


# ---------------------------------------------------------------------------------------------
# What a folder says about itself, read from its config files without loading any weights


def _is_local(model: str) -> bool:
    return os.path.exists(model) or not HUB_ID.match(model) or model.startswith((".", "/", "~"))


def check_model(model: str) -> None:
    """SamplerInputError unless ``model`` is a pipeline folder (or a hub id, which loading will check)."""
    if not _is_local(model):
        return
    path = Path(model)
    if not path.exists():
        raise SamplerInputError(f"{model}: no such folder")
    if not path.is_dir() or not (path / "model_index.json").is_file():
        hint = ""
        if path.is_dir() and ckpt.list_checkpoints(path):
            hint = " (a training run's folder: sample its checkpoints with --watch, or name one checkpoint)"
        raise SamplerInputError(f"{model}: not a pipeline folder (no model_index.json){hint}")


def check_out_folder(out: Path, flag: str = "--out") -> None:
    """SamplerInputError unless the PNGs can be written into the folder ``out`` (made when they are, if
    missing); nothing is made here, so a refusal, or a model that then fails to load, leaves nothing behind."""
    if out.exists() and not out.is_dir():
        raise SamplerInputError(f"{flag} {out}: an existing file, not a folder; name a folder for the PNGs")
    problem = writable_problem(out)
    if problem:
        raise SamplerInputError(f"{flag} {out}: {problem}")


def _read_config(model: str, file_name: str, subfolder: str = "") -> dict:
    """A JSON config of a folder (a watcher reads a few per checkpoint, and refusing a flag needs no
    import of diffusers) or of a hub id (fetched, or read from the hub cache)."""
    if _is_local(model):
        path = Path(model, subfolder, file_name)
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(model, file_name, subfolder=subfolder or None))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{path}: not a JSON config ({error})") from None


def model_index(model: str) -> dict:
    return _read_config(model, "model_index.json")


def scheduler_config(model: str) -> dict:
    return _read_config(model, "scheduler_config.json", "scheduler")


def own_scheduler_name(model: str) -> str:
    """The class of the model's own scheduler, as draw_samples records it when no sampler is chosen."""
    entry = model_index(model).get("scheduler")
    return entry[1] if isinstance(entry, list) and len(entry) == 2 else "unknown"


def recorded_token_length(model: str) -> int | None:
    """The token length the model was trained to (--force_toklen): its T5 projection keeps it; for an
    SD1.5 model, the settings of the run that wrote it (train_args.json beside or above the folder)."""
    if "t5_projection" in model_index(model):
        value = _read_config(model, "config.json", "t5_projection").get("token_length")
        return int(value) if value is not None else None
    if not _is_local(model):
        return None
    folder = Path(model)
    for run_dir in (folder, folder.parent):
        if (run_dir / ARGS_FILE).is_file():
            config = _start_that_wrote(run_dir / ARGS_FILE, folder)
            value = config.get("force_toklen")
            return int(value) if value is not None else None
    return None


def _start_that_wrote(args_file: Path, folder: Path) -> dict:
    """The config of the training start that wrote ``folder``: the last start before the folder was
    written (a resume may change --force_toklen); the last one when times do not tell."""
    try:
        starts = json.loads(args_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(starts, list) or not starts:
        return {}
    written = folder / ckpt.TRAINING_STATE_FILE
    written_at = (written if written.exists() else folder).stat().st_mtime
    chosen = starts[-1]
    for start in starts:
        try:
            started = datetime.strptime(start["started"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
        except (KeyError, TypeError, ValueError):
            continue
        if started <= written_at + 1:  # the start time has whole seconds
            chosen = start
    return chosen.get("config", {}) if isinstance(chosen, dict) else {}


def step_of(folder: str) -> int:
    """A checkpoint's step (``checkpoint-00100`` -> 100), as the trainer records it; 0 for other folders."""
    match = ckpt.CHECKPOINT_PATTERN.match(Path(folder).name)
    return int(match.group(1)) if match else 0


def plan_for(model: str, settings: SampleSettings, step: int) -> tuple[list[tuple[str, SampleMetadata]], int | None]:
    """(the samples to draw for ``model`` and what their PNGs will say, the token length to condition on)."""
    token_length = settings.token_length if settings.token_length is not None else recorded_token_length(model)
    name = settings.scheduler or own_scheduler_name(model)
    plan = sample_plan(settings.prompts, step=step, seed=settings.seed, sampler_steps=settings.steps,
                       guidance_scale=settings.guidance, negative_prompt=settings.negative_prompt,
                       token_length=token_length, scheduler_name=name, increment_seed=settings.increment_seed,
                       width=settings.width, height=settings.height)
    return plan, token_length


# ---------------------------------------------------------------------------------------------
# Loading and drawing


def load_sampling_pipeline(model: str, settings: SampleSettings):
    """The folder's pipeline on the sampling device: its EMA UNet when it has one (the trainer's
    samples show the EMA weights) unless --no_ema."""
    from diffusers import UNet2DConditionModel

    from ..models import loading as models

    models.quiet_loading()  # a watcher's log is one line per checkpoint
    subfolder = "unet"
    if settings.use_ema and _is_local(model) and (Path(model) / ckpt.EMA_COMPONENT).is_dir():
        subfolder = ckpt.EMA_COMPONENT
    unet = UNet2DConditionModel.from_pretrained(model, subfolder=subfolder, torch_dtype=settings.weight_dtype)
    if _is_local(model):
        merge_checkpoint_adapter(unet, Path(model), settings.use_ema)
    pipeline = models.load_pipeline_around(model, unet, settings.custom)
    if settings.vae_scaling is not None:  # the latents are divided by it before decoding
        pipeline.vae.register_to_config(scaling_factor=settings.vae_scaling)
    pipeline.to(dtype=settings.weight_dtype)
    if settings.offload and settings.device.type == "cuda":
        pipeline.enable_sequential_cpu_offload(device=settings.device)
    else:
        pipeline.to(device=settings.device)
    unet.eval()
    return pipeline


def merge_checkpoint_adapter(unet, folder: Path, use_ema: bool) -> None:
    """An adapter run's checkpoint (a LoRA, LoHa or LoKr beside its base UNet): the adapter (its EMA when
    it has one, unless --no_ema) merged into ``unet``, so samples show what the run's own samples showed."""
    from ..checkpoint_layout import ADAPTER_EMA_COMPONENT
    from ..models.adapter_folders import holds_adapter
    from ..models.lora_tools import adapter_changes, merge_changes

    ema = folder / ADAPTER_EMA_COMPONENT
    source = ema if use_ema and holds_adapter(ema) else folder
    if holds_adapter(source):
        merge_changes(unet, adapter_changes(unet, source))


def sample_model(model: str, out_dir: Path, settings: SampleSettings, step: int | None = None) -> list[Path]:
    """Draw every prompt from ``model`` into ``out_dir``. SamplerInputError for a sampler or size the
    model cannot take."""
    from ..models.sampling import build_sampling_scheduler

    problem = scheduler_choice_problem(settings.scheduler, scheduler_config(model)) if settings.scheduler else None
    if problem:
        raise SamplerInputError(f"--scheduler {problem}")
    step = step_of(model) if step is None else step
    plan, token_length = plan_for(model, settings, step)
    pipeline = load_sampling_pipeline(model, settings)
    factor = pipeline.vae_scale_factor
    for flag in ("width", "height"):
        value = getattr(settings, flag)
        if value is not None and value % factor:
            raise SamplerInputError(f"--{flag} {value}: must be a multiple of {factor} (the VAE's factor) for {model}")
    for _, metadata in plan:  # a prompts-file line's own size
        for letter, value in (("w", metadata.width), ("h", metadata.height)):
            if value is not None and value % factor:
                raise SamplerInputError(f"--prompts_file: {metadata.prompt!r} --{letter} {value}: must be a "
                                        f"multiple of {factor} (the VAE's factor) for {model}")
    scheduler = build_sampling_scheduler(settings.scheduler, pipeline.scheduler.config) if settings.scheduler else None
    return draw_samples(pipeline, settings.prompts, out_dir, step=step, seed=settings.seed,
                        sampler_steps=settings.steps, guidance_scale=settings.guidance,
                        negative_prompt=settings.negative_prompt, device=settings.device,
                        autocast_dtype=settings.autocast_dtype, token_length=token_length, scheduler=scheduler,
                        scheduler_name=plan[0][1].scheduler, height=settings.height, width=settings.width,
                        increment_seed=settings.increment_seed, generator_device=settings.seed_device)
