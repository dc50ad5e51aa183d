"""cachetrain-lora merge|extract: a LoRA merged into a model folder or single file equals what diffusers'
fuse_lora makes; a LoRA extracted from two models recovers their difference, with the error its rank
leaves reported; faults end in one line and status 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cachetrain.commands import lora as lora_command
from cachetrain.models.lora_files import (KOHYA_LORA_FILE, LoraFileError, adaptable_layers, kohya_metadata, kohya_name,
                                         read_lora, write_kohya_lora)


@pytest.fixture(scope="module")
def sd15_model(tmp_path_factory) -> Path:
    from cachetrain.tiny.models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("sd15-structure") / "model", seed=0, sd15_structure=True)


@pytest.fixture(scope="module")
def random_lora(sd15_model, tmp_path_factory) -> Path:
    """A rank-4 LoRA (attention + conv) with random weights, in the kohya layout and a diffusers folder."""
    from diffusers import UNet2DConditionModel

    from cachetrain.train.adapters import AdapterSpec, attach_adapter, write_adapter

    unet = UNet2DConditionModel.from_pretrained(sd15_model, subfolder="unet")
    spec = AdapterSpec(kind="lora", rank=4, alpha=2, targets=["attention", "conv"])
    trainable = attach_adapter(unet, spec, seed=0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in trainable:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    folder = tmp_path_factory.mktemp("lora") / "lora"
    write_adapter(unet, spec, folder, kohya=True, title="random")
    return folder


def _unet(model: Path, subfolder: str = "unet"):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(model, subfolder=subfolder)


def _fused_by_diffusers(model: Path, lora: Path, scale: float):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipeline.load_lora_weights(lora)
    pipeline.fuse_lora(lora_scale=scale)
    return adaptable_layers(pipeline.unet)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_merge_into_a_folder_equals_diffusers_fuse_lora(sd15_model, random_lora, tmp_path, scale):
    out = tmp_path / "merged"
    assert lora_command(["merge", "--model", str(sd15_model), "--lora", str(random_lora / KOHYA_LORA_FILE),
                         "--out", str(out), "--scale", str(scale)]) == 0
    merged = adaptable_layers(_unet(out))
    theirs = _fused_by_diffusers(sd15_model, random_lora / KOHYA_LORA_FILE, scale)
    base = adaptable_layers(_unet(sd15_model))
    changed = 0
    for name, layer in merged.items():
        assert torch.allclose(layer.weight, theirs[name].weight, atol=1e-6, rtol=0), name
        changed += not torch.equal(layer.weight, base[name].weight)
    assert changed == len(read_lora(random_lora, base))
    assert (out / "vae").is_dir() and (out / "text_encoder").is_dir()  # a whole pipeline folder



def test_a_kohya_file_of_layers_with_different_alphas_loads_in_diffusers_with_each_layers_change(sd15_model, random_lora,
                                                                                                  tmp_path):
    """A run started from a file whose cross-attention layers have their own alpha: diffusers' kohya conversion
    keeps one alpha for every attention layer, so the file we write holds one, each layer's own baked in."""
    from cachetrain.models.lora_files import LowRankPair

    base = adaptable_layers(_unet(sd15_model))
    mixed = {name: LowRankPair(pair.down, pair.up, 3.0 if ".attn2." in name else pair.alpha)
             for name, pair in read_lora(random_lora, base).items()}
    assert len({pair.alpha for pair in mixed.values()}) == 2
    path = write_kohya_lora(tmp_path / "mixed.safetensors", mixed, kohya_metadata(mixed, title="mixed"))
    with safe_open(str(path), framework="pt") as handle:
        assert {handle.get_tensor(key).item() for key in handle.keys() if key.endswith(".alpha")} == {2.0}
        assert handle.metadata()["ss_network_alpha"] == "2.0"
    theirs = _fused_by_diffusers(sd15_model, path, 1.0)
    for name, pair in mixed.items():
        intended = base[name].weight + pair.delta()
        assert torch.allclose(theirs[name].weight, intended, atol=2e-4, rtol=0), name  # the file is fp16

