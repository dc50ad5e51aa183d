"""The cache scripts keep the data index: after a run it holds every sidecar they wrote, with the
size, mtime and shape the file has; a rerun after a sidecar was removed by hand records the new one."""

from __future__ import annotations

import os

from safetensors import safe_open

from cachetrain.commands import create_img_sdvae
from cachetrain.data_index import read_index


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
                             "0", "--no_progress", "--save_dtype", "float16", "--resolution", "64"]) == 0
    assert removed.exists()
    assert _recorded(cached_dataset, removed) == _actual(removed)
    assert read_index(str(cached_dataset)).pair_count(".img_sdvae", ".txt_clipl") == 48
