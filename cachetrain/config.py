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
from .prompts import PromptsFileError, read_prompts_file
from .ldm_layout import is_single_file

OPTIMIZERS = ("adamw", "adamw8", "lion")
SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_min_lr", "cosine_with_restarts", "polynomial",
              "constant_with_warmup", "inverse_sqrt", "warmup_stable_decay", "cosine_warmup_with_min_lr",
              "reduce_lr_on_plateau", "greedy", "linear_with_min_lr", "rex")
# the samplers that draw samples, in the trainer and in sample_images.py alike (built in sampling.py)
SAMPLE_SCHEDULERS = ("ddim", "euler", "euler_a", "dpmpp_2m", "pndm", "flow_euler")
OBJECTIVES = ("ddpm", "flow")
PREDICTION_TYPES = ("epsilon", "v_prediction")
LOSS_TYPES = ("mse", "l1", "huber")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
EPOCHS = re.compile(r"(\d+(?:\.\d*)?|\.\d+)e")  # "2e", "2.5e", ".5e": a length in epochs


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
    is_custom: bool = _flag(False, "the model folder carries its own pipeline code (trust it); also --custom",
                            aliases=("--custom",))
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
    max_steps: str = _flag("1000", "optimizer steps to train, or Ne for N epochs (e.g. 3e, 2.5e)")
    learning_rate: float = _flag(1e-5, "peak learning rate")
    min_learning_rate: float = _flag(0.1, "final LR as a ratio of the peak, for cosine_with_min_lr, "
                                          "cosine_warmup_with_min_lr, linear_with_min_lr")
    learning_rate_decay: float = _flag(0.0, "with --scheduler constant: subtracted from the LR after each epoch")
    scheduler: str = _flag("constant", "LR schedule: " + "|".join(SCHEDULERS), choices=SCHEDULERS)
    warmup_steps: str = _flag("0", "optimizer steps of linear LR warm-up, or Ne for N epochs (e.g. 0.5e)")
    optimizer: str = _flag("adamw", "adamw | adamw8 (bitsandbytes 8-bit AdamW) | lion", choices=OPTIMIZERS)
    betas: list[float] = _flag([0.9, 0.999], "optimizer betas B1 B2", nargs=2, type=float)
    weight_decay: float = _flag(0.01, "decoupled weight decay")
    gradient_clip: float = _flag(1.0, "clip the gradient norm to this; <= 0 disables")
    seed: int = _flag(0, "seed of data order, noise and timesteps")
    num_cycles: float | None = _flag(None, "cosine: periods of the cosine (default 0.5, one half-wave down); "
                                           "cosine_with_restarts: number of restarts (default 1)", type=float)
    rex_start_factor: float = _flag(1.0, "rex: LR factor where the decay starts (after warm-up)")
    rex_end_factor: float = _flag(0.0, "rex: LR factor at the last step")
    scheduler_at_epoch: bool = _flag(False, "the LR schedule counts epochs, not optimizer steps: it moves only "
                                            "when an epoch ends (its length is --max_steps in epochs, rounded up, "
                                            "its warm-up --warmup_steps in epochs, rounded); the LR is constant "
                                            "within an epoch")
    # objective
    use_snr: bool = _flag(False, "min-SNR loss weighting (with --noise_gamma): min(SNR,g)/SNR for epsilon, "
                                 "min(SNR,g)/(SNR+1) for v; flow matching: min(SNR,g) s^2 with SNR=((1-s)/s)^2, "
                                 "the same weighting of the x0 error")
    noise_gamma: float = _flag(5.0, "gamma of min-SNR weighting")
    noise_offset: float = _flag(0.0, "offset noise strength (0 disables)")
    caption_dropout: float = _flag(0.0, "probability of training a sample on the empty prompt (needs the data root's .empty_prompt sidecar)")
    ema_decay: float = _flag(0.0, "keep an EMA of the UNet with this decay, e.g. 0.9999 (0 disables); samples use it")
    vae_scaling_factor: float | None = _flag(None, "latent scale; default: the model's VAE config value (an override is saved in the checkpoints' VAE config)", type=float)
    text_scaling_factor: float = _flag(1.0, "multiplier applied to cached text embeddings (T5 pipelines: saved into the checkpoints' projection scaling_factor)")
    force_toklen: int | None = _flag(None, "pad or truncate every caption embedding to N tokens "
                                           "(default: pad each batch to its longest)", type=int)
    objective: str | None = _flag(None, "ddpm | flow (rectified flow matching); default: what the model's "
                                        "scheduler config is (FlowMatchEulerDiscreteScheduler: flow)",
                                  choices=OBJECTIVES)
    prediction_type: str | None = _flag(None, "DDPM target: epsilon | v_prediction (default: the model's); "
                                              "saved in the checkpoints' scheduler", choices=PREDICTION_TYPES)
    zero_terminal_snr: bool = _flag(False, "DDPM: rescale the betas so the last timestep is pure noise (needs "
                                           "v-prediction: the model's or --prediction_type v_prediction); saved "
                                           "in the checkpoints' scheduler (rescale_betas_zero_snr, trailing)")
    loss_type: str = _flag("mse", "mse | l1 | huber (pseudo-Huber 2c(sqrt(e^2+c^2)-c), c = --huber_c)",
                           choices=LOSS_TYPES)
    huber_c: float = _flag(0.1, "c of --loss_type huber: errors above about c count linearly, not squared")
    min_timestep: int = _flag(0, "lowest training timestep (flow: lowest sigma x (T-1))")
    max_timestep: int | None = _flag(None, "highest training timestep (default: the last, T-1)", type=int)
    min_sigma: float = _flag(1e-5, "flow: sigmas are drawn in [min_sigma, 1 - min_sigma]")
    timestep_sampling: str = _flag("uniform", "flow: how sigma is drawn: uniform | logit_normal",
                                   choices=TIMESTEP_SAMPLINGS)
    logit_mean: float = _flag(0.0, "flow, logit_normal: mean of logit(sigma)")
    logit_std: float = _flag(1.0, "flow, logit_normal: standard deviation of logit(sigma)")
    flow_shift: float | None = _flag(None, "flow: shift sigma to k s / (1 + (k-1) s), k > 1 trains noisier "
                                           "(default: the model's scheduler shift, else 1)", type=float)
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
    unfreeze_attn2: bool = _flag(False, "with --targetted_training: train the cross-attention layers (attn2) only")
    unfreeze_norms: bool = _flag(False, "with --targetted_training: train every normalisation layer (GroupNorm, LayerNorm)")
    unfreeze_in: bool = _flag(False, "with --targetted_training: train the input convolution (conv_in)")
    unfreeze_out: bool = _flag(False, "with --targetted_training: train the output convolution (conv_out)")
    unfreeze_time: bool = _flag(False, "with --targetted_training: train the timestep embedding (time_embedding)")
    reinit_in: bool = _flag(False, "re-initialise the input convolution (conv_in)")
    reinit_out: bool = _flag(False, "re-initialise the output convolution (conv_out)")
    reinit_time: bool = _flag(False, "re-initialise the timestep embedding (time_embedding)")
    reinit_crossattnout: bool = _flag(False, "re-initialise the output projection of each cross-attention (attn2.to_out)")
    force_txtcache: str | None = _flag(None, "a text sidecar (e.g. a data root's .empty_prompt.txt_clipl) every "
                                             "sample trains on instead of its own caption: unconditional training")
    gradient_topk: float | None = _flag(None, "keep only the largest fraction F of gradient magnitudes each step "
                                              "(0 < F <= 1), zeroing the rest (exact within groups of ~32M "
                                              "elements); one kthvalue over the gradients per step: 5-6x an "
                                              "AdamW step on a CPU (bench/bench_gradient_topk.py)",
                                        type=float)
    # checkpoints and samples
    save_steps: int = _flag(500, "save a checkpoint every N optimizer steps (0: only at the end)")
    save_on_epoch: bool = _flag(False, "save a checkpoint at the end of every epoch")
    save_start: int = _flag(0, "no periodic checkpoint before this optimizer step")
    keep_checkpoints: int = _flag(0, "keep only the newest N checkpoints (0 keeps all)")
    resume: str | None = _flag(None, "'latest' (newest checkpoint of output_dir; refused if there is none), 'auto' (the newest if any, else a new run) or a checkpoint folder", nargs="?", const="latest")
    sample_prompt: list[str] = _flag([], "prompt(s) drawn at each checkpoint; repeatable", nargs="+", action="extend")
    sample_steps: int = _flag(0, "draw samples every N optimizer steps (0: at every checkpoint)")
    sampler_steps: int = _flag(30, "denoising steps of each sample")
    sample_seed: int = _flag(1234, "seed of the sample images (fixed, so checkpoints compare)")
    guidance_scale: float = _flag(7.5, "classifier-free guidance of samples")
    cpu_offload: bool = _flag(False, "move the sampling-only models (VAE, text encoder) back to the CPU after each sampling")
    sample_scheduler: str | None = _flag(None, "sampler of the samples: " + "|".join(SAMPLE_SCHEDULERS) + " (built from "
                                         "the model's scheduler config; default: the model's own scheduler)",
                                         choices=SAMPLE_SCHEDULERS)
    sample_prompts_file: str | None = _flag(None, "more sample prompts, one a line (blank lines and # comments skipped)")
    max_failed_saves: int = _flag(3, "stop the run when this many checkpoint saves in a row failed (e.g. a full disk)")
    # validation
    validation_dir: list[str] = _flag([], "folder(s) of held-out sidecar pairs for val/loss", nargs="+", action="extend")
    validation_split: float = _flag(0.0, "hold out this fraction of the training pairs for val/loss instead")
    validation_steps: int = _flag(0, "compute val/loss every N optimizer steps (0: at each checkpoint)")
    # telemetry and safety
    log_every: int = _flag(10, "read metrics back from the device and log them every N optimizer steps")
    max_bad_steps: int = _flag(10, "stop after this many optimizer steps in a row had NaN/Inf gradients")
    no_progress: bool = _flag(False, "no progress bar")
    # the data path: bad pairs, aspect buckets, balance of data folders
    max_bad_fraction: float = _flag(0.05, "stop when more than this fraction of the pairs read were bad "
                                          "(unreadable, another shape or width, NaN/Inf); bad pairs below it "
                                          "are named once, skipped and replaced")
    aspect_buckets: bool = _flag(False, "train on latents of several shapes (caches made with --buckets or "
                                        "--aspect_buckets): shapes are read from the headers at start and each "
                                        "batch holds one shape. Without it the run's shape is that of the first "
                                        "pairs and others are skipped as bad data")
    data_balance: str = _flag("pooled", "pooled: every pair equally likely; equal: each --train_data_dir gets "
                                        "the same share of every epoch (an epoch is as long as the largest "
                                        "folder, smaller ones are drawn again)", choices=("pooled", "equal"))

    @property
    def max_epochs(self) -> float | None:
        return epochs_in(self.max_steps)

    def max_optimizer_steps(self, batches_per_epoch: int) -> int:
        """--max_steps in optimizer steps, turning Ne into N epochs' worth of steps (N may be fractional)."""
        epochs = self.max_epochs
        if epochs is None:
            return int(self.max_steps)
        return max(1, int(epochs * batches_per_epoch) // self.gradient_accum)

    def warmup_optimizer_steps(self, batches_per_epoch: int) -> int:
        """--warmup_steps in optimizer steps (Ne: N epochs' worth, rounded down)."""
        epochs = epochs_in(self.warmup_steps)
        if epochs is None:
            return int(self.warmup_steps)
        return int(epochs * batches_per_epoch) // self.gradient_accum


def epochs_in(length: str) -> float | None:
    """The number of epochs a length such as '2.5e' names; None for a plain step count."""
    match = EPOCHS.fullmatch(str(length).strip().lower())
    return float(match.group(1)) if match else None


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Train an SD1.5-architecture UNet from cached latent and text-embedding sidecars.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for item in dataclasses.fields(TrainConfig):
        meta = dict(item.metadata)
        flag = "--" + item.name
        if item.type == "bool":
            parser.add_argument(flag, *meta.get("aliases", ()), action="store_true", help=meta["help"])
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
    if epochs_in(config.warmup_steps) is None:
        try:
            if int(config.warmup_steps) < 0:
                problems.append("--warmup_steps must be >= 0")
        except ValueError:
            problems.append(f"--warmup_steps wants a number of steps or Ne for N epochs, got {config.warmup_steps!r}")
    for name in ("batch_size", "gradient_accum", "log_every", "sampler_steps", "max_bad_steps", "max_failed_saves"):
        if getattr(config, name) < 1:
            problems.append(f"--{name} must be >= 1")
    for name in ("save_steps", "save_start", "keep_checkpoints", "num_workers", "sample_steps",
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
    if config.sample_prompts_file:
        try:
            read_prompts_file(config.sample_prompts_file)
        except PromptsFileError as error:
            problems.append(f"--sample_prompts_file {error}")
    if config.bf16_weights and config.fp32:
        problems.append("--bf16_weights and --fp32 contradict each other")
    if config.bf16_weights and config.optimizer == "adamw8":
        problems.append("--bf16_weights needs --optimizer adamw or lion (stochastic rounding); adamw8 rounds to nearest")
    if config.validation_dir and config.validation_split:
        problems.append("give --validation_dir or --validation_split, not both")
    if not 0 <= config.validation_split < 1:
        problems.append("--validation_split is a fraction in [0, 1)")
    selected = (config.unfreeze_attention or config.unfreeze_up_blocks or config.unfreeze_down_blocks
                or config.unfreeze_mid_block or config.unfreeze_attn2 or config.unfreeze_norms or config.unfreeze_in
                or config.unfreeze_out or config.unfreeze_time)
    if selected and not config.targetted_training:
        problems.append("--unfreeze_* selects layers for --targetted_training; add it (without it everything trains)")
    reinit = (config.reinit_qk or config.reinit_crossattn or config.reinit_attention or config.reinit_unet
              or config.reinit_in or config.reinit_out or config.reinit_time or config.reinit_crossattnout)
    if config.targetted_training and not (selected or reinit):
        problems.append("--targetted_training needs a selection: --unfreeze_* or --reinit_*")
    if config.targetted_training and config.reinit_unet:
        problems.append("--reinit_unet re-initialises everything; --targetted_training would then train everything")
    for name in ("unfreeze_up_blocks", "unfreeze_down_blocks"):
        if any(block < 0 for block in getattr(config, name)):
            problems.append(f"--{name} takes block numbers >= 0")
    if not 0 <= config.max_bad_fraction <= 1:
        problems.append("--max_bad_fraction is a fraction in [0, 1]")
    problems += _objective_problems(config) + _schedule_problems(config)
    if config.gradient_topk is not None and not 0 < config.gradient_topk <= 1:
        problems.append("--gradient_topk is a fraction of the gradients to keep, in (0, 1]")
    if is_single_file(config.pretrained_model) and not os.path.isfile(config.pretrained_model):
        problems.append(f"--pretrained_model {config.pretrained_model}: no such file")
    if config.single_file_config and not is_single_file(config.pretrained_model):
        problems.append("--single_file_config applies to a single-file (.safetensors) --pretrained_model only")
    if problems:
        raise ConfigError("invalid arguments:\n  " + "\n  ".join(problems))
    return config


def _objective_problems(config: TrainConfig) -> list[str]:
    problems = []
    flow_only = [name for name, default in (("timestep_sampling", "uniform"), ("logit_mean", 0.0), ("logit_std", 1.0),
                                           ("min_sigma", 1e-5), ("flow_shift", None))
                 if getattr(config, name) != default]
    if config.objective == "ddpm" and flow_only:
        problems.append(f"--{' --'.join(flow_only)}: flow-matching options; this run trains --objective ddpm")
    if config.objective == "flow" and (config.prediction_type or config.zero_terminal_snr):
        problems.append("--prediction_type and --zero_terminal_snr are DDPM options; flow matching predicts "
                        "noise - x0 and already ends at pure noise")
    if config.zero_terminal_snr and config.prediction_type == "epsilon":
        problems.append("--zero_terminal_snr needs v-prediction: at the pure-noise last step an epsilon target "
                        "teaches nothing; use --prediction_type v_prediction")
    if config.huber_c <= 0:
        problems.append("--huber_c must be > 0")
    if config.min_timestep < 0 or (config.max_timestep is not None and config.max_timestep < config.min_timestep):
        problems.append("--min_timestep/--max_timestep: need 0 <= min <= max")
    if not 0 <= config.min_sigma < 0.5:
        problems.append("--min_sigma must be in [0, 0.5)")
    if config.logit_std <= 0 or (config.flow_shift is not None and config.flow_shift <= 0):
        problems.append("--logit_std and --flow_shift must be > 0")
    return problems


def _schedule_problems(config: TrainConfig) -> list[str]:
    problems = []
    if config.scheduler in ("reduce_lr_on_plateau", "greedy"):
        problems.append(f"--scheduler {config.scheduler} moves the LR by whether a metric improves, and a diffusion "
                        "loss (noisy by timestep) gives it none to follow; use a schedule of steps (e.g. cosine, rex)")
    if config.num_cycles is not None and config.num_cycles <= 0:
        problems.append("--num_cycles must be > 0")
    for name in ("rex_start_factor", "rex_end_factor"):
        if getattr(config, name) < 0:
            problems.append(f"--{name} must be >= 0")
    return problems


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    values = vars(build_parser().parse_args(argv))
    for item in dataclasses.fields(TrainConfig):
        if values[item.name] is None and item.metadata.get("action") == "extend":
            values[item.name] = []  # an "extend" flag that was not given
    return validate(TrainConfig(**values))


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
