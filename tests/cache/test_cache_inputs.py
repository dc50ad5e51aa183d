"""Bad input never stops a cache run: every kind is reported with path and reason, counted, and skipped or converted."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import create_img_sdvae
from cachetrain import sidecar
from cachetrain.cache.image_cache import main as image_main
from cachetrain.cache.images import ALPHA_BACKGROUND, MAX_IMAGE_FILE_BYTES, ImageRejected, load_image
from cachetrain.cache.text_cache import main_clip

RESOLUTION = 64


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims ``width`` x ``height``: what a decompression bomb looks like to open()."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data[12:29]  # chunk type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def noise_image(mode: str, size: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode)


def write_corpus(root: Path) -> dict[str, set[str]]:
    """One file per bad-input kind, plus good files; returns what each file should become."""
    root.mkdir(parents=True)
    noise_image("RGB", 80).save(root / "good.jpg", quality=90)
    noise_image("RGB", 80, seed=1).save(root / "UPPER.JPG", quality=90)
    noise_image("CMYK", 80).save(root / "cmyk.jpg", quality=90)
    noise_image("RGBA", 80).save(root / "alpha.png")
    noise_image("L", 80).save(root / "grey.png")
    noise_image("RGB", 80).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.gif")
    Image.fromarray((np.arange(80 * 80).reshape(80, 80) * 10).astype(np.uint16)).save(root / "deep.png")
    noise_image("RGB", 40).save(root / "small.png")
    (root / "zero.jpg").write_bytes(b"")
    (root / "notes.png").write_text("this is not an image", encoding="utf-8")
    whole = io.BytesIO()
    noise_image("RGB", 256).save(whole, "JPEG", quality=90)
    (root / "cut.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (root / "bomb.png").write_bytes(png_claiming_size(30_000, 30_000))  # over 2x Pillow's limit: error
    (root / "nearbomb.png").write_bytes(png_claiming_size(10_000, 10_000))  # 1x-2x the limit: Pillow only warns
    with open(root / "huge.jpg", "wb") as huge:  # sparse: over the size limit without using the disk
        huge.truncate(MAX_IMAGE_FILE_BYTES + 1)
    (root / "readme.md").write_text("not an image extension: ignored", encoding="utf-8")
    captions = {
        "good": "a red circle on a blue background", "UPPER": "a blue square", "cmyk": "a green cross",
        "alpha": "", "grey": "red " * 100, "palette": "a yellow triangle", "deep": "a black square",
        "small": "a white circle",
    }
    for stem, text in captions.items():
        (root / f"{stem}.txt").write_text(text, encoding="utf-8")
    (root / "zero.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))  # not UTF-8
    return {
        "latent": {"good", "UPPER", "cmyk", "alpha", "grey", "palette", "deep", "small"},
        "no latent": {"zero", "notes", "cut", "bomb", "nearbomb", "huge"},
    }


def stems(root: Path, suffix: str) -> set[str]:
    return {p.name[: -len(suffix)] for p in root.glob(f"*{suffix}") if not p.name.startswith(".")}


def test_a_corpus_of_every_bad_image_kind_gives_exact_counts_reasons_and_latents_for_the_good(tmp_path, capsys,
                                                                                            tiny_sd_model):
    root = tmp_path / "corpus"
    expected = write_corpus(root)
    report = tmp_path / "report.jsonl"
    status = image_main(["--model", str(tiny_sd_model), "--data_root", str(root), "--resolution", str(RESOLUTION),
                         "--num_workers", "2", "--batch_size", "3", "--no_progress", "--report", str(report)],
                        create_img_sdvae.DEFAULTS)
    err = capsys.readouterr().err
    assert status == 1  # some inputs have no sidecar
    assert stems(root, ".img_sdvae") == expected["latent"]
    assert "written 8 (rebuilt stale 0), skipped fresh 0, legacy kept 0, failed 6" in err
    assert ("problems: decompression bomb 2, empty file 1, not an image 1, too large 1, truncated 1" in err)
    assert "conversions: 16bit 1, alpha 1, cmyk 1, grey 1, palette 1, upscaled 1" in err
    for stem in ("zero.jpg", "notes.png", "cut.jpg", "bomb.png"):
        assert f"failed {root / stem}: " in err
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    failed = {Path(line["path"]).stem: line["kind"] for line in lines if line["status"] == "failed"}
    assert failed == {"zero": "empty file", "notes": "not an image", "cut": "truncated",
                      "bomb": "decompression bomb", "nearbomb": "decompression bomb", "huge": "too large"}
    assert all(line["reason"] for line in lines)
    notes = sorted((Path(line["path"]).stem, line["kind"]) for line in lines if line["status"] == "note")
    assert notes == [("alpha", "alpha"), ("cmyk", "cmyk"), ("deep", "16bit"), ("grey", "grey"),
                     ("palette", "palette"), ("small", "upscaled")]
    for stem in expected["latent"]:
        latent = sidecar.read_sidecar(next(root.glob(f"{stem}.img_sdvae")), "latent", ndim=3)
        assert latent.shape == (4, 16, 16) and torch.isfinite(latent).all()


def test_min_size_skips_small_images_on_request_without_failing_the_run(tmp_path, capsys, tiny_sd_model,
                                                                       shapes_dataset):
    noise_image("RGB", 40).save(shapes_dataset / "part0" / "tiny.png")
    status = image_main(["--model", str(tiny_sd_model), "--data_root", str(shapes_dataset), "--resolution", "64",
                         "--num_workers", "0", "--no_progress", "--min_size", "48"], create_img_sdvae.DEFAULTS)
    err = capsys.readouterr().err
    assert status == 0
    assert "written 48 (rebuilt stale 0), skipped fresh 0, legacy kept 0, failed 0, skipped on request 1" in err
    assert "problems: too small 1" in err
    assert not (shapes_dataset / "part0" / "tiny.img_sdvae").exists()


def test_a_corpus_of_every_bad_caption_kind_gives_exact_counts_and_embeddings_for_the_rest(tmp_path, capsys,
                                                                                         tiny_sd_model):
    root = tmp_path / "corpus"
    write_corpus(root)
    report = tmp_path / "report.jsonl"
    status = main_clip(["--model", str(tiny_sd_model), "--data_root", str(root), "--no_progress",
                        "--report", str(report)])
    err = capsys.readouterr().err
    assert status == 1
    # Captions exist for the 8 good images; of the 6 bad images only zero.jpg has one (not UTF-8).
    assert stems(root, ".txt_clipl") == {"good", "UPPER", "cmyk", "alpha", "grey", "palette", "deep", "small"}
    assert "written 8 (rebuilt stale 0), skipped fresh 0, legacy kept 0, failed 6" in err
    assert "problems: caption not UTF-8 1, no caption 5" in err
    assert "conversions: empty caption 1, truncated caption 1" in err
    lines = {Path(line["path"]).stem: (line["status"], line["kind"]) for line in
             map(json.loads, report.read_text().splitlines())}
    assert lines == {"zero": ("failed", "caption not UTF-8"), "notes": ("failed", "no caption"),
                     "cut": ("failed", "no caption"), "bomb": ("failed", "no caption"),
                     "nearbomb": ("failed", "no caption"), "huge": ("failed", "no caption"),
                     "alpha": ("note", "empty caption"),
                     "grey": ("note", "truncated caption")}
    empty = sidecar.read_sidecar(root / "alpha.txt_clipl", "emb", ndim=2)
    assert torch.equal(empty, sidecar.read_sidecar(root / ".empty_prompt.txt_clipl", "emb"))


def test_alpha_is_composited_on_the_documented_background():
    transparent_red = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    half_red = Image.new("RGBA", (64, 64), (255, 0, 0, 128))
    buffer = io.BytesIO()
    for image, expected in ((transparent_red, ALPHA_BACKGROUND), (half_red, (255, 127, 127))):
        buffer.seek(0), buffer.truncate()
        image.save(buffer, "PNG")
        buffer.seek(0)
        prepared = load_image(buffer, 64)
        assert prepared.notes == ("alpha",)
        assert prepared.pixels[:, 0, 0].tolist() == list(expected)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    deep = Image.fromarray(np.full((64, 64), 32896, dtype=np.uint16))  # half of 65535
    buffer = io.BytesIO()
    deep.save(buffer, "PNG")
    buffer.seek(0)
    prepared = load_image(buffer, 64)
    assert "16bit" in prepared.notes
    assert prepared.pixels[:, 10, 10].tolist() == [128, 128, 128]


def test_large_jpegs_decode_reduced_yet_report_their_stored_size(tmp_path):
    path = tmp_path / "big.jpg"
    noise_image("RGB", 1024).resize((1024, 768)).save(path, quality=90)
    prepared = load_image(path, 64)
    assert prepared.original_size == (1024, 768)
    assert prepared.pixels.shape == (3, 64, 64) and prepared.pixels.dtype == torch.uint8


def test_decompression_bombs_are_rejected_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming_size(30_000, 30_000))
    with pytest.raises(ImageRejected) as caught:
        load_image(path, 64)
    assert caught.value.kind == "decompression bomb" and "900000000 pixels" in caught.value.reason
