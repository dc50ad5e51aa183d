"""Adapter runs (--lora_type): what trains, the files a checkpoint holds and where they load (diffusers'
own load_lora_weights, in both layouts), exact resume with EMA, samples with the adapter on, and the
faults refused before step 1.

The kohya layout follows SD1.5's block structure, which diffusers' conversion of it assumes: these
tests train the narrow model with SD1.5's structure (build_tiny_sd(..., sd15_structure=True))."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cachetrain.commands import lora as lora_command
from cachetrain.models.adapter_folders import holds_adapter
from cachetrain.models.lora_files import DIFFUSERS_LORA_FILE, KOHYA_LORA_FILE, adaptable_layers, read_lora
from cachetrain.models.lora_tools import merge_changes, pair_changes
from cachetrain.train.config import parse_train_args
from cachetrain.train.trainer import main, train
from tests.conftest import cache_shapes
from tests.training_support import train_args

LORA = ("--lora_type", "lora", "--lora_rank", "4", "--lora_alpha", "2", "--lora_targets", "attention", "conv",
        "--batch_size", "4", "--max_steps", "3", "--log_every", "1")


@pytest.fixture(scope="module")
def sd15_model(tmp_path_factory) -> Path:
    from cachetrain.tiny.models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("sd15-structure") / "model", seed=0, sd15_structure=True)


@pytest.fixture(scope="module")
def sd15_cached(sd15_model, _shapes_template, tmp_path_factory) -> Path:
    return cache_shapes(sd15_model, _shapes_template, tmp_path_factory.mktemp("sd15-cached") / "data",
                        resolution=64)  # SD1.5's VAE structure downsamples 8x: 8x8 latents


@pytest.fixture(scope="module")
def lora_run(sd15_model, sd15_cached, tmp_path_factory) -> Path:
    """A finished 3-step LoRA run (attention + conv layers, EMA, kohya file, one sample per checkpoint)."""
    output = tmp_path_factory.mktemp("lora-run") / "run"
    result = train(parse_train_args(train_args(sd15_model, sd15_cached, output, *LORA, "--ema_decay", "0.5",
                                               "--save_kohya_lora", "--sample_prompt", "a red circle",
                                               "--sampler_steps", "2", "--guidance_scale", "1")))
    assert result.exit_status == 0 and result.final_saved
    return output


def _base_pipeline(model: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)


def _draw(pipeline) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a red circle", num_inference_steps=3, guidance_scale=1.0, height=64, width=64,
                     generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    return image


def _sampled(checkpoint: Path, out: Path) -> np.ndarray:
    """sample_images.py's picture of the prompt the run sampled, with the run's seed, size and sampler steps."""
    from cachetrain.sample.sampler_cli import main as sample_main

    assert sample_main([str(checkpoint), "--out", str(out), "--prompt", "a red circle", "--steps", "2",
                        "--guidance", "1", "--device", "cpu"]) == 0
    return np.asarray(Image.open(next(out.glob("*.png"))), dtype=np.int16)


def test_an_adapter_run_trains_only_the_adapter_and_keeps_the_base_unet(lora_run, sd15_model, capsys):
    checkpoint = lora_run / "checkpoint-00003"
    base = load_file(sd15_model / "unet" / "diffusion_pytorch_model.safetensors")
    saved = load_file(checkpoint / "unet" / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == base.keys() and all(torch.equal(saved[k], base[k]) for k in base)  # frozen, plain names
    lora = load_file(checkpoint / DIFFUSERS_LORA_FILE)
    # every up matrix started at zero and every one must have trained but two: at 8x8 latents the mid block
    # sees one token, its self-attention's softmax is 1 whatever q and k are, so their adapters' gradient is 0
    # (or, on some CPUs' attention kernels, a rounding error that AdamW scales up to a full step)
    single_token = ("mid_block.attentions.0.transformer_blocks.0.attn1.to_q.",
                    "mid_block.attentions.0.transformer_blocks.0.attn1.to_k.")
    ups = {key: value for key, value in lora.items() if key.endswith("lora_B.weight")}
    untrained = {key for key, value in ups.items() if not value.abs().sum() > 0}
    assert untrained <= {key for key in ups if any(part in key for part in single_token)}, sorted(untrained)
    trained = set(ups) - untrained
    assert len(trained) > 20
    assert any(key.endswith("resnets.0.conv1.lora_A.weight") for key in lora)  # --lora_targets conv: LoCon
    assert (checkpoint / "adapter_ema" / DIFFUSERS_LORA_FILE).is_file() and not (checkpoint / "unet_ema").exists()
    # the final model: the base pipeline folder with the adapter beside it, as in the checkpoint
    assert (lora_run / DIFFUSERS_LORA_FILE).is_file() and (lora_run / KOHYA_LORA_FILE).is_file()
    summary = json.loads((lora_run / "train_summary.json").read_text())
    assert summary["final_model_saved"] and summary["steps"] == 3


def test_the_start_line_counts_the_adapter_as_what_trains(sd15_model, sd15_cached, tmp_path, capsys):
    assert main(train_args(sd15_model, sd15_cached, tmp_path / "run", *LORA, "--max_steps", "1")) == 0
    line = next(line for line in capsys.readouterr().err.splitlines() if "trainable parameters" in line)
    pairs = read_lora(tmp_path / "run", adaptable_layers(_base_pipeline(sd15_model).unet))
    count = sum(pair.down.numel() + pair.up.numel() for pair in pairs.values())
    assert f"trainable parameters: {count:,} of " in line and "lora rank 4 alpha 2" in line
    assert f"on {len(pairs)} layers" in line


@pytest.mark.parametrize("layout", ["diffusers folder", "kohya file"])
def test_diffusers_load_lora_weights_draws_what_our_merge_draws(lora_run, sd15_model, layout):
    checkpoint = lora_run / "checkpoint-00003"
    source = checkpoint if layout == "diffusers folder" else checkpoint / KOHYA_LORA_FILE
    if layout == "kohya file":
        with safe_open(str(source), framework="pt") as handle:
            metadata = handle.metadata()
            assert next(iter(handle.keys())).startswith("lora_unet_")
        assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
        assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora" and metadata["ss_steps"] == "3"
    theirs = _base_pipeline(sd15_model)
    theirs.load_lora_weights(source)  # diffusers' own loader (it converts the kohya layout itself)
    theirs.fuse_lora()
    ours = _base_pipeline(sd15_model)
    pairs = read_lora(source, adaptable_layers(ours.unet))
    assert len(pairs) == len(read_lora(checkpoint, adaptable_layers(ours.unet)))
    merge_changes(ours.unet, pair_changes(pairs))
    their_layers, our_layers = adaptable_layers(theirs.unet), adaptable_layers(ours.unet)
    for name in pairs:
        assert torch.allclose(their_layers[name].weight, our_layers[name].weight, atol=1e-6, rtol=0), name
    base_image = _draw(_base_pipeline(sd15_model))
    their_image, our_image = _draw(theirs), _draw(ours)
    assert np.abs(their_image - our_image).max() < 1e-4
    assert np.abs(our_image - base_image).max() > 1e-3  # the adapter changes the picture


def test_a_single_file_export_of_an_adapter_checkpoint_is_refused_naming_the_merge(lora_run, tmp_path, capsys):
    """Its unet/ is the frozen base: the file would hold none of what the run trained."""
    from cachetrain.export import main as export_main

    checkpoint = lora_run / "checkpoint-00003"
    capsys.readouterr()
    assert export_main([str(checkpoint), str(tmp_path / "model.safetensors")]) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert line.startswith(f"error: {checkpoint}: an adapter run's model") and "cachetrain-lora merge" in line
    assert not (tmp_path / "model.safetensors").exists()


def test_sample_images_on_an_adapter_checkpoint_draws_the_runs_own_sample(lora_run, tmp_path):
    checkpoint = lora_run / "checkpoint-00003"
    drawn = _sampled(checkpoint, tmp_path / "drawn")
    trained = np.asarray(Image.open(next(checkpoint.glob("sample-*.png"))), dtype=np.int16)
    assert np.abs(drawn - trained).max() <= 1  # the EMA adapter, merged, draws what the run drew unmerged


@pytest.mark.slow
def test_an_adapter_run_stopped_and_resumed_ends_with_the_same_adapter(sd15_model, sd15_cached, tmp_path):
    common = (*LORA, "--max_steps", "5", "--ema_decay", "0.9", "--lora_dropout", "0.1", "--scheduler", "cosine",
              "--save_kohya_lora")
    straight = train(parse_train_args(train_args(sd15_model, sd15_cached, tmp_path / "straight", *common)))
    stopped = train(parse_train_args(train_args(sd15_model, sd15_cached, tmp_path / "resumed", *common)),
                    interrupt_after_batches=2)
    assert stopped.interrupted and stopped.steps == 2
    resumed = train(parse_train_args(train_args(sd15_model, sd15_cached, tmp_path / "resumed", *common, "--resume")))
    assert straight.steps == resumed.steps == 5
    for name in (DIFFUSERS_LORA_FILE, f"adapter_ema/{DIFFUSERS_LORA_FILE}", KOHYA_LORA_FILE):
        a = load_file(tmp_path / "straight" / "checkpoint-00005" / name)
        b = load_file(tmp_path / "resumed" / "checkpoint-00005" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name


def test_a_resume_with_other_adapter_settings_names_the_flags_that_resume_it_and_the_start_that_works(
        lora_run, sd15_model, sd15_cached, tmp_path, capsys):
    output = tmp_path / "run"
    shutil.copytree(lora_run, output)
    checkpoint = output / "checkpoint-00003"
    same_layers = ["--lora_type", "lora", "--lora_rank", "4", "--lora_targets", "attention", "conv"]
    # another rank; another alpha (the same weights would make another change); no adapter at all
    for other in (["--lora_type", "lora", "--lora_rank", "8"], [*same_layers, "--lora_alpha", "16"], []):
        capsys.readouterr()
        assert main(train_args(sd15_model, sd15_cached, output, *other, "--batch_size", "4", "--max_steps", "4",
                               "--resume", str(checkpoint))) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, errors
        assert ("It was saved by an adapter run (--lora_type lora --lora_rank 4 --lora_alpha 2 --lora_targets "
                f"attention conv): resume with those flags, or start a new adapter from its weights with "
                f"--lora_weights {checkpoint}") in errors[0]
        assert "--pretrained_model" not in errors[0]  # its unet/ is the base: that start would drop the adapter
        if "--lora_alpha" in other:
            assert "adapter_alpha was 2.0, now 16.0; this run's adapter is not the one it saved" in errors[0]
    # the start it names works, from the adapter's own rank
    assert main(train_args(sd15_model, sd15_cached, tmp_path / "new", "--lora_type", "lora", "--lora_weights",
                           str(checkpoint), "--batch_size", "4", "--max_steps", "1")) == 0


def test_a_run_starts_from_an_existing_lora_with_its_rank_and_alpha(lora_run, sd15_model, sd15_cached, tmp_path):
    start = lora_run / "checkpoint-00003" / KOHYA_LORA_FILE
    output = tmp_path / "run"
    result = train(parse_train_args(train_args(sd15_model, sd15_cached, output, "--lora_type", "lora",
                                               "--lora_weights", str(start), "--learning_rate", "1e-12",
                                               "--max_steps", "1", "--batch_size", "4")))
    assert result.exit_status == 0
    layers = adaptable_layers(_base_pipeline(sd15_model).unet)
    before, after = read_lora(start, layers), read_lora(output, layers)
    assert before.keys() == after.keys()
    for name, pair in before.items():  # a step of lr 1e-12 leaves the started weights as they were
        assert after[name].alpha == pair.alpha == 2.0
        assert torch.allclose(after[name].delta(), pair.delta(), atol=1e-6), name


@pytest.mark.slow
@pytest.mark.parametrize("kind,marker", [("loha", "hada_w1_a"), ("lokr", "lokr_w1")])
def test_loha_and_lokr_train_through_peft_and_save_peft_folders(sd15_model, sd15_cached, tmp_path, capsys, kind,
                                                                marker):
    from diffusers import UNet2DConditionModel
    from peft import PeftConfig
    from peft.utils import set_peft_model_state_dict

    output = tmp_path / "run"
    common = ("--lora_type", kind, "--lora_rank", "4", "--batch_size", "4", "--max_steps", "4", "--save_steps", "2",
              "--learning_rate", "2e-2",  # an adapter that shows in a picture after 4 steps
              "--sample_prompt", "a red circle", "--sampler_steps", "2", "--guidance_scale", "1")
    stopped = train(parse_train_args(train_args(sd15_model, sd15_cached, output, *common)), interrupt_after_batches=2)
    assert stopped.steps == 2
    result = train(parse_train_args(train_args(sd15_model, sd15_cached, output, *common, "--resume")))
    assert result.exit_status == 0 and result.steps == 4
    folder = output / "checkpoint-00004" / "unet_adapter"
    tensors = load_file(folder / "adapter_model.safetensors")
    assert any(marker in key for key in tensors)
    # PEFT reads its folder back onto the base UNet, and the adapter changes the UNet's output
    unet = UNet2DConditionModel.from_pretrained(output / "checkpoint-00004", subfolder="unet").eval()
    inputs = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500]),
              torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        plain = unet(*inputs).sample
        unet.add_adapter(PeftConfig.from_pretrained(folder))
        set_peft_model_state_dict(unet, tensors)
        adapted = unet(*inputs).sample
    assert (adapted - plain).abs().max() > 1e-2
    # merged into a model by `cachetrain-lora merge` (PEFT's own change of each layer), it changes the output
    # as the attached adapter does; sample_images.py on the checkpoint draws what the run's own sample showed
    checkpoint, merged = output / "checkpoint-00004", tmp_path / "merged"
    assert lora_command(["merge", "--model", str(checkpoint), "--lora", str(checkpoint), "--out", str(merged)]) == 0
    with torch.no_grad():
        ours = UNet2DConditionModel.from_pretrained(merged, subfolder="unet").eval()(*inputs).sample
    assert (ours - adapted).abs().max() < 0.01 * (adapted - plain).abs().max()
    assert not holds_adapter(merged)  # a plain model: it trains in full and exports
    drawn = _sampled(checkpoint, tmp_path / "drawn")
    trained = np.asarray(Image.open(next(checkpoint.glob("sample-*.png"))), dtype=np.int16)
    assert np.abs(drawn - trained).max() <= 1
    base_only = tmp_path / "base-only" / checkpoint.name  # the same checkpoint without its adapter draws otherwise
    shutil.copytree(checkpoint, base_only, ignore=shutil.ignore_patterns("unet_adapter"))
    assert np.abs(_sampled(base_only, tmp_path / "drawn-base") - trained).max() > 8
    if kind == "lokr":  # the start below reads a PEFT folder the same way for either kind
        return
    # a new run starts from the checkpoint's adapter (--lora_weights; its base in bf16, the adapter not rounded to
    # it): steps of lr 1e-12 leave it as it was, also over a stop and a --resume after the start folder is gone
    start, started = tmp_path / "start", tmp_path / "started"
    shutil.copytree(checkpoint, start)
    begin = ("--lora_type", kind, "--lora_weights", str(start), "--bf16_weights", "--learning_rate", "1e-12",
             "--max_steps", "2", "--save_steps", "1", "--batch_size", "4")
    assert train(parse_train_args(train_args(sd15_model, sd15_cached, started, *begin)),
                 interrupt_after_batches=1).steps == 1
    shutil.rmtree(start)
    assert main(train_args(sd15_model, sd15_cached, started, *begin, "--resume")) == 0
    again = load_file(started / "checkpoint-00002" / "unet_adapter" / "adapter_model.safetensors")
    assert again.keys() == tensors.keys() and all(torch.allclose(again[k], tensors[k], atol=1e-6) for k in tensors)
    other = "lokr" if kind == "loha" else "loha"
    capsys.readouterr()
    assert main(train_args(sd15_model, sd15_cached, tmp_path / "other", "--lora_type", other, "--lora_weights",
                           str(checkpoint), "--max_steps", "1")) == 2
    [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert f"a {kind} adapter; it starts a --lora_type {kind} run" in error
    assert not list((tmp_path / "other").glob("checkpoint-*"))


def _peft_adapted_unet(checkpoint: Path):
    """The checkpoint's base UNet with its PEFT LoHa/LoKr folder attached, as the trainer saved it."""
    from diffusers import UNet2DConditionModel
    from peft import PeftConfig
    from peft.utils import set_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(checkpoint, subfolder="unet").eval()
    folder = checkpoint / "unet_adapter"
    unet.add_adapter(PeftConfig.from_pretrained(folder))
    set_peft_model_state_dict(unet, load_file(folder / "adapter_model.safetensors"))
    return unet


