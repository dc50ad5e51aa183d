"""Walking data roots: case-insensitive extensions, hidden names skipped, symlinks followed once, temporaries found."""

from __future__ import annotations

import os

from cachetrain.cache_build import scan_roots
from cachetrain.tree import normalize_extensions, walk_files


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_extensions_match_whatever_their_case(tmp_path):
    for name in ("a.jpg", "b.JPG", "c.Jpeg", "d.png", "e.txt", "f.jpg.bak"):
        touch(tmp_path / name)
    assert normalize_extensions(["JPG", ".jpeg", "jpg"]) == (".jpeg", ".jpg")
    found = sorted(os.path.basename(p) for p in walk_files(tmp_path, normalize_extensions(["jpg", "JPEG"])))
    assert found == ["a.jpg", "b.JPG", "c.Jpeg"]


def test_hidden_names_are_skipped_and_temporaries_reported(tmp_path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / ".cache" / "b.jpg")
    temporary = touch(tmp_path / ".a.img_sdvae.partial-1234abcd")
    temporaries: list[str] = []
    found = list(walk_files(tmp_path, (".jpg", ".img_sdvae"), temporaries=temporaries))
    assert found == [str(tmp_path / "a.jpg")]
    assert temporaries == [str(temporary)]


def test_symlinked_folders_are_followed_once_and_loops_end(tmp_path):
    touch(tmp_path / "data" / "sub" / "a.jpg")
    touch(tmp_path / "elsewhere" / "b.jpg")
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "linked")
    os.symlink(tmp_path / "data", tmp_path / "data" / "sub" / "loop")  # points back up
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "sub" / "linked_again")
    found = sorted(os.path.relpath(p, tmp_path / "data") for p in walk_files(tmp_path / "data", (".jpg",)))
    assert found == ["linked/b.jpg", "sub/a.jpg"]


def test_one_scan_splits_sources_sidecars_and_images_left_out(tmp_path):
    for name in ("a.jpg", "a.img_sdvae", "b.PNG", "b.img_sdvae", "c.img_sdvae", "a.txt"):
        touch(tmp_path / name)
    scan = scan_roots([str(tmp_path)], (".jpg",), ".img_sdvae")
    assert scan.sources == [str(tmp_path / "a.jpg")]
    assert scan.other_images == [str(tmp_path / "b.PNG")]
    assert scan.sidecars == [str(tmp_path / n) for n in ("a.img_sdvae", "b.img_sdvae", "c.img_sdvae")]
