"""cachetrain-pack: a cached tree into Arrow shards, a manifest of which sidecars went where, and a
repack that rewrites only the shards whose sidecars changed."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from cachetrain.commands import pack
from cachetrain.sidecar import IMAGE_LATENT_KEY, write_sidecar
from cachetrain.tiny.models import write_random_pairs
from tests.small_disks import read_only_folder


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "tree"
    write_random_pairs(root, 120, (4, 8, 8), (77, 32), torch.float16, folders=4)
    (root / "part1" / "s000001.txt").write_text("a red square\n")
    return root


def _manifest(out: Path) -> dict:
    return json.loads((out / "shards.json").read_text())


def _shard_files(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.arrow")}


def _row(out: Path, key: str) -> dict:
    for shard in _manifest(out)["shards"]:
        table = pa.ipc.open_file(pa.memory_map(str(out / shard["name"]))).read_all()
        keys = table.column("key").to_pylist()
        if key in keys:
            return table.slice(keys.index(key), 1).to_pylist()[0]
    raise KeyError(key)


def test_packed_rows_hold_each_sidecars_tensors_caption_and_metadata(tree, tmp_path):
    out = tmp_path / "shards"
    assert pack([str(tree), "--out", str(out), "--pairs_per_shard", "16"]) == 0
    manifest = _manifest(out)
    assert sum(shard["rows"] for shard in manifest["shards"]) == 120
    assert len(manifest["shards"]) >= 3 and set(_shard_files(out)) == {s["name"] for s in manifest["shards"]}
    row = _row(out, "part1/s000001")
    from safetensors.torch import load_file

    expected = load_file(tree / "part1" / "s000001.img_sdvae")[IMAGE_LATENT_KEY]
    stored = torch.frombuffer(bytearray(row["latent"]), dtype=torch.float16).view(row["latent_shape"])
    assert torch.equal(stored, expected) and row["latent_dtype"] == "float16"
    assert row["emb_shape"] == [77, 32] and row["caption"] == "a red square"
    assert json.loads(row["latent_meta"])["kind"] == "image_latent"


def test_a_repack_after_a_re_cache_rewrites_only_the_shard_holding_the_changed_sidecar(tree, tmp_path, capsys):
    out = tmp_path / "shards"
    assert pack([str(tree), "--out", str(out), "--pairs_per_shard", "16"]) == 0
    before = _shard_files(out)
    changed = torch.full((4, 8, 8), 0.5, dtype=torch.float16)
    write_sidecar(tree / "part2" / "s000002.img_sdvae", {IMAGE_LATENT_KEY: changed}, {"kind": "image_latent"})
    capsys.readouterr()
    assert pack([str(tree), "--out", str(out), "--pairs_per_shard", "16"]) == 0
    assert "1 written" in capsys.readouterr().err
    after = _shard_files(out)
    assert set(after) == set(before)
    rewritten = [name for name in after if after[name] != before[name]]
    assert len(rewritten) == 1
    # the manifest's digest of each shard is its file's: the rewritten one's changed with it (a reader's
    # cached copy, under the same name, is told from it by this)
    for shard in _manifest(out)["shards"]:
        assert shard["sha256"] == hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest(), shard["name"]
    row = _row(out, "part2/s000002")
    assert torch.equal(torch.frombuffer(bytearray(row["latent"]), dtype=torch.float16).view(4, 8, 8), changed)


def test_a_pair_added_or_removed_changes_few_shards_and_no_stale_file_is_left(tree, tmp_path):
    out = tmp_path / "shards"
    assert pack([str(tree), "--out", str(out), "--pairs_per_shard", "16"]) == 0
    before = _shard_files(out)
    for suffix in (".img_sdvae", ".txt_clipl"):
        (tree / "part3" / f"s000003{suffix}").unlink()
    assert pack([str(tree), "--out", str(out), "--pairs_per_shard", "16"]) == 0
    after = _shard_files(out)
    assert len(set(after) - set(before)) <= 2 and len(set(before) - set(after)) <= 2
    assert set(after) == {s["name"] for s in _manifest(out)["shards"]}
    assert sum(s["rows"] for s in _manifest(out)["shards"]) == 119


def test_bad_pairs_are_named_and_left_out_and_packed_once_repaired(tree, tmp_path, capsys):
    out = tmp_path / "shards"
    bad = tree / "part0" / "s000004.img_sdvae"
    good_bytes = bad.read_bytes()
    bad.write_bytes(b"not a sidecar")
    nan = tree / "part0" / "s000008.txt_clipl"
    write_sidecar(nan, {"emb": torch.full((77, 32), float("nan"), dtype=torch.float16)}, {})
    assert pack([str(tree), "--out", str(out), "--pairs_per_shard", "16"]) == 0
    err = capsys.readouterr().err
    assert f"left out {bad}: not a readable safetensors file" in err
    assert f"left out {nan}: tensor 'emb' holds NaN/Inf values" in err
    assert "118 pairs" in err and "2 bad pairs left out" in err
    bad.write_bytes(good_bytes)
    os.utime(bad)
    assert pack([str(tree), "--out", str(out), "--pairs_per_shard", "16"]) == 0
    assert "119 pairs" in capsys.readouterr().err
    assert _row(out, "part0/s000004")["key"] == "part0/s000004"


def test_a_tree_without_pairs_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert pack([str(tmp_path / "empty"), "--out", str(tmp_path / "shards")]) == 2
    assert capsys.readouterr().err.startswith("error: no sample has both")


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("where", ["root", "inside", "holds_root"])
def test_an_out_that_is_inside_or_holds_a_data_root_is_refused_and_nothing_is_written(tree, tmp_path, capsys, where):
    out = {"root": tree, "inside": tree / "shards", "holds_root": tmp_path}[where]
    before = _files(tmp_path)
    assert pack([str(tree), "--out", str(out), "--pairs_per_shard", "16"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"--out {out}" in line and str(tree) in line and "data root" in line
    assert _files(tmp_path) == before and not (tree / "shards").exists()


def _second_tree(tmp_path: Path) -> Path:
    other = tmp_path / "other"
    write_random_pairs(other, 10, (4, 8, 8), (77, 32), torch.float16)
    return other


@pytest.mark.parametrize("change", ["other_root", "other_text_suffix"])
def test_an_out_holding_a_shard_set_of_other_roots_or_suffixes_is_refused_and_left_as_it_was(tree, tmp_path, capsys,
                                                                                              change):
    out = tmp_path / "shards"
    assert pack([str(tree), "--out", str(out), "--pairs_per_shard", "16"]) == 0
    before = _files(out)
    argv = ([str(_second_tree(tmp_path)), "--out", str(out)] if change == "other_root"
            else [str(tree), "--out", str(out), "--txtcache_suffix", ".txt_t5cache"])
    capsys.readouterr()
    assert pack(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"--out {out}: holds the shard set of data roots tree with .img_sdvae + .txt_clipl" in line
    assert "choose another --out or remove it" in line
    assert _files(out) == before
    # the same roots and suffixes again: the normal incremental update
    assert pack([str(tree), "--out", str(out), "--pairs_per_shard", "16"]) == 0
    assert "0 written" in capsys.readouterr().err and _files(out) == before


def test_an_out_that_is_a_file_is_refused_in_one_line(tree, tmp_path, capsys):
    out = tmp_path / "shards"
    out.write_text("not a folder")
    assert pack([str(tree), "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"--out {out}: is a file, not a folder" in line
    assert out.read_text() == "not a folder"


def test_a_read_only_out_is_refused_in_one_line(tree, tmp_path, capsys):
    with read_only_folder(tmp_path / "shards") as out:
        assert pack([str(tree), "--out", str(out)]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert f"--out {out}: cannot be written" in line and list(out.iterdir()) == []


@pytest.mark.parametrize("failing", ["shard", "manifest"])
def test_a_write_failing_midway_is_one_line_and_the_previous_shard_set_stays_whole(tree, tmp_path, capsys,
                                                                                   monkeypatch, failing):
    import errno

    from cachetrain.cache import pack as pack_module

    out = tmp_path / "shards"
    assert pack([str(tree), "--out", str(out), "--pairs_per_shard", "16"]) == 0
    before = _files(out)
    for number in range(200, 230):  # new keys: new shards to write
        write_sidecar(tree / f"n{number}.img_sdvae", {IMAGE_LATENT_KEY: torch.zeros(4, 8, 8, dtype=torch.float16)},
                      {"kind": "image_latent"})
        write_sidecar(tree / f"n{number}.txt_clipl", {"emb": torch.zeros(77, 32, dtype=torch.float16)}, {})

    def disk_full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pack_module, "write_shard" if failing == "shard" else "write_atomically", disk_full)
    capsys.readouterr()
    assert pack([str(tree), "--out", str(out), "--pairs_per_shard", "16"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"--out {out}: could not write the shard set (No space left on device" in line
    after = _files(out)
    assert {name: after.get(name) for name in before} == before  # the previous set, byte for byte
