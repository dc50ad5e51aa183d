"""Single-file checkpoints (the original SD layout of A1111 / ComfyUI), proven against diffusers' own loaders.

The model is the tiny one with SD1.5's structure (cachetrain.tiny.SD15_STRUCTURE_UNET / _VAE): the
original layout's keys follow that structure. It is trained 2 steps (with EMA and --save_single_file),
then exported and read back with ``UNet2DConditionModel.from_single_file`` and friends.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from cachetrain import __version__
from cachetrain.models import export, ldm_layout, loading as models
from cachetrain.tiny.models import SD15_STRUCTURE_UNET, build_tiny_sd
from tests.conftest import cache_shapes
from tests.script_runs import run_script


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def sd15_model(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("sd15-structure") / "model", seed=3, sd15_structure=True)


@pytest.fixture(scope="module")
def sd15_cached(sd15_model, _shapes_template, tmp_path_factory) -> Path:
    return cache_shapes(sd15_model, _shapes_template, tmp_path_factory.mktemp("sd15-cached") / "data",
                        resolution=64)  # SD1.5's VAE structure downsamples 8x: 8x8 latents


TRAIN_FLAGS = ("--num_workers", "0", "--no_progress", "--learning_rate", "1e-3", "--batch_size", "4",
               "--log_every", "1", "--max_steps", "2")


@pytest.fixture(scope="module")
def trained_run(sd15_model, sd15_cached, tmp_path_factory) -> Path:
    """2 steps with EMA and --save_single_file, a checkpoint at each step."""
    output = tmp_path_factory.mktemp("sd15-run") / "run"
    result = run_script("train_from_cached.py", "--pretrained_model", str(sd15_model), "--train_data_dir",
                        str(sd15_cached), "--output_dir", str(output), "--save_steps", "1", "--ema_decay", "0.5",
                        "--save_single_file", *TRAIN_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def unet_state(folder: Path, subfolder: str = "unet") -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, subfolder=subfolder).state_dict()


def assert_same_weights(loaded: dict, original: dict, rounding: torch.dtype | None = None) -> None:
    assert set(loaded) == set(original)
    for key, tensor in original.items():
        expected = tensor if rounding is None else tensor.to(rounding)
        assert torch.equal(loaded[key].to(expected.dtype), expected), key


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def test_fp32_export_of_a_trained_checkpoint_loads_bit_identical_in_diffusers_single_file_loaders(trained_run, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    checkpoint = trained_run / "checkpoint-00002"
    out = tmp_path / "model-fp32.safetensors"
    assert export.main([str(checkpoint), str(out), "--dtype", "fp32"]) == 0
    unet = UNet2DConditionModel.from_single_file(str(out), config=str(checkpoint), subfolder="unet",
                                                 local_files_only=True, torch_dtype=torch.float32)
    assert_same_weights(unet.state_dict(), unet_state(checkpoint))
    vae = AutoencoderKL.from_single_file(str(out), config=str(checkpoint), subfolder="vae", local_files_only=True,
                                         torch_dtype=torch.float32)
    assert_same_weights(vae.state_dict(), AutoencoderKL.from_pretrained(checkpoint, subfolder="vae").state_dict())
    tensors, metadata = read_file(out)
    text_encoder = CLIPTextModel.from_pretrained(checkpoint, subfolder="text_encoder").state_dict()
    # the text encoder's keys as A1111 / ComfyUI read them: the prefix, then transformers' (4.x) key
    prefix = ldm_layout.TEXT_ENCODER_PREFIX + "text_model."
    assert prefix + "embeddings.token_embedding.weight" in tensors
    assert_same_weights({key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)},
                        {key.removeprefix("text_model."): value for key, value in text_encoder.items()})
    # nothing but the three parts' prefixes (an epsilon model carries no marker keys)
    assert {key.split(".")[0] for key in tensors} == {"model", "first_stage_model", "cond_stage_model"}
    assert metadata["modelspec.sai_model_spec"] == "1.0.0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"
    assert metadata["modelspec.prediction_type"] == "epsilon"
    # the size it trained at: 64 px images, 8x8 latents (the trainer records them in the UNet config)
    assert metadata["modelspec.resolution"] == "64x64"
    assert metadata["modelspec.title"] == "model-fp32"
    assert metadata["modelspec.date"].startswith("20")
    assert metadata["cachetrain.steps_trained"] == "2"
    assert metadata["cachetrain.version"] == __version__


def test_fp16_export_holds_the_weights_rounded_to_fp16_and_ema_exports_the_ema_weights(trained_run, tmp_path):
    from diffusers import UNet2DConditionModel

    checkpoint = trained_run / "checkpoint-00002"
    plain, ema = tmp_path / "plain.safetensors", tmp_path / "ema.safetensors"
    assert export.main([str(checkpoint), str(plain)]) == 0  # fp16 by default
    assert export.main([str(checkpoint), str(ema), "--ema", "--unet_only"]) == 0
    loaded = UNet2DConditionModel.from_single_file(str(plain), config=str(checkpoint), subfolder="unet",
                                                   local_files_only=True, torch_dtype=torch.float16)
    assert all(tensor.dtype == torch.float16 for tensor in loaded.state_dict().values())
    trained = unet_state(checkpoint)
    assert_same_weights(loaded.state_dict(), trained, rounding=torch.float16)
    ema_loaded = UNet2DConditionModel.from_single_file(str(ema), config=str(checkpoint), subfolder="unet",
                                                       local_files_only=True, torch_dtype=torch.float16)
    ema_weights = unet_state(checkpoint, "unet_ema")
    assert_same_weights(ema_loaded.state_dict(), ema_weights, rounding=torch.float16)
    assert any(not torch.equal(trained[key], ema_weights[key]) for key in trained)  # two different exports
    tensors, metadata = read_file(ema)
    assert all(key.startswith(ldm_layout.UNET_PREFIX) for key in tensors)
    assert metadata["cachetrain.parts"] == "unet_ema"


def test_a_seeded_sample_from_the_exported_file_matches_the_folder_s(trained_run, tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    checkpoint = trained_run / "checkpoint-00002"
    out = tmp_path / "model.safetensors"
    assert export.main([str(checkpoint), str(out), "--dtype", "fp32"]) == 0
    folder_pipeline = StableDiffusionPipeline.from_pretrained(checkpoint, safety_checker=None,
                                                              requires_safety_checker=False)
    # diffusers refuses a tiny CLIP text encoder from the file ("weights appear to be missing"): the
    # text encoder is passed in, built from the file's own keys as our loader reads them
    _, text_encoder = models.load_clip_text_encoder(str(out), single_file_config=str(checkpoint))
    assert isinstance(text_encoder, CLIPTextModel)
    file_pipeline = StableDiffusionPipeline.from_single_file(
        str(out), config=str(checkpoint), local_files_only=True, text_encoder=text_encoder,
        tokenizer=folder_pipeline.tokenizer, safety_checker=None, requires_safety_checker=False,
        torch_dtype=torch.float32)

    def sample(pipeline) -> np.ndarray:
        generator = torch.Generator().manual_seed(11)
        return pipeline("a red circle on a blue background", num_inference_steps=3, guidance_scale=2.0,
                        generator=generator, output_type="np", height=128, width=128).images[0]

    drawn = sample(folder_pipeline)
    assert drawn.std() > 0  # a picture, not a constant
    assert np.array_equal(sample(file_pipeline), drawn)


def test_save_single_file_writes_model_safetensors_into_each_checkpoint_and_beside_the_final_model(trained_run):
    for step in (1, 2):
        tensors, metadata = read_file(trained_run / f"checkpoint-{step:05d}" / export.SINGLE_FILE_NAME)
        assert metadata["cachetrain.steps_trained"] == str(step)
        assert metadata["cachetrain.parts"] == "unet_ema,vae,text_encoder"  # the EMA weights, as the samples
        assert tensors[ldm_layout.UNET_PREFIX + "input_blocks.0.0.weight"].dtype == torch.float16
    final, metadata = read_file(trained_run / export.SINGLE_FILE_NAME)
    assert metadata["cachetrain.steps_trained"] == "2"
    ema = unet_state(trained_run / "checkpoint-00002", "unet_ema")
    assert torch.equal(final[ldm_layout.UNET_PREFIX + "input_blocks.0.0.weight"], ema["conv_in.weight"].half())
    assert (trained_run / "model_index.json").is_file()  # the final model folder is there as before


def test_v_prediction_and_zero_terminal_snr_models_carry_comfyui_s_marker_keys(sd15_model, tmp_path):
    folder = tmp_path / "vpred"
    shutil.copytree(sd15_model, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    config_path.write_text(json.dumps(config))
    out = tmp_path / "vpred.safetensors"
    assert export.main([str(folder), str(out), "--unet_only"]) == 0
    tensors, metadata = read_file(out)
    assert tensors[ldm_layout.V_PREDICTION_MARKER].numel() == 0
    assert tensors[ldm_layout.ZERO_TERMINAL_SNR_MARKER].numel() == 0
    assert metadata["modelspec.prediction_type"] == "v"
    # read back: the markers set the training schedule whatever the config folder says (epsilon here)
    scheduler = models.load_training_scheduler(str(out), single_file_config=str(sd15_model))
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.rescale_betas_zero_snr is True


def test_a_flow_matching_model_is_refused_by_export_and_by_save_single_file(sd15_model, sd15_cached, tmp_path,
                                                                            capsys):
    """The single-file format has no flow marker: an export would be sampled as epsilon and draw noise."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = tmp_path / "flow"
    shutil.copytree(sd15_model, folder)
    shutil.rmtree(folder / "scheduler")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    out = tmp_path / "flow.safetensors"
    assert export.main([str(folder), str(out)]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "a flow-matching model (FlowMatchEulerDiscreteScheduler)" in line and not out.exists()
    result = run_script("train_from_cached.py", "--pretrained_model", str(folder), "--train_data_dir",
                        str(sd15_cached), "--output_dir", str(tmp_path / "run"), "--save_single_file", *TRAIN_FLAGS)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert line.startswith("error: --save_single_file: a flow-matching run")
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_a_unet_without_sd15_s_structure_is_refused_in_one_line_naming_what_exports(tiny_sd_model, tmp_path):
    out = tmp_path / "never.safetensors"
    result = run_script("-m", "cachetrain.export", str(tiny_sd_model), str(out))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert "this UNet has no single-file layout (down_block_types is" in line
    assert "what exports: SD1.5's UNet structure" in line
    assert not out.exists()


def test_save_single_file_on_a_model_that_cannot_export_is_refused_before_training(tiny_sd_model, cached_dataset,
                                                                                   tmp_path):
    result = run_script("train_from_cached.py", "--pretrained_model", str(tiny_sd_model), "--train_data_dir",
                        str(cached_dataset), "--output_dir", str(tmp_path / "run"), "--save_single_file", *TRAIN_FLAGS)
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert line.startswith("error: --save_single_file: the UNet of") and "no single-file layout" in line
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_a_t5_model_exports_its_unet_alone_and_says_so(tiny_t5_model, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    folder = tmp_path / "t5"
    shutil.copytree(tiny_t5_model, folder)
    shutil.rmtree(folder / "unet")
    unet_config = json.loads((Path(tiny_t5_model) / "unet" / "config.json").read_text())
    UNet2DConditionModel(**{**SD15_STRUCTURE_UNET, "cross_attention_dim": unet_config["cross_attention_dim"]}
                         ).save_pretrained(folder / "unet")
    out = tmp_path / "t5-unet.safetensors"
    assert export.main([str(folder), str(out), "--dtype", "fp32"]) == 0
    assert "the file holds the UNet alone" in capsys.readouterr().err
    tensors, metadata = read_file(out)
    assert all(key.startswith(ldm_layout.UNET_PREFIX) for key in tensors)
    assert metadata["cachetrain.parts"] == "unet"
    loaded = UNet2DConditionModel.from_single_file(str(out), config=str(folder), subfolder="unet",
                                                   local_files_only=True, torch_dtype=torch.float32)
    assert_same_weights(loaded.state_dict(), unet_state(folder))


def test_export_refuses_a_folder_that_is_no_pipeline_and_ema_without_ema_weights(sd15_model, tmp_path, capsys):
    assert export.main([str(tmp_path), str(tmp_path / "x.safetensors")]) == 2
    assert "not a diffusers pipeline folder (no model_index.json)" in capsys.readouterr().err
    assert export.main([str(sd15_model), str(tmp_path / "x.safetensors"), "--ema"]) == 2
    assert "--ema: no EMA weights" in capsys.readouterr().err
    assert export.main([str(sd15_model), str(tmp_path / "x.ckpt")]) == 2
    assert "x.ckpt: the output must be a .safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    (tmp_path / "notes.txt").write_text("a file where a folder would go")
    assert export.main([str(sd15_model), str(tmp_path / "notes.txt" / "x.safetensors")]) == 2
    assert f"x.safetensors: {tmp_path / 'notes.txt'} is a file, not a folder" in capsys.readouterr().err


# -- import: a single file as the model to train on and to cache with ----------------------------

@pytest.fixture(scope="module")
def exported_file(sd15_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "sd15.safetensors"
    assert export.main([str(sd15_model), str(out), "--dtype", "fp32"]) == 0
    return out


def test_the_cache_scripts_take_a_single_file_model_and_write_the_same_sidecars(sd15_model, sd15_cached,
                                                                                 exported_file, _shapes_template,
                                                                                 tmp_path):
    from cachetrain.commands import create_clipl, create_img_sdvae

    root = tmp_path / "data"
    shutil.copytree(_shapes_template, root)
    common = ["--model", str(exported_file), "--single_file_config", str(sd15_model), "--data_root", str(root),
              "--num_workers", "0", "--no_progress", "--save_dtype", "float32"]
    assert create_img_sdvae(common + ["--resolution", "64"]) == 0
    assert create_clipl(common) == 0
    pairs = 0
    for sidecar in sorted(sd15_cached.rglob("*.img_sdvae")) + sorted(sd15_cached.rglob("*.txt_clipl")):
        mine = root / sidecar.relative_to(sd15_cached)
        theirs_tensors, _ = read_file(sidecar)
        mine_tensors, _ = read_file(mine)
        assert all(torch.equal(mine_tensors[key], theirs_tensors[key]) for key in theirs_tensors), sidecar
        pairs += 1
    assert pairs >= 96


def test_training_on_from_a_single_file_keeps_its_vae_and_text_encoder(sd15_model, sd15_cached, exported_file,
                                                                       tmp_path):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    output = tmp_path / "run"
    result = run_script("train_from_cached.py", "--pretrained_model", str(exported_file), "--single_file_config",
                        str(sd15_model), "--train_data_dir", str(sd15_cached), "--output_dir", str(output),
                        "--save_steps", "0", "--vae_scaling_factor", "0.5", *TRAIN_FLAGS[:-1], "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert AutoencoderKL.load_config(output, subfolder="vae")["scaling_factor"] == 0.5  # kept, as for a folder
    assert_same_weights(AutoencoderKL.from_pretrained(output, subfolder="vae").state_dict(),
                        AutoencoderKL.from_pretrained(sd15_model, subfolder="vae").state_dict())
    assert_same_weights(CLIPTextModel.from_pretrained(output, subfolder="text_encoder").state_dict(),
                        CLIPTextModel.from_pretrained(sd15_model, subfolder="text_encoder").state_dict())
    trained, start = unet_state(output), unet_state(sd15_model)
    assert any(not torch.equal(trained[key], start[key]) for key in start)  # it trained from the file's UNet


def test_a_missing_single_file_or_a_stray_single_file_config_is_refused_at_start(sd15_model, sd15_cached, tmp_path):
    missing = run_script("train_from_cached.py", "--pretrained_model", str(tmp_path / "gone.safetensors"),
                         "--train_data_dir", str(sd15_cached), "--output_dir", str(tmp_path / "run"))
    assert missing.returncode == 2
    assert "gone.safetensors: no such file" in missing.stderr and "Traceback" not in missing.stderr
    stray = run_script("train_from_cached.py", "--pretrained_model", str(sd15_model), "--single_file_config",
                       str(sd15_model), "--train_data_dir", str(sd15_cached), "--output_dir", str(tmp_path / "run"))
    assert stray.returncode == 2
    assert "--single_file_config applies to a single-file (.safetensors) --pretrained_model only" in stray.stderr


def test_the_t5_cache_script_refuses_a_single_file_model_in_one_line(tmp_path):
    result = run_script("create_t5cache_768.py", "--model", str(tmp_path / "t5.safetensors"), "--data_root",
                        str(tmp_path))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "a T5 pipeline has no single-file form" in line
