"""Image sizes other than a square: one fixed WxH (--target_width/--target_height) and aspect-ratio buckets
(--buckets, --aspect_buckets). Each image is scaled to cover its size and center-cropped to exactly it; the
sizes are in the sidecar metadata, so changing them makes the sidecars stale."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import create_img_sdvae
from cachetrain.view import inspect as cache_inspect
from cachetrain import sidecar
from cachetrain.cache.image_cache import main as image_main
from cachetrain.cache.images import Sizing, load_image, standard_buckets

from tests.conftest import REPO_ROOT
from .test_cache_builders import IMAGES_IN_DATASET, summary_counts

TINY_VAE_FACTOR = 4  # the tiny VAE has three blocks: 2 x 2


def run_images(capsys, model, root, *extra) -> tuple[int, dict[str, int], str]:
    capsys.readouterr()
    status = image_main(["--model", str(model), "--data_root", str(root), "--num_workers", "0", "--no_progress",
                         "--save_dtype", "float32", *extra], create_img_sdvae.DEFAULTS)
    err = capsys.readouterr().err
    return status, summary_counts(err) if status != 2 else {}, err


def striped(width: int, height: int) -> Image.Image:
    """Red left third, green middle third, blue right third."""
    image = Image.new("RGB", (width, height), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, width // 3, height))
    image.paste((0, 0, 255), (width - width // 3, 0, width, height))
    return image


def test_an_image_is_scaled_to_cover_the_target_and_center_cropped_to_exactly_it():
    prepared = load_image(_png(striped(300, 100)), Sizing([(64, 96)]))
    assert tuple(prepared.pixels.shape) == (3, 96, 64)
    # scaled to 288x96 (the height covers), then the middle 64 columns kept: all of them from the green third
    assert (prepared.pixels[1] > 200).all() and (prepared.pixels[0] < 50).all() and (prepared.pixels[2] < 50).all()
    assert prepared.notes == ()  # 300x100 covers 64x96 after scaling down: no upscaling
    assert "upscaled" in load_image(_png(striped(30, 30)), Sizing([(64, 96)])).notes


def _png(image: Image.Image):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    buffer.seek(0)
    return buffer


def test_target_width_and_height_give_exact_latents_recorded_in_the_metadata(capsys, tiny_sd_model, shapes_dataset):
    status, counts, _ = run_images(capsys, tiny_sd_model, shapes_dataset, "--target_width", "64",
                                   "--target_height", "96")
    assert status == 0 and counts["written"] == IMAGES_IN_DATASET
    first = shapes_dataset / "part0" / "img00000.img_sdvae"
    assert tuple(sidecar.read_sidecar(first, "latent").shape) == (4, 96 // TINY_VAE_FACTOR, 64 // TINY_VAE_FACTOR)
    assert sidecar.read_metadata(first)["resolution"] == "64x96"
    status, counts, _ = run_images(capsys, tiny_sd_model, shapes_dataset, "--target_width", "64",
                                   "--target_height", "96")
    assert counts["fresh"] == IMAGES_IN_DATASET
    status, counts, _ = run_images(capsys, tiny_sd_model, shapes_dataset, "--target_width", "96",
                                   "--target_height", "64")
    assert counts["stale"] == IMAGES_IN_DATASET
    assert tuple(sidecar.read_sidecar(first, "latent").shape) == (4, 16, 24)
    # a square of the same side says what square sidecars have always said, so old caches stay fresh
    run_images(capsys, tiny_sd_model, shapes_dataset, "--target_width", "64", "--target_height", "64")
    assert sidecar.read_metadata(first)["resolution"] == "64"
    assert run_images(capsys, tiny_sd_model, shapes_dataset, "--resolution", "64")[1]["fresh"] == IMAGES_IN_DATASET


def test_sizes_that_are_not_multiples_of_the_vae_factor_are_refused_in_one_line_by_the_script(tiny_sd_model,
                                                                                              shapes_dataset):
    done = subprocess.run([sys.executable, str(REPO_ROOT / "create_img_sdvae.py"), "--model", str(tiny_sd_model),
                           "--data_root", str(shapes_dataset), "--target_width", "66", "--target_height", "96"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2
    assert done.stderr == ("error: target size 66x96 (--resolution, --target_width/--target_height or --buckets): "
                           "both sides must be multiples of 4, this VAE's downscale factor\n")
    assert not list(shapes_dataset.rglob("*.img_sdvae"))


@pytest.mark.parametrize("flags, message", [
    (["--target_width", "64"], "error: --target_width and --target_height go together: give both\n"),
    (["--target_width", "64", "--target_height", "64", "--aspect_buckets"],
     "error: --target_width/--target_height and --aspect_buckets: choose one way to size the images\n"),
    (["--buckets", "64x64", "64by32"], "error: --buckets '64by32' is not WIDTHxHEIGHT such as 448x576\n"),
])
def test_contradictory_or_malformed_size_flags_are_one_line_and_exit_2(capsys, tiny_sd_model, shapes_dataset,
                                                                       flags, message):
    status, _, err = run_images(capsys, tiny_sd_model, shapes_dataset, *flags)
    assert status == 2 and err == message


def test_the_standard_buckets_keep_area_and_sides_and_the_nearest_aspect_wins():
    assert standard_buckets(512) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    for width, height in standard_buckets(1024):
        assert width % 64 == 0 and height % 64 == 0 and width * height <= 1024 * 1024
        assert max(width, height) / min(width, height) <= 2
    buckets = Sizing([(512, 512), (448, 576), (576, 448)])
    assert buckets.size_for(1000, 1000) == (512, 512)
    assert buckets.size_for(600, 800) == (448, 576) and buckets.size_for(800, 600) == (576, 448)
    assert buckets.size_for(100, 1000) == (448, 576)  # far out: still the nearest
    # log-ratio distance: 2:1 and 1:2 are equally far from a square, and on a tie the bucket listed first wins
    tied = Sizing([(64, 32), (32, 64)])
    assert tied.size_for(50, 50) == (64, 32)
    assert Sizing([(32, 64), (64, 32)]).size_for(50, 50) == (32, 64)


def test_each_image_goes_to_its_nearest_bucket_recorded_in_the_metadata_and_inspect_finds_no_odd_shapes(
        capsys, tiny_sd_model, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    sizes = {"wide": (120, 60), "tall": (60, 120), "square": (70, 70), "nearly_wide": (90, 70)}
    for name, size in sizes.items():
        striped(*size).save(root / f"{name}.png")
    buckets = ["64x64", "64x32", "32x64"]
    status, counts, _ = run_images(capsys, tiny_sd_model, root, "--buckets", *buckets)
    assert status == 0 and counts["written"] == len(sizes)
    expected = {"wide": (64, 32), "tall": (32, 64), "square": (64, 64), "nearly_wide": (64, 64)}
    for name, (width, height) in expected.items():
        path = root / f"{name}.img_sdvae"
        latent = sidecar.read_sidecar(path, "latent")
        assert tuple(latent.shape) == (4, height // TINY_VAE_FACTOR, width // TINY_VAE_FACTOR), name
        metadata = sidecar.read_metadata(path)
        assert metadata["size"] == f"{width}x{height}" and metadata["resolution"] == "64x64,64x32,32x64"
    assert cache_inspect.main([str(root), "--no_progress", "--suffix", ".img_sdvae"]) == 0
    # another bucket list makes every sidecar stale
    status, counts, _ = run_images(capsys, tiny_sd_model, root, "--buckets", "64x64", "64x32")
    assert counts["stale"] == len(sizes)
    assert tuple(sidecar.read_sidecar(root / "tall.img_sdvae", "latent").shape) == (4, 16, 16)


def test_aspect_buckets_use_the_standard_list_at_the_resolution(capsys, tiny_sd_model, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    striped(600, 300).save(root / "wide.png")
    status, counts, _ = run_images(capsys, tiny_sd_model, root, "--aspect_buckets", "--resolution", "256")
    assert status == 0 and counts["written"] == 1
    assert standard_buckets(256) == [(192, 320), (256, 256), (320, 192)]  # the three at 256
    latent = sidecar.read_sidecar(root / "wide.img_sdvae", "latent")
    assert tuple(latent.shape) == (4, 192 // TINY_VAE_FACTOR, 320 // TINY_VAE_FACTOR)
    assert torch.isfinite(latent).all()


def test_with_buckets_each_vae_batch_holds_one_shape_and_is_full(capsys, tiny_sd_model, tmp_path, monkeypatch):
    from cachetrain.cache.image_cache import ImageLatentBuilder

    root = tmp_path / "data"
    root.mkdir()
    for i in range(12):  # wide, tall and square images interleaved in walk order
        striped(*[(120, 60), (60, 120), (70, 70)][i % 3]).save(root / f"img{i:02d}.png")
    shapes = []
    real_latents_of = ImageLatentBuilder.latents_of
    monkeypatch.setattr(ImageLatentBuilder, "latents_of",
                        lambda self, pixels: shapes.append(tuple(pixels.shape)) or real_latents_of(self, pixels))
    status, counts, _ = run_images(capsys, tiny_sd_model, root, "--buckets", "64x64", "64x32", "32x64",
                                   "--batch_size", "4")
    assert status == 0 and counts["written"] == 12
    assert sorted(shapes) == sorted([(4, 3, 64, 64), (4, 3, 32, 64), (4, 3, 64, 32)])
