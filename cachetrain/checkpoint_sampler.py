"""The parts of a pipeline that do not train: loaded once, saved around the UNet, used to draw samples.

Only the UNet trains. The VAE, text encoder(s), tokenizer and scheduler are loaded (on the CPU) before
step 1 (``prepare``), with the scales training applied stored in them, so every checkpoint is a complete
pipeline folder that conditions the UNet as training did, and a part that is missing stops the run
before it trains rather than at its first save. A save or a sample that fails later is reported, and
training goes on (the trainer decides when failed saves must stop it).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from . import export, ldm_layout, models
from .config import ConfigError, TrainConfig
from .objective import is_flow_config
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
        self.failed_samples = 0  # prompts that could not be drawn, over the whole start

    def prepare(self, unet) -> None:
        """Before step 1: load every part a checkpoint needs, write the frozen template, and try the
        sample settings on the sampling scheduler, so that no save or sample fails later for a reason
        known now. Raises SetupError naming the part, file or flag."""
        model = self.config.pretrained_model
        try:
            pipeline = self._pipeline_for(unet)
        except Exception as error:
            raise SetupError(f"--pretrained_model {model}: the parts a checkpoint needs do not load "
                             f"({type(error).__name__}: {_first_line(error)})") from None
        try:
            _save_frozen_parts(pipeline, self.frozen_dir, model)
        except Exception as error:  # a full disk: OSError, or RuntimeError from a library's writer
            raise SetupError(f"--output_dir {self.config.output_dir}: could not write the parts every checkpoint "
                             f"links to ({self.frozen_dir.name}/: {type(error).__name__}: {_first_line(error)})"
                             ) from None
        if self.prompts:
            drawing = self._drawing_scheduler(pipeline) or pipeline.scheduler
            problem = sampler_steps_problem(drawing, self.config.sampler_steps)
            if problem:
                raise SetupError(problem)

    def _pipeline_for(self, unet):
        if self._pipeline is None:
            if ldm_layout.is_single_file(self.config.pretrained_model):
                self._pipeline = models.load_single_file_pipeline_around(self.config.pretrained_model, unet,
                                                                         self.config.single_file_config)
            else:
                self._pipeline = models.load_pipeline_around(self.config.pretrained_model, unet,
                                                             self.config.is_custom)
            _match_training_scales(self._pipeline, self.config)
            self._pipeline = _match_training_objective(self._pipeline, self.config)
        _record_training_size(unet, self.training_size)
        self._pipeline.unet = unet
        return self._pipeline

    def _drawing_scheduler(self, pipeline):
        """The --sample_scheduler built from the pipeline's own config, or None for the pipeline's own."""
        name = self.config.sample_scheduler
        return build_sampling_scheduler(name, pipeline.scheduler.config) if name else None

    def sample(self, unet, step: int, out_dir: Path) -> list[Path]:
        """The samples of ``step``. A prompt that cannot be drawn (any error, CUDA out of memory
        included) is reported with its reason and counted (train/failed_samples); training goes on."""
        prompts = self.prompts
        if not prompts:
            return []
        failed: list[int] = []

        def report(index: int, prompt: str, error: Exception) -> None:
            failed.append(index)
            tqdm.write(f"[train] sample {index} at step {step} failed for prompt {prompt!r} "
                       f"({type(error).__name__}: {_first_line(error)}); training goes on")

        was_training = unet.training
        paths: list[Path] = []
        try:
            pipeline = self._pipeline_for(unet)
            scheduler = self._drawing_scheduler(pipeline)
            unet.eval()
            others = [m for name, m in pipeline.components.items()
                      if isinstance(m, torch.nn.Module) and name != "unet"]
            try:
                for module in others:
                    module.to(self.device)
                paths = draw_samples(pipeline, prompts, out_dir, step=step, seed=self.config.sample_seed,
                                     sampler_steps=self.config.sampler_steps,
                                     guidance_scale=self.config.guidance_scale, device=self.device,
                                     autocast_dtype=self.autocast_dtype, token_length=self.config.force_toklen,
                                     scheduler=scheduler, scheduler_name=self.config.sample_scheduler,
                                     on_failure=report)
            finally:
                if self.config.cpu_offload:  # give the memory back to training until the next samples
                    for module in others:
                        module.to("cpu")
        except Exception as error:  # outside one prompt: loading the parts, moving them to the device
            failed = list(range(len(prompts)))
            tqdm.write(f"[train] samples at step {step} failed ({type(error).__name__}: {_first_line(error)}); "
                       "training goes on")
        finally:
            unet.train(was_training)
        drawn = [prompt for index, prompt in enumerate(prompts) if index not in failed]
        if failed:
            self.failed_samples += len(failed)
            if self.device.type == "cuda":  # what a failed (out-of-memory) sample held goes back to training
                torch.cuda.empty_cache()
        if self.telemetry is not None:
            if failed:
                self.telemetry.add_scalar("train/failed_samples", self.failed_samples, step)
            if drawn:
                try:
                    self.telemetry.add_images(step, dict(zip(drawn, paths)))
                except Exception as error:  # the PNGs are on disk; only their copy in the logs is missing
                    tqdm.write(f"[train] samples of step {step} not logged to tensorboard "
                               f"({type(error).__name__}: {_first_line(error)})")
        return paths

    def save(self, unet, step: int, training_state: dict, ema=None, trainable=None) -> Path | None:
        destination = ckpt.checkpoint_dir(Path(self.config.output_dir), step)
        try:
            _save_frozen_parts(self._pipeline_for(unet), self.frozen_dir, self.config.pretrained_model)
            ckpt.save_checkpoint(destination, unet, self.frozen_dir, training_state,
                                 ema_weights=_ema_writer(ema, trainable, unet))
        except Exception as error:  # a full disk shows as OSError, RuntimeError or safetensors' own error
            newest = ckpt.latest_checkpoint(Path(self.config.output_dir))
            kept = (f"the newest saved checkpoint, {newest.name}, is intact" if newest is not None
                    else "no checkpoint of this run is saved yet")
            tqdm.write(f"[train] could not save checkpoint at step {step} "
                       f"({type(error).__name__}: {_first_line(error)}); {kept}")
            return None
        self._write_single_file(destination, step, ema is not None)
        return destination

    def _write_single_file(self, checkpoint: Path, step: int, has_ema: bool) -> None:
        """--save_single_file: model.safetensors in the checkpoint (publish_final copies it beside the
        final model). A failure costs the file, not the checkpoint or the run."""
        if not self.config.save_single_file:
            return
        title = f"{Path(self.config.output_dir).resolve().name} step {step}"
        try:
            export.export_single_file(checkpoint, checkpoint / export.SINGLE_FILE_NAME, ema=has_ema, steps=step,
                                      title=title)
        except Exception as error:  # a full disk shows as OSError or safetensors' own error
            tqdm.write(f"[train] could not write {checkpoint / export.SINGLE_FILE_NAME} ({type(error).__name__}: "
                       f"{error}); the checkpoint folder itself is saved. Training goes on.")


def _save_frozen_parts(pipeline, frozen_dir: Path, model: str) -> None:
    """The template of every checkpoint, with the code a hub-style ``model`` folder carries put back
    (diffusers' save drops it): checkpoints then load as the source did, with custom_pipeline=checkpoint."""
    ckpt.save_frozen_components(pipeline, frozen_dir, models.model_name(model))
    models.put_folder_code_back(model, frozen_dir)


class SetupError(RuntimeError):
    """Something found before step 1 that would make every later save or sample fail."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"


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


LEFT_OUT_PARTS = ("safety_checker", "feature_extractor")  # load_pipeline_around leaves these out


def sampler_steps_problem(scheduler, sampler_steps: int) -> str | None:
    """Why the sampling scheduler cannot draw ``sampler_steps`` steps, tried on a copy of it."""
    trial = copy.deepcopy(scheduler)
    try:
        trial.set_timesteps(sampler_steps)
    except Exception as error:
        return (f"--sampler_steps {sampler_steps}: the model's sampling scheduler {type(scheduler).__name__} "
                f"cannot draw that many steps ({type(error).__name__}: {_first_line(error)}); "
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


def sample_prompts(config: TrainConfig) -> list[str]:
    """--sample_prompt's prompts, then --sample_prompts_file's (validated when the flags were parsed)."""
    return list(config.sample_prompt) + (read_prompts_file(config.sample_prompts_file)
                                         if config.sample_prompts_file else [])


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


def _match_training_objective(pipeline, config: TrainConfig):
    """The pipeline that draws samples and is saved in checkpoints, with the scheduler that undoes the noise
    this run trained with (flow matching, a prediction type, zero terminal SNR). A flow run's SD pipeline
    becomes a StableDiffusionFlowPipeline, so its checkpoints draw correctly with a plain from_pretrained."""
    from .flow import flow_pipeline
    from .objective import objective_kind, sampling_scheduler

    kind = objective_kind(pipeline.scheduler, config.objective)
    pipeline.scheduler = sampling_scheduler(pipeline.scheduler, kind, prediction_type=config.prediction_type,
                                            zero_terminal_snr=config.zero_terminal_snr, flow_shift=config.flow_shift)
    return flow_pipeline(pipeline) if kind == "flow" else pipeline


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