def test_merge_into_a_single_file_loads_with_diffusers_single_file_loader(sd15_model, random_lora, tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "merged.safetensors"
    assert lora_command(["merge", "--model", str(sd15_model), "--lora", str(random_lora), "--out", str(out)]) == 0
    unet = UNet2DConditionModel.from_single_file(str(out), config=str(sd15_model), subfolder="unet",
                                                 local_files_only=True)
    theirs = _fused_by_diffusers(sd15_model, random_lora, 1.0)
    for name, layer in adaptable_layers(unet).items():
        assert torch.allclose(layer.weight, theirs[name].weight, atol=1e-6, rtol=0), name


def test_extract_recovers_the_difference_and_reports_what_the_rank_leaves(sd15_model, random_lora, tmp_path, capsys):
    tuned = tmp_path / "tuned"
    assert lora_command(["merge", "--model", str(sd15_model), "--lora", str(random_lora), "--out", str(tuned)]) == 0
    capsys.readouterr()
    out = tmp_path / "extracted.safetensors"
    assert lora_command(["extract", "--base", str(sd15_model), "--tuned", str(tuned), "--rank", "4", "--out", str(out),
                         "--targets", "attention", "conv"]) == 0
    report = capsys.readouterr().err
    error = float(report.split("relative error left by the rank ")[1].split()[0])
    assert error < 1e-4, report  # the difference has rank 4: nothing is left
    layers = adaptable_layers(_unet(sd15_model))
    original, extracted = read_lora(random_lora, layers), read_lora(out, layers)
    assert extracted.keys() == original.keys()
    for name, pair in original.items():
        assert torch.allclose(extracted[name].delta(), pair.delta(), atol=1e-5), name
    assert lora_command(["extract", "--base", str(sd15_model), "--tuned", str(tuned), "--rank", "1", "--out",
                         str(tmp_path / "rank1"), "--targets", "attention", "conv"]) == 0
    smaller = float(capsys.readouterr().err.split("relative error left by the rank ")[1].split()[0])
    assert 0.1 < smaller < 1.0
    assert len(read_lora(tmp_path / "rank1", layers)) == len(original)  # a diffusers folder, read back
    assert "kept whole" not in report
    # a rank above a layer's own keeps that layer's whole difference, and the report says how many
    assert lora_command(["extract", "--base", str(sd15_model), "--tuned", str(tuned), "--rank", "4096", "--out",
                         str(tmp_path / "whole"), "--targets", "attention"]) == 0
    report = capsys.readouterr().err
    whole = read_lora(tmp_path / "whole", layers)
    assert f"; {len(whole)} layer(s) of a rank below 4096 kept whole at their own" in report
    assert all(pair.down.shape[0] == min(pair.delta().flatten(1).shape) for pair in whole.values())


def test_a_model_with_a_lora_merged_in_trains_as_pretrained_model(sd15_model, random_lora, tmp_path):
    from cachetrain.train.config import parse_train_args
    from cachetrain.train.trainer import train
    from cachetrain.tiny.models import write_random_pairs
    from tests.training_support import train_args

    merged = tmp_path / "merged"
    assert lora_command(["merge", "--model", str(sd15_model), "--lora", str(random_lora), "--out", str(merged)]) == 0
    write_random_pairs(tmp_path / "data", 8, latent_shape=(4, 8, 8), folders=1)
    result = train(parse_train_args(train_args(merged, tmp_path / "data", tmp_path / "run", "--max_steps", "1",
                                               "--batch_size", "4", "--lora_type", "lora", "--lora_rank", "2")))
    assert result.exit_status == 0 and (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


def test_merge_and_extract_faults_end_in_one_line_and_status_2(sd15_model, random_lora, tiny_sd_model, tmp_path, capsys):
    layers = adaptable_layers(_unet(sd15_model))
    pairs = read_lora(random_lora, layers)
    odd = tmp_path / "odd.safetensors"
    write_kohya_lora(odd, {**pairs}, kohya_metadata(pairs, title="odd"))
    from safetensors.torch import load_file, save_file

    tensors = load_file(odd)
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 32)
    save_file(tensors, odd)
    to_q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({**load_file(random_lora / KOHYA_LORA_FILE), f"{to_q}.dora_scale": torch.ones(32, 1)},
              tmp_path / "dora.safetensors")
    # a LyCORIS LoHa of a wider model: to_q is 64 x 64 there, 32 x 32 here
    save_file({f"{to_q}.hada_w1_a": torch.zeros(64, 4), f"{to_q}.hada_w1_b": torch.zeros(4, 64),
               f"{to_q}.hada_w2_a": torch.zeros(64, 4), f"{to_q}.hada_w2_b": torch.zeros(4, 64),
               f"{to_q}.alpha": torch.tensor(4.0)}, tmp_path / "loha.safetensors")
    with pytest.raises(LoraFileError, match=r"e\.g\. \S+hada_w1_a \(a LyCORIS LoHa/LoKr: cachetrain-lora merge and "
                                            r"a --lora_type loha\|lokr run read these\)"):
        read_lora(tmp_path / "loha.safetensors", layers)  # as a LoRA reader meets it
    from diffusers import UNet2DConditionModel

    from cachetrain.train.adapters import AdapterError, AdapterSpec, attach_adapter, write_adapter

    with pytest.raises(AdapterError, match=rf"--lora_weights \S+loha.safetensors: {to_q} changes a weight of "
                                           rf"shape \[64, 64\], this UNet's is \[32, 32\] \(an adapter of another "
                                           rf"base model\)"):
        attach_adapter(_unet(sd15_model), AdapterSpec(kind="loha", rank=2, alpha=2,  # as a training start
                                                      start_weights=str(tmp_path / "loha.safetensors")), seed=0)

    other_base = UNet2DConditionModel.from_pretrained(tiny_sd_model, subfolder="unet")
    loha = AdapterSpec(kind="loha", rank=2, alpha=2)
    attach_adapter(other_base, loha, seed=0)
    write_adapter(other_base, loha, tmp_path / "other-loha")
    cases = [
        (["merge", "--model", str(sd15_model), "--lora", str(tmp_path / "other-loha"), "--out", str(tmp_path / "h")],
         "other-loha/unet_adapter: not an adapter for this UNet (size mismatch for "),  # a LoHa checkpoint of another base
        (["merge", "--model", str(tiny_sd_model), "--lora", str(random_lora), "--out", str(tmp_path / "a")],
         "is not in this UNet"),  # another base: its layers are not there
        (["merge", "--model", str(sd15_model), "--lora", str(odd), "--out", str(tmp_path / "b")],
         "lora_te_text_model_encoder_layers_0_mlp_fc1 lacks its lora_down or lora_up weight"),
        (["merge", "--model", str(sd15_model), "--lora", str(tmp_path / "missing"), "--out", str(tmp_path / "c")],
         "no such LoRA file"),
        (["merge", "--model", str(sd15_model), "--lora", str(tmp_path / "loha.safetensors"), "--out",
          str(tmp_path / "f")], f"{to_q} changes a weight of shape [64, 64], this UNet's is [32, 32]"),
        (["merge", "--model", str(sd15_model), "--lora", str(tmp_path / "dora.safetensors"), "--out",
          str(tmp_path / "g")], f"1 key(s) this UNet has no place for, e.g. {to_q}.dora_scale (DoRA"),
        (["extract", "--base", str(sd15_model), "--tuned", str(tiny_sd_model), "--rank", "2", "--out",
          str(tmp_path / "d")], "differs in shape"),
        (["extract", "--base", str(sd15_model), "--tuned", str(sd15_model), "--rank", "2", "--out",
          str(tmp_path / "e")], "do not differ"),
    ]
    from peft.tuners.tuners_utils import BaseTunerLayer

    from cachetrain.models.lora_tools import peft_adapter_changes

    unet = _unet(sd15_model)
    before = {name: tensor.clone() for name, tensor in unet.state_dict().items()}
    with pytest.raises(LoraFileError, match="size mismatch"):
        peft_adapter_changes(unet, tmp_path / "other-loha" / "unet_adapter")
    assert not any(isinstance(module, BaseTunerLayer) for module in unet.modules())  # taken off again
    with pytest.raises(AdapterError, match=r"--lora_weights \S+other-loha/unet_adapter: not an adapter for this UNet "
                                           r"\(size mismatch for "):  # as a training start
        attach_adapter(_unet(sd15_model), AdapterSpec(kind="loha", rank=2, alpha=2,
                                                      start_weights=str(tmp_path / "other-loha")), seed=0)
    assert unet.state_dict().keys() == before.keys() and all(torch.equal(unet.state_dict()[k], before[k]) for k in before)
    for argv, message in cases:
        capsys.readouterr()
        assert lora_command(argv) == 2, argv
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (argv, lines)
    assert not any((tmp_path / name).exists() for name in "abcdefgh")


@pytest.fixture(scope="module")
def lora_run(sd15_model, tmp_path_factory) -> Path:
    """A finished 2-step LoRA run of the SD1.5-structure model (read-only for the tests): its output folder
    as the trainer leaves it (checkpoints, tensorboard, the run's records, the adapter beside the base)."""
    from cachetrain.tiny.models import write_random_pairs
    from cachetrain.train.config import parse_train_args
    from cachetrain.train.trainer import train
    from tests.training_support import train_args

    root = tmp_path_factory.mktemp("lora-run")
    write_random_pairs(root / "data", 4, latent_shape=(4, 8, 8), folders=1)
    result = train(parse_train_args(train_args(sd15_model, root / "data", root / "run", "--max_steps", "2",
                                               "--save_steps", "1", "--batch_size", "2", "--lora_type", "lora",
                                               "--lora_rank", "2")))
    assert result.exit_status == 0
    return root / "run"


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_merge_and_extract_refuse_an_out_that_would_replace_or_lose_files(sd15_model, random_lora, lora_run, tmp_path,
                                                                          capsys):
    """--out is checked before anything loads: never one of the inputs, never a folder of other things or a
    run's folder (a merge replaces its --out folder whole), a file where a folder goes and the reverse."""
    photos = tmp_path / "photos"  # a folder of the user's own files
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"not really a picture")
    run_copy = tmp_path / "run-copy"
    shutil.copytree(lora_run, run_copy)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    (tmp_path / "folder.safetensors").mkdir()
    before = {folder: _tree(folder) for folder in (photos, run_copy, sd15_model, random_lora)}
    merge = ["merge", "--model", str(sd15_model), "--lora", str(random_lora)]
    extract = ["extract", "--base", str(sd15_model), "--tuned", str(sd15_model), "--rank", "2"]
    cases = [
        (merge + ["--out", str(photos)], f"--out {photos}: a folder that holds no model (no model_index.json), "
                                         "and the merged model would replace the whole folder"),
        (["merge", "--model", str(run_copy), "--lora", str(run_copy), "--out", str(run_copy)],
         f"--out {run_copy}: is, lies inside or holds --model {run_copy}"),  # "in place"
        (merge + ["--out", str(run_copy)], f"--out {run_copy}: a training run's folder (checkpoints, resume state)"),
        (merge + ["--out", str(sd15_model / "merged")], "lies inside or holds --model"),
        (["merge", "--model", str(run_copy), "--lora", str(run_copy), "--out", str(tmp_path)],
         f"--out {tmp_path}: is, lies inside or holds --model {run_copy}"),  # a folder around an input
        (merge + ["--out", str(a_file)], f"--out {a_file}: an existing file; name a folder"),
        (merge + ["--out", str(tmp_path / "folder.safetensors")], "an existing folder; a .safetensors output is one file"),
        (merge + ["--out", str(tmp_path / "m"), "--scale", "nan"], "--scale nan: must be a finite number"),
        (extract + ["--out", str(a_file)], f"--out {a_file}: an existing file"),
        (extract + ["--out", str(tmp_path / "folder.safetensors")], "an existing folder"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert lora_command(argv) == 2, argv
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (argv, lines)
    assert {folder: _tree(folder) for folder in before} == before  # every input and every file left as it was
    assert a_file.read_text() == "keep me" and not (tmp_path / "m").exists()
    # a missing folder on the way is made, for a single file and a folder alike
    single, folder = tmp_path / "new" / "a" / "merged.safetensors", tmp_path / "new" / "b" / "extracted"
    assert lora_command(merge + ["--out", str(single)]) == 0 and single.is_file()
    tuned = tmp_path / "new" / "tuned"
    assert lora_command(merge + ["--out", str(tuned)]) == 0
    assert lora_command(["extract", "--base", str(sd15_model), "--tuned", str(tuned), "--rank", "2", "--out",
                         str(folder)]) == 0 and (folder / "pytorch_lora_weights.safetensors").is_file()


def test_merging_a_run_folder_writes_its_pipeline_and_nothing_else_of_the_run(sd15_model, lora_run, tmp_path):
    out = tmp_path / "merged"
    assert lora_command(["merge", "--model", str(lora_run), "--lora", str(lora_run), "--out", str(out)]) == 0
    # what a pipeline folder holds, as the model it started from: no checkpoints, logs, lock, adapter, resume state
    assert sorted(path.name for path in out.iterdir()) == sorted(path.name for path in sd15_model.iterdir())
    merged, base = adaptable_layers(_unet(out)), adaptable_layers(_unet(sd15_model))
    assert any(not torch.equal(merged[name].weight, base[name].weight) for name in base)  # the adapter is in it


def test_a_single_file_merges_offline_with_its_config_folder_and_is_refused_in_one_line_without(
        sd15_model, random_lora, tmp_path, capsys):
    from cachetrain.models import export

    single = tmp_path / "sd15.safetensors"
    assert export.main([str(sd15_model), str(single), "--dtype", "fp32"]) == 0
    capsys.readouterr()
    # offline (the suite's hub is unreachable): SD1.5's hub id, the default config source, cannot be had
    assert lora_command(["merge", "--model", str(single), "--lora", str(random_lora), "--out",
                         str(tmp_path / "refused.safetensors")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{single}: a single file holds weights only" in lines[0], lines
    assert "--single_file_config FOLDER" in lines[0] and not (tmp_path / "refused.safetensors").exists()
    merged = tmp_path / "merged.safetensors"
    assert lora_command(["merge", "--model", str(single), "--lora", str(random_lora), "--out", str(merged),
                         "--single_file_config", str(sd15_model)]) == 0
    by_folder = tmp_path / "by-folder"
    assert lora_command(["merge", "--model", str(sd15_model), "--lora", str(random_lora), "--out", str(by_folder)]) == 0
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_single_file(str(merged), config=str(sd15_model), subfolder="unet",
                                                 local_files_only=True)
    expected = adaptable_layers(_unet(by_folder))
    for name, layer in adaptable_layers(unet).items():  # the same merge as from the model's folder
        assert torch.allclose(layer.weight, expected[name].weight, atol=1e-6, rtol=0), name
    assert lora_command(["extract", "--base", str(single), "--tuned", str(merged), "--rank", "4", "--out",
                         str(tmp_path / "extracted"), "--single_file_config", str(sd15_model)]) == 0


def test_extract_from_an_adapter_runs_model_is_refused_naming_the_merge_that_gives_its_model(sd15_model, lora_run,
                                                                                              tmp_path, capsys):
    assert lora_command(["extract", "--base", str(sd15_model), "--tuned", str(lora_run), "--rank", "2", "--out",
                         str(tmp_path / "e")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"--tuned {lora_run}: an adapter run's model, whose unet/ is the untrained base" in lines[0]
    assert f"cachetrain-lora merge --model {lora_run} --lora {lora_run}" in lines[0] and not (tmp_path / "e").exists()


def test_a_lora_with_non_finite_values_a_vector_alpha_or_unmatched_ranks_is_refused_naming_the_layer(
        sd15_model, random_lora, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    to_q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = load_file(random_lora / KOHYA_LORA_FILE)
    broken = {
        "nan": {**tensors, f"{to_q}.lora_up.weight": torch.full_like(tensors[f"{to_q}.lora_up.weight"], float("nan"))},
        "vector-alpha": {**tensors, f"{to_q}.alpha": torch.ones(4)},
        "ranks": {**tensors, f"{to_q}.lora_down.weight": torch.zeros(5, *tensors[f"{to_q}.lora_down.weight"].shape[1:])},
    }
    messages = {"nan": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q holds NaN or infinite values",
                "vector-alpha": f"{to_q}.alpha holds 4 values; an alpha is one number",
                "ranks": "to_q's up and down weights do not make a pair"}
    for name, file_tensors in broken.items():
        save_file(file_tensors, tmp_path / f"{name}.safetensors")
        capsys.readouterr()
        assert lora_command(["merge", "--model", str(sd15_model), "--lora", str(tmp_path / f"{name}.safetensors"),
                             "--out", str(tmp_path / f"out-{name}")]) == 2, name
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and f"{name}.safetensors" in lines[0] and messages[name] in lines[0], (name, lines)
        assert not (tmp_path / f"out-{name}").exists()


def test_a_merge_into_a_single_file_of_a_model_without_that_layout_is_refused_before_merging(tiny_sd_model, tmp_path,
                                                                                              capsys):
    from diffusers import UNet2DConditionModel

    from cachetrain.train.adapters import AdapterSpec, attach_adapter, write_adapter

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_model, subfolder="unet")
    spec = AdapterSpec(kind="lora", rank=2, alpha=2)
    attach_adapter(unet, spec, seed=0)
    write_adapter(unet, spec, tmp_path / "lora")
    assert lora_command(["merge", "--model", str(tiny_sd_model), "--lora", str(tmp_path / "lora"), "--out",
                         str(tmp_path / "out.safetensors")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "UNet has no single-file layout" in lines[0] and "write a folder instead" in lines[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["lora"]


def test_a_locon_written_by_lycoris_merges_and_starts_a_run_as_lycoris_applies_it(sd15_model, tmp_path, monkeypatch):
    """A file our code did not write: LyCORIS' LoRA/LoCon network (every Linear and Conv2d of the UNet, 3x3
    convolutions included, rank 4, alpha 2) saved by its own save_weights under the UIs' lora_unet_ names.
    Merged by `cachetrain-lora merge`, and attached as a --lora_weights start, it changes the UNet's output
    as LyCORIS' forward does."""
    from lycoris.wrapper import LycorisNetwork, create_lycoris

    from cachetrain.train.adapters import AdapterSpec, attach_adapter, describe

    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", "lora_unet")
    unet = _unet(sd15_model).eval()
    network = create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=2, algo="lora")
    network.apply_to()  # (its layers become its parameters here)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "lora_up" in name:  # LyCORIS starts them at zero, which would change nothing
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    file = tmp_path / "locon.safetensors"
    network.save_weights(str(file), torch.float32, {"ss_network_module": "lycoris.kohya"})
    inputs = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500]),
              torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        theirs = unet(*inputs).sample
        plain = _unet(sd15_model).eval()(*inputs).sample
    assert (theirs - plain).abs().max() > 1e-3

    out = tmp_path / "merged"
    assert lora_command(["merge", "--model", str(sd15_model), "--lora", str(file), "--out", str(out)]) == 0
    merged = _unet(out).eval()
    assert len(read_lora(file, adaptable_layers(merged))) == len(network.loras)  # conv_in, time embedding too
    started = _unet(sd15_model).train()
    spec = AdapterSpec(kind="lora", rank=16, alpha=16, start_weights=str(file))
    attach_adapter(started, spec, seed=0)
    assert (spec.rank, spec.alpha) == (4, 2) and f"on {len(network.loras)} layers" in describe(started, spec)
    with torch.no_grad():
        ours_merged, ours_started = merged(*inputs).sample, started.eval()(*inputs).sample
    assert torch.allclose(ours_merged, theirs, atol=1e-5, rtol=1e-4)
    assert torch.allclose(ours_started, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_a_loha_or_lokr_written_by_lycoris_merges_and_starts_a_run_as_lycoris_applies_it(sd15_model, tmp_path,
                                                                                       monkeypatch, algo):
    """LyCORIS' own LoHa/LoKr network (every Linear and Conv2d, rank 4, alpha 2; LoKr with its default factor,
    so full and low-rank factors both occur) saved by its save_weights. Merged by `cachetrain-lora merge`, and
    attached as a --lora_weights start of a run of its kind, it changes the UNet's output as LyCORIS' forward
    does; a run of the other kind is refused, naming the file's."""
    from lycoris.wrapper import LycorisNetwork, create_lycoris

    from cachetrain.models.lycoris_files import lycoris_changes
    from cachetrain.train.adapters import AdapterError, AdapterSpec, attach_adapter, describe

    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", "lora_unet")
    unet = _unet(sd15_model).eval()
    network = create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=2, algo=algo)
    network.apply_to()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in network.parameters():  # some factors start at zero, which would change nothing
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    file = tmp_path / f"{algo}.safetensors"
    network.save_weights(str(file), torch.float32, {"ss_network_module": "lycoris.kohya"})
    with safe_open(str(file), framework="pt") as handle:
        keys = set(handle.keys())
    if algo == "lokr":
        assert any(key.endswith(".lokr_w2") for key in keys) and any(key.endswith(".lokr_w2_b") for key in keys)
    inputs = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500]),
              torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        theirs = unet(*inputs).sample
        plain = _unet(sd15_model).eval()(*inputs).sample
    out = tmp_path / "merged"
    assert lora_command(["merge", "--model", str(sd15_model), "--lora", str(file), "--out", str(out)]) == 0
    started = _unet(sd15_model)
    spec = AdapterSpec(kind=algo, rank=16, alpha=16, start_weights=str(file))
    trainable = attach_adapter(started, spec, seed=0)
    with torch.no_grad():
        ours = _unet(out).eval()(*inputs).sample
        ours_started = started.eval()(*inputs).sample
    assert (theirs - plain).abs().max() > 1e-2
    assert (ours - theirs).abs().max() < 1e-4 * max(1.0, theirs.abs().max())
    assert (ours_started - theirs).abs().max() < 1e-4 * max(1.0, theirs.abs().max())
    assert len(lycoris_changes(file, adaptable_layers(_unet(sd15_model)))) == len(network.loras)
    assert f"on {len(network.loras)} layers" in describe(started, spec)
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in network.parameters())
    other = "lokr" if algo == "loha" else "loha"
    with pytest.raises(AdapterError, match=f"{file}: a {algo} adapter; it starts a --lora_type {algo} run"):
        attach_adapter(_unet(sd15_model), AdapterSpec(kind=other, rank=4, alpha=4, start_weights=str(file)), seed=0)


def test_lycoris_files_with_low_rank_first_factors_two_full_factors_or_alpha_0_merge_as_lycoris_computes(sd15_model,
                                                                                                       tmp_path):
    """Variants LyCORIS' modules write or read, each layer's change against the module's own get_weight: LoKr with
    both factors low-rank (decompose_both), LoKr with two full factors and an alpha that is not its rank (LyCORIS
    applies no scale there), LoHa with alpha 0 (read as alpha = rank), and a LoCon layer in the same file."""
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule
    from safetensors.torch import save_file

    from cachetrain.models.lycoris_files import lycoris_changes

    layers = adaptable_layers(_unet(sd15_model))
    attention = "down_blocks.0.attentions.0.transformer_blocks.0.attn1."
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        modules = {
            attention + "to_q": LokrModule("q", layers[attention + "to_q"], 1.0, lora_dim=1, alpha=0.5, decompose_both=True),
            attention + "to_k": LokrModule.make_module_from_state_dict(
                "k", layers[attention + "to_k"], torch.randn(4, 4, generator=generator), None, None,
                torch.randn(8, 8, generator=generator), None, None, None, None, torch.tensor(7.0), None),
            attention + "to_v": LohaModule.make_module_from_state_dict(
                "v", layers[attention + "to_v"], *(torch.randn(*shape, generator=generator) for shape in
                                                   ((32, 2), (2, 32), (32, 2), (2, 32))), None, None, torch.tensor(0.0), None),
            "down_blocks.0.resnets.0.conv1": LoConModule("c", layers["down_blocks.0.resnets.0.conv1"], 1.0, lora_dim=2,
                                                         alpha=1),
        }
        for module in modules.values():
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    assert hasattr(modules[attention + "to_q"], "lokr_w1_a") and hasattr(modules[attention + "to_q"], "lokr_w2_a")
    tensors = {f"{kohya_name(name)}.{key}": tensor.clone() for name, module in modules.items()
               for key, tensor in module.state_dict().items() if key != "scalar"}
    tensors[f"{kohya_name(attention + 'to_k')}.alpha"] = torch.tensor(7.0)  # as other tools may write them (the
    tensors[f"{kohya_name(attention + 'to_v')}.alpha"] = torch.tensor(0.0)  # modules keep what they read them as)
    file = tmp_path / "variants.safetensors"
    save_file(tensors, file)
    ours = lycoris_changes(file, layers)
    assert ours.keys() == modules.keys()
    for name, module in modules.items():
        theirs = module.get_weight(layers[name].weight.shape).detach() * module.multiplier if not isinstance(
            module, LoConModule) else module.get_diff_weight(module.multiplier)[0].detach()
        assert torch.allclose(ours[name], theirs.reshape(ours[name].shape), atol=1e-5, rtol=1e-4), name
        assert theirs.abs().max() > 1e-2, name


def _lycoris_file(modules: dict, path: Path) -> Path:
    """LyCORIS modules' tensors under the UIs' lora_unet_ names, as its save_weights writes them."""
    from safetensors.torch import save_file

    save_file({f"{kohya_name(name)}.{key}": tensor.detach().clone().contiguous() for name, module in modules.items()
               for key, tensor in module.state_dict().items() if key != "scalar"}, path)
    return path


def test_lokr_with_a_factor_and_low_rank_first_factors_starts_a_run_as_lycoris_computes_it(sd15_model, tmp_path):
    """LyCORIS' LokrModule with factor 4 and both factors low-rank (decompose_both), on two attention projections
    and a 3x3 convolution: attached as a --lora_weights start, each PEFT layer's change is the module's own."""
    from lycoris.modules.lokr import LokrModule

    from cachetrain.train.adapters import AdapterSpec, attach_adapter

    layers = adaptable_layers(_unet(sd15_model))
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
             "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_v", "down_blocks.1.resnets.0.conv1"]
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        modules = {name: LokrModule(name, layers[name], 1.0, lora_dim=1, alpha=3, decompose_both=True, factor=4)
                   for name in names}
        for module in modules.values():
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    assert all(hasattr(module, "lokr_w1_a") and hasattr(module, "lokr_w2_a") for module in modules.values())
    file = _lycoris_file(modules, tmp_path / "lokr.safetensors")
    started = _unet(sd15_model)
    spec = AdapterSpec(kind="lokr", rank=16, alpha=16, start_weights=str(file))
    attach_adapter(started, spec, seed=0)
    assert (spec.rank, spec.alpha) == (1, 3)
    for name, module in modules.items():
        theirs = module.get_weight(layers[name].weight.shape).detach() * module.multiplier
        ours = started.get_submodule(name).get_delta_weight("default").detach()
        assert theirs.abs().max() > 1e-2 and torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_tucker_factors_merge_and_start_a_run_as_lycoris_computes_them(sd15_model, tmp_path, algo):
    """LyCORIS' use_tucker: a 3x3 convolution's low-rank factors as a core [r, r, 3, 3] between two [r, side]
    matrices (LoHa: both halves; LoKr: its second factor), beside an attention projection that has none. Each
    layer's change as read for a merge, and as PEFT's layers (use_effective_conv2d) compute it when the file
    starts a run, is the module's own."""
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    from cachetrain.models.lycoris_files import lycoris_changes
    from cachetrain.train.adapters import AdapterSpec, attach_adapter

    module_class = LohaModule if algo == "loha" else LokrModule
    layers = adaptable_layers(_unet(sd15_model))
    names = ["down_blocks.2.resnets.0.conv1", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        modules = {name: module_class(name, layers[name], 1.0, lora_dim=2, alpha=1, use_tucker=True) for name in names}
        for module in modules.values():
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    conv, attention = (modules[name].state_dict().keys() for name in names)
    assert ({"hada_t1", "hada_t2"} <= conv) if algo == "loha" else ("lokr_t2" in conv)
    assert not any(key.endswith(("_t1", "_t2")) for key in attention)
    file = _lycoris_file(modules, tmp_path / f"{algo}-tucker.safetensors")
    merged = lycoris_changes(file, layers)
    started = _unet(sd15_model)
    attach_adapter(started, AdapterSpec(kind=algo, rank=16, alpha=16, start_weights=str(file)), seed=0)
    for name, module in modules.items():
        theirs = (module.get_weight(layers[name].weight.shape).detach() * module.multiplier).reshape(
            layers[name].weight.shape)
        ours = started.get_submodule(name).get_delta_weight("default").detach()
        assert theirs.abs().max() > 1e-2, name
        assert torch.allclose(merged[name], theirs, atol=1e-5, rtol=1e-4), name
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4), name


def test_lycoris_files_peft_cannot_hold_as_they_compute_are_refused_as_a_start_naming_the_layer(sd15_model, tmp_path):
    """Factor 16 (LyCORIS splits a 32-wide side 2 x 16 and a 64-wide one 4 x 16; no one factor of PEFT's LoKr
    makes both), a LoKr layer beside LoHa ones, a LoHa layer without one of its factors: one AdapterError each,
    naming the file and layer."""
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule
    from safetensors.torch import load_file, save_file

    from cachetrain.train.adapters import AdapterError, AdapterSpec, attach_adapter

    layers = adaptable_layers(_unet(sd15_model))
    narrow, wide = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                    "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q")
    files = {
        "factor": ("lokr", {name: LokrModule(name, layers[name], lora_dim=2, factor=16) for name in (narrow, wide)},
                   f"{kohya_name(narrow)} splits its weight [32, 32] into factors 2x2 and 16x16, which no decompose "
                   f"factor of PEFT's LoKr makes"),
        "mixed": ("loha", {narrow: LohaModule(narrow, layers[narrow], lora_dim=2),
                           wide: LokrModule(wide, layers[wide], lora_dim=2)},
                  f"{kohya_name(wide)} is a lokr layer beside loha layers; a run starts from a file of one kind"),
        "incomplete": ("loha", {narrow: LohaModule(narrow, layers[narrow], lora_dim=2)},
                       f"{kohya_name(narrow)} lacks hada_w2_b"),
    }
    for case, (kind, modules, message) in files.items():
        file = _lycoris_file(modules, tmp_path / f"{case}.safetensors")
        if case == "incomplete":
            save_file({key: value for key, value in load_file(file).items() if not key.endswith("hada_w2_b")}, file)
        with pytest.raises(AdapterError) as refused:
            attach_adapter(_unet(sd15_model), AdapterSpec(kind=kind, rank=4, alpha=4, start_weights=str(file)), seed=0)
        assert str(refused.value).startswith(f"--lora_weights {file}: ") and message in str(refused.value), case
        assert "\n" not in str(refused.value)


@pytest.fixture(scope="module")
def lora_with_text_encoder(sd15_model, tmp_path_factory) -> Path:
    """A LoRA of the UNet's attention (rank 4, alpha 2) and the text encoder's (rank 4, alpha 8), written by
    diffusers' own save_lora_weights from PEFT layers (keys unet.* and text_encoder.*), and the same LoRA in
    sd-scripts' kohya names (lora_unet_*, lora_te_text_model_*; one alpha per layer) beside it."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    pipeline = StableDiffusionPipeline.from_pretrained(sd15_model, safety_checker=None, requires_safety_checker=False)
    unet_config = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    text_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"])
    pipeline.unet.add_adapter(unet_config)
    inject_adapter_in_model(text_config, pipeline.text_encoder)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for model in (pipeline.unet, pipeline.text_encoder):
            for name, parameter in model.named_parameters():
                if "lora_B" in name:  # PEFT starts them at zero
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    folder = tmp_path_factory.mktemp("lora-te") / "diffusers"
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(pipeline.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipeline.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict())
    kohya = {}
    for key, tensor in load_file(folder / "pytorch_lora_weights.safetensors").items():
        part, rest = key.split(".", 1)
        module, which = rest.rsplit(".lora_", 1)
        module = module.removeprefix("text_model.")
        name = ("lora_te_text_model_" if part == "text_encoder" else "lora_unet_") + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if which == 'A.weight' else 'lora_up'}.weight"] = tensor
        kohya[f"{name}.alpha"] = torch.tensor(8.0 if part == "text_encoder" else 2.0)
    save_file(kohya, folder.parent / "kohya.safetensors", metadata={"ss_network_module": "networks.lora"})
    # the diffusers file as transformers 4 named the text encoder's layers (text_model.encoder...)
    older = folder.parent / "diffusers-transformers4"
    older.mkdir()
    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        header = handle.metadata()
    renamed = {key.replace("text_encoder.", "text_encoder.text_model.", 1) if not key.startswith("text_encoder.text_model.")
               and key.startswith("text_encoder.") else key: tensor
               for key, tensor in load_file(folder / "pytorch_lora_weights.safetensors").items()}
    save_file(renamed, older / "pytorch_lora_weights.safetensors", metadata=header)
    # its UNet part alone, as diffusers writes a UNet LoRA
    StableDiffusionPipeline.save_lora_weights(folder.parent / "diffusers-unet-only",
                                              unet_lora_layers=get_peft_model_state_dict(pipeline.unet),
                                              unet_lora_adapter_metadata=unet_config.to_dict())
    return folder


@pytest.mark.parametrize("layout", ["diffusers folder", "diffusers folder, transformers 4 names", "kohya file"])
def test_merge_applies_a_loras_text_encoder_part_as_diffusers_fuse_lora_does(sd15_model, lora_with_text_encoder,
                                                                             tmp_path, layout):
    from diffusers import StableDiffusionPipeline

    source = {"diffusers folder": lora_with_text_encoder,
              "diffusers folder, transformers 4 names": lora_with_text_encoder.parent / "diffusers-transformers4",
              "kohya file": lora_with_text_encoder.parent / "kohya.safetensors"}[layout]
    out = tmp_path / "merged"
    assert lora_command(["merge", "--model", str(sd15_model), "--lora", str(source), "--out", str(out)]) == 0
    theirs = StableDiffusionPipeline.from_pretrained(sd15_model, safety_checker=None, requires_safety_checker=False)
    theirs.load_lora_weights(source)
    theirs.fuse_lora()
    ours = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    base = StableDiffusionPipeline.from_pretrained(sd15_model, safety_checker=None, requires_safety_checker=False)
    for part in ("unet", "text_encoder"):
        our_layers, their_layers = adaptable_layers(getattr(ours, part)), adaptable_layers(getattr(theirs, part))
        base_layers = adaptable_layers(getattr(base, part))
        changed = 0
        for name, layer in our_layers.items():
            assert torch.allclose(layer.weight, their_layers[name].weight, atol=1e-6, rtol=0), (part, name)
            changed += not torch.equal(layer.weight, base_layers[name].weight)
        # every attention projection (and the text encoder's fc1) of the tiny model: 128 of the UNet, 10 of the TE
        assert changed == {"unet": 128, "text_encoder": 10}[part], part


@pytest.mark.parametrize("layout", ["diffusers folder", "kohya file"])
def test_a_loras_text_encoder_part_is_left_out_of_a_training_start_in_one_line(sd15_model, lora_with_text_encoder,
                                                                                capsys, layout):
    """The captions' embeddings are cached: a text-encoder part could not apply to them, so a start from a LoRA
    that has one (as sd-scripts trains them by default) takes its UNet part and says so."""
    from cachetrain.train.adapters import AdapterSpec, attach_adapter, lora_pairs

    source = lora_with_text_encoder if layout == "diffusers folder" else lora_with_text_encoder.parent / "kohya.safetensors"
    unet = _unet(sd15_model)
    attach_adapter(unet, AdapterSpec(kind="lora", rank=16, alpha=16, start_weights=str(source)), seed=0)
    unet_part = read_lora(lora_with_text_encoder.parent / "diffusers-unet-only", adaptable_layers(_unet(sd15_model)))
    started = lora_pairs(unet)
    assert len(started) == 128 and started.keys() == unet_part.keys()  # every attention projection of the UNet
    for name, pair in unet_part.items():
        torch.testing.assert_close(started[name].delta(), pair.delta(), msg=name)
    assert (f"--lora_weights {source}: its text-encoder layers are left out (the captions are cached); its 128 UNet "
            "layers start the adapter") in capsys.readouterr().err


def test_a_text_encoder_part_meets_a_model_without_clip_in_one_line_and_unet_only_leaves_it_out(
        sd15_model, lora_with_text_encoder, tiny_t5_model, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    capsys.readouterr()
    assert lora_command(["merge", "--model", str(tiny_t5_model), "--lora", str(lora_with_text_encoder),
                         "--out", str(tmp_path / "t5")]) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "a part for SD1.5's CLIP text encoder, and this model's is t5" in line and "--unet_only" in line
    assert not (tmp_path / "t5").exists()
    out = tmp_path / "unet-only"
    assert lora_command(["merge", "--model", str(sd15_model), "--lora", str(lora_with_text_encoder), "--out", str(out),
                         "--unet_only"]) == 0
    merged = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    base = StableDiffusionPipeline.from_pretrained(sd15_model, safety_checker=None, requires_safety_checker=False)
    base_text = dict(base.text_encoder.named_parameters())
    assert all(torch.equal(tensor, base_text[name]) for name, tensor in merged.text_encoder.named_parameters())
    base_unet = dict(base.unet.named_parameters())
    assert sum(not torch.equal(tensor, base_unet[name]) for name, tensor in merged.unet.named_parameters()) == 128


def test_merging_another_lora_into_an_adapter_runs_model_is_refused(sd15_model, random_lora, tmp_path, capsys):
    """Its unet/ is the untrained base: the result would hold the other LoRA without the run's own."""
    run_model = tmp_path / "adapter-run"
    shutil.copytree(sd15_model, run_model)
    shutil.copy(random_lora / "pytorch_lora_weights.safetensors", run_model)
    capsys.readouterr()
    assert lora_command(["merge", "--model", str(run_model), "--lora", str(random_lora / KOHYA_LORA_FILE),
                         "--out", str(tmp_path / "out")]) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert f"{run_model}: an adapter run's model" in line and f"merge its own adapter first (--lora {run_model})" in line
    assert not (tmp_path / "out").exists()
    assert lora_command(["merge", "--model", str(run_model), "--lora", str(run_model), "--out", str(tmp_path / "own")]) == 0


# -- LoRAs as PEFT and diffusers write them from a user's own LoraConfig ------------------------------------------

def _peft_deltas(unet) -> dict[str, torch.Tensor]:
    """Each adapted layer's change as PEFT itself computes it (its LoraLayer.get_delta_weight)."""
    from peft.tuners.lora import LoraLayer

    return {name: module.get_delta_weight("default").detach().clone() for name, module in unet.named_modules()
            if isinstance(module, LoraLayer)}


@pytest.fixture(scope="module", params=["alpha_pattern by a name's ending", "use_rslora"])
def users_lora_config(request):
    from peft import LoraConfig

    extra = {"alpha_pattern": {"attn2.to_k": 16}} if request.param.startswith("alpha") else {"use_rslora": True}
    return LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False,
                      **extra)


