"""The data index (cachetrain.data_index) and the pairs read from it: the same pairs, order, shapes and
fingerprint as a full walk; unchanged folders never walked again; every index that cannot be believed
ignored; and the ``cachetrain-index`` command for trees cached without one."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cachetrain import data_index, index_table
from cachetrain.commands import data_index as index_command
from cachetrain.data_index import INDEX_FOLDER_NAME, INDEX_FILE_NAME, IndexError_, read_index, refresh
from cachetrain.indexed_pairs import indexed_training_pairs
from cachetrain.sidecar import write_sidecar
from cachetrain.tiny.models import write_random_pairs
from cachetrain.tree import index_training_pairs, record_latent_shapes

SUFFIXES = (".img_sdvae", ".txt_clipl")


def age_folders(root: Path, seconds: float = 60.0) -> None:
    """Move every folder's mtime into the past, as on a tree cached a while ago (a folder changed within
    the last seconds is recorded as unverified and walked again)."""
    for folder, _, _ in os.walk(root):
        info = os.stat(folder)
        os.utime(folder, ns=(info.st_atime_ns, info.st_mtime_ns - int(seconds * 1e9)))


def index_file(root: Path) -> Path:
    return root / INDEX_FOLDER_NAME / INDEX_FILE_NAME


@pytest.fixture
def tree(tmp_path) -> Path:
    """Nested folders, two latent shapes, unpaired and unreadable sidecars, a folder linked twice."""
    root = tmp_path / "data"
    write_random_pairs(root, 30, latent_shape=(4, 4, 4), text_shape=(7, 8), folders=3)
    write_random_pairs(root / "part1" / "deep", 6, latent_shape=(4, 4, 6), text_shape=(7, 8), folders=2, seed=1)
    (root / "part0" / "s000000.txt_clipl").unlink()
    (root / "part2" / "s000002.img_sdvae").unlink()
    (root / "part0" / "s000999.img_sdvae").write_bytes(b"not safetensors")
    (root / "part0" / "s000999.txt_clipl").write_bytes(b"not safetensors")
    (root / "link").symlink_to(root / "part1")
    # "link-b" sorts between "link" and "link/deep" by name, but a walk takes it after link's subfolders
    write_random_pairs(root / "link-b", 3, latent_shape=(4, 4, 4), text_shape=(7, 8), folders=1, seed=2)
    for indexed_root in (root, root / "part2"):  # made by the first index (a change of the root folder)
        (indexed_root / INDEX_FOLDER_NAME).mkdir()
    age_folders(root)
    return root


def _walked(roots):
    index, counts = index_training_pairs(roots, *SUFFIXES)
    record_latent_shapes(index, "latent")
    return index, counts


def _same_pairs(a, b) -> None:
    assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))]
    assert a.fingerprint() == b.fingerprint()
    assert a.shapes == b.shapes and list(a.shape_ids) == list(b.shape_ids)


def test_pairs_from_the_index_are_those_of_a_full_walk_in_order_with_shapes_and_fingerprint(tree):
    roots = [str(tree), str(tree / "part2")]  # overlapping roots: part2's pairs count once
    walked, counts = _walked(roots)
    first = indexed_training_pairs(roots, *SUFFIXES)
    _same_pairs(walked, first.index)
    assert first.unpaired == counts
    assert sorted(walked.shapes) == [(4, 4, 4), (4, 4, 6)] and len(walked) == 38  # 30 - 2 unpaired + 1 unreadable + 9 deeper
    again = indexed_training_pairs(roots, *SUFFIXES)  # now all from the stored indexes
    assert [done.scanned for done in again.refreshes] == [[], []]
    _same_pairs(walked, again.index)


def test_only_the_changed_folder_is_walked_again(tree):
    refresh(str(tree))
    write_random_pairs(tree / "part2", 4, latent_shape=(4, 4, 8), text_shape=(7, 8), folders=1, seed=3)
    (tree / "part2" / "part0").rename(tree / "part2" / "new")  # a new subfolder of an indexed folder
    age_folders(tree / "part2")
    (tree / "part0" / "s000003.img_sdvae").unlink()  # removed by hand
    found = indexed_training_pairs([str(tree)], *SUFFIXES)
    assert found.refreshes[0].scanned == ["part0", "part2", "part2/new"]
    _same_pairs(_walked([str(tree)])[0], found.index)
    assert (4, 4, 8) in found.index.shapes


def test_a_sidecar_rebuilt_with_another_shape_is_seen_by_its_new_shape(tree):
    refresh(str(tree))
    latent = tree / "part2" / "s000005.img_sdvae"
    write_sidecar(latent, {"latent": torch.zeros(4, 6, 6)}, {})  # a rerun renames its new file in place
    found = indexed_training_pairs([str(tree)], *SUFFIXES)
    position = [found.index[i][0] for i in range(len(found.index))].index(str(latent))
    assert found.index.latent_shape(position) == (4, 6, 6)


def test_a_folder_changed_just_before_indexing_is_walked_again_next_time(tree):
    refresh(str(tree))
    write_random_pairs(tree / "part0", 1, latent_shape=(4, 4, 4), text_shape=(7, 8), folders=1, seed=4)
    assert refresh(str(tree)).scanned == ["part0", "part0/part0"]
    # still within the filesystem's mtime tick of the scan: not trusted yet
    assert refresh(str(tree)).scanned == ["part0", "part0/part0"]


class SlowScan:
    """A progress bar whose every folder takes ``seconds`` (a long scan) and may change the tree meanwhile."""

    def __init__(self, seconds: float, meanwhile=None):
        self.seconds, self.meanwhile = seconds, meanwhile

    def reset(self, total):
        pass

    def update(self, count):
        time.sleep(self.seconds)
        if self.meanwhile is not None:
            self.meanwhile()
            self.meanwhile = None


def test_a_folder_changed_just_before_a_long_scan_is_believed_once_it_has_settled(tree, monkeypatch):
    monkeypatch.setattr(data_index, "RACY_NS", int(0.3e9))
    write_random_pairs(tree / "part0", 1, latent_shape=(4, 4, 4), text_shape=(7, 8), folders=1, seed=4)
    done = refresh(str(tree), progress=SlowScan(0.1))  # the scan outlasts the racy window: listed again
    assert (done.table.folder_mtime_ns != data_index.UNVERIFIED_MTIME).all()
    assert refresh(str(tree)).scanned == []


def test_a_racy_folder_changed_within_its_mtime_tick_is_walked_again(tree, monkeypatch):
    """On a filesystem whose mtime ticks coarsely, a file added during the scan may leave the folder's
    mtime as it was: the second listing sees the new entry."""
    monkeypatch.setattr(data_index, "RACY_NS", int(0.3e9))
    write_random_pairs(tree / "part0", 1, latent_shape=(4, 4, 4), text_shape=(7, 8), folders=1, seed=4)
    folder = tree / "part0" / "part0"
    before = os.stat(folder)

    def add_a_pair_within_the_tick():
        write_random_pairs(folder, 1, latent_shape=(4, 4, 4), text_shape=(7, 8), folders=1, seed=5)
        shutil.move(folder / "part0" / "s000000.img_sdvae", folder / "late.img_sdvae")
        shutil.move(folder / "part0" / "s000000.txt_clipl", folder / "late.txt_clipl")
        shutil.rmtree(folder / "part0")
        os.utime(folder, ns=(before.st_atime_ns, before.st_mtime_ns))

    done = refresh(str(tree), progress=SlowScan(0.1, add_a_pair_within_the_tick))
    folders = done.table.folders()
    assert done.table.folder_mtime_ns[folders.index("part0/part0")] == data_index.UNVERIFIED_MTIME
    found = indexed_training_pairs([str(tree)], *SUFFIXES)
    assert "part0/part0" in found.refreshes[0].scanned
    assert str(folder / "late.img_sdvae") in [found.index[i][0] for i in range(len(found.index))]


def test_a_rescan_that_finds_what_the_index_says_does_not_rewrite_it(tree):
    write_random_pairs(tree / "part0", 1, latent_shape=(4, 4, 4), text_shape=(7, 8), folders=1, seed=4)
    first = refresh(str(tree))
    assert first.written_to == str(index_file(tree))
    written = index_file(tree).stat().st_mtime_ns
    again = refresh(str(tree))  # the racy folders walked again, found as they were
    assert again.scanned == ["part0", "part0/part0"] and again.written_to is None
    assert index_file(tree).stat().st_mtime_ns == written


def test_the_index_read_in_place_holds_what_numpy_reads_from_the_file(tree):
    """The start maps each array where it lies in the file; numpy's own reader is the reference."""
    from cachetrain.index_table import TABLE_ARRAYS

    refresh(str(tree))
    table = read_index(str(tree))
    with np.load(index_file(tree), allow_pickle=False) as stored:
        assert sorted(stored.files) == sorted([*TABLE_ARRAYS, "meta"])
        for name in TABLE_ARRAYS:
            assert getattr(table, name).dtype == stored[name].dtype, name
            np.testing.assert_array_equal(getattr(table, name), stored[name], err_msg=name)


