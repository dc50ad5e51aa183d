"""Layer selections (counted here from the UNet's module tree and from parameter names), the trainable
count printed at start, a selection naming a missing block, --force_txtcache, --gradient_topk and the
unet/L2_norm scalar.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from cachetrain.train.config import parse_train_args
from cachetrain.train.trainer import main, train
from tests.training_support import train_args as _args
from tests.training_support import unet_weights as _unet_weights
from tests.script_runs import run_script


def _unet(model: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(model, subfolder="unet")


def _parameter_names_of(unet, wanted) -> set[str]:
    """Names of the parameters of every module ``wanted(name, module)`` picks, from the module tree."""
    names = set()
    for module_name, module in unet.named_modules():
        if wanted(module_name, module):
            names |= {f"{module_name}.{name}" for name, _ in module.named_parameters()}
    return names


SELECTIONS = {
    "--unfreeze_attn2": lambda name, module: name.endswith(".attn2"),
    "--unfreeze_norms": lambda name, module: isinstance(module, (nn.GroupNorm, nn.LayerNorm)),
    "--unfreeze_in": lambda name, module: name == "conv_in",
    "--unfreeze_out": lambda name, module: name == "conv_out",
    "--unfreeze_time": lambda name, module: name == "time_embedding",
    "--reinit_in": lambda name, module: name == "conv_in",
    "--reinit_out": lambda name, module: name == "conv_out",
    "--reinit_time": lambda name, module: name == "time_embedding",
    "--reinit_crossattnout": lambda name, module: name.endswith(".attn2.to_out.0"),
}


@pytest.mark.parametrize("flag", list(SELECTIONS))
def test_each_selection_trains_exactly_its_parameters(tiny_sd_model, flag):
    from cachetrain.train.layers import LayerSelection, apply_layer_selection

    unet = _unet(tiny_sd_model)
    expected = _parameter_names_of(unet, SELECTIONS[flag])
    expected_count = sum(p.numel() for name, p in unet.named_parameters() if name in expected)
    assert expected_count > 0
    config = parse_train_args(["--pretrained_model", "m", "--train_data_dir", "d", "--targetted_training", flag])
    trainable = apply_layer_selection(unet, LayerSelection.of(config), seed=0)
    assert {name for name, p in unet.named_parameters() if p.requires_grad} == expected
    assert sum(p.numel() for p in trainable) == expected_count


@pytest.mark.parametrize("flag", [flag for flag in SELECTIONS if flag.startswith("--reinit_")])
def test_each_reinit_changes_exactly_its_weights_reproducibly(tiny_sd_model, flag):
    from cachetrain.train.layers import LayerSelection, apply_layer_selection

    original = _unet(tiny_sd_model)
    expected = _parameter_names_of(original, SELECTIONS[flag])
    config = parse_train_args(["--pretrained_model", "m", "--train_data_dir", "d", flag])
    results = []
    for _ in range(2):
        unet = _unet(tiny_sd_model)
        apply_layer_selection(unet, LayerSelection.of(config), seed=5)
        results.append(unet.state_dict())
    before = original.state_dict()
    # a bias that starts at zero may be reset to values; each weight must have changed
    changed = {name for name in before if not torch.equal(before[name], results[0][name])}
    assert changed <= expected and {name for name in expected if name.endswith(".weight")} <= changed
    assert all(torch.equal(results[0][name], results[1][name]) for name in before)


def test_force_txtcache_trains_every_sample_on_that_embedding(tiny_sd_model, cached_dataset, tmp_path):
    empty = cached_dataset / ".empty_prompt.txt_clipl"
    assert empty.exists()
    uncaptioned = tmp_path / "uncaptioned"
    shutil.copytree(cached_dataset, uncaptioned)
    for sidecar in uncaptioned.rglob("*.txt_clipl"):
        shutil.copyfile(empty, sidecar)
    common = ("--batch_size", "8", "--max_steps", "2")
    train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "forced", *common,
                                 "--force_txtcache", str(empty))))
    train(parse_train_args(_args(tiny_sd_model, uncaptioned, tmp_path / "empty", *common)))
    train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "own", *common)))
    forced, empty_run, own = (_unet_weights(tmp_path / name) for name in ("forced", "empty", "own"))
    assert all(torch.equal(forced[name], empty_run[name]) for name in forced)
    assert not all(torch.equal(forced[name], own[name]) for name in forced)


def test_force_txtcache_trains_image_only_data_without_text_sidecars(tiny_sd_model, cached_dataset, tmp_path):
    # the original scripts' unsupervised training: latents alone, one embedding for all
    empty = tmp_path / "empty.txt_clipl"
    shutil.copyfile(cached_dataset / ".empty_prompt.txt_clipl", empty)
    images_only = tmp_path / "images_only"
    shutil.copytree(cached_dataset, images_only)
    for sidecar in images_only.rglob("*.txt_clipl"):
        sidecar.unlink()
    common = ("--batch_size", "8", "--max_steps", "2")
    result = train(parse_train_args(_args(tiny_sd_model, images_only, tmp_path / "images_only_run", *common,
                                          "--force_txtcache", str(empty))))
    train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "with_text", *common,
                                 "--force_txtcache", str(empty))))
    assert result.steps == 2 and result.exit_status == 0
    alone, with_text = _unet_weights(tmp_path / "images_only_run"), _unet_weights(tmp_path / "with_text")
    assert all(torch.equal(alone[name], with_text[name]) for name in alone)  # the same 48 samples, same steps


def test_force_txtcache_is_padded_by_the_pad_rule_like_every_caption(cached_dataset):
    from cachetrain.sidecar import read_sidecar
    from cachetrain.train.fixed_embeddings import forced_embedding

    empty = cached_dataset / ".empty_prompt.txt_clipl"
    stored = read_sidecar(empty, "emb")
    config = parse_train_args(["--pretrained_model", "m", "--train_data_dir", "d", "--force_txtcache", str(empty),
                               "--force_toklen", str(stored.shape[0] + 3)])
    embedding, mask = forced_embedding(config)
    assert embedding.shape == (1, stored.shape[0] + 3, stored.shape[1])
    assert torch.equal(embedding[0, :stored.shape[0]], stored) and not embedding[0, stored.shape[0]:].any()
    assert mask.tolist() == [[1] * stored.shape[0] + [0] * 3]


def test_force_txtcache_naming_a_missing_file_fails_at_start(tiny_sd_model, cached_dataset, tmp_path):
    done = run_script("train_from_cached.py", *_args(tiny_sd_model, cached_dataset, tmp_path / "run",
                                                     "--force_txtcache", str(tmp_path / "nothing.txt_clipl")))
    assert done.returncode == 2
    assert "--force_txtcache" in done.stderr and "nothing.txt_clipl" in done.stderr
    assert "Traceback" not in done.stderr


def test_gradient_topk_keeps_the_largest_magnitudes_across_tensors():
    from cachetrain.train.optim import keep_top_gradients_

    generator = torch.Generator().manual_seed(0)
    parameters = [nn.Parameter(torch.zeros(shape)) for shape in ((64, 32), (17,), (8, 4, 3, 3), (5, 5))]
    for p in parameters:
        p.grad = torch.randn(p.shape, generator=generator) * torch.rand((), generator=generator) * 4
    parameters[2].grad = parameters[2].grad.contiguous(memory_format=torch.channels_last)
    flat = torch.cat([p.grad.reshape(-1) for p in parameters])
    keep = flat.numel() - int(flat.numel() * 0.9)
    kept_positions = set(flat.abs().sort(descending=True).indices[:keep].tolist())
    expected = torch.tensor([value if i in kept_positions else 0.0 for i, value in enumerate(flat.tolist())])

    keep_top_gradients_(parameters, 0.1)
    assert torch.equal(torch.cat([p.grad.reshape(-1) for p in parameters]), expected)
    assert parameters[2].grad.is_contiguous(memory_format=torch.channels_last)


def test_gradient_topk_moves_only_the_kept_fraction_of_weights(tiny_sd_model, cached_dataset, tmp_path):
    # Adam's first step moves a weight by lr * g / (|g| + eps): exactly the weights with a kept gradient
    train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--batch_size", "8",
                                 "--max_steps", "1", "--gradient_topk", "0.05", "--weight_decay", "0")))
    before, after = _unet_weights(tiny_sd_model), _unet_weights(tmp_path / "run")
    moved = sum(int((before[name] != after[name]).sum()) for name in before)
    total = sum(t.numel() for t in before.values())
    kept = total - int(total * 0.95)  # the fraction, rounded up
    assert 0.95 * kept < moved <= kept  # a kept gradient may be exactly 0; none other moves


def test_unet_l2_norm_is_logged_at_the_log_interval(tiny_sd_model, cached_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--batch_size", "8",
                                 "--max_steps", "4", "--log_every", "2", "--save_steps", "1")))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {event.step: event.value for event in events.Scalars("unet/L2_norm")}
    assert sorted(logged) == [2, 4]
    # measured before step 4's update: the weights of checkpoint 3
    weights = _unet_weights(tmp_path / "run" / "checkpoint-00003")
    expected = torch.sqrt(sum(t.double().square().sum() for t in weights.values())).item()
    assert logged[4] == pytest.approx(expected, rel=1e-5)


def _names(unet, pattern: str) -> set[str]:
    return {name for name, _ in unet.named_parameters() if re.search(pattern, name)}


@pytest.mark.parametrize("flags, pattern", [
    (["--unfreeze_attention"], r"\.attn[12]\."),
    (["--unfreeze_up_blocks", "1"], r"^up_blocks\.1\."),
    (["--unfreeze_down_blocks", "0", "1"], r"^down_blocks\.[01]\."),
    (["--unfreeze_mid_block"], r"^mid_block\."),
    (["--reinit_qk"], r"\.to_[qk]\.weight$"),
    (["--reinit_crossattn"], r"\.attn2\."),
    (["--reinit_attention"], r"\.attn[12]\."),
    (["--unfreeze_up_blocks", "0", "--unfreeze_mid_block"], r"^(up_blocks\.0|mid_block)\."),
])
def test_targetted_training_trains_exactly_the_selected_parameters(tiny_sd_model, flags, pattern):
    from diffusers import UNet2DConditionModel

    from cachetrain.train.layers import LayerSelection, apply_layer_selection

    config = parse_train_args(["--pretrained_model", "m", "--train_data_dir", "d", "--targetted_training", *flags])
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_model, subfolder="unet")
    expected = _names(unet, pattern)
    assert expected
    trainable = apply_layer_selection(unet, LayerSelection.of(config), seed=0)
    assert {name for name, p in unet.named_parameters() if p.requires_grad} == expected
    assert len(trainable) == len(expected)


def test_reinit_qk_changes_only_query_and_key_weights_reproducibly(tiny_sd_model):
    from diffusers import UNet2DConditionModel

    from cachetrain.train.layers import LayerSelection, apply_layer_selection

    original = UNet2DConditionModel.from_pretrained(tiny_sd_model, subfolder="unet").state_dict()
    results = []
    for _ in range(2):
        unet = UNet2DConditionModel.from_pretrained(tiny_sd_model, subfolder="unet")
        apply_layer_selection(unet, LayerSelection(reinit_qk=True), seed=3)
        results.append(unet.state_dict())
    changed = {name for name in original if not torch.equal(original[name], results[0][name])}
    assert changed == {name for name in original if re.search(r"\.attn[12]\.to_[qk]\.weight$", name)}
    assert all(torch.equal(results[0][name], results[1][name]) for name in original)


def test_trainable_parameter_count_is_printed_at_start(tiny_sd_model, cached_dataset, tmp_path, capsys):
    train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--batch_size", "8",
                                 "--max_steps", "1", "--targetted_training", "--unfreeze_mid_block")))
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_model, subfolder="unet")
    mid = sum(p.numel() for name, p in unet.named_parameters() if name.startswith("mid_block."))
    total = sum(p.numel() for p in unet.parameters())
    assert f"trainable parameters: {mid:,} of {total:,}" in capsys.readouterr().err


def test_an_unfreeze_selection_naming_a_missing_block_fails_clearly(tiny_sd_model, cached_dataset, tmp_path, capsys):
    code = main(_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--targetted_training",
                      "--unfreeze_up_blocks", "7"))
    assert code == 2
    assert "--unfreeze_up_blocks 7: this UNet has up_blocks 0-1" in capsys.readouterr().err
