"""The rules that tie the trainer's flags together, one function per concern: asked by
config.validate after each flag's own check, so a run that cannot work is refused before anything
heavy is loaded, each problem naming its flags. (The layer-selection rules are layers.py's.)

They read a TrainConfig's fields and import nothing from config.py, which imports them.
"""

from __future__ import annotations

import dataclasses
import math

from ..models.ldm_layout import is_single_file
from .data_folders import DatasetFileError, read_dataset_file
from .layers import LayerSelection

ROUNDING_OPTIMIZERS = ("adamw", "lion")  # the ones that keep bf16 weights with stochastic rounding
INITIAL_D_OPTIMIZERS = ("d_lion", "prodigy")  # the ones that take --initial_d (their d0)
FLOW_ONLY_FLAGS = ("timestep_sampling", "logit_mean", "logit_std", "min_sigma", "flow_shift")
ADAPTER_FLAGS = ("lora_weights", "save_kohya_lora", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets",
                 "lora_modules")


def combination_problems(config) -> list[str]:
    """Every problem between the flags of ``config`` (a TrainConfig), in the order a user reads them."""
    problems = _non_finite_problems(config)
    for rules in (_model_problems, _schedule_problems, _objective_problems, _precision_problems, _data_problems,
                  _adapter_problems):
        problems += rules(config)
    return problems + LayerSelection.of(config).problems()


def dataset_file_problem(path: str | None) -> str | None:
    """What is wrong with a --dataset_config file, or None."""
    if not path:
        return None
    try:
        read_dataset_file(path)
    except DatasetFileError as error:
        return str(error)
    return None


def _non_finite_problems(config) -> list[str]:
    """nan / inf given to any number flag: accepted, they would poison the loss and halt the run later."""
    problems = []
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        bad = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            problems.append(f"--{item.name} {' '.join(str(v) for v in values)}: must be a finite number")
    return problems


def _model_problems(config) -> list[str]:
    if config.single_file_config and not is_single_file(config.pretrained_model):
        return ["--single_file_config applies to a single-file (.safetensors) --pretrained_model only"]
    return []


def _given(config, names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` (in that order) whose value is not the flag's default: flags the user set."""
    fields = {item.name: item for item in dataclasses.fields(config)}

    def default(item):
        return item.default_factory() if item.default is dataclasses.MISSING else item.default

    return [name for name in names if getattr(config, name) != default(fields[name])]


def _schedule_problems(config) -> list[str]:
    if config.learning_rate_decay and config.scheduler != "constant":
        return ["--learning_rate_decay applies to --scheduler constant only"]
    return []


def _objective_problems(config) -> list[str]:
    problems = []
    flow_only = _given(config, FLOW_ONLY_FLAGS)
    if config.objective == "ddpm" and flow_only:
        problems.append(f"--{' --'.join(flow_only)}: flow-matching options; this run trains --objective ddpm")
    if config.objective == "flow" and (config.prediction_type or config.zero_terminal_snr):
        problems.append("--prediction_type and --zero_terminal_snr are DDPM options; flow matching predicts "
                        "noise - x0 and already ends at pure noise")
    if config.zero_terminal_snr and config.prediction_type == "epsilon":
        problems.append("--zero_terminal_snr needs v-prediction: at the pure-noise last step an epsilon target "
                        "teaches nothing; use --prediction_type v_prediction")
    if config.min_timestep < 0 or (config.max_timestep is not None and config.max_timestep < config.min_timestep):
        problems.append("--min_timestep/--max_timestep: need 0 <= min <= max")
    if config.use_snr and config.noise_gamma <= 0:
        problems.append("--noise_gamma must be > 0 with --use_snr")
    return problems


def optimizer_precision_problem(optimizer: str, bf16_weights: bool) -> str | None:
    """Only our adamw and lion round bf16 weights stochastically; the others round to nearest (or keep
    fp32 state beside them), so small updates vanish. Asked at start (validate) and by
    optim.build_optimizer, for callers that build an optimizer without the flags."""
    if bf16_weights and optimizer not in ROUNDING_OPTIMIZERS:
        return (f"--bf16_weights needs --optimizer adamw or lion (stochastic rounding); {optimizer} rounds "
                "to nearest")
    return None


def _precision_problems(config) -> list[str]:
    problems = ["--bf16_weights and --fp32 contradict each other"] if config.bf16_weights and config.fp32 else []
    optimizer_problem = optimizer_precision_problem(config.optimizer, config.bf16_weights)
    if config.initial_d is not None and config.optimizer not in INITIAL_D_OPTIMIZERS:
        problems.append(f"--initial_d applies to --optimizer {' or '.join(INITIAL_D_OPTIMIZERS)}, "
                        f"not {config.optimizer}")
    return problems + ([optimizer_problem] if optimizer_problem else [])


def _data_problems(config) -> list[str]:
    problems = []
    if config.imgcache_suffix == config.txtcache_suffix:
        problems.append("--imgcache_suffix and --txtcache_suffix must differ")
    if config.validation_dir and config.validation_split:
        problems.append("give --validation_dir or --validation_split, not both")
    if config.dataset_config:
        listed = [] if dataset_file_problem(config.dataset_config) else read_dataset_file(config.dataset_config)
        if listed and config.train_data_dir != [folder.path for folder in listed]:
            problems.append("give --dataset_config or --train_data_dir, not both (the file lists the folders)")
        if config.data_balance != "pooled":
            problems.append("--data_balance: with --dataset_config each folder's repeats or weight say its share")
    if config.data_balance == "round_robin" and config.aspect_buckets:
        problems.append("--data_balance round_robin takes one latent shape per run; with --aspect_buckets "
                        "use pooled or equal")
    if not config.masked_loss and (config.masked_loss_unmasked_weight or config.masked_loss_normalize):
        problems.append("--masked_loss_unmasked_weight and --masked_loss_normalize apply with --masked_loss only")
    remote = [d for d in config.train_data_dir if "://" in d]
    if remote and len(config.train_data_dir) > 1:
        problems.append(f"--train_data_dir {remote[0]}: a shard URL is the run's only --train_data_dir "
                        "(pack several data roots into one shard set)")
    return problems


def _adapter_problems(config) -> list[str]:
    if not config.lora_type:  # without it the whole UNet trains: an adapter's settings would be dropped unsaid
        return [f"--{name} needs --lora_type lora, loha or lokr" for name in _given(config, ADAPTER_FLAGS)]
    problems = []
    if config.save_single_file:
        problems.append("--save_single_file writes a whole model; an adapter run saves its adapter "
                        "(--save_kohya_lora for the A1111/ComfyUI file; cachetrain-lora merge makes a model)")
    selection = LayerSelection.of(config)
    if selection.targetted_training or selection.reinitialises_some():
        problems.append("--lora_type trains an adapter on a frozen UNet; --targetted_training and --reinit_* "
                        "select UNet layers to train and do not apply")
    return problems
