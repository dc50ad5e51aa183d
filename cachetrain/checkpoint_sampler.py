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
from . import export, ldm_layout, models
from .config import TrainConfig
from .sampling import draw_samples
from .telemetry import Telemetry


class CheckpointSampler:
    """Owns the parts that do not train: saves checkpoints around the UNet and draws samples."""

    def __init__(self, config: TrainConfig, device: torch.device, telemetry: Telemetry | None = None):
        self.config = config
        self.telemetry = telemetry
        self.device = device
        self.frozen_dir = Path(config.output_dir) / ckpt.FROZEN_DIR_NAME
        self.autocast_dtype = torch.bfloat16 if device.type == "cuda" and not config.fp32 else None
        self._pipeline = None

    def _pipeline_for(self, unet):
        if self._pipeline is None and ldm_layout.is_single_file(self.config.pretrained_model):
            self._pipeline = models.load_single_file_pipeline_around(self.config.pretrained_model, unet,
                                                                     self.config.single_file_config)
            _match_training_scales(self._pipeline, self.config)
        if self._pipeline is None:
            self._pipeline = models.load_pipeline_around(self.config.pretrained_model, unet, self.config.is_custom)
            _match_training_scales(self._pipeline, self.config)
        self._pipeline.unet = unet
        return self._pipeline

    def sample(self, unet, step: int, out_dir: Path) -> list[Path]:
        if not self.config.sample_prompt:
            return []
        pipeline = self._pipeline_for(unet)
        was_training = unet.training
        unet.eval()
        others = [m for name, m in pipeline.components.items() if isinstance(m, torch.nn.Module) and name != "unet"]
        for module in others:
            module.to(self.device)
        try:
            paths = draw_samples(pipeline, self.config.sample_prompt, out_dir, step=step, seed=self.config.sample_seed,
                                 sampler_steps=self.config.sampler_steps, guidance_scale=self.config.guidance_scale,
                                 device=self.device, autocast_dtype=self.autocast_dtype,
                                 token_length=self.config.force_toklen)
        finally:
            if self.config.cpu_offload:  # give the memory back to training until the next samples
                for module in others:
                    module.to("cpu")
            unet.train(was_training)
        if self.telemetry is not None:
            self.telemetry.add_images(step, dict(zip(self.config.sample_prompt, paths)))
        return paths

    def save(self, unet, step: int, training_state: dict, ema=None, trainable=None) -> Path | None:
        destination = ckpt.checkpoint_dir(Path(self.config.output_dir), step)
        try:
            ckpt.save_frozen_components(self._pipeline_for(unet), self.frozen_dir,
                                        models.model_name(self.config.pretrained_model))
            ckpt.save_checkpoint(destination, unet, self.frozen_dir, training_state,
                                 ema_weights=_ema_writer(ema, trainable, unet))
        except Exception as error:  # a full disk shows as OSError, RuntimeError or safetensors' own error
            previous = ckpt.latest_checkpoint(Path(self.config.output_dir))
            tqdm.write(f"[train] could not save checkpoint at step {step} ({type(error).__name__}: {error}); "
                       f"the previous checkpoint {previous} is intact. Training goes on.")
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
    if hasattr(pipeline, "t5_projection"):  # None too: a model trained with a length, trained on without
        pipeline.t5_projection.register_to_config(token_length=config.force_toklen)


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
