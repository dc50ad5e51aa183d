"""The parts of a pipeline that do not train (VAE, text encoder(s), tokenizer, scheduler): loaded once
around the training UNet, matched to what training applies, and written once as every checkpoint's
template.

Only the UNet trains. The other parts are loaded (on the CPU) before step 1 with the scales training
applied stored in them, so every checkpoint is a complete pipeline folder that conditions the UNet as
training did, and samples are drawn by that same pipeline. A part that is missing stops the run before
it trains rather than at its first save.
"""

from __future__ import annotations

from pathlib import Path

from . import checkpoint as ckpt
from ..models import ldm_layout, loading as models
from ..cli import first_line
from .config import TrainConfig
from ..sidecar import IMAGE_LATENT_KEY
from .start_checks import SetupError
from ..tree import walk_files


class FrozenParts:
    """The pipeline around the training UNet, and its template folder ``output_dir/.frozen-components``."""

    def __init__(self, config: TrainConfig, latent_shape: tuple[int, ...] | None = None):
        """``latent_shape``: the [C, H, W] training reads (the commonest bucket's with --aspect_buckets);
        default: the first latent sidecar's."""
        self.config = config
        self.frozen_dir = Path(config.output_dir) / ckpt.FROZEN_DIR_NAME
        self.training_size = (sample_size_of(latent_shape) if latent_shape is not None
                              else training_latent_size(config))
        self._pipeline = None

    def prepare(self, unet):
        """Before step 1: load every part a checkpoint needs and write the template; the pipeline.
        Raises SetupError naming the part, file or flag."""
        model = self.config.pretrained_model
        try:
            pipeline = self.around(unet)
        except Exception as error:
            raise SetupError(f"--pretrained_model {model}: the parts a checkpoint needs do not load "
                             f"({type(error).__name__}: {first_line(error)})") from None
        try:
            self.write_template(unet)
        except Exception as error:  # a full disk: OSError, or RuntimeError from a library's writer
            raise SetupError(f"--output_dir {self.config.output_dir}: could not write the parts every checkpoint "
                             f"links to ({self.frozen_dir.name}/: {type(error).__name__}: {first_line(error)})"
                             ) from None
        return pipeline

    def around(self, unet):
        """The pipeline (loaded at the first call) with ``unet`` as its UNet."""
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
        if hasattr(self._pipeline, "_is_unet_config_sample_size_int"):  # diffusers reads it at __init__ only
            self._pipeline._is_unet_config_sample_size_int = isinstance(unet.config.sample_size, int)
        return self._pipeline

    def write_template(self, unet) -> None:
        """The template of every checkpoint (rewritten only when it changed), with the code a hub-style
        model folder carries put back (diffusers' save drops it): checkpoints then load as the source
        did, with custom_pipeline=checkpoint."""
        model = self.config.pretrained_model
        ckpt.save_frozen_components(self.around(unet), self.frozen_dir, models.model_name(model))
        models.put_folder_code_back(model, self.frozen_dir)


def sample_size_of(latent_shape: tuple[int, ...]) -> int | list[int]:
    """The UNet config's sample_size for latents of ``latent_shape`` [C, H, W]: the side when square,
    else [H, W] (diffusers' pipelines take either)."""
    height, width = int(latent_shape[-2]), int(latent_shape[-1])
    return height if height == width else [height, width]


def training_latent_size(config: TrainConfig) -> int | list[int] | None:
    """The sample_size of the latents training reads (one of its sidecars tells: the loader refuses a run
    whose caches differ in shape), or None when none is found."""
    from safetensors import safe_open

    for root in config.train_data_dir:
        for path in walk_files(root, (config.imgcache_suffix,)):
            try:
                with safe_open(path, framework="pt") as handle:
                    shape = handle.get_slice(IMAGE_LATENT_KEY).get_shape()
            except Exception:  # a bad sidecar is the loader's to report; look at the next one
                continue
            return sample_size_of(shape) if len(shape) == 3 else None
    return None


def _record_training_size(unet, size: int | list[int] | None) -> None:
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


def _match_training_objective(pipeline, config: TrainConfig):
    """The pipeline that draws samples and is saved in checkpoints, with the scheduler that undoes the noise
    this run trained with (flow matching, a prediction type, zero terminal SNR). A flow run's SD pipeline
    becomes a StableDiffusionFlowPipeline, so its checkpoints draw correctly with a plain from_pretrained."""
    from ..models.flow import flow_pipeline
    from .objective import objective_kind, sampling_scheduler

    kind = objective_kind(pipeline.scheduler, config.objective)
    pipeline.scheduler = sampling_scheduler(pipeline.scheduler, kind, prediction_type=config.prediction_type,
                                            zero_terminal_snr=config.zero_terminal_snr, flow_shift=config.flow_shift)
    return flow_pipeline(pipeline) if kind == "flow" else pipeline
