"""The parts of a pipeline that do not train: loaded once, saved around the UNet, used to draw samples.

Only the UNet trains. The VAE, text encoder(s), tokenizer and scheduler are loaded (on the CPU) the
first time a checkpoint is saved or samples are drawn, with the scales training applied stored in
them, so every checkpoint is a complete pipeline folder that conditions the UNet as training did.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from . import models
from .config import ConfigError, TrainConfig
from .prompts import read_prompts_file
from .sampling import build_sampling_scheduler, draw_samples, scheduler_choice_problem
from .sidecar import IMAGE_LATENT_KEY
from .telemetry import Telemetry
from .tree import walk_files


class CheckpointSampler:
    """Owns the parts that do not train: saves checkpoints around the UNet and draws samples."""

    def __init__(self, config: TrainConfig, device: torch.device, telemetry: Telemetry | None = None):
        self.config = config
        self.telemetry = telemetry
        self.device = device
        self.frozen_dir = Path(config.output_dir) / ckpt.FROZEN_DIR_NAME
        self.autocast_dtype = torch.bfloat16 if device.type == "cuda" and not config.fp32 else None
        self._pipeline = None
        self.prompts = sample_prompts(config)
        self.training_size = training_latent_size(config)
        problem = sample_scheduler_problem(config) if self.prompts else None
        if problem:  # refused before step 1, not at the first sample
            raise ConfigError(problem)

    def _pipeline_for(self, unet):
        if self._pipeline is None:
            self._pipeline = models.load_pipeline_around(self.config.pretrained_model, unet, self.config.is_custom)
            _match_training_scales(self._pipeline, self.config)
            _match_training_objective(self._pipeline, self.config)
        _record_training_size(unet, self.training_size)
        self._pipeline.unet = unet
        return self._pipeline

    def sample(self, unet, step: int, out_dir: Path) -> list[Path]:
        if not self.prompts:
            return []
        pipeline = self._pipeline_for(unet)
        name = self.config.sample_scheduler
        scheduler = build_sampling_scheduler(name, pipeline.scheduler.config) if name else None
        was_training = unet.training
        unet.eval()
        others = [m for name, m in pipeline.components.items() if isinstance(m, torch.nn.Module) and name != "unet"]
        for module in others:
            module.to(self.device)
        try:
            paths = draw_samples(pipeline, self.prompts, out_dir, step=step, seed=self.config.sample_seed,
                                 sampler_steps=self.config.sampler_steps, guidance_scale=self.config.guidance_scale,
                                 device=self.device, autocast_dtype=self.autocast_dtype,
                                 token_length=self.config.force_toklen, scheduler=scheduler, scheduler_name=name)
        finally:
            if self.config.cpu_offload:  # give the memory back to training until the next samples
                for module in others:
                    module.to("cpu")
            unet.train(was_training)
        if self.telemetry is not None:
            self.telemetry.add_images(step, dict(zip(self.prompts, paths)))
        return paths

    def save(self, unet, step: int, training_state: dict, ema=None, trainable=None) -> Path | None:
        destination = ckpt.checkpoint_dir(Path(self.config.output_dir), step)
        try:
            _save_frozen_parts(self._pipeline_for(unet), self.frozen_dir, self.config.pretrained_model)
            ckpt.save_checkpoint(destination, unet, self.frozen_dir, training_state,
                                 ema_weights=_ema_writer(ema, trainable, unet))
        except Exception as error:  # a full disk shows as OSError, RuntimeError or safetensors' own error
            previous = ckpt.latest_checkpoint(Path(self.config.output_dir))
            tqdm.write(f"[train] could not save checkpoint at step {step} ({type(error).__name__}: {error}); "
                       f"the previous checkpoint {previous} is intact. Training goes on.")
            return None
        return destination


def _save_frozen_parts(pipeline, frozen_dir: Path, model: str) -> None:
    """The template of every checkpoint, with the code a hub-style ``model`` folder carries put back
    (diffusers' save drops it): checkpoints then load as the source did, with custom_pipeline=checkpoint."""
    ckpt.save_frozen_components(pipeline, frozen_dir, models.model_name(model))
    models.put_folder_code_back(model, frozen_dir)


def scale_problem(config: TrainConfig) -> str | None:
    """Why --text_scaling_factor cannot be kept in the model, if it cannot (checked before any model loads).

    Samples and checkpoints must condition the UNet as training did; only a T5 pipeline has a place
    for a text scale (its projection's scaling_factor).
    """
    if config.text_scaling_factor == 1.0:
        return None
    from diffusers import DiffusionPipeline

    if "t5_projection" not in DiffusionPipeline.load_config(config.pretrained_model):
        return ("--text_scaling_factor: this model's pipeline has no text projection to keep the scale in, so its "
                "samples and checkpoints would not see what training saw; scale the cached embeddings instead, "
                "or train a T5 pipeline")
    return None


def sample_prompts(config: TrainConfig) -> list[str]:
    """--sample_prompt's prompts, then --sample_prompts_file's (validated when the flags were parsed)."""
    return list(config.sample_prompt) + (read_prompts_file(config.sample_prompts_file)
                                         if config.sample_prompts_file else [])


def sample_scheduler_problem(config: TrainConfig) -> str | None:
    """Why --sample_scheduler cannot draw this model, if it cannot (reads only its scheduler config)."""
    if not config.sample_scheduler:
        return None
    from diffusers import DDIMScheduler

    scheduler_config = DDIMScheduler.load_config(config.pretrained_model, subfolder="scheduler")
    problem = scheduler_choice_problem(config.sample_scheduler, scheduler_config)
    return f"--sample_scheduler {problem}" if problem else None


def training_latent_size(config: TrainConfig) -> int | None:
    """The side of the latents training reads (one of its sidecars tells: the loader refuses a run
    whose caches differ in shape), or None when none is found. Caches are square crops."""
    from safetensors import safe_open

    for root in config.train_data_dir:
        for path in walk_files(root, (config.imgcache_suffix,)):
            try:
                with safe_open(path, framework="pt") as handle:
                    shape = handle.get_slice(IMAGE_LATENT_KEY).get_shape()
            except Exception:  # a bad sidecar is the loader's to report; look at the next one
                continue
            return int(shape[-1]) if len(shape) == 3 and shape[-1] == shape[-2] else None
    return None


def _record_training_size(unet, size: int | None) -> None:
    """Keep the size training sees in the UNet's config (sample_size, in latent pixels): samples are
    drawn at it, and every pipeline that loads a checkpoint (diffusers' own, sample_images.py) draws
    at it by default, not at the base model's size."""
    if size is not None and unet.config.sample_size != size:
        unet.register_to_config(sample_size=size)


def _match_training_scales(pipeline, config: TrainConfig) -> None:
    """Store the scales (and the forced token length) training applies in the pipeline that draws
    samples and is saved in checkpoints. An SD1.5 pipeline has no place for a token length: its
    samples get it from draw_samples, its users from the README."""
    if config.vae_scaling_factor:
        pipeline.vae.register_to_config(scaling_factor=config.vae_scaling_factor)
    if config.text_scaling_factor != 1.0:
        projection = pipeline.t5_projection
        projection.register_to_config(scaling_factor=projection.config.scaling_factor * config.text_scaling_factor)
    projection = getattr(pipeline, "t5_projection", None)
    # None too: a model trained with a length, trained on without (a projection of a folder's own code
    # that never had a length is left as it is: its class may not take one)
    if projection is not None and (config.force_toklen is not None or "token_length" in projection.config):
        projection.register_to_config(token_length=config.force_toklen)


def _match_training_objective(pipeline, config: TrainConfig) -> None:
    """Store the scheduler that undoes the noise this run trained with (flow matching, a prediction type,
    zero terminal SNR) in the pipeline that draws samples and is saved in checkpoints."""
    from .objective import objective_kind, sampling_scheduler

    kind = objective_kind(pipeline.scheduler, config.objective)
    pipeline.scheduler = sampling_scheduler(pipeline.scheduler, kind, prediction_type=config.prediction_type,
                                            zero_terminal_snr=config.zero_terminal_snr, flow_shift=config.flow_shift)


def _ema_writer(ema, trainable, unet):
    """A function that saves the EMA weights as a UNet folder, or None without EMA."""
    if ema is None:
        return None

    def write(folder: Path) -> None:
        ema.store(trainable)
        ema.copy_to(trainable)
        try:
            unet.save_pretrained(folder, safe_serialization=True)
        finally:
            ema.restore(trainable)

    return write