@pytest.mark.parametrize("kind,rank,full_factors", [("loha", 4, None), ("lokr", 4, True), ("lokr", 2, False)])
def test_loha_and_lokr_kohya_files_apply_in_lycoris_as_peft_applies_them(sd15_model, sd15_cached, tmp_path,
                                                                        monkeypatch, capsys, kind, rank, full_factors):
    """LyCORIS' own loader reads the file (its lora_unet_ names) onto the base UNet and adds, layer by layer and
    in the UNet's output, what PEFT's layers add. LoKr at rank 4 has two full factors in the narrow layers (LyCORIS
    applies no alpha to those: PEFT's scale is baked in) and a low-rank second one (alpha / rank applies) in the
    wider ones; at rank 2 every second factor is low-rank."""
    from diffusers import UNet2DConditionModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from lycoris.wrapper import LycorisNetwork, create_lycoris_from_weights

    output = tmp_path / "run"
    result = train(parse_train_args(train_args(
        sd15_model, sd15_cached, output, "--lora_type", kind, "--lora_rank", str(rank), "--lora_alpha", "1",
        "--lora_targets", "attention", "conv", "--batch_size", "2", "--max_steps", "1", "--save_kohya_lora")))
    assert result.exit_status == 0
    checkpoint = output / "checkpoint-00001"
    kohya_file = checkpoint / KOHYA_LORA_FILE
    with safe_open(str(kohya_file), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"])["algo"] == kind
    if kind == "lokr":
        assert any(key.endswith(".lokr_w2_b") for key in keys)  # a low-rank second factor
        assert any(key.endswith(".lokr_w2") for key in keys) == full_factors
    peft_unet = _peft_adapted_unet(checkpoint)
    peft_changes = {name: module.get_delta_weight("default").detach()
                    for name, module in peft_unet.named_modules() if isinstance(module, BaseTunerLayer)}

    unet = UNet2DConditionModel.from_pretrained(checkpoint, subfolder="unet").eval()
    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", "lora_unet")  # the UIs' prefix of UNet layers
    network, _ = create_lycoris_from_weights(1.0, str(kohya_file), unet)
    assert len(network.loras) == len(peft_changes)  # every layer of the file found its UNet layer
    largest = max(change.abs().max() for change in peft_changes.values())
    assert largest > 0  # the adapter trained
    for module in network.loras:  # the change LyCORIS' forward adds to the layer's weight
        change = peft_changes[next(name for name in peft_changes if "lora_unet_" + name.replace(".", "_") == module.lora_name)]
        theirs = module.get_weight(change.shape).detach() * module.multiplier
        # to the rounding of an fp16 file (the mid block's self-attention sees one token: its to_q/to_k get
        # no gradient, their factors stay near fp16's smallest numbers)
        assert (theirs - change).abs().max() <= 2e-3 * change.abs().max() + 1e-3 * largest, module.lora_name
    # our reader of that layout (cachetrain-lora merge) finds the same change in every layer
    from cachetrain.models.lycoris_files import lycoris_changes

    read_back = lycoris_changes(kohya_file, adaptable_layers(unet))
    assert read_back.keys() == peft_changes.keys()
    for name, change in peft_changes.items():
        assert (read_back[name] - change).abs().max() <= 2e-3 * change.abs().max() + 1e-3 * largest, name
    # and it starts a run (--lora_weights): PEFT's layers attached from the file change each layer as the run's did
    from cachetrain.train.adapters import AdapterSpec, attach_adapter

    started = UNet2DConditionModel.from_pretrained(checkpoint, subfolder="unet")
    attach_adapter(started, AdapterSpec(kind=kind, rank=16, alpha=16, start_weights=str(kohya_file)), seed=0)
    started_changes = {name: module.get_delta_weight("default").detach()
                       for name, module in started.named_modules() if isinstance(module, BaseTunerLayer)}
    assert started_changes.keys() == peft_changes.keys()
    for name, change in peft_changes.items():
        assert (started_changes[name] - change).abs().max() <= 2e-3 * change.abs().max() + 1e-3 * largest, name
    if kind == "lokr" and full_factors:
        # through the trainer, with layers of two ranks (a PEFT config with a rank_pattern): a run from the file,
        # stopped and resumed from its PEFT folder, keeps it (lr 1e-12) into the LyCORIS file it writes again
        started_run = tmp_path / "started"
        begin = ("--lora_type", "lokr", "--lora_weights", str(kohya_file), "--learning_rate", "1e-12",
                 "--max_steps", "2", "--save_steps", "1", "--batch_size", "2", "--save_kohya_lora")
        assert train(parse_train_args(train_args(sd15_model, sd15_cached, started_run, *begin)),
                     interrupt_after_batches=1).steps == 1
        assert main(train_args(sd15_model, sd15_cached, started_run, *begin, "--resume")) == 0
        written_again = lycoris_changes(started_run / "checkpoint-00002" / KOHYA_LORA_FILE, adaptable_layers(unet))
        assert written_again.keys() == peft_changes.keys()
        for name, change in peft_changes.items():
            assert (written_again[name] - change).abs().max() <= 4e-3 * change.abs().max() + 2e-3 * largest, name
        # given to a run of the other kind: one line naming the file's kind, status 2, before step 1
        capsys.readouterr()
        assert main(train_args(sd15_model, sd15_cached, tmp_path / "other", "--lora_type", "loha", "--lora_weights",
                               str(kohya_file), "--max_steps", "1")) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert errors == [f"error: --lora_weights {kohya_file}: a lokr adapter; it starts a --lora_type lokr run"]
        assert not list((tmp_path / "other").glob("checkpoint-*"))
    inputs = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500]),
              torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        plain = unet(*inputs).sample
        network.apply_to()
        theirs, ours = unet(*inputs).sample, peft_unet(*inputs).sample
    assert (ours - plain).abs().max() > 1e-5  # the adapter changes the output ...
    assert (theirs - ours).abs().max() < 0.05 * (ours - plain).abs().max()  # ... and LyCORIS' by the same


