"""The sidecar contract: naming, format + metadata round trip, atomic write (freshness: test_freshness.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cachetrain import sidecar


def test_sidecar_and_caption_names_replace_the_extension():
    assert sidecar.sidecar_path("/d/x.jpg", ".img_sdvae") == Path("/d/x.img_sdvae")
    assert sidecar.sidecar_path("/d/a.b.PNG", ".txt_clipl") == Path("/d/a.b.txt_clipl")
    assert sidecar.caption_path("/d/x.jpeg") == Path("/d/x.txt")


def test_tensor_and_metadata_round_trip(tmp_path):
    path = tmp_path / "x.img_sdvae"
    latent = torch.randn(4, 8, 8)
    sidecar.write_sidecar(path, {"latent": latent}, {"kind": "image_latent", "resolution": 64})
    assert torch.equal(sidecar.read_sidecar(path, "latent", ndim=3), latent)
    metadata = sidecar.read_metadata(path)
    assert metadata["kind"] == "image_latent"
    assert metadata["resolution"] == "64"
    assert metadata["cachetrain_format"] == sidecar.FORMAT_VERSION
    assert oct(os.stat(path).st_mode & 0o777) == oct(sidecar.FILE_MODE)


def test_read_names_the_file_and_the_problem(tmp_path):
    wrong_key = tmp_path / "a.img_sdvae"
    sidecar.write_sidecar(wrong_key, {"emb": torch.zeros(2, 3)}, {})
    with pytest.raises(sidecar.SidecarError, match="a.img_sdvae: has no tensor 'latent'"):
        sidecar.read_sidecar(wrong_key, "latent")
    with pytest.raises(sidecar.SidecarError, match="expected 3 dims"):
        sidecar.read_sidecar(wrong_key, "emb", ndim=3)
    garbage = tmp_path / "b.img_sdvae"
    garbage.write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(sidecar.SidecarError, match="b.img_sdvae: not a readable safetensors file"):
        sidecar.read_sidecar(garbage, "latent")


def test_a_write_that_fails_midway_leaves_neither_sidecar_nor_temporary(tmp_path, monkeypatch):
    path = tmp_path / "x.img_sdvae"
    real_open = open

    class HalfWritten:  # the disk fills after the first bytes reached the temporary
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[:10])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr("builtins.open", lambda file, mode="r", *a, **k: HalfWritten(real_open(file, mode, *a, **k))
                        if "w" in mode else real_open(file, mode, *a, **k))
    with pytest.raises(OSError, match="No space left"):
        sidecar.write_sidecar(path, {"latent": torch.zeros(4, 2, 2)}, {})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rewrite_keeps_the_previous_sidecar(tmp_path, monkeypatch):
    path = tmp_path / "x.img_sdvae"
    sidecar.write_sidecar(path, {"latent": torch.ones(4, 2, 2)}, {})
    monkeypatch.setattr(os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        sidecar.write_sidecar(path, {"latent": torch.zeros(4, 2, 2)}, {})
    monkeypatch.undo()
    assert torch.equal(sidecar.read_sidecar(path, "latent"), torch.ones(4, 2, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.img_sdvae"]


def test_a_sidecar_is_written_once_by_us_never_through_safetensors_own_temporary(tmp_path, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: pytest.fail("save_file makes a .tmp of its own"))
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((Path(src).name, Path(dst).name)),
                                                          real_replace(src, dst)))
    path = tmp_path / "x.img_sdvae"
    sidecar.write_sidecar(path, {"latent": torch.ones(4, 2, 2)}, {"kind": "image_latent"})
    assert len(renames) == 1 and renames[0][1] == "x.img_sdvae"
    assert sidecar.is_temporary(renames[0][0])
    assert [p.name for p in tmp_path.iterdir()] == ["x.img_sdvae"]


def test_temporaries_of_killed_writers_are_told_from_user_files_by_name_and_content(tmp_path):
    # the names safetensors 0.8's save_file and our own writer give their temporaries
    assert sidecar.is_temporary(".tmpAb3dE9") and sidecar.is_temporary(".x.img_sdvae.partial-0123abcd")
    for name in (".tmpAb3dE", ".tmpAb3dE9x", ".tmp-b3dE9", "tmpAb3dE9", ".x.img_sdvae.partial-0123abcg"):
        assert not sidecar.is_temporary(name), name
    started = tmp_path / ".tmpAAAAAA"
    save_file({"latent": torch.zeros(4, 8, 8)}, started)
    started.write_bytes(started.read_bytes()[:40])  # cut off mid-write
    empty = tmp_path / ".tmpBBBBBB"
    empty.write_bytes(b"")
    users = tmp_path / ".tmpCCCCCC"
    users.write_text("my notes")
    assert sidecar.holds_sidecar_start(started) and sidecar.holds_sidecar_start(empty)
    assert not sidecar.holds_sidecar_start(users)
    assert not sidecar.is_abandoned_temporary_content(users)
    ours = tmp_path / ".x.img_sdvae.webp.partial-0123abcd"  # our own name: ours whatever it holds (a preview)
    ours.write_bytes(b"RIFF....WEBP")
    assert sidecar.is_abandoned_temporary_content(ours) and sidecar.is_abandoned_temporary_content(started)


def test_rewriting_the_metadata_of_a_sidecar_safetensors_cannot_read_names_the_file(tmp_path):
    import json

    header = json.dumps({"latent": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]},
                         "__metadata__": {"cachetrain_format": "1"}}).encode()
    path = tmp_path / "odd.img_sdvae"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    assert sidecar.read_metadata(path) == {"cachetrain_format": "1"}  # the header itself is well formed
    with pytest.raises(sidecar.SidecarError, match="odd.img_sdvae: not a readable safetensors file"):
        sidecar.update_metadata(path, {"source_mtime_ns": "1"})


def test_a_caption_saved_with_a_byte_order_mark_reads_without_it(tmp_path):
    (tmp_path / "x.txt").write_bytes("\ufeffa red circle\n".encode("utf-8"))
    assert sidecar.read_caption(str(tmp_path / "x.jpg")) == "a red circle"
