"""The original cache scripts' command lines: --vae (a bare VAE), --cpu, --writepreview, --previewonly, the
crop torchvision's center_crop makes, and the caption suffix the T5 script's --help states."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cachetrain import sidecar
from cachetrain.cache.images import load_image
from cachetrain.commands import create_img_sdvae, create_t5cache_768


def run(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    status = create_img_sdvae(["--num_workers", "0", "--no_progress", *map(str, argv)])
    return status, capsys.readouterr().err


def noise_image(path, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def tiny_vae(tiny_sd_model):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_sd_model, subfolder="vae").eval()


def torchvision_center_crop_offset(excess: int) -> int:
    """torchvision.transforms.functional.center_crop's offset, written out: int(round(excess / 2.0))."""
    return int(round(excess / 2.0))


@pytest.mark.parametrize("width, height", [(50, 37), (37, 50)])
def test_odd_excesses_are_cropped_at_torchvisions_center_crop_offset_rounding_half_to_even(
        capsys, tmp_path, tiny_sd_model, tiny_vae, width, height):
    # 50x37 covers 32x32 at 43x32: an excess of 11 columns, which torchvision crops at 6 (5.5 rounds to even)
    root = tmp_path / "data"
    root.mkdir()
    noise_image(root / "odd.png", width, height, seed=3)
    status, err = run(capsys, "--model", tiny_sd_model, "--data_root", root, "--target_width", 32,
                      "--target_height", 32, "--dtype", "float32", "--save_dtype", "float32")
    assert status == 0, err
    stored = sidecar.read_sidecar(root / "odd.img_sdvae", "latent")

    with Image.open(root / "odd.png") as image:
        scale = max(32 / width, 32 / height)
        resized = image.convert("RGB").resize((round(width * scale), round(height * scale)),
                                              Image.Resampling.BICUBIC, reducing_gap=3.0)
    excess = (resized.width - 32, resized.height - 32)
    assert sorted(excess) == [0, 11]

    def latent_of_crop(left: int, top: int) -> torch.Tensor:
        pixels = torch.from_numpy(np.asarray(resized.crop((left, top, left + 32, top + 32)), dtype=np.float32))
        with torch.no_grad():
            return tiny_vae.encode((pixels.permute(2, 0, 1) / 127.5 - 1)[None]).latent_dist.mean[0]

    expected = latent_of_crop(*(torchvision_center_crop_offset(e) for e in excess))
    floored = latent_of_crop(*(e // 2 for e in excess))
    assert torch.allclose(stored, expected, atol=1e-5)
    assert (stored - floored).abs().max() > 1e-3  # the floored offset (one column off) is told apart


def test_vae_takes_a_bare_vae_folder_and_gives_the_pipelines_latents(capsys, tmp_path, tiny_sd_model, shapes_dataset):
    bare = tmp_path / "sd-vae-ft-mse"
    shutil.copytree(tiny_sd_model / "vae", bare)
    status, err = run(capsys, "--model", bare, "--vae", "--data_root", shapes_dataset, "--resolution", 32,
                      "--save_dtype", "float32")
    assert status == 0, err
    by_bare = sidecar.read_sidecar(shapes_dataset / "part0" / "img00000.img_sdvae", "latent")
    status, err = run(capsys, "--model", tiny_sd_model, "--data_root", shapes_dataset, "--resolution", 32,
                      "--save_dtype", "float32", "--overwrite")
    assert status == 0, err
    assert torch.equal(by_bare, sidecar.read_sidecar(shapes_dataset / "part0" / "img00000.img_sdvae", "latent"))
    # a bare VAE is no custom pipeline: the two flags together are one line and exit 2
    status, err = run(capsys, "--model", bare, "--vae", "--custom", "--data_root", shapes_dataset)
    assert status == 2 and err.startswith("error: --vae and --custom") and "Traceback" not in err


def test_cpu_runs_on_the_cpu_and_refuses_a_contradicting_device(capsys, tiny_sd_model, shapes_dataset):
    status, err = run(capsys, "--model", tiny_sd_model, "--data_root", shapes_dataset, "--resolution", 32, "--cpu")
    assert status == 0, err
    assert sidecar.read_sidecar(shapes_dataset / "part0" / "img00000.img_sdvae", "latent").shape == (4, 8, 8)
    status, err = run(capsys, "--model", tiny_sd_model, "--data_root", shapes_dataset, "--cpu", "--device", "cuda")
    assert status == 2 and "--cpu and --device cuda" in err


def test_writepreview_writes_a_lossless_decoded_preview_and_previewonly_writes_previews_without_sidecars(
        capsys, tmp_path, tiny_sd_model, tiny_vae):
    root = tmp_path / "data"
    root.mkdir()
    for i in range(3):
        noise_image(root / f"img{i}.png", 40, 40, seed=i)
    cached_first = root / "cached"
    cached_first.mkdir()
    shutil.move(root / "img0.png", cached_first / "img0.png")
    status, err = run(capsys, "--model", tiny_sd_model, "--data_root", cached_first, "--resolution", 32,
                      "--writepreview")
    assert status == 0, err
    preview = cached_first / "img0.img_sdvae.webp"
    with Image.open(preview) as image:
        assert image.format == "WEBP" and image.size == (32, 32)
        written_with_the_cache = np.asarray(image.convert("RGB")).copy()
    latent = sidecar.read_sidecar(cached_first / "img0.img_sdvae", "latent").float()
    with torch.no_grad():
        decoded = tiny_vae.decode(latent[None]).sample[0].clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    assert np.array_equal(written_with_the_cache, decoded.permute(1, 2, 0).numpy())  # lossless: the exact pixels

    preview.unlink()
    status, err = run(capsys, "--model", tiny_sd_model, "--data_root", root, "--resolution", 32, "--previewonly")
    assert status == 0, err
    assert "previews written 3 (1 from existing latents, 2 from images without one" in err
    with Image.open(preview) as image:  # the stored latent, decoded: the same picture as before
        assert np.array_equal(np.asarray(image.convert("RGB")), written_with_the_cache)
    assert sorted(p.name for p in root.rglob("*.img_sdvae")) == ["img0.img_sdvae"]  # no sidecar written
    assert (root / "img1.img_sdvae.webp").exists() and (root / "img2.img_sdvae.webp").exists()
    status, err = run(capsys, "--model", tiny_sd_model, "--data_root", root, "--resolution", 32, "--previewonly")
    assert status == 0 and "already there 3" in err


def test_the_t5_scripts_help_states_its_caption_suffix_and_the_originals(capsys):
    with pytest.raises(SystemExit):
        create_t5cache_768(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default .txt" in text and ".txtqs" in text


def test_the_image_scripts_help_states_the_precision_and_what_float16_storage_costs(capsys):
    with pytest.raises(SystemExit):
        create_img_sdvae(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "float32 by default, as the original scripts" in text
    assert "84-87 dB PSNR" in text and "--vae" in text and "--previewonly" in text and "--writepreview" in text


def test_the_crop_offset_of_load_image_matches_torchvision_for_every_small_excess(tmp_path):
    for excess in range(0, 12):
        path = tmp_path / f"stripes{excess}.png"
        columns = np.arange(16 + excess, dtype=np.uint8)[None, :, None].repeat(16, 0).repeat(3, 2) * 10
        Image.fromarray(columns).save(path)
        pixels = load_image(path, 16).pixels
        assert int(pixels[0, 0, 0]) == torchvision_center_crop_offset(excess) * 10, excess