def replace_meta(stored: Path, meta: bytes) -> None:
    with np.load(stored) as kept:
        arrays = dict(kept)
    arrays["meta"] = np.frombuffer(meta, np.uint8)
    np.savez(stored, **arrays)


SPOILED_METAS = {  # meta JSON that is not what a writer of this format writes
    "meta_not_an_object": b"[1, 2]",
    "meta_without_suffixes": b'{"format": 2, "root": "/"}',
    "meta_with_other_suffixes": b'{"format": 2, "root": "/", "suffixes": [1, 2, 3, 4]}',
}


def damage_in_place(root: Path, spoil: str) -> None:
    """Change a few bytes of one stored array where they lie, as a bad disk or a stray write would: the zip's
    CRC no longer matches, but a start maps the arrays and never reads the whole file to check it."""
    table = read_index(str(root))
    part0 = table.folders().index("part0")
    start, end = table.folder_rows(part0)
    if spoil == "stem_renamed_in_place":  # s000003 becomes s000006, the name after it: one pair twice, one lost
        names = data_index.folder_stems(table, start, end)
        assert names["s000003"] == start + 1 and names["s000006"] == start + 2
        array, at, value = table.stem_names, int(table.stem_name_ends[start + 1]) - 1, ord("6")
    elif spoil == "stem_name_ends_typed_as_floats":  # one byte of the .npy header that describes the array
        stored = index_file(root).read_bytes()
        at = stored.index(b"'descr': '<i8'", stored.index(b"stem_name_ends.npy")) + len(b"'descr': '<")
        with open(index_file(root), "r+b") as handle:
            handle.seek(at)
            handle.write(b"f")
        return
    elif spoil == "stem_name_ends_run_backwards":
        array, at, value = table.stem_name_ends, start + 2, table.stem_name_ends[start]
    else:  # part0's rows end before those of the folder before it
        array, at, value = table.folder_row_ends, part0, table.folder_row_ends[part0 - 1] - 1
    with open(index_file(root), "r+b") as handle:
        handle.seek(array.offset + at * array.itemsize)
        handle.write(np.asarray(value, array.dtype).tobytes())