@pytest.mark.parametrize("writer", ["pipeline save_lora_weights", "unet save_lora_adapter",
                                    "PeftModel save_pretrained"])
def test_a_lora_saved_by_peft_or_diffusers_merges_and_starts_a_run_with_the_change_peft_applies(
        sd15_model, users_lora_config, writer, tmp_path):
    import copy

    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict

    from cachetrain.train.adapters import AdapterSpec, attach_adapter

    torch.manual_seed(5)
    unet, folder = _unet(sd15_model), tmp_path / "lora"
    if writer == "PeftModel save_pretrained":
        model = get_peft_model(unet, copy.deepcopy(users_lora_config))
        model.save_pretrained(folder)
        expected = _peft_deltas(model.base_model.model)
    else:
        unet.add_adapter(copy.deepcopy(users_lora_config))
        expected = _peft_deltas(unet)
        if writer == "unet save_lora_adapter":
            unet.save_lora_adapter(folder)
        else:
            StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                                                      unet_lora_adapter_metadata=users_lora_config.to_dict())
    out = tmp_path / "merged"
    assert lora_command(["merge", "--model", str(sd15_model), "--lora", str(folder), "--out", str(out)]) == 0
    merged, base = adaptable_layers(_unet(out)), adaptable_layers(_unet(sd15_model))
    strong = {name for name in expected if name.endswith("attn2.to_k")}
    assert expected and strong
    for name, delta in expected.items():
        torch.testing.assert_close(merged[name].weight - base[name].weight, delta, atol=1e-6, rtol=1e-4, msg=name)
    started = _unet(sd15_model)
    attach_adapter(started, AdapterSpec(kind="lora", rank=16, alpha=16, start_weights=str(folder)), seed=0)
    ours = _peft_deltas(started)
    assert ours.keys() == expected.keys()
    for name, delta in expected.items():
        torch.testing.assert_close(ours[name], delta, atol=1e-6, rtol=1e-4, msg=name)


