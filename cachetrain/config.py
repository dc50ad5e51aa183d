"""The trainer's flags, defaults and validation, in one place.

Each field of TrainConfig is one command-line flag (same name, the seed's names); its help text is
the field's ``help`` metadata. ``parse_train_args`` builds the parser from the fields, parses, and
validates before anything heavy is imported or loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .cli import ArgumentParser
from .ldm_layout import is_single_file

OPTIMIZERS = ("adamw", "adamw8", "lion")
SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_min_lr", "cosine_with_restarts", "polynomial",
              "constant_with_warmup", "inverse_sqrt", "warmup_stable_decay")


class ConfigError(ValueError):
    """An invalid flag or combination of flags; the message says which and why."""


def _flag(default: Any = None, help: str = "", **argparse_kwargs: Any):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **argparse_kwargs})
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    # what to train, on what, and where to write
    pretrained_model: str = _flag(None, "diffusers folder or hub id of the model to fine-tune", required=True)
    is_custom: bool = _flag(False, "the model folder carries its own pipeline code (trust it)")
    train_data_dir: list[str] = _flag([], "folder(s) of sidecar pairs; repeatable", nargs="+", action="extend", required=True)
    output_dir: str = _flag("output", "where checkpoints, samples, logs and the final model go")
    copy_config: str | None = _flag(None, "a settings file (e.g. the wrapper script) archived into output_dir")
    imgcache_suffix: str = _flag(".img_sdvae", "suffix of the latent sidecars")
    txtcache_suffix: str = _flag(".txt_clipl", "suffix of the text-embedding sidecars")
    num_workers: int = _flag(2, "DataLoader worker processes reading sidecars")
    # single-file models (the original SD layout of A1111 / ComfyUI)
    single_file_config: str | None = _flag(None, "with a .safetensors --pretrained_model: the folder or hub id its "
                                                 "configs and tokenizer come from (default: the SD1.5 hub id)")
    save_single_file: bool = _flag(False, "also write model.safetensors (original SD layout, fp16; the EMA weights "
                                          "with --ema_decay) into each checkpoint and beside the final model")
    # batch and schedule
    batch_size: int = _flag(4, "samples per micro-batch (per process)")
    gradient_accum: int = _flag(1, "micro-batches per optimizer step")
    max_steps: str = _flag("1000", "optimizer steps to train, or Ne for N epochs (e.g. 3e)")
    learning_rate: float = _flag(1e-5, "peak learning rate")
    min_learning_rate: float = _flag(0.1, "final LR as a ratio of the peak, for cosine_with_min_lr")
    learning_rate_decay: float = _flag(0.0, "with --scheduler constant: subtracted from the LR after each epoch")
    scheduler: str = _flag("constant", "LR schedule: " + "|".join(SCHEDULERS), choices=SCHEDULERS)
    warmup_steps: int = _flag(0, "optimizer steps of linear LR warm-up")
    optimizer: str = _flag("adamw", "adamw | adamw8 (bitsandbytes 8-bit AdamW) | lion", choices=OPTIMIZERS)
    betas: list[float] = _flag([0.9, 0.999], "optimizer betas B1 B2", nargs=2, type=float)
    weight_decay: float = _flag(0.01, "decoupled weight decay")
    gradient_clip: float = _flag(1.0, "clip the gradient norm to this; <= 0 disables")
    seed: int = _flag(0, "seed of data order, noise and timesteps")
    # objective
    use_snr: bool = _flag(False, "min-SNR loss weighting (with --noise_gamma)")
    noise_gamma: float = _flag(5.0, "gamma of min-SNR weighting")
    noise_offset: float = _flag(0.0, "offset noise strength (0 disables)")
    caption_dropout: float = _flag(0.0, "probability of training a sample on the empty prompt (needs the data root's .empty_prompt sidecar)")
    ema_decay: float = _flag(0.0, "keep an EMA of the UNet with this decay, e.g. 0.9999 (0 disables); samples use it")
    vae_scaling_factor: float | None = _flag(None, "latent scale; default: the model's VAE config value (an override is saved in the checkpoints' VAE config)", type=float)
    text_scaling_factor: float = _flag(1.0, "multiplier applied to cached text embeddings (T5 pipelines: saved into the checkpoints' projection scaling_factor)")
    force_toklen: int | None = _flag(None, "pad or truncate every caption embedding to N tokens "
                                           "(default: pad each batch to its longest)", type=int)
    # precision and speed
    gradient_checkpointing: bool = _flag(False, "recompute activations in backward to save memory")
    fp32: bool = _flag(False, "no bf16 autocast on CUDA (full fp32)")
    bf16_weights: bool = _flag(False, "weights, grads and optimizer state in bf16, stochastic rounding on the update")
    allow_tf32: bool = _flag(False, "allow TF32 matmuls on CUDA")
    compile: bool = _flag(False, "torch.compile the UNet (slow first steps, faster after)")
    channels_last: bool = _flag(False, "UNet and latents in channels-last memory format (faster convolutions on GPU)")
    # layer selections
    reinit_unet: bool = _flag(False, "re-initialise the whole UNet (train from scratch, seeded)")
    reinit_qk: bool = _flag(False, "re-initialise the query and key weights of every attention layer")
    reinit_crossattn: bool = _flag(False, "re-initialise the cross-attention layers (attn2: q, k, v, out)")
    reinit_attention: bool = _flag(False, "re-initialise all attention layers (attn1 and attn2)")
    unfreeze_attention: bool = _flag(False, "with --targetted_training: train the attention layers")
    unfreeze_up_blocks: list[int] = _flag([], "with --targetted_training: train these up_blocks (e.g. 2 3)", nargs="+", type=int, action="extend")
    unfreeze_down_blocks: list[int] = _flag([], "with --targetted_training: train these down_blocks", nargs="+", type=int, action="extend")
    unfreeze_mid_block: bool = _flag(False, "with --targetted_training: train the mid block")
    targetted_training: bool = _flag(False, "train only the unfrozen and re-initialised layers; freeze the rest")
    # checkpoints and samples
    save_steps: int = _flag(500, "save a checkpoint every N optimizer steps (0: only at the end)")
    save_on_epoch: bool = _flag(False, "save a checkpoint at the end of every epoch")
    save_start: int = _flag(0, "no periodic checkpoint before this optimizer step")
    keep_checkpoints: int = _flag(0, "keep only the newest N checkpoints (0 keeps all)")
    resume: str | None = _flag(None, "'latest' (newest checkpoint of output_dir) or a checkpoint folder", nargs="?", const="latest")
    sample_prompt: list[str] = _flag([], "prompt(s) drawn at each checkpoint; repeatable", nargs="+", action="extend")
    sample_steps: int = _flag(0, "draw samples every N optimizer steps (0: at every checkpoint)")
    sampler_steps: int = _flag(30, "denoising steps of each sample")
    sample_seed: int = _flag(1234, "seed of the sample images (fixed, so checkpoints compare)")
    guidance_scale: float = _flag(7.5, "classifier-free guidance of samples")
    cpu_offload: bool = _flag(False, "move the sampling-only models (VAE, text encoder) back to the CPU after each sampling")
    # validation
    validation_dir: list[str] = _flag([], "folder(s) of held-out sidecar pairs for val/loss", nargs="+", action="extend")
    validation_split: float = _flag(0.0, "hold out this fraction of the training pairs for val/loss instead")
    validation_steps: int = _flag(0, "compute val/loss every N optimizer steps (0: at each checkpoint)")
    # telemetry and safety
    log_every: int = _flag(10, "read metrics back from the device and log them every N optimizer steps")
    max_bad_steps: int = _flag(10, "stop after this many optimizer steps in a row had NaN/Inf gradients")
    no_progress: bool = _flag(False, "no progress bar")

    @property
    def max_epochs(self) -> int | None:
        match = re.fullmatch(r"(\d+)e", self.max_steps.strip().lower())
        return int(match.group(1)) if match else None

    def max_optimizer_steps(self, batches_per_epoch: int) -> int:
        """--max_steps in optimizer steps, turning Ne into N epochs' worth of steps."""
        epochs = self.max_epochs
        if epochs is None:
            return int(self.max_steps)
        return max(1, epochs * batches_per_epoch // self.gradient_accum)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Train an SD1.5-architecture UNet from cached latent and text-embedding sidecars.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for item in dataclasses.fields(TrainConfig):
        meta = dict(item.metadata)
        flag = "--" + item.name
        if item.type == "bool":
            parser.add_argument(flag, action="store_true", help=meta["help"])
            continue
        kwargs = {"help": meta.pop("help")}
        kwargs.update(meta)
        if "type" not in kwargs and kwargs.get("action") != "extend" and item.type in ("int", "float"):
            kwargs["type"] = int if item.type == "int" else float
        if kwargs.get("action") == "extend":
            kwargs.setdefault("default", None)
        elif item.default is not dataclasses.MISSING:
            kwargs["default"] = item.default
        else:
            kwargs["default"] = item.default_factory()
        parser.add_argument(flag, **kwargs)
    return parser


def validate(config: TrainConfig) -> TrainConfig:
    """Fail fast, with the flag's name, on values that would break the run later."""
    problems = []
    if config.max_epochs == 0:
        problems.append("--max_steps 0e: train at least one epoch (1e)")
    if config.max_epochs is None:
        try:
            if int(config.max_steps) < 1:
                problems.append("--max_steps must be >= 1")
        except ValueError:
            problems.append(f"--max_steps wants a number of steps or Ne for N epochs, got {config.max_steps!r}")
    for name in ("batch_size", "gradient_accum", "log_every", "sampler_steps", "max_bad_steps"):
        if getattr(config, name) < 1:
            problems.append(f"--{name} must be >= 1")
    for name in ("save_steps", "save_start", "keep_checkpoints", "warmup_steps", "num_workers", "sample_steps",
                 "validation_steps"):
        if getattr(config, name) < 0:
            problems.append(f"--{name} must be >= 0")
    if config.learning_rate <= 0:
        problems.append("--learning_rate must be > 0")
    if not 0 <= config.min_learning_rate <= 1:
        problems.append("--min_learning_rate is a ratio of the peak LR, between 0 and 1")
    if config.use_snr and config.noise_gamma <= 0:
        problems.append("--noise_gamma must be > 0 with --use_snr")
    if config.force_toklen is not None and config.force_toklen < 1:
        problems.append("--force_toklen must be >= 1")
    if config.imgcache_suffix == config.txtcache_suffix:
        problems.append("--imgcache_suffix and --txtcache_suffix must differ")
    if config.learning_rate_decay and config.scheduler != "constant":
        problems.append("--learning_rate_decay applies to --scheduler constant only")
    if config.learning_rate_decay < 0:
        problems.append("--learning_rate_decay must be >= 0")
    if not 0 <= config.caption_dropout < 1:
        problems.append("--caption_dropout is a probability in [0, 1)")
    if not 0 <= config.ema_decay < 1:
        problems.append("--ema_decay must be in [0, 1), e.g. 0.9999")
    if config.bf16_weights and config.fp32:
        problems.append("--bf16_weights and --fp32 contradict each other")
    if config.bf16_weights and config.optimizer == "adamw8":
        problems.append("--bf16_weights needs --optimizer adamw or lion (stochastic rounding); adamw8 rounds to nearest")
    if config.validation_dir and config.validation_split:
        problems.append("give --validation_dir or --validation_split, not both")
    if not 0 <= config.validation_split < 1:
        problems.append("--validation_split is a fraction in [0, 1)")
    selected = (config.unfreeze_attention or config.unfreeze_up_blocks or config.unfreeze_down_blocks
                or config.unfreeze_mid_block)
    if selected and not config.targetted_training:
        problems.append("--unfreeze_* selects layers for --targetted_training; add it (without it everything trains)")
    reinit = config.reinit_qk or config.reinit_crossattn or config.reinit_attention or config.reinit_unet
    if config.targetted_training and not (selected or reinit):
        problems.append("--targetted_training needs a selection: --unfreeze_* or --reinit_*")
    if config.targetted_training and config.reinit_unet:
        problems.append("--reinit_unet re-initialises everything; --targetted_training would then train everything")
    for name in ("unfreeze_up_blocks", "unfreeze_down_blocks"):
        if any(block < 0 for block in getattr(config, name)):
            problems.append(f"--{name} takes block numbers >= 0")
    if is_single_file(config.pretrained_model) and not os.path.isfile(config.pretrained_model):
        problems.append(f"--pretrained_model {config.pretrained_model}: no such file")
    if config.single_file_config and not is_single_file(config.pretrained_model):
        problems.append("--single_file_config applies to a single-file (.safetensors) --pretrained_model only")
    if problems:
        raise ConfigError("invalid arguments:\n  " + "\n  ".join(problems))
    return config


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    values = vars(build_parser().parse_args(argv))
    for item in dataclasses.fields(TrainConfig):
        if values[item.name] is None and item.metadata.get("action") == "extend":
            values[item.name] = []  # an "extend" flag that was not given
    return validate(TrainConfig(**values))


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
