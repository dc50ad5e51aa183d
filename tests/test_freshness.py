"""Whether a sidecar is current for its source and encoder: the identities stored in its metadata and the
rule that compares them (cachetrain/freshness.py)."""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from cachetrain import freshness, sidecar


def test_freshness_compares_metadata_with_the_current_source_and_encoder(tmp_path):
    path = tmp_path / "x.img_sdvae"
    expected = {"encoder_fingerprint": "abc", "source_size": "10"}
    assert freshness.check_freshness(path, expected).status == "missing"
    sidecar.write_sidecar(path, {"latent": torch.zeros(1, 1, 1)}, expected)
    assert freshness.check_freshness(path, expected).status == "fresh"
    stale = freshness.check_freshness(path, {**expected, "encoder_fingerprint": "def"})
    assert stale.status == "stale" and "encoder_fingerprint" in stale.reason
    legacy = tmp_path / "old.img_sdvae"
    save_file({"latent": torch.zeros(1, 1, 1)}, legacy)  # the original scripts wrote no metadata
    assert freshness.check_freshness(legacy, expected).status == "legacy"
    broken = tmp_path / "broken.img_sdvae"
    broken.write_bytes(b"")
    assert freshness.check_freshness(broken, expected).status == "unreadable"


def test_a_source_with_a_new_time_but_the_same_bytes_is_recognised_by_its_digest(tmp_path):
    source = tmp_path / "x.jpg"
    source.write_bytes(b"0123456789")
    path = tmp_path / "x.img_sdvae"
    written = {**freshness.image_source_identity(source), **freshness.content_digest(source.read_bytes())}
    sidecar.write_sidecar(path, {"latent": torch.ones(1, 2, 2)}, {"encoder_fingerprint": "abc", **written})

    def digest():
        return freshness.file_content_digest(source)

    os.utime(source, ns=(0, 10**18))  # as a copy that did not keep times
    expected = {"encoder_fingerprint": "abc", **freshness.image_source_identity(source)}
    assert freshness.check_freshness(path, expected).status == "stale"  # without a way to read the source
    retimed = freshness.check_freshness(path, expected, digest)
    assert retimed.status == "retimed" and retimed.usable
    sidecar.update_metadata(path, expected)
    assert freshness.check_freshness(path, expected).status == "fresh"  # a stat is enough again
    assert torch.equal(sidecar.read_sidecar(path, "latent"), torch.ones(1, 2, 2))

    source.write_bytes(b"0123456780")  # same size, other bytes
    os.utime(source, ns=(0, 2 * 10**18))
    expected = {"encoder_fingerprint": "abc", **freshness.image_source_identity(source)}
    changed = freshness.check_freshness(path, expected, digest)
    assert changed.status == "stale" and "source_mtime_ns" in changed.reason
    # a digest is only consulted when the time alone differs
    assert freshness.check_freshness(path, {**expected, "encoder_fingerprint": "def"}, digest).status == "stale"


def test_caption_identity_is_the_hash_of_the_text():
    assert freshness.caption_source_identity("a cat") == freshness.caption_source_identity("a cat")
    assert freshness.caption_source_identity("a cat") != freshness.caption_source_identity("a dog")


def test_encoder_fingerprint_is_the_same_for_fp32_and_bf16_loads_and_changes_with_the_weights(tiny_sd_model):
    from diffusers import AutoencoderKL

    from cachetrain.models.loading import encoder_identity

    fp32 = AutoencoderKL.from_pretrained(tiny_sd_model, subfolder="vae", torch_dtype=torch.float32)
    bf16 = AutoencoderKL.from_pretrained(tiny_sd_model, subfolder="vae", torch_dtype=torch.bfloat16)
    assert encoder_identity(fp32) == encoder_identity(bf16)
    with torch.no_grad():
        for parameter in fp32.parameters():
            parameter.mul_(1.01)  # what a short fine-tune does: every weight moves a little
    assert encoder_identity(fp32)[1] != encoder_identity(bf16)[1]