def test_a_file_of_a_rank_above_its_layers_width_starts_a_run_as_it_is(sd15_model, tmp_path, capsys):
    """sd-scripts and LyCORIS write such files (a LoCon's conv_out has 4 outputs; a dim above a narrow layer's
    width): the pair is only larger than it needs to be. --lora_rank's own check concerns a new adapter."""
    from cachetrain.models.lora_files import LowRankPair
    from cachetrain.train.adapters import AdapterSpec, attach_adapter, lora_pairs

    layers = adaptable_layers(_unet(sd15_model))
    generator = torch.Generator().manual_seed(8)
    chosen = [name for name in layers if name.endswith("attn1.to_q") and layers[name].weight.shape[0] < 40] + ["conv_out"]
    pairs = {}
    for name in chosen:
        out_features, *inputs = layers[name].weight.shape
        assert min(out_features, torch.Size(inputs).numel()) < 40, name  # rank 40 is above each layer's limit
        down_shape = (40, *inputs) if len(inputs) == 1 else (40, inputs[0], *inputs[1:])
        up_shape = (out_features, 40) if len(inputs) == 1 else (out_features, 40, 1, 1)
        pairs[name] = LowRankPair(down=torch.randn(down_shape, generator=generator) * 0.1,
                                  up=torch.randn(up_shape, generator=generator) * 0.1, alpha=20.0)
    file = write_kohya_lora(tmp_path / "wide.safetensors", pairs, {"ss_network_module": "networks.lora"})
    unet = _unet(sd15_model)
    attach_adapter(unet, AdapterSpec(kind="lora", rank=16, alpha=16, start_weights=str(file)), seed=0)
    started, in_file = lora_pairs(unet), read_lora(file, layers)
    assert started.keys() == set(chosen)
    for name, pair in in_file.items():
        torch.testing.assert_close(started[name].delta(), pair.delta(), msg=name)