def _foreign_lora(tmp_path: Path) -> Path:
    """A LoRA made for the 2-level tiny UNet (other widths): an adapter of another base."""
    from diffusers import UNet2DConditionModel

    from cachetrain.tiny.models import TINY_UNET
    from cachetrain.train.adapters import AdapterSpec, attach_adapter, write_adapter

    unet = UNet2DConditionModel(**{**TINY_UNET, "block_out_channels": (48, 64)})
    spec = AdapterSpec(kind="lora", rank=4, alpha=4)
    attach_adapter(unet, spec, seed=0)
    write_adapter(unet, spec, tmp_path / "foreign")
    return tmp_path / "foreign"


def _kohya_with_unknown_key(lora_run: Path, tmp_path: Path) -> Path:
    tensors = load_file(lora_run / KOHYA_LORA_FILE)
    tensors["lora_unet_middle_block_9_proj_in.lora_down.weight"] = torch.zeros(4, 4)
    save_file(tensors, tmp_path / "odd.safetensors")
    return tmp_path / "odd.safetensors"


@pytest.mark.parametrize("fault,message", [
    ("rank", "--lora_rank 40 is larger than"),
    ("module", "--lora_modules attn9.to_q: matches no Linear or Conv2d layer"),
    ("other base", "(an adapter of another base model)"),
    ("kohya keys", "key(s) this UNet has no place for, e.g. lora_unet_middle_block_9_proj_in.lora_down.weight"),
])
def test_adapter_faults_are_refused_in_one_line_before_step_1(lora_run, sd15_model, sd15_cached, tmp_path, capsys,
                                                              fault, message):
    extra = {"rank": ["--lora_rank", "40"],
             "module": ["--lora_modules", "attn9.to_q"],
             "other base": ["--lora_weights", str(_foreign_lora(tmp_path)) if fault == "other base" else ""],
             "kohya keys": ["--lora_weights", str(_kohya_with_unknown_key(lora_run, tmp_path)) if fault == "kohya keys"
                            else ""]}[fault]
    output = tmp_path / "run"
    capsys.readouterr()
    status = main(train_args(sd15_model, sd15_cached, output, "--lora_type", "lora", "--max_steps", "2", *extra))
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert status == 2 and len(errors) == 1 and message in errors[0], err
    assert not list(output.glob("checkpoint-*")) and not (output / "tensorboard").exists()


