"""Walking data roots: case-insensitive extensions, hidden names skipped, symlinks followed once, temporaries found."""

from __future__ import annotations

import os
from pathlib import Path

from cachetrain.cache.plan import scan_roots
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


def test_a_user_file_containing_partial_in_its_name_is_an_image_not_a_temporary(tmp_path):
    from cachetrain.sidecar import is_temporary
    from cachetrain.tree import walk_files

    (tmp_path / "holiday.partial-1.jpg").write_bytes(b"x")
    (tmp_path / ".x.img_sdvae.partial-0123abcd").write_bytes(b"x")
    temporaries: list[str] = []
    found = list(walk_files(tmp_path, (".jpg",), temporaries=temporaries))
    assert [Path(p).name for p in found] == ["holiday.partial-1.jpg"]
    assert [Path(p).name for p in temporaries] == [".x.img_sdvae.partial-0123abcd"]
    assert not is_temporary("holiday.partial-1.jpg")


def test_overlapping_data_roots_give_each_file_once(tmp_path):
    from cachetrain.tree import walk_files

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "sub" / "b.jpg").write_bytes(b"x")
    walked: set = set()
    found = [p for root in (tmp_path / "sub", tmp_path) for p in walk_files(root, (".jpg",), visited=walked)]
    assert sorted(Path(p).name for p in found) == ["a.jpg", "b.jpg"]
