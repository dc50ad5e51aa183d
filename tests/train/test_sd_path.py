"""The SD1.5 path end to end on the tiny model: cache scripts, then a short training run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cachetrain import sidecar
from cachetrain.cache.image_cache import main as image_main
from cachetrain.sidecar import empty_prompt_path
from cachetrain.cache.text_cache import main_clip
from create_img_sdvae import DEFAULTS as SDVAE_DEFAULTS
from tests.conftest import CACHED_RESOLUTION
from tests.training_support import fixed_batch_loss


def _cache_args(model: Path, root: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--data_root", str(root), "--num_workers", "0", "--no_progress",
            "--save_dtype", "float32", *extra]


def _sidecars(root: Path, suffix: str) -> list[Path]:
    return sorted(p for p in root.rglob(f"*{suffix}") if not p.name.startswith("."))


def test_cache_scripts_write_one_valid_sidecar_per_image_and_caption(tiny_sd_model, shapes_dataset):
    images = sorted(shapes_dataset.rglob("*.jpg"))
    assert image_main(_cache_args(tiny_sd_model, shapes_dataset, "--resolution", "64"), SDVAE_DEFAULTS) == 0
    assert main_clip(_cache_args(tiny_sd_model, shapes_dataset)) == 0

    latents = _sidecars(shapes_dataset, ".img_sdvae")
    texts = _sidecars(shapes_dataset, ".txt_clipl")
    assert [p.stem for p in latents] == [p.stem for p in images]
    assert [p.stem for p in texts] == [p.stem for p in images]
    for path in latents:
        assert sidecar.read_sidecar(path, "latent", ndim=3).shape == (4, 16, 16)  # 64 px / VAE factor 4
        assert sidecar.read_metadata(path)["kind"] == "image_latent"
    for path in texts:
        assert sidecar.read_sidecar(path, "emb", ndim=2).shape == (77, 32)
    assert Path(empty_prompt_path(str(shapes_dataset), ".txt_clipl")).exists()


def test_stored_latent_is_the_unscaled_posterior_mean_of_the_prepared_image(tiny_sd_model, shapes_dataset):
    from diffusers import AutoencoderKL
    from PIL import Image

    folder = shapes_dataset / "part0"
    assert image_main(_cache_args(tiny_sd_model, folder, "--resolution", "64"), SDVAE_DEFAULTS) == 0
    image = sorted(folder.glob("*.jpg"))[0]
    with Image.open(image) as opened:  # already 64x64 RGB: nothing to resize or crop
        pixels = torch.tensor(list(opened.convert("RGB").getdata()), dtype=torch.float32)
    pixels = pixels.view(64, 64, 3).permute(2, 0, 1) / 127.5 - 1.0
    vae = AutoencoderKL.from_pretrained(tiny_sd_model, subfolder="vae").eval()
    with torch.no_grad():
        expected = vae.encode(pixels[None]).latent_dist.mean[0]
    stored = sidecar.read_sidecar(sidecar.sidecar_path(image, ".img_sdvae"), "latent")
    torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-5)


def test_rerun_skips_fresh_sidecars_and_overwrite_rebuilds_them(tiny_sd_model, cached_dataset):
    latents = _sidecars(cached_dataset, ".img_sdvae")
    texts = _sidecars(cached_dataset, ".txt_clipl")
    before = {p: p.stat().st_mtime_ns for p in latents + texts}

    assert image_main(_cache_args(tiny_sd_model, cached_dataset, "--resolution", str(CACHED_RESOLUTION)),
                      SDVAE_DEFAULTS) == 0
    assert main_clip(_cache_args(tiny_sd_model, cached_dataset)) == 0
    assert {p: p.stat().st_mtime_ns for p in latents + texts} == before

    assert image_main(_cache_args(tiny_sd_model, cached_dataset, "--resolution", str(CACHED_RESOLUTION),
                                  "--overwrite"), SDVAE_DEFAULTS) == 0
    assert main_clip(_cache_args(tiny_sd_model, cached_dataset, "--overwrite")) == 0
    assert all(p.stat().st_mtime_ns != before[p] for p in latents + texts)


def test_a_changed_caption_makes_only_its_text_sidecar_stale(tiny_sd_model, cached_dataset):
    caption = sorted(cached_dataset.rglob("*.txt"))[3]
    caption.write_text("a green cross on a white background", encoding="utf-8")
    texts = _sidecars(cached_dataset, ".txt_clipl")
    before = {p: p.stat().st_mtime_ns for p in texts}
    assert main_clip(_cache_args(tiny_sd_model, cached_dataset)) == 0
    changed = [p for p in texts if p.stat().st_mtime_ns != before[p]]
    assert changed == [caption.with_suffix(".txt_clipl")]


def test_cached_caption_embedding_equals_the_pipelines_encode_prompt(tiny_sd_model, cached_dataset):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_model, safety_checker=None)
    for caption in sorted(cached_dataset.rglob("*.txt"))[:4]:
        text = caption.read_text(encoding="utf-8").strip()
        prompt_embeds, _ = pipeline.encode_prompt(text, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        cached = sidecar.read_sidecar(caption.with_suffix(".txt_clipl"), "emb")
        torch.testing.assert_close(cached, prompt_embeds[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Training


def _read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def short_run(tiny_sd_model, _cached_template, tmp_path_factory):
    """60 optimizer steps on the cached synthetic data; read-only for the tests that use it."""
    from cachetrain.train.trainer import main

    output = tmp_path_factory.mktemp("short-run") / "run"
    code = main(["--pretrained_model", str(tiny_sd_model), "--train_data_dir", str(_cached_template),
                 "--output_dir", str(output), "--batch_size", "8", "--max_steps", "60", "--save_steps", "30",
                 "--learning_rate", "1e-3", "--scheduler", "cosine", "--warmup_steps", "5", "--use_snr",
                 "--noise_gamma", "5", "--log_every", "10", "--num_workers", "0", "--no_progress",
                 "--sample_prompt", "a red circle on a blue background", "--sampler_steps", "4"])
    assert code == 0
    return output


def test_short_training_run_lowers_the_loss_on_a_fixed_batch(short_run, tiny_sd_model, _cached_template):
    before = fixed_batch_loss(tiny_sd_model, tiny_sd_model, _cached_template, ".img_sdvae", ".txt_clipl")
    after = fixed_batch_loss(short_run, tiny_sd_model, _cached_template, ".img_sdvae", ".txt_clipl")
    assert after < 0.7 * before, (before, after)


def test_training_logs_the_four_scalars_to_tensorboard(short_run):
    scalars = _read_scalars(short_run / "tensorboard")
    for tag in ("train/loss", "train/loss_raw", "train/learning_rate", "train/qk_grads_av"):
        assert [step for step, _ in scalars[tag]] == [10, 20, 30, 40, 50, 60], tag
    assert all(value > 0 for _, value in scalars["train/qk_grads_av"])
    # min-SNR weights are <= 1 for epsilon prediction, so the weighted loss never exceeds the raw one
    assert all(w <= r + 1e-6 for (_, w), (_, r) in zip(scalars["train/loss"], scalars["train/loss_raw"]))
    learning_rates = [value for _, value in scalars["train/learning_rate"]]
    assert learning_rates == sorted(learning_rates, reverse=True)  # cosine decay after warm-up


def test_checkpoints_are_pipeline_folders_that_load_and_draw(short_run):
    from diffusers import StableDiffusionPipeline

    checkpoints = sorted(p.name for p in short_run.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-00030", "checkpoint-00060"]
    for name in checkpoints:
        samples = list((short_run / name).glob("sample-*.png"))
        assert [p.name for p in samples] == ["sample-00-a-red-circle-on-a-blue-background.png"]
    pipeline = StableDiffusionPipeline.from_pretrained(short_run / "checkpoint-00060", safety_checker=None)
    image = pipeline("a red circle", num_inference_steps=3, height=64, width=64,
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    final = StableDiffusionPipeline.from_pretrained(short_run, safety_checker=None)
    for name, tensor in final.unet.state_dict().items():
        assert torch.equal(tensor, pipeline.unet.state_dict()[name]), name
