"""Checks made before step 1: what would make every later save or sample fail is refused at the start,
naming the flag, part or file, not met at the first save days later."""

from __future__ import annotations

import copy
import os
from pathlib import Path

from ..models import ldm_layout, loading as models
from ..cli import first_line
from .config import TrainConfig
from .objective import is_flow_config
from ..models.sampling import scheduler_choice_problem

LEFT_OUT_PARTS = ("safety_checker", "feature_extractor")  # load_pipeline_around leaves these out


class SetupError(RuntimeError):
    """Something found before step 1 that would make every later save or sample fail."""


def start_problem(config: TrainConfig) -> str | None:
    """Why this run's model and flags cannot train and save, if they cannot (before any model loads)."""
    return (model_problem(config.pretrained_model) or scale_problem(config) or single_file_problem(config)
            or models.folder_code_problem(config.pretrained_model, config.is_custom))


def model_problem(model: str) -> str | None:
    """Why ``model`` cannot be trained and saved: not a folder nor a hub id that can be reached, or a
    folder that lacks a part its model_index.json names (checked before anything loads)."""
    if ldm_layout.is_single_file(model):  # its file is checked with the flags; the rest comes from its config
        return None
    if not Path(model).is_dir():
        from diffusers import DiffusionPipeline

        try:
            DiffusionPipeline.load_config(model)
        except Exception as error:  # hub errors: not found, offline, malformed id, no network
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
            return (f"--pretrained_model {model}: no such folder, and not a hub id that can be reached{offline} "
                    f"({type(error).__name__})")
        return None
    missing = missing_parts(model)
    if missing:
        return f"--pretrained_model {model}: {missing}; every checkpoint is a whole pipeline and needs it"
    return None


def missing_parts(model: str) -> str | None:
    """What a local model folder lacks of the parts its model_index.json names (None when nothing)."""
    index_file = Path(model) / "model_index.json"
    if not index_file.exists():
        return f"no model_index.json in {model}"
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(model)
    for name, value in index.items():
        if name.startswith("_") or name in LEFT_OUT_PARTS or not isinstance(value, (list, tuple)):
            continue
        if value[0] is None or value[1] is None:  # a part the folder declares absent
            continue
        folder = Path(model) / name
        if not folder.is_dir():
            return f"its model_index.json names the part {name!r}, but {folder}{os.sep} is missing"
        if not any(folder.iterdir()):
            return f"the part {name!r} ({folder}{os.sep}) is an empty folder"
    return None


def sampler_steps_problem(scheduler, sampler_steps: int) -> str | None:
    """Why the sampling scheduler cannot draw ``sampler_steps`` steps, tried on a copy of it."""
    trial = copy.deepcopy(scheduler)
    try:
        trial.set_timesteps(sampler_steps)
    except Exception as error:
        return (f"--sampler_steps {sampler_steps}: the model's sampling scheduler {type(scheduler).__name__} "
                f"cannot draw that many steps ({type(error).__name__}: {first_line(error)}); "
                "choose more --sampler_steps or another scheduler in the model's scheduler/ folder")
    return None


def scale_problem(config: TrainConfig) -> str | None:
    """Why --text_scaling_factor cannot be kept in the model, if it cannot (checked before any model loads).

    Samples and checkpoints must condition the UNet as training did; only a T5 pipeline has a place
    for a text scale (its projection's scaling_factor).
    """
    if config.text_scaling_factor == 1.0:
        return None
    from diffusers import DiffusionPipeline

    if ldm_layout.is_single_file(config.pretrained_model) \
            or "t5_projection" not in DiffusionPipeline.load_config(config.pretrained_model):
        return ("--text_scaling_factor: this model's pipeline has no text projection to keep the scale in, so its "
                "samples and checkpoints would not see what training saw; scale the cached embeddings instead, "
                "or train a T5 pipeline")
    return None


def sample_scheduler_problem(config: TrainConfig) -> str | None:
    """Why --sample_scheduler cannot draw this model, if it cannot (reads only its scheduler config)."""
    if not config.sample_scheduler:
        return None
    from diffusers import DDIMScheduler

    source = (models.single_file_config_source(config.single_file_config)
              if ldm_layout.is_single_file(config.pretrained_model) else config.pretrained_model)
    scheduler_config = DDIMScheduler.load_config(source, subfolder="scheduler")
    problem = scheduler_choice_problem(config.sample_scheduler, scheduler_config)
    return f"--sample_scheduler {problem}" if problem else None


def single_file_problem(config: TrainConfig) -> str | None:
    """Why --save_single_file cannot write this model's UNet, if it cannot (checked before any model loads)."""
    if not config.save_single_file:
        return None
    from diffusers import UNet2DConditionModel

    source = config.pretrained_model
    if ldm_layout.is_single_file(source):  # imported from a single file: it exports again
        return None
    problem = ldm_layout.unet_layout_problem(UNet2DConditionModel.load_config(source, subfolder="unet"))
    if problem:
        return (f"--save_single_file: the UNet of {source} has no single-file layout ({problem}); "
                f"what exports: {ldm_layout.EXPORTABLE_UNET_LAYOUTS}")
    from diffusers import DDIMScheduler

    if config.objective == "flow" or is_flow_config(DDIMScheduler.load_config(source, subfolder="scheduler")):
        return ("--save_single_file: a flow-matching run; the single-file format has no marker for flow models, so "
                "A1111/ComfyUI would sample it as an epsilon model (the checkpoint folders load with diffusers)")
    return None
