"""The trainer's flags, defaults and validation, in one place.

Each field of TrainConfig is one command-line flag (same name, the seed's names); its help text, and
the check of its own value, sit in the field's metadata. The rules that tie flags together are
config_rules.py's (the layer-selection rules layers.py's). ``parse_train_args`` builds the parser from
the fields (a --preset replacing their defaults: presets.py), parses, and validates before anything
heavy is loaded. Its length (over 400 lines) is the ~130 flags, each with its help and check.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..cli import ArgumentParser
from ..models.schedulers import SAMPLE_SCHEDULERS
from ..models.ldm_layout import is_single_file
from .presets import PRESETS, describe
from ..models.prompts import PromptsFileError, read_prompts_file
from .data_folders import read_dataset_file
from .config_rules import combination_problems, dataset_file_problem
from ..bounded_read import DEFAULT_READ_TIMEOUT
from ..sidecar import CLIP_L_SUFFIX, SD_VAE_SUFFIX

# adamw8, opt_lion, py_lion, d_lion: the original scripts' names and packages; lion: ours (stochastic
# rounding for --bf16_weights); prodigy, schedulefree: learning-rate-free optimizers from their packages
OPTIMIZERS = ("adamw", "adamw8", "lion", "opt_lion", "py_lion", "d_lion", "prodigy", "schedulefree")
SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_min_lr", "cosine_with_restarts", "polynomial",
              "constant_with_warmup", "inverse_sqrt", "warmup_stable_decay", "cosine_warmup_with_min_lr",
              "reduce_lr_on_plateau", "greedy", "linear_with_min_lr", "rex")
OBJECTIVES = ("ddpm", "flow")
PREDICTION_TYPES = ("epsilon", "v_prediction")
LOSS_TYPES = ("mse", "l1", "huber")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
EPOCHS = re.compile(r"(\d+(?:\.\d*)?|\.\d+)e")  # "2e", "2.5e", ".5e": a length in epochs
# the help of the flag that trusts a model folder's own code, the same in every script that has it
TRUST_HELP = "the model folder carries its own pipeline code (pipeline.py and its modules): run it (only for a folder you trust)"
# a preset may switch these on, so they also take a --no-NAME that switches them off again
NEGATABLE = frozenset(name for values in PRESETS.values() for name, value in values.items() if isinstance(value, bool))


class ConfigError(ValueError):
    """An invalid flag or combination of flags; the message says which and why."""


Check = Callable[[Any], "str | None"]  # a field's own check: what is wrong with its value (after "--name "), or None


def _check(ok: Callable[[Any], bool], problem: str) -> Check:
    """A check that reports ``problem`` ({value} filled in) unless ``ok(value)``; an unset (None) value passes."""
    return lambda value: None if value is None or ok(value) else problem.format(value=value)


AT_LEAST_1 = _check(lambda number: number >= 1, "must be >= 1")
NOT_NEGATIVE = _check(lambda number: number >= 0, "must be >= 0")
POSITIVE = _check(lambda number: number > 0, "must be > 0")


def _steps_or_epochs(minimum: int) -> Check:
    """The check of a length given as optimizer steps or as Ne for N epochs (--max_steps, --warmup_steps)."""
    def check(length: str) -> str | None:
        epochs = epochs_in(length)
        if epochs is not None:
            return "0e: train at least one epoch (1e)" if minimum and epochs == 0 else None
        try:
            steps = int(length)
        except ValueError:
            return f"wants a number of steps or Ne for N epochs, got {length!r}"
        return None if steps >= minimum else f"must be >= {minimum}"
    return check


def _prompts_file_problem(path: str | None) -> str | None:
    if not path:
        return None
    try:
        read_prompts_file(path)
    except PromptsFileError as error:
        return str(error)
    return None


def _flag(default: Any = None, help: str = "", check: Check | None = None, **argparse_kwargs: Any):
    metadata = {"help": help, **argparse_kwargs, **({"check": check} if check else {})}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


DYNAMO_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")  # torch's own, as kohya's --dynamo_backend


@dataclass
class TrainConfig:
    # what to train, on what, and where to write
    preset: str | None = _flag(None, "a named recipe whose values replace the defaults below: "
                                     + " | ".join(PRESETS) + " (--preset NAME --help shows them)",
                               choices=tuple(PRESETS))
    pretrained_model: str = _flag(None, "diffusers folder or hub id of the model to fine-tune", required=True,
                                  check=_check(lambda model: not is_single_file(model) or os.path.isfile(model),
                                               "{value}: no such file"))
    is_custom: bool = _flag(False, TRUST_HELP, flags=("--custom", "--is_custom"))
    train_data_dir: list[str] = _flag([], "folder(s) of sidecar pairs; repeatable, or --dataset_config "
                                          "(--data_balance round_robin: each use of the flag is one group)",
                                      nargs="+", action="extend", by_occurrence=True)
    output_dir: str = _flag("output", "where checkpoints, samples, logs and the final model go")
    copy_config: str | None = _flag(None, "a settings file (e.g. the wrapper script) archived into output_dir")
    imgcache_suffix: str = _flag(SD_VAE_SUFFIX, "suffix of the latent sidecars")
    txtcache_suffix: str = _flag(CLIP_L_SUFFIX, "suffix of the text-embedding sidecars")
    num_workers: int = _flag(2, "DataLoader worker processes reading sidecars", check=NOT_NEGATIVE)
    # single-file models (the original SD layout of A1111 / ComfyUI)
    single_file_config: str | None = _flag(None, "with a .safetensors --pretrained_model: the folder or hub id its "
                                                 "configs and tokenizer come from (default: the SD1.5 hub id)")
    save_single_file: bool = _flag(False, "also write model.safetensors (original SD layout, fp16; the EMA weights "
                                          "with --ema_decay) into each checkpoint and beside the final model")
    # batch and schedule
    batch_size: int = _flag(4, "samples per micro-batch (per process)", check=AT_LEAST_1)
    gradient_accum: int = _flag(1, "micro-batches per optimizer step", check=AT_LEAST_1)
    max_steps: str = _flag("1000", "optimizer steps to train, or Ne for N epochs (e.g. 3e, 2.5e)",
                             check=_steps_or_epochs(minimum=1))
    learning_rate: float = _flag(1e-5, "peak learning rate", check=POSITIVE)
    min_lr_ratio: float = _flag(0.1, "final LR as a ratio of the peak, for cosine_with_min_lr, "
                                     "cosine_warmup_with_min_lr, linear_with_min_lr and rex (the original "
                                     "scripts' name; --min_learning_rate is the same flag)",
                                flags=("--min_lr_ratio", "--min_learning_rate"),
                                check=_check(lambda ratio: 0 <= ratio <= 1, "is a ratio of the peak LR, between 0 and 1"))
    learning_rate_decay: float = _flag(0.0, "with --scheduler constant: subtracted from the LR after each epoch",
                                      check=NOT_NEGATIVE)
    scheduler: str = _flag("constant", "LR schedule: " + "|".join(SCHEDULERS), choices=SCHEDULERS,
                           check=_check(lambda name: name not in ("reduce_lr_on_plateau", "greedy"),
                                        "{value} moves the LR by whether a metric improves, and a diffusion loss "
                                        "(noisy by timestep) gives it none to follow; use a schedule of steps "
                                        "(e.g. cosine, rex)"))
    warmup_steps: str = _flag("0", "optimizer steps of linear LR warm-up, or Ne for N epochs (e.g. 0.5e)",
                                check=_steps_or_epochs(minimum=0))
    optimizer: str = _flag("adamw", "adamw (torch) | adamw8 (bitsandbytes 8-bit AdamW, CUDA) | lion (ours: "
                                    "stochastic rounding with --bf16_weights) | opt_lion (torch-optimi's Lion) | "
                                    "py_lion (lion-pytorch's) | d_lion (dadaptation's DAdaptLion, LR ~1.0) | prodigy "
                                    "(prodigyopt, LR ~1.0) | schedulefree (schedule-free AdamW); the original "
                                    "scripts' default was adamw8", choices=OPTIMIZERS)
    betas: list[float] | None = _flag(None, "optimizer betas B1 B2 (default: the optimizer's own, e.g. AdamW "
                                            "0.9 0.999, Lion 0.9 0.99)", nargs=2)
    weight_decay: float | None = _flag(None, "decoupled weight decay (default: the optimizer's own, e.g. AdamW "
                                             "0.01, Lion and the LR-free ones 0)")
    gradient_clip: float = _flag(1.0, "clip the gradient norm to this; <= 0 disables")
    seed: int = _flag(0, "seed of data order, noise and timesteps")
    num_cycles: float | None = _flag(None, "cosine: periods of the cosine (default 0.5, one half-wave down); "
                                           "cosine_with_restarts: number of restarts (default 1)", check=POSITIVE)
    rex_start_factor: float = _flag(1.0, "rex: the warm-up starts at this factor of the peak LR and rises "
                                         "linearly to the peak over --warmup_steps (the original scripts' meaning; "
                                         "the decay's floor is --min_lr_ratio)",
                                    check=_check(lambda factor: 0 < factor <= 1, "must be in (0, 1]"))
    rex_end_factor: bool = _flag(False, "rex: accepted for the original scripts' command lines and changes "
                                        "nothing (its warm-up always ends at the peak LR). It takes no value; "
                                        "the LR at the last step is --min_lr_ratio")
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
    caption_dropout: float = _flag(0.0, "probability of training a sample on the empty prompt (needs the data root's .empty_prompt sidecar)",
                                  check=_check(lambda p: 0 <= p < 1, "is a probability in [0, 1)"))
    ema_decay: float = _flag(0.0, "keep an EMA of the UNet with this decay, e.g. 0.9999 (0 disables); samples use it",
                             check=_check(lambda decay: 0 <= decay < 1, "must be in [0, 1), e.g. 0.9999"))
    vae_scaling_factor: float | None = _flag(None, "latent scale; default: the model's VAE config value (an override is saved in the checkpoints' VAE config)")
    text_scaling_factor: float = _flag(1.0, "multiplier applied to cached text embeddings (T5 pipelines: saved into the checkpoints' projection scaling_factor)")
    force_toklen: int | None = _flag(None, "pad or truncate every caption embedding to N tokens "
                                           "(default: pad each batch to its longest)", check=AT_LEAST_1)
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
    huber_c: float = _flag(0.1, "c of --loss_type huber: errors above about c count linearly, not squared",
                           check=POSITIVE)
    min_timestep: int = _flag(0, "lowest training timestep (flow: lowest sigma x (T-1))")
    max_timestep: int | None = _flag(None, "highest training timestep (default: the last, T-1)")
    min_sigma: float = _flag(1e-5, "flow: sigmas are drawn in [min_sigma, 1 - min_sigma]",
                              check=_check(lambda sigma: 0 <= sigma < 0.5, "must be in [0, 0.5)"))
    timestep_sampling: str = _flag("uniform", "flow: how sigma is drawn: uniform | logit_normal",
                                   choices=TIMESTEP_SAMPLINGS)
    logit_mean: float = _flag(0.0, "flow, logit_normal: mean of logit(sigma)")
    logit_std: float = _flag(1.0, "flow, logit_normal: standard deviation of logit(sigma)",
                              check=POSITIVE)
    flow_shift: float | None = _flag(None, "flow: shift sigma to k s / (1 + (k-1) s), k > 1 trains noisier "
                                           "(default: the model's scheduler shift, else 1)", check=POSITIVE)
    # precision and speed
    gradient_checkpointing: bool = _flag(False, "recompute activations in backward to save memory")
    fp32: bool = _flag(False, "no bf16 autocast on CUDA (full fp32)")
    bf16_weights: bool = _flag(False, "weights, grads and optimizer state in bf16, stochastic rounding on the update")
    allow_tf32: bool = _flag(False, "allow TF32 matmuls on CUDA")
    compile: bool = _flag(False, "torch.compile the UNet (slow first steps, faster after)")
    dynamo_backend: str | None = _flag(None, "torch.compile's backend, kohya's flag: given alone it turns --compile "
                                             "on, 'no' turns it off; with --compile the default is inductor (it "
                                             "generates kernels; aot_eager traces without)",
                                       choices=("no", *DYNAMO_BACKENDS))
    channels_last: bool = _flag(False, "UNet and latents in channels-last memory format (faster convolutions on GPU)")
    # layer selections
    reinit_unet: bool = _flag(False, "re-initialise the whole UNet (train from scratch, seeded)")
    reinit_qk: bool = _flag(False, "re-initialise the query and key weights of every attention layer")
    reinit_crossattn: bool = _flag(False, "re-initialise the cross-attention layers (attn2: q, k, v, out)")
    reinit_attention: bool = _flag(False, "re-initialise all attention layers (attn1 and attn2)")
    unfreeze_attention: bool = _flag(False, "with --targetted_training: train the attention layers")
    unfreeze_up_blocks: list[int] = _flag([], "with --targetted_training: train these up_blocks (e.g. 2 3)", nargs="+", action="extend")
    unfreeze_down_blocks: list[int] = _flag([], "with --targetted_training: train these down_blocks", nargs="+", action="extend")
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
                                             "sample trains on instead of its own caption: unconditional "
                                             "training; the latents need no text sidecars of their own")
    gradient_topk: float | None = _flag(None, "keep only the largest fraction F of gradient magnitudes each step "
                                              "(0 < F <= 1), zeroing the rest (exact within groups of ~32M "
                                              "elements); one kthvalue over the gradients per step: 5-6x an "
                                              "AdamW step on a CPU (bench/bench_gradient_topk.py)",
                                        check=_check(lambda share: 0 < share <= 1,
                                                     "is a fraction of the gradients to keep, in (0, 1]"))
    # checkpoints and samples
    save_steps: int = _flag(500, "save a checkpoint every N optimizer steps (0: only at the end)", check=NOT_NEGATIVE)
    save_on_epoch: bool = _flag(False, "save a checkpoint at the end of every epoch")
    save_start: int = _flag(0, "no periodic checkpoint before this optimizer step", check=NOT_NEGATIVE)
    keep_checkpoints: int = _flag(0, "keep only the newest N checkpoints (0 keeps all)", check=NOT_NEGATIVE)
    resume: str | None = _flag(None, "'latest' (newest checkpoint of output_dir; refused if there is none), 'auto' (the newest if any, else a new run) or a checkpoint folder", nargs="?", const="latest")
    sample_prompt: list[str] = _flag([], "prompt(s) drawn at each checkpoint; repeatable", nargs="+", action="extend")
    sample_steps: int = _flag(0, "draw samples every N optimizer steps (0: at every checkpoint)", check=NOT_NEGATIVE)
    sampler_steps: int = _flag(30, "denoising steps of each sample", check=AT_LEAST_1)
    sample_seed: int = _flag(1234, "seed of the sample images (fixed, so checkpoints compare)")
    guidance_scale: float = _flag(7.5, "classifier-free guidance of samples")
    cpu_offload: bool = _flag(False, "move the sampling-only models (VAE, text encoder) back to the CPU after each sampling")
    sample_scheduler: str | None = _flag(None, "sampler of the samples: " + "|".join(SAMPLE_SCHEDULERS) + " (built from "
                                         "the model's scheduler config; default: the model's own scheduler)",
                                         choices=SAMPLE_SCHEDULERS)
    sample_prompts_file: str | None = _flag(None, "more sample prompts, one a line (blank lines and # comments skipped)",
                                          check=_prompts_file_problem)
    max_failed_saves: int = _flag(3, "stop the run when this many checkpoint saves in a row failed (e.g. a full disk)",
                                 check=AT_LEAST_1)
    # validation
    validation_dir: list[str] = _flag([], "folder(s) of held-out sidecar pairs for val/loss", nargs="+", action="extend")
    validation_split: float = _flag(0.0, "hold out this fraction of the training pairs for val/loss instead",
                                   check=_check(lambda share: 0 <= share < 1, "is a fraction in [0, 1)"))
    validation_steps: int = _flag(0, "compute val/loss every N optimizer steps (0: at each checkpoint)",
                                 check=NOT_NEGATIVE)
    # telemetry and safety
    log_every: int = _flag(10, "read metrics back from the device and log them every N optimizer steps",
                          check=AT_LEAST_1)
    max_bad_steps: int = _flag(10, "stop after this many optimizer steps in a row had NaN/Inf gradients",
                              check=AT_LEAST_1)
    no_progress: bool = _flag(False, "no progress bar")
    # the data path: bad pairs, aspect buckets, balance of data folders
    max_bad_fraction: float = _flag(0.05, "stop when more than this fraction of the pairs read were bad "
                                          "(unreadable, another shape or width, NaN/Inf); bad pairs below it "
                                          "are named once, skipped and replaced",
                                   check=_check(lambda share: 0 <= share <= 1, "is a fraction in [0, 1]"))
    aspect_buckets: bool = _flag(False, "train on latents of several shapes (caches made with --buckets or "
                                        "--aspect_buckets): shapes are read from the headers at start and each "
                                        "batch holds one shape. Without it the run's shape is that of the first "
                                        "pairs and others are skipped as bad data")
    data_balance: str = _flag("pooled", "pooled: every pair equally likely; equal: each --train_data_dir gets "
                                        "the same share of every epoch (an epoch is as long as the largest "
                                        "folder, smaller ones are drawn again); round_robin: the original "
                                        "scripts' rule, one batch from each folder in turn, an epoch being the "
                                        "smallest folder's batches times the number of folders (larger folders "
                                        "carry on where they stopped in the next epoch)",
                              choices=("pooled", "equal", "round_robin"))
    # the data index: start from the index the cache scripts keep beside the data (docs/data-index.md)
    data_index: str = _flag("auto", "auto: start from each data root's index (ROOT/.cachetrain/data-index.npz), "
                                    "walk only folders changed since, and write it back; off: walk every folder "
                                    "and read nothing from or into an index", choices=("auto", "off"))
    data_index_dir: str | None = _flag(None, "where indexes of read-only data roots live (default "
                                             "$CACHETRAIN_INDEX_DIR, else ~/.cache/cachetrain/data-index)")

    # streamed shards (cachetrain-pack): --train_data_dir names one shard folder or URL (s3://, gs://, https://)
    shard_cache_dir: str | None = _flag(None, "local cache of remote shards (default: a folder per URL under the "
                                              "system's temporary folder); node-local disk is best")
    shard_cache_gb: float = _flag(50.0, "size cap of the local shard cache in GB (least recently used shards go first)",
                                  check=_check(lambda gb: gb > 0, "must be > 0"))
    shard_retries: int = _flag(5, "tries per remote shard before the run stops (waits double from 0.5 s)",
                               check=_check(lambda n: n >= 1, "must be >= 1"))

    # adapters (LoRA, LoCon, LoHa, LoKr through PEFT): the UNet stays frozen, the adapter trains
    lora_type: str | None = _flag(None, "train an adapter instead of the UNet: lora | loha | lokr",
                                  choices=("lora", "loha", "lokr"))
    lora_rank: int = _flag(16, "rank of the adapter's layers", check=AT_LEAST_1)
    lora_alpha: float | None = _flag(None, "alpha of the adapter (its change is scaled by alpha / rank; default: the rank)",
                                     check=POSITIVE)
    lora_dropout: float = _flag(0.0, "dropout inside the adapter (LoRA: on its input; LoHa/LoKr: of whole layers)",
                                check=_check(lambda p: 0 <= p < 1, "is a probability in [0, 1)"))
    lora_targets: list[str] = _flag(["attention"], "layer groups that get an adapter: attention (q, k, v, out) "
                                                   "feedforward (ff, proj_in/out) conv (resnets, samplers: LoCon)",
                                    nargs="+", action="extend", choices=("attention", "feedforward", "conv"))
    lora_modules: list[str] = _flag([], "more layers by name (a module-name suffix such as attn2.to_k, or a "
                                        "full-match regex)", nargs="+", action="extend")
    lora_weights: str | None = _flag(None, "start the adapter from this LoRA file or folder (either layout), a "
                                           "LoHa/LoKr file in LyCORIS' layout, or a LoHa/LoKr run's checkpoint (its "
                                           "unet_adapter/); its layers, rank and alpha replace --lora_targets/"
                                           "--lora_rank/--lora_alpha")
    save_kohya_lora: bool = _flag(False, "also write the adapter as lora_kohya.safetensors (kohya/A1111 layout, "
                                         "LyCORIS keys for LoHa/LoKr; for ComfyUI and A1111) into each checkpoint")

    # the original scripts' flags: loss scaling and the learning-rate-free optimizers' d0
    scale_loss_with_accum: bool = _flag(False, "divide each micro-batch's loss by --gradient_accum, on top of the "
                                               "averaging over micro-batches accumulation already does (as the "
                                               "original scripts did): gradients --gradient_accum times smaller")
    initial_d: float | None = _flag(None, "d_lion, prodigy: their initial step-size estimate d0 (default: the "
                                          "optimizer's own, 1e-6)", check=POSITIVE)
    # which use of --train_data_dir gave each folder (set by the parser, not a flag of its own)
    train_data_groups: list[int] = field(default_factory=list, metadata={"hidden": True})

    # per-folder weights and repeats (docs/data-features.md)
    dataset_config: str | None = _flag(None, "a TOML file of [[folder]] tables (path; repeats or weight; loss_weight; "
                                             "caption_dropout): the run's data folders, in place of --train_data_dir",
                                       check=dataset_file_problem)
    # noise and loss variants (docs/data-features.md)
    multires_noise_iterations: int = _flag(0, "pyramid noise: add this many levels of coarser noise to each sample's "
                                              "noise (0 disables; 6 is common)", check=NOT_NEGATIVE)
    multires_noise_discount: float = _flag(0.3, "pyramid noise: level i is weighted discount^i",
                                           check=_check(lambda d: 0 < d <= 1, "must be in (0, 1]"))
    ip_noise_gamma: float = _flag(0.0, "input perturbation: noise the UNet input with noise + gamma x a second draw, "
                                       "the target keeps the first (0 disables; 0.1 is common)", check=NOT_NEGATIVE)
    debiased_estimation_loss: bool = _flag(False, "DDPM: weight each sample's loss by 1/sqrt(SNR(t)) "
                                                  "(v-prediction: 1/sqrt(SNR(t)+1)), SNR capped at 1000")
    # data features: horizontal flips and masked loss (caption variants need no flag: each sample draws one)
    flip_p: float = _flag(0.0, "probability of training a sample on its mirrored latent (latents cached with --flip; "
                               "images whose caption names a side have none and are never flipped)",
                          check=_check(lambda p: 0 <= p <= 1, "is a probability in [0, 1]"))
    masked_loss: bool = _flag(False, "weight each latent cell's loss by its image's cached mask (cached with --mask; "
                                     "images without a mask weigh 1 everywhere)")
    masked_loss_unmasked_weight: float = _flag(0.0, "with --masked_loss: the weight of cells outside the mask "
                                                    "(mask 0); a cell of mask m weighs w + (1 - w) m",
                                               check=_check(lambda w: 0 <= w <= 1, "is a weight in [0, 1]"))
    masked_loss_normalize: bool = _flag(False, "with --masked_loss: divide each sample's loss by its mean weight, so "
                                               "a small mask trains as strongly as a whole image")
    # elastic resume: a debug record of what each process trained (docs/reliability.md)
    log_sample_ids: bool = _flag(False, "write each micro-batch's (step, rank, epoch, row, sample ids) to "
                                        "trained_samples.rank<R>.jsonl in --output_dir (a debug record; off by default)")
    # reads that never return (a hung network or FUSE mount): docs/reliability.md
    read_timeout: float = _flag(DEFAULT_READ_TIMEOUT, "seconds a sidecar read may take before its pair is named and "
                                                      "skipped as bad (0: no bound)", check=NOT_NEGATIVE)

    @property
    def compile_backend(self) -> str | None:
        """The backend the UNet is compiled with, or None for no torch.compile."""
        if self.dynamo_backend == "no":
            return None
        return self.dynamo_backend or ("inductor" if self.compile else None)

    @property
    def max_epochs(self) -> float | None:
        return epochs_in(self.max_steps)

    def max_optimizer_steps(self, batches_per_epoch: int, processes: int = 1) -> int:
        """--max_steps in optimizer steps, turning Ne into N epochs' worth of steps (N may be fractional).
        ``batches_per_epoch``: the micro-batches of all ``processes`` together (the same on any count
        that keeps the global batch)."""
        epochs = self.max_epochs
        if epochs is None:
            return int(self.max_steps)
        return max(1, int(epochs * batches_per_epoch) // (self.gradient_accum * processes))

    def warmup_optimizer_steps(self, batches_per_epoch: int, processes: int = 1) -> int:
        """--warmup_steps in optimizer steps (Ne: N epochs' worth, rounded down)."""
        epochs = epochs_in(self.warmup_steps)
        if epochs is None:
            return int(self.warmup_steps)
        return int(epochs * batches_per_epoch) // (self.gradient_accum * processes)


def epochs_in(length: str) -> float | None:
    """The number of epochs a length such as '2.5e' names; None for a plain step count."""
    match = EPOCHS.fullmatch(str(length).strip().lower())
    return float(match.group(1)) if match else None


def _value_type(hint: Any) -> type:
    """The type one value of a flag converts to: int for ``int``, ``int | None`` and ``list[int]``."""
    inner = [argument for argument in typing.get_args(hint) if argument is not type(None)]
    return _value_type(inner[0]) if inner else hint  # list[float] | None: float


def _default(item: dataclasses.Field) -> Any:
    return item.default_factory() if item.default is dataclasses.MISSING else item.default


class _ExtendNumberingOccurrences(argparse._ExtendAction):
    """--train_data_dir: extends the list of folders and numbers each by the use of the flag that gave
    it (the original scripts read each use through a loader of its own: round_robin's groups)."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        groups = list(getattr(namespace, "train_data_groups", None) or [])
        setattr(namespace, "train_data_groups", groups + [max(groups, default=-1) + 1] * len(values))


def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    """The trainer's parser; with ``preset``, that preset's values are the defaults (and --help shows them)."""
    chosen = PRESETS[preset] if preset else {}
    listed = "; ".join(f"{name}: {describe(name)}" for name in PRESETS)
    parser = ArgumentParser(
        description="Train an SD1.5-architecture UNet from cached latent and text-embedding sidecars.",
        epilog=(f"--preset {preset} sets: {describe(preset)}. A flag given wins over it." if preset
                else f"Presets (--preset NAME; a flag given wins over it): {listed}."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(TrainConfig)
    parser.set_defaults(train_data_groups=None)
    for item in dataclasses.fields(TrainConfig):
        if item.metadata.get("hidden"):
            continue
        kwargs = {key: value for key, value in item.metadata.items() if key not in ("check", "flags", "by_occurrence")}
        if item.metadata.get("by_occurrence"):
            kwargs["action"] = _ExtendNumberingOccurrences
        flags = item.metadata.get("flags", ("--" + item.name,))
        default = chosen.get(item.name, _default(item))
        kind = _value_type(hints[item.name])
        if kind is bool:
            action = argparse.BooleanOptionalAction if item.name in NEGATABLE else "store_true"
            parser.add_argument(*flags, dest=item.name, action=action, default=default, help=kwargs["help"])
            continue
        if kind is not str:
            kwargs.setdefault("type", kind)
        # an "extend" flag given on the command line replaces its default list instead of adding to it
        parser.add_argument(*flags, dest=item.name, default=None if kwargs.get("action") == "extend" else default,
                            **kwargs)
    return parser


def _preset_in(argv: list[str] | None) -> str | None:
    """The --preset among ``argv``, read before the full parser is built (its defaults depend on it)."""
    finder = ArgumentParser(add_help=False)
    finder.add_argument("--preset", choices=tuple(PRESETS), default=None)
    return finder.parse_known_args(argv)[0].preset


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    """config.py's defaults < the --preset's values < the flags given."""
    preset = _preset_in(argv)
    values = vars(build_parser(preset).parse_args(argv))
    chosen = PRESETS[preset] if preset else {}
    for item in dataclasses.fields(TrainConfig):
        if values[item.name] is None and item.metadata.get("action") == "extend":  # not given
            values[item.name] = list(chosen.get(item.name, _default(item)))
    values["train_data_groups"] = values["train_data_groups"] or []
    config = TrainConfig(**values)
    if config.dataset_config and not config.train_data_dir and not dataset_file_problem(config.dataset_config):
        config.train_data_dir = [folder.path for folder in read_dataset_file(config.dataset_config)]
    elif not config.dataset_config and not config.train_data_dir:
        raise ConfigError("invalid arguments:\n  --train_data_dir is required (or --dataset_config)")
    return validate(config)


def validate(config: TrainConfig) -> TrainConfig:
    """Fail fast, with the flag's name, on values that would break the run later: each field's own check,
    then the rules that tie flags together."""
    problems = [f"--{item.name} {problem}" for item in dataclasses.fields(config)
                if (check := item.metadata.get("check")) and (problem := check(getattr(config, item.name)))]
    problems += combination_problems(config)
    if problems:
        raise ConfigError("invalid arguments:\n  " + "\n  ".join(problems))
    return config


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
