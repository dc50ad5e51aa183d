"""config.py: flags typed from the fields' annotations, each field's check beside it, and each rule stated
once (the layer-selection rules in layers.py, the adamw8 + bf16 rule asked by both the flags and optim.py)."""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest

from cachetrain import sidecar
from cachetrain.train.config import ConfigError, TrainConfig, build_parser, parse_train_args

REQUIRED = ["--pretrained_model", "m", "--train_data_dir", "d"]


def _problems(*flags: str) -> list[str]:
    with pytest.raises(ConfigError) as refused:
        parse_train_args([*REQUIRED, *flags])
    return str(refused.value).splitlines()[1:]


def test_each_flag_converts_to_its_fields_annotated_type():
    config = parse_train_args([*REQUIRED, "--max_timestep", "900", "--vae_scaling_factor", "0.2", "--betas", "0.8",
                               "0.9", "--unfreeze_up_blocks", "1", "2", "--targetted_training", "--force_toklen", "77",
                               "--num_cycles", "2"])
    assert (config.max_timestep, config.vae_scaling_factor, config.betas) == (900, 0.2, [0.8, 0.9])
    assert config.unfreeze_up_blocks == [1, 2] and config.force_toklen == 77 and config.num_cycles == 2.0
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig(pretrained_model="m", train_data_dir=["d"])
    for item in dataclasses.fields(TrainConfig):  # every default has its annotated type (None where it is optional)
        hint = hints[item.name]
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        assert isinstance(getattr(defaults, item.name), tuple(typing.get_origin(t) or t for t in allowed)), item.name
    actions = {action.dest: action for action in build_parser()._actions}
    assert actions["fp32"].nargs == 0 and actions["max_timestep"].type is int and actions["betas"].type is float


def test_the_suffix_defaults_are_the_sidecar_constants():
    config = parse_train_args(REQUIRED)
    assert (config.imgcache_suffix, config.txtcache_suffix) == (sidecar.SD_VAE_SUFFIX, sidecar.CLIP_L_SUFFIX)


@pytest.mark.parametrize("flags, problem", [
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--save_steps", "-1"], "--save_steps must be >= 0"),
    (["--learning_rate", "0"], "--learning_rate must be > 0"),
    (["--max_steps", "0e"], "--max_steps 0e: train at least one epoch (1e)"),
    (["--max_steps", "0"], "--max_steps must be >= 1"),
    (["--warmup_steps", "-2"], "--warmup_steps must be >= 0"),
    (["--warmup_steps", "soon"], "--warmup_steps wants a number of steps or Ne for N epochs, got 'soon'"),
    (["--min_learning_rate", "2"], "--min_lr_ratio is a ratio of the peak LR, between 0 and 1"),
    (["--num_cycles", "0"], "--num_cycles must be > 0"),
    (["--rex_start_factor", "0"], "--rex_start_factor must be in (0, 1]"),
    (["--scheduler", "greedy"], "--scheduler greedy moves the LR by whether a metric improves"),
    (["--caption_dropout", "1"], "--caption_dropout is a probability in [0, 1)"),
    (["--ema_decay", "1"], "--ema_decay must be in [0, 1), e.g. 0.9999"),
    (["--logit_std", "0"], "--logit_std must be > 0"),
    (["--flow_shift", "0"], "--flow_shift must be > 0"),
    (["--min_sigma", "0.5"], "--min_sigma must be in [0, 0.5)"),
    (["--gradient_topk", "0"], "--gradient_topk is a fraction of the gradients to keep, in (0, 1]"),
    (["--max_bad_fraction", "1.5"], "--max_bad_fraction is a fraction in [0, 1]"),
    (["--use_snr", "--noise_gamma", "0"], "--noise_gamma must be > 0 with --use_snr"),
    (["--imgcache_suffix", ".x", "--txtcache_suffix", ".x"], "--imgcache_suffix and --txtcache_suffix must differ"),
    (["--bf16_weights", "--fp32"], "--bf16_weights and --fp32 contradict each other"),
    (["--pretrained_model", "none.safetensors"], "--pretrained_model none.safetensors: no such file"),
    (["--single_file_config", "f"], "--single_file_config applies to a single-file (.safetensors) --pretrained_model only"),
])
def test_each_bad_value_is_refused_with_its_flag_named(flags, problem):
    problems = _problems(*flags)
    assert len(problems) == 1 and problems[0].strip().startswith(problem), problems


def test_every_problem_is_reported_at_once():
    assert len(_problems("--batch_size", "0", "--ema_decay", "2", "--unfreeze_attention")) == 3


def test_the_layer_rules_the_flags_report_are_layers_py_s():
    from cachetrain.train.layers import LayerSelection

    for flags, selection in ((["--unfreeze_mid_block"], LayerSelection(unfreeze_mid_block=True)),
                             (["--targetted_training"], LayerSelection(targetted_training=True)),
                             (["--targetted_training", "--reinit_unet"],
                              LayerSelection(targetted_training=True, reinit_unet=True)),
                             (["--targetted_training", "--unfreeze_down_blocks", "-1"],
                              LayerSelection(targetted_training=True, unfreeze_down_blocks=[-1]))):
        expected = selection.problems()
        assert expected and [line.strip() for line in _problems(*flags)] == expected, flags
    config = parse_train_args([*REQUIRED, "--targetted_training", "--unfreeze_up_blocks", "2", "--reinit_qk"])
    assert LayerSelection.of(config) == LayerSelection(targetted_training=True, unfreeze_up_blocks=[2], reinit_qk=True)
    assert LayerSelection.of(config).problems() == []


def test_adamw8_with_bf16_weights_is_one_rule_for_the_flags_and_the_optimizer_builder():
    import torch

    from cachetrain.train.optim import build_optimizer

    (flags_problem,) = _problems("--bf16_weights", "--optimizer", "adamw8")
    with pytest.raises(RuntimeError) as refused:
        build_optimizer("adamw8", [torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], 1e-4, (0.9, 0.999),
                        0.0, bf16_weights=True)
    assert str(refused.value) == flags_problem.strip() and "stochastic rounding" in flags_problem


@pytest.mark.parametrize("flags, backend", [
    ((), None), (("--compile",), "inductor"), (("--dynamo_backend", "aot_eager"), "aot_eager"),
    (("--compile", "--dynamo_backend", "aot_eager"), "aot_eager"), (("--compile", "--dynamo_backend", "no"), None),
])
def test_kohyas_dynamo_backend_alone_compiles_and_no_turns_compilation_off(flags, backend):
    assert parse_train_args([*REQUIRED, *flags]).compile_backend == backend