def test_a_full_run_from_an_adapter_runs_model_is_refused_naming_the_merge(lora_run, sd15_cached, tmp_path, capsys):
    """Its unet/ is the untrained base: a full run from it would drop what the adapter learned, unsaid."""
    capsys.readouterr()
    assert main(train_args(lora_run, sd15_cached, tmp_path / "run", "--max_steps", "1", "--batch_size", "4")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"--pretrained_model {lora_run}: an adapter run's model" in errors[0]
    assert f"cachetrain-lora merge --model {lora_run} --lora {lora_run}" in errors[0]
    assert not list((tmp_path / "run").glob("checkpoint-*"))
    # a new adapter on its base trains, with a note that the model's own adapter is not its start
    assert main(train_args(lora_run, sd15_cached, tmp_path / "new", "--max_steps", "1", "--batch_size", "4",
                           "--lora_type", "lora", "--lora_rank", "2")) == 0
    assert f"[train] note: {lora_run} holds a trained adapter this run does not start from" in capsys.readouterr().err


def test_adapter_flags_without_an_adapter_are_refused():
    from cachetrain.train.config import ConfigError

    with pytest.raises(ConfigError, match="--save_kohya_lora needs --lora_type lora, loha or lokr"):
        parse_train_args(["--pretrained_model", "m", "--train_data_dir", "d", "--save_kohya_lora"])
    # an adapter's settings without an adapter would train the whole UNet, the settings dropped unsaid
    for flags in (["--lora_rank", "4"], ["--lora_alpha", "8"], ["--lora_dropout", "0.1"], ["--lora_targets", "conv"],
                  ["--lora_modules", "attn2.to_k"], ["--lora_weights", "x.safetensors"]):
        name = flags[0]
        with pytest.raises(ConfigError, match=f"{name} needs --lora_type lora, loha or lokr"):
            parse_train_args(["--pretrained_model", "m", "--train_data_dir", "d", *flags])
    # the defaults, given again, change nothing: not refused
    parse_train_args(["--pretrained_model", "m", "--train_data_dir", "d", "--lora_rank", "16"])
    with pytest.raises(ConfigError, match="--save_single_file writes a whole model"):
        parse_train_args(["--pretrained_model", "m", "--train_data_dir", "d", "--lora_type", "lora",
                          "--save_single_file"])


@pytest.mark.slow
def test_a_t5_model_trains_saves_resumes_and_samples_with_a_lora(tiny_t5_model, t5_cached_template, tmp_path):
    from cachetrain import sidecar
    from cachetrain.sample.sampler_cli import main as sample_main

    def args(output: Path, *extra: str) -> list[str]:
        return train_args(tiny_t5_model, t5_cached_template, output, "--imgcache_suffix", sidecar.SDXL_VAE_SUFFIX,
                          "--txtcache_suffix", sidecar.T5_SUFFIX, "--lora_type", "lora", "--lora_rank", "4",
                          "--lora_targets", "attention", "feedforward", "--batch_size", "8", "--max_steps", "4",
                          "--save_steps", "2", "--sample_prompt", "a red circle", "--sampler_steps", "2", *extra)

    straight = train(parse_train_args(args(tmp_path / "straight")))
    stopped = train(parse_train_args(args(tmp_path / "resumed")), interrupt_after_batches=2)
    resumed = train(parse_train_args(args(tmp_path / "resumed", "--resume")))
    assert stopped.steps == 2 and straight.exit_status == resumed.exit_status == 0
    a = load_file(tmp_path / "straight" / "checkpoint-00004" / DIFFUSERS_LORA_FILE)
    b = load_file(tmp_path / "resumed" / "checkpoint-00004" / DIFFUSERS_LORA_FILE)
    assert any("attn2.to_k" in key for key in a) and all(torch.equal(a[key], b[key]) for key in a)
    checkpoint = tmp_path / "straight" / "checkpoint-00004"
    index = json.loads((checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionT5Pipeline"
    assert sample_main([str(checkpoint), "--out", str(tmp_path / "drawn"), "--prompt", "a red circle", "--steps", "2",
                        "--device", "cpu"]) == 0
    drawn = np.asarray(Image.open(next((tmp_path / "drawn").glob("*.png"))), dtype=np.int16)
    trained = np.asarray(Image.open(next(checkpoint.glob("sample-*.png"))), dtype=np.int16)
    assert np.abs(drawn - trained).max() <= 1  # the T5 pipeline draws with the LoRA merged as the run drew


@pytest.mark.slow
def test_two_processes_train_one_lora_and_keep_it_identical(tiny_sd_model, cached_dataset, tmp_path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    output = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(repo / "train_from_cached.py"),
               *train_args(tiny_sd_model, cached_dataset, output, "--lora_type", "lora", "--lora_rank", "4",
                           "--batch_size", "4", "--max_steps", "4", "--log_every", "2")]
    done = subprocess.run(command, cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4
    first, second = summary["process_weight_checksums"]  # the adapter's weights are among them
    assert first == second
    assert summary["process_sample_id_sums"][0] != summary["process_sample_id_sums"][1]
    lora = load_file(output / DIFFUSERS_LORA_FILE)
    assert all(value.abs().sum() > 0 for key, value in lora.items() if key.endswith("lora_B.weight"))


def test_with_bf16_weights_the_base_stays_bf16_and_the_adapter_trains_in_fp32(tiny_sd_model, cached_dataset, tmp_path):
    output = tmp_path / "run"
    result = train(parse_train_args(train_args(tiny_sd_model, cached_dataset, output, "--lora_type", "loha",
                                               "--lora_rank", "4", "--bf16_weights", "--max_steps", "2",
                                               "--batch_size", "4")))
    assert result.exit_status == 0
    adapter = load_file(output / "unet_adapter" / "adapter_model.safetensors")
    assert {value.dtype for value in adapter.values()} == {torch.float32}
    base = load_file(output / "unet" / "diffusion_pytorch_model.safetensors")
    assert {value.dtype for value in base.values()} == {torch.bfloat16}


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_a_peft_adapter_folder_with_a_nan_is_refused_as_a_start_naming_the_tensor(sd15_model, tmp_path, kind):
    """A start of NaN trains on loss=nan from step 1 and saves it into every checkpoint."""
    from diffusers import UNet2DConditionModel
    from peft import LoHaConfig, LoKrConfig
    from peft.utils import get_peft_model_state_dict

    from cachetrain.train.adapters import AdapterError, AdapterSpec, attach_adapter

    unet = UNet2DConditionModel.from_pretrained(sd15_model, subfolder="unet")
    config = (LoHaConfig if kind == "loha" else LoKrConfig)(r=4, alpha=4, target_modules=["to_q", "to_v"])
    unet.add_adapter(config)
    state = get_peft_model_state_dict(unet)
    broken = sorted(state)[3]
    state[broken] = state[broken].clone()
    state[broken].view(-1)[0] = float("nan")
    folder = tmp_path / "unet_adapter"
    config.save_pretrained(folder)
    save_file(state, folder / "adapter_model.safetensors")
    fresh = UNet2DConditionModel.from_pretrained(sd15_model, subfolder="unet")
    with pytest.raises(AdapterError, match=rf"^--lora_weights {folder}: {broken} holds NaN or infinite values$"):
        attach_adapter(fresh, AdapterSpec(kind=kind, rank=4, alpha=4, start_weights=str(folder)), seed=0)
