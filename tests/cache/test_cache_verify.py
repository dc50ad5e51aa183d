"""An image replaced by other bytes of the same size and modification time (``touch -r``): the freshness rule
reads no bytes when size and time match, so the stale latent is kept and the inspector says what "fresh" rests
on; ``--verify`` hashes every image and rebuilds the one whose bytes changed."""

from __future__ import annotations

import os

from cachetrain import freshness, sidecar
from cachetrain.view import inspect as cache_inspect

from .test_cache_builders import run_images


def _swap_bytes_keeping_size_and_time(image) -> None:
    before = os.stat(image)
    data = bytearray(image.read_bytes())
    middle = len(data) // 2  # inside the JPEG's scan data: still decodes, other pixels
    data[middle] ^= 0xFF
    image.write_bytes(bytes(data))
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))  # what touch -r does
    assert os.stat(image).st_size == before.st_size and os.stat(image).st_mtime_ns == before.st_mtime_ns


def test_verify_rebuilds_an_image_replaced_under_the_same_size_and_time_which_the_plain_rule_keeps(
        cached_dataset, tiny_sd_model, capsys):
    image = sorted(cached_dataset.rglob("*.jpg"))[3]
    latent = image.with_suffix(".img_sdvae")
    _swap_bytes_keeping_size_and_time(image)
    stored_digest = sidecar.read_metadata(latent)["source_sha256"]

    status, counts, _err = run_images(capsys, tiny_sd_model, cached_dataset)
    assert status == 0 and counts["written"] == 0  # the plain rule: size and time match, bytes not read
    report = cache_inspect.render_text(cache_inspect.inspect_cache([str(cached_dataset)]))
    assert "fresh = same image size and modification time (bytes not read; the cache scripts' --verify" in report

    status, counts, _err = run_images(capsys, tiny_sd_model, cached_dataset, "--verify")
    assert status == 0 and counts["written"] == 1 and counts["stale"] == 1
    assert sidecar.read_metadata(latent)["source_sha256"] != stored_digest
    assert sidecar.read_metadata(latent)["source_sha256"] == freshness.file_content_digest(image)["source_sha256"]

    status, counts, _err = run_images(capsys, tiny_sd_model, cached_dataset, "--verify")
    assert status == 0 and counts["written"] == 0  # every byte read again, nothing changed