DAMAGED_IN_PLACE = {  # what a start says of each
    "stem_renamed_in_place": "its names are out of order within a folder",
    "stem_name_ends_typed_as_floats": "stem_name_ends is not of the type written",
    "stem_name_ends_run_backwards": "its name offsets run backwards or past the names",
    "folder_row_ends_run_backwards": "its folders' rows run backwards",
}


@pytest.mark.parametrize("spoil", ["truncated", "garbage", "other_format", "compressed", "killed_writer",
                                   *SPOILED_METAS, *DAMAGED_IN_PLACE])
def test_an_index_that_cannot_be_believed_is_ignored_and_rebuilt(tree, spoil):
    refresh(str(tree))
    stored = index_file(tree)
    if spoil in DAMAGED_IN_PLACE:
        damage_in_place(tree, spoil)
    elif spoil == "truncated":  # what a writer without a rename would leave when killed
        stored.write_bytes(stored.read_bytes()[:500])
    elif spoil == "garbage":
        stored.write_bytes(b"\0" * 100)
    elif spoil == "other_format":
        replace_meta(stored, b'{"format": 99, "root": "/", "suffixes": []}')
    elif spoil in SPOILED_METAS:
        replace_meta(stored, SPOILED_METAS[spoil])
    elif spoil == "compressed":  # the same arrays, as another tool might rewrite them
        with np.load(stored) as kept:
            arrays = dict(kept)
        np.savez_compressed(stored, **arrays)
    else:  # a killed writer's temporary beside the good index: never read
        (stored.parent / f".{INDEX_FILE_NAME}.partial-0123abcd").write_bytes(b"half")
    if spoil != "killed_writer":
        with pytest.raises(IndexError_):
            read_index(str(tree))
    found = indexed_training_pairs([str(tree)], *SUFFIXES)
    _same_pairs(_walked([str(tree)])[0], found.index)
    assert (found.refreshes[0].ignored is None) == (spoil == "killed_writer")
    if spoil in DAMAGED_IN_PLACE:
        assert found.refreshes[0].ignored == DAMAGED_IN_PLACE[spoil]
    assert read_index(str(tree)) is not None  # rewritten


