"""The cache scripts keep the data index: after a run it holds every sidecar they wrote, with the
size, mtime and shape the file has; a rerun after a sidecar was removed by hand records the new one."""

from __future__ import annotations

import os

from safetensors import safe_open

from cachetrain.commands import create_img_sdvae
from cachetrain.data_index import read_index
from tests.conftest import CACHED_RESOLUTION


def _recorded(root, path):
    """(size, mtime, shape) the index holds for one sidecar."""
    table = read_index(str(root))
    column = table.suffixes.index(os.path.splitext(path)[1])
    folder = table.folders().index(os.path.relpath(os.path.dirname(path), root))
    start, end = table.folder_rows(folder)
    names = [bytes(table.stem_names[(table.stem_name_ends[row - 1] if row else 0): table.stem_name_ends[row]]).decode()
             for row in range(start, end)]
    row = start + names.index(os.path.splitext(os.path.basename(path))[0])
    ndim = int(table.header_ndims[row, column])
    return (int(table.file_sizes[row, column]), int(table.file_mtime_ns[row, column]),
            tuple(int(d) for d in table.header_shapes[row, column, :ndim]))


def _actual(path):
    with safe_open(str(path), framework="pt") as handle:
        shape = tuple(handle.get_slice(handle.keys()[0]).get_shape())
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns, shape


def test_the_cache_scripts_leave_an_index_of_every_sidecar_they_wrote(_cached_template):
    table = read_index(str(_cached_template))
    assert table is not None and table.pair_count(".img_sdvae", ".txt_clipl") == 48
    for path in sorted(_cached_template.glob("part*/*.img_sdvae"))[:5] + sorted(_cached_template.glob("part*/*.txt_clipl"))[:5]:
        assert _recorded(_cached_template, path) == _actual(path)


def test_a_sidecar_removed_by_hand_and_rebuilt_by_a_rerun_is_in_the_index_as_rebuilt(
        tiny_sd_model, cached_dataset, capsys):
    removed = sorted((cached_dataset / "part2").glob("*.img_sdvae"))[4]
    removed.unlink()
    assert create_img_sdvae(["--model", str(tiny_sd_model), "--data_root", str(cached_dataset), "--num_workers",
                             "0", "--no_progress", "--save_dtype", "float16",
                             "--resolution", str(CACHED_RESOLUTION)]) == 0
    assert removed.exists()
    assert _recorded(cached_dataset, removed) == _actual(removed)
    assert read_index(str(cached_dataset)).pair_count(".img_sdvae", ".txt_clipl") == 48


def _rerun(model, root, *extra) -> int:
    return create_img_sdvae(["--model", str(model), "--data_root", str(root), "--num_workers", "0", "--no_progress",
                             "--save_dtype", "float32", "--resolution", str(CACHED_RESOLUTION), *extra])


def test_a_fresh_rerun_decides_from_the_index_without_reading_a_header_and_verify_still_reads(
        tiny_sd_model, cached_dataset, capsys):
    table = read_index(str(cached_dataset))
    assert (table.fresh_digests[:, table.suffixes.index(".img_sdvae")] != 0).sum() == 48  # recorded when written
    # a header spoiled in place, at the same size and mtime: only a read of it would notice
    spoiled = sorted((cached_dataset / "part1").glob("*.img_sdvae"))[3]
    info = os.stat(spoiled)
    with open(spoiled, "r+b") as handle:
        handle.write(b"\xff" * 8)
    os.utime(spoiled, ns=(info.st_atime_ns, info.st_mtime_ns))
    touched = sorted((cached_dataset / "part3").glob("*.jpg"))[0]  # a source with a new mtime: read again
    os.utime(touched, ns=(info.st_atime_ns, os.stat(touched).st_mtime_ns + 10**9))
    capsys.readouterr()
    assert _rerun(tiny_sd_model, cached_dataset) == 0
    err = capsys.readouterr().err
    assert "skipped fresh 48" in err and "fresh by content 1" in err  # the touched image: compared by content
    assert open(spoiled, "rb").read(8) == b"\xff" * 8  # decided from the index: never read
    assert _rerun(tiny_sd_model, cached_dataset, "--verify") == 0  # --verify reads every header and source
    err = capsys.readouterr().err
    assert "written 1 (rebuilt stale 1), skipped fresh 47" in err
    assert open(spoiled, "rb").read(8) != b"\xff" * 8
