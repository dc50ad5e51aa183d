"""The cache scripts' data features: caption variants in one text sidecar, mirrored latents (--flip) and
latent-resolution masks (--mask) beside the latent; what the inspector counts of them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from cachetrain.commands import create_clipl, create_img_sdvae
from cachetrain.sidecar import read_metadata, read_text_variants
from tests.conftest import CACHED_RESOLUTION

COMMON = ["--num_workers", "0", "--no_progress", "--save_dtype", "float32"]


def _cache_args(model: Path, root: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--data_root", str(root), *COMMON, *extra]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def _picture(path: Path, mode: str = "RGB") -> None:
    """A 64 px picture whose left and right halves differ, so its mirror image is another picture."""
    image = Image.new(mode, (64, 64), (20, 40, 200, 255)[: len(mode)])
    ImageDraw.Draw(image).rectangle((4, 10, 24, 40), fill=(230, 40, 40, 255)[: len(mode)])
    image.save(path)


def test_caption_variants_are_cached_as_extra_tensors_equal_to_each_line_cached_alone(tiny_sd_model, tmp_path):
    data, alone = tmp_path / "data", tmp_path / "alone"
    data.mkdir()
    alone.mkdir()
    lines = ["a red square", "a crimson box on blue", "red square, blue background"]
    _picture(data / "a.png")
    (data / "a.txt").write_text("\n".join(lines) + "\n\n")  # a blank line is no variant
    for number, line in enumerate(lines):
        _picture(alone / f"{number}.png")
        (alone / f"{number}.txt").write_text(line)
    assert create_clipl(_cache_args(tiny_sd_model, data, "--caption_variants")) == 0
    assert create_clipl(_cache_args(tiny_sd_model, alone)) == 0
    variants = read_text_variants(data / "a.txt_clipl")
    assert len(variants) == 3
    for number, variant in enumerate(variants):
        assert torch.equal(variant, _tensors(alone / f"{number}.txt_clipl")["emb"])
    assert read_metadata(data / "a.txt_clipl")["caption_variant_count"] == "3"
    # a sidecar cached without the flag is one caption, the whole text, and still reads as one variant
    assert len(read_text_variants(alone / "0.txt_clipl")) == 1
    # the flag is part of the settings: dropping it rebuilds the sidecar as one caption of the whole text
    assert create_clipl(_cache_args(tiny_sd_model, data)) == 0
    assert len(read_text_variants(data / "a.txt_clipl")) == 1


def test_t5_caption_variants_are_stored_trimmed_each_to_its_own_tokens(tiny_t5_model, tmp_path):
    from tests.t5_support import cache_t5_embeddings

    data = tmp_path / "data"
    data.mkdir()
    _picture(data / "a.png")
    (data / "a.txt").write_text("red\na red square on a blue ground\n")
    assert cache_t5_embeddings(tiny_t5_model, data, "--caption_variants") == 0
    short, long = read_text_variants(data / "a.txt_t5cache")
    assert short.shape[0] < long.shape[0]


def test_flip_stores_the_latent_of_the_mirrored_image_unless_the_caption_names_a_side(tiny_sd_model, tmp_path):
    data, mirrored = tmp_path / "data", tmp_path / "mirrored"
    data.mkdir()
    mirrored.mkdir()
    for name, caption in (("plain", "a red square"), ("sided", "a red square on the Left")):
        _picture(data / f"{name}.png")
        (data / f"{name}.txt").write_text(caption)
    Image.open(data / "plain.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored / "plain.png")
    assert create_img_sdvae(_cache_args(tiny_sd_model, data, "--resolution", "64", "--flip")) == 0
    assert create_img_sdvae(_cache_args(tiny_sd_model, mirrored, "--resolution", "64")) == 0
    plain = _tensors(data / "plain.img_sdvae")
    # the mirrored image encoded, which is not the latent mirrored (the VAE is no mirror-symmetric map)
    assert torch.allclose(plain["latent_flipped"], _tensors(mirrored / "plain.img_sdvae")["latent"], atol=1e-5)
    assert not torch.allclose(plain["latent_flipped"], plain["latent"].flip(-1), atol=1e-3)
    assert set(_tensors(data / "sided.img_sdvae")) == {"latent"}
    assert read_metadata(data / "sided.img_sdvae")["flip"] == "caption names a side"
    # a caption that stops naming a side makes the sidecar stale: the rerun stores the mirrored latent
    (data / "sided.txt").write_text("a red square")
    assert create_img_sdvae(_cache_args(tiny_sd_model, data, "--resolution", "64", "--flip")) == 0
    assert "latent_flipped" in _tensors(data / "sided.img_sdvae")
    # a run without --flip rebuilds the sidecar without the mirrored latent
    assert create_img_sdvae(_cache_args(tiny_sd_model, data, "--resolution", "64")) == 0
    assert set(_tensors(data / "sided.img_sdvae")) == {"latent"}


def test_masks_from_a_mask_file_or_the_alpha_channel_are_stored_at_latent_resolution(tiny_sd_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _picture(data / "filed.jpg")
    mask = Image.new("L", (128, 128), 0)  # drawn at twice the image's size: scaled to it
    mask.paste(255, (0, 0, 64, 128))
    mask.save(data / "filed.mask.png")
    _picture(data / "alpha.png", "RGBA")
    with Image.open(data / "alpha.png") as image:
        pixels = image.copy()
    pixels.putalpha(Image.new("L", (64, 64), 0))
    pixels.paste((0, 0, 0, 255), (0, 32, 64, 64))  # the lower half opaque
    pixels.save(data / "alpha.png")
    _picture(data / "none.png")
    assert create_img_sdvae(_cache_args(tiny_sd_model, data, "--resolution", "64", "--mask")) == 0
    filed_sidecar = _tensors(data / "filed.img_sdvae")
    cells = filed_sidecar["latent"].shape[-1]  # the tiny VAE's latents are smaller than SD's /8
    expected = torch.zeros(1, cells, cells)
    expected[..., : cells // 2] = 1
    # the mask file is twice the image's size: scaled down (bilinear), its edge column blurs a little
    assert torch.allclose(filed_sidecar["mask"], expected, atol=0.05)
    alpha = _tensors(data / "alpha.img_sdvae")["mask"][0]
    assert torch.equal(alpha[cells // 2 :], torch.ones(cells // 2, cells))
    assert torch.equal(alpha[: cells // 2], torch.zeros(cells // 2, cells))
    assert "mask" not in _tensors(data / "none.img_sdvae")
    assert not (data / "filed.mask.img_sdvae").exists()  # a mask is never a source image
    # a new mask file makes its image's sidecar stale
    mask.paste(255, (0, 0, 128, 128))
    mask.save(data / "filed.mask.png")
    assert create_img_sdvae(_cache_args(tiny_sd_model, data, "--resolution", "64", "--mask")) == 0
    assert torch.equal(_tensors(data / "filed.img_sdvae")["mask"], torch.ones(1, cells, cells))


def test_the_inspector_counts_caption_variants_mirrored_latents_and_masks(tiny_sd_model, tmp_path):
    from cachetrain.view.inspect import inspect_cache, render_text

    data = tmp_path / "data"
    data.mkdir()
    for name, caption in (("a", "one\ntwo\nthree"), ("b", "just one"), ("c", "on the right")):
        _picture(data / f"{name}.png")
        (data / f"{name}.txt").write_text(caption)
    shutil.copy(data / "a.png", data / "a.mask.png")
    assert create_img_sdvae(_cache_args(tiny_sd_model, data, "--resolution", "64", "--flip", "--mask")) == 0
    assert create_clipl(_cache_args(tiny_sd_model, data, "--caption_variants")) == 0
    result = inspect_cache([str(data)])
    assert result["suffixes"][".txt_clipl"]["extras"] == {"caption variants": 5, "files with several captions": 1}
    assert result["suffixes"][".img_sdvae"]["extras"] == {"mirrored latents": 2, "masks": 1}
    text = render_text(result)
    assert "caption variants 5, files with several captions 1" in text and "mirrored latents 2, masks 1" in text


@pytest.mark.parametrize("flag", ["--flip", "--mask"])
def test_caches_made_without_flip_or_mask_stay_fresh_until_the_flag_is_given(tiny_sd_model, cached_dataset, flag,
                                                                             capsys):
    assert create_img_sdvae(_cache_args(tiny_sd_model, cached_dataset, "--resolution", str(CACHED_RESOLUTION))) == 0
    assert "written 0 " in capsys.readouterr().err
    assert create_img_sdvae(_cache_args(tiny_sd_model, cached_dataset, "--resolution", str(CACHED_RESOLUTION),
                                        flag)) == 0
    assert "written 48 " in capsys.readouterr().err