@pytest.mark.parametrize("rows_at_once", [3, 1 << 16])
def test_the_name_order_check_agrees_with_the_order_names_are_written_in(monkeypatch, rows_at_once):
    """Names of any length and bytes (shared prefixes longer than 8 bytes, bytes that are not UTF-8, a NUL
    that a damaged byte may leave), folders of any size, sorted as written or not: a table passes exactly
    when each folder's names strictly increase as Python sorts them, the order the writer uses."""
    monkeypatch.setattr(index_table, "_ROWS_AT_ONCE", rows_at_once)  # also blocks that split a folder
    rng = np.random.default_rng(0)
    pieces = ["a", "b", "\u00e9", "\u4e2d", "\udc80", "\udcff", "\x00", "s0000", "photo_2023-05-17_"]
    passed = 0
    for case in range(600):
        folders = [["".join(rng.choice(pieces, rng.integers(0, 5))) for _ in range(rng.integers(0, 9))]
                   for _ in range(rng.integers(1, 5))]
        if case % 3 == 0:  # as the writer leaves them
            folders = [sorted(set(names)) for names in folders]
        names = [name for names in folders for name in names]
        blob, ends = index_table.encode_names(names)
        row_ends = np.cumsum([len(names) for names in folders], dtype=np.int64)
        expected = all(a < b for names in folders for a, b in zip(names, names[1:]))
        assert index_table._names_increase(blob, ends, row_ends) == expected, folders
        passed += expected
    assert 200 <= passed < 600  # both answers were asked for


def test_names_whose_bytes_sort_otherwise_than_their_text_are_believed_as_written(tmp_path):
    """"a\\x80" (not UTF-8: kept as a surrogate) sorts after "aé" as text, before it as bytes."""
    root = tmp_path / "data"
    (root / INDEX_FOLDER_NAME).mkdir(parents=True)
    for stem in ("a\u00e9", os.fsdecode(b"a\x80"), "b"):
        for suffix, key in zip(SUFFIXES, ("latent", "emb")):
            write_sidecar(root / f"{stem}{suffix}", {key: torch.zeros(4, 4, 4)}, {})
    age_folders(root)
    first = refresh(str(root))
    assert data_index.folder_stems(first.table, 0, 3) == {"a\u00e9": 0, os.fsdecode(b"a\x80"): 1, "b": 2}
    again = refresh(str(root))
    assert again.had_index and again.ignored is None and again.scanned == []


def test_an_index_copied_with_its_tree_is_not_believed_for_the_copy(tree, tmp_path):
    import shutil

    refresh(str(tree))
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy, symlinks=True)  # keeps mtimes; the folders are other inodes
    (copy / "part0" / "s000003.img_sdvae").unlink()
    os.utime(copy / "part0", ns=(0, os.stat(tree / "part0").st_mtime_ns))
    found = indexed_training_pairs([str(copy)], *SUFFIXES)
    assert "part0" in found.refreshes[0].scanned
    _same_pairs(_walked([str(copy)])[0], found.index)


def test_the_index_command_indexes_an_old_tree_and_then_walks_nothing(tree, capsys):
    assert not index_file(tree).exists()
    assert index_command([str(tree)]) == 0
    out = capsys.readouterr()
    assert "indexing" in out.err  # the progress bar
    assert f"{tree}: 9 folders, 9 walked" in out.out and "39 .img_sdvae, 39 .txt_clipl" in out.out
    assert index_file(tree).exists()
    assert index_command([str(tree), "--no_progress"]) == 0
    assert f"{tree}: 9 folders, 0 walked" in capsys.readouterr().out
    assert index_command([str(tree / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    a_file = next(tree.rglob("*.txt_clipl"))
    assert index_command([str(a_file)]) == 2
    assert f"{a_file}: not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("meta, why", [(b"[1, 2]", "its meta is not a JSON object"),
                                       (b'{"format": 2, "root": "/"}', "its meta names no list of distinct suffixes")])
def test_the_index_command_names_a_damaged_meta_in_one_line_and_rebuilds_the_index(tree, capsys, meta, why):
    refresh(str(tree))
    capsys.readouterr()
    replace_meta(index_file(tree), meta)
    assert index_command([str(tree), "--no_progress"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    [line] = out.splitlines()
    assert line.startswith(f"{tree}: 9 folders, 9 walked (stored index ignored: {why}); 39 .img_sdvae")
    assert index_command([str(tree), "--no_progress"]) == 0
    assert f"{tree}: 9 folders, 0 walked;" in capsys.readouterr().out  # the rebuilt index is believed


def test_a_read_only_root_keeps_its_index_in_the_index_folder(tree, tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    if os.system(f"mount --bind {tree} {read_only} 2>/dev/null && mount -o remount,ro,bind {read_only}") != 0:
        pytest.skip("needs a read-only bind mount (root)")
    try:
        assert not os.access(read_only, os.W_OK) or not (read_only / INDEX_FOLDER_NAME).exists()
        elsewhere = tmp_path / "indexes"
        first = indexed_training_pairs([str(read_only)], *SUFFIXES, index_dir=str(elsewhere))
        assert first.refreshes[0].written_to.startswith(str(elsewhere))
        again = indexed_training_pairs([str(read_only)], *SUFFIXES, index_dir=str(elsewhere))
        assert again.refreshes[0].scanned == [] and again.refreshes[0].had_index
        _same_pairs(first.index, again.index)
    finally:
        os.system(f"umount {read_only}")
