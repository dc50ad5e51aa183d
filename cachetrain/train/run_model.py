"""The model a run trains, set up before step 1: the UNet loaded, what of it trains (all, the selected
layers, or an adapter on the frozen rest), the objective from its scheduler, the noise plan, the
optimizer and its LR schedule, all wrapped by accelerate and driven by one TrainStep.

Problems a user can fix (a layer selection or adapter that cannot attach, a scheduler the objective
cannot use, an optimizer whose package is missing) come out as TrainingError, one line, before step 1.
The trainer (trainer.py) holds the result and runs the loop over it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models import loading as models
from ..models.adapter_folders import adapter_to_merge, holds_adapter
from ..models.lora_files import DIFFUSERS_LORA_FILE
from .adapters import AdapterSpec, attach_adapter, describe as describe_adapter
from .bad_data import TrainingError
from .config import TrainConfig
from .fixed_embeddings import forced_embedding, noise_plan
from .layers import LayerSelection, apply_layer_selection
from .objective import objective_for
from .optim import build_optimizer, run_lr_schedule
from .shard_data import ShardIndex
from .step import TrainStep
from .telemetry import qk_weight_parameters


@dataclass
class RunModel:
    unet: torch.nn.Module  # as accelerate prepared it (DDP-wrapped with several processes)
    bare_unet: torch.nn.Module  # the same UNet unwrapped: what is saved, sampled and restored
    trainable: list[torch.nn.Parameter]
    adapter: AdapterSpec | None
    objective: torch.nn.Module
    plan: object  # the noise plan of fixed_embeddings.noise_plan
    optimizer: torch.optim.Optimizer
    lr_schedule: object
    step: TrainStep


def check_base_model(config: TrainConfig, adapter: AdapterSpec | None, is_main: bool) -> None:
    """An adapter run's model as --pretrained_model: its unet/ is the untrained base, so a full run from it
    would drop what that run trained (TrainingError, naming the merge); a new adapter on it gets a note."""
    model = config.pretrained_model
    if config.lora_weights or not holds_adapter(model):
        return
    if adapter is None:
        raise TrainingError(f"--pretrained_model {model}: an adapter run's model, whose unet/ is the untrained base; "
                            f"to train the whole UNet from what that run learned, merge it first (cachetrain-lora "
                            f"merge --model {model} --lora {adapter_to_merge(model)} --out MERGED, then "
                            f"--pretrained_model MERGED)")
    if is_main:
        source = adapter_to_merge(model)
        kind = "lora" if (source / DIFFUSERS_LORA_FILE).is_file() else "loha or lokr (as that run's)"
        print(f"[train] note: {model} holds a trained adapter this run does not start from (it trains a new one on "
              f"the base); --lora_type {kind} --lora_weights {source} starts from it", file=sys.stderr)


def text_width_problem(config: TrainConfig, text_width: int | None, unet_config) -> str | None:
    """Why the run's text sidecars cannot condition this UNet, if they cannot: their width is not the one its
    cross-attention takes (sidecars of another text encoder: CLIP-L's for the T5 model, T5's for SD1.5).
    Found at step 1 it would be a matrix-shape traceback."""
    takes = unet_config.get("encoder_hid_dim") or unet_config.get("cross_attention_dim")
    if text_width is None or config.force_txtcache or not isinstance(takes, int) or text_width == takes:
        return None
    return (f"--txtcache_suffix {config.txtcache_suffix}: the run's text sidecars are {text_width} wide, and "
            f"{config.pretrained_model}'s UNet takes text {takes} wide: they were cached with another model's "
            "text encoder; cache the captions with this model's, or name the sidecars made for it")


def load_run_model(config: TrainConfig, accelerator, data, resume_from: Path | None = None,
                   before_processes_meet=lambda: None) -> RunModel:
    """The UNet and everything that trains it, from ``config`` and the run's data (run_data.RunData).
    ``before_processes_meet`` is called before accelerate's prepare, where the processes first meet after
    loading (the trainer raises there a set-up stop that an import during the load swallowed)."""
    device, world = accelerator.device, accelerator.num_processes
    weight_dtype = torch.bfloat16 if config.bf16_weights else torch.float32
    adapter = AdapterSpec.of(config)
    check_base_model(config, adapter, accelerator.is_main_process)
    if adapter is not None and adapter.start_weights and resume_from is not None:
        # the checkpoint holds the adapter in the start's own layout (and the weights that matter): a resume needs
        # no start file, which a save limit may have pruned if it was a checkpoint of this run
        adapter.start_weights = str(resume_from)
    try:
        unet = models.load_unet(config.pretrained_model, dtype=weight_dtype, single_file_config=config.single_file_config)
    except models.SingleFileConfigError as error:  # a single file whose configs neither folder nor hub can give
        raise TrainingError(f"--pretrained_model {error}") from None
    problem = text_width_problem(config, data.checks.text_width, unet.config)
    if problem:
        raise TrainingError(problem)
    try:
        if adapter is not None:  # the UNet frozen, the adapter's layers train
            trainable = attach_adapter(unet, adapter, config.seed)
        else:
            trainable = apply_layer_selection(unet, LayerSelection.of(config), config.seed)
    except ValueError as error:  # an AdapterError too
        raise TrainingError(str(error)) from None
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.channels_last:
        unet.to(memory_format=torch.channels_last)
    unet.train()
    try:
        scheduler = models.load_training_scheduler(config.pretrained_model, config.prediction_type,
                                                   config.zero_terminal_snr, config.single_file_config)
        objective = objective_for(scheduler, config).to(device)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    shards = data.train_index if isinstance(data.train_index, ShardIndex) else None
    plan = noise_plan(config, data.folders, shards)
    vae_scale = config.vae_scaling_factor or models.read_vae_scaling_factor(config.pretrained_model,
                                                                            config.single_file_config)
    try:
        optimizer = build_optimizer(config.optimizer, trainable, config.learning_rate, config.betas,
                                    config.weight_decay, initial_d=config.initial_d,
                                    # an adapter trains in fp32 (PEFT's) beside bf16 base weights
                                    bf16_weights=config.bf16_weights and adapter is None)
    except RuntimeError as error:  # its package is missing
        raise TrainingError(str(error)) from None
    # stepped by hand once per optimizer step (accelerate would step it once per process), or once
    # per epoch with --scheduler_at_epoch
    rows = data.rows_per_epoch
    lr_schedule = run_lr_schedule(config, optimizer, rows, data.total_steps, accelerator.is_main_process, world)
    before_processes_meet()
    unet, optimizer = accelerator.prepare(unet, optimizer)
    bare_unet = accelerator.unwrap_model(unet)
    step = TrainStep(accelerator, unet, optimizer, objective, trainable, qk_weight_parameters(bare_unet),
                     vae_scale=vae_scale, text_scale=config.text_scaling_factor, gradient_clip=config.gradient_clip,
                     channels_last=config.channels_last, compile_backend=config.compile_backend,
                     gradient_topk=config.gradient_topk, forced_embedding=forced_embedding(config),
                     loss_divisor=config.gradient_accum if config.scale_loss_with_accum else 1,
                     masked_loss=(config.masked_loss_unmasked_weight, config.masked_loss_normalize)
                     if config.masked_loss else None)
    if accelerator.is_main_process:
        total = sum(p.numel() for p in bare_unet.parameters())
        held_out = data.validation_index
        print(f"[train] {len(data.train_index)} training pairs"
              f"{f', {len(held_out)} held out' if held_out else ''}; "
              f"{rows // world if rows % world == 0 else f'{rows / world:.2f}'} "
              f"batches/epoch/process x {world} process(es); {data.total_steps} "
              f"optimizer steps; trainable parameters: {sum(p.numel() for p in trainable):,} "
              f"of {total:,}{describe_adapter(bare_unet, adapter)}", file=sys.stderr)
    return RunModel(unet=unet, bare_unet=bare_unet, trainable=trainable, adapter=adapter, objective=objective,
                    plan=plan, optimizer=optimizer, lr_schedule=lr_schedule, step=step)
