"""The data index's table and its file: the arrays that describe one data root (``IndexTable``), and the
versioned ``.npz`` they are stored in (``write_index``, ``load_index_file``). data_index.py keeps the
table up to date against the tree; its docstring describes the columns and the staleness rule.

The file is an uncompressed numpy ``.npz``, written under a temporary name and renamed (a killed writer
leaves the old index or none). A start memory-maps each array where it lies in the file (copy-on-write,
no pickles), so it reads only the pages of the columns it uses.
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
import zipfile
from dataclasses import dataclass, field

import numpy as np

from .atomic import write_atomically

INDEX_FORMAT = 2  # 2: fresh_digests
ABSENT, UNREADABLE, NO_TENSOR = -1, -2, 0  # header_ndims values that are not a dimension count


class IndexError_(ValueError):
    """An index file that cannot be believed (unreadable, another format, another root)."""


def decode_names(blob: np.ndarray, ends: np.ndarray) -> list[str]:
    raw, start, names = blob.tobytes(), 0, []
    for end in ends.tolist():
        names.append(raw[start:end].decode("utf-8", "surrogateescape"))
        start = end
    return names


def encode_names(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [name.encode("utf-8", "surrogateescape") for name in names]
    ends = np.cumsum([len(e) for e in encoded], dtype=np.int64) if encoded else np.zeros(0, np.int64)
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), ends


@dataclass
class IndexTable:
    """The index of one root in memory: numpy arrays, names as one blob + end offsets."""

    root: str
    suffixes: tuple[str, ...]
    folder_names: np.ndarray  # uint8 blob
    folder_name_ends: np.ndarray  # int64 [F]
    folder_parents: np.ndarray  # int32 [F], -1 for the root
    folder_mtime_ns: np.ndarray  # int64 [F]
    folder_inodes: np.ndarray  # uint64 [F]
    folder_row_ends: np.ndarray  # int64 [F]
    stem_names: np.ndarray  # uint8 blob
    stem_name_ends: np.ndarray  # int64 [N]
    file_sizes: np.ndarray  # int64 [N, K]
    file_mtime_ns: np.ndarray  # int64 [N, K]
    header_ndims: np.ndarray  # int8 [N, K]
    header_shapes: np.ndarray  # int32 [N, K, 3]
    fresh_digests: np.ndarray | None = None  # uint64 [N, K]; None: all 0
    folder_devices: np.ndarray | None = None  # this start's stat, not stored: tells overlapping roots apart
    _folder_list: list[str] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.fresh_digests is None:
            self.fresh_digests = np.zeros(self.file_sizes.shape, np.uint64)

    def folders(self) -> list[str]:
        if self._folder_list is None:
            self._folder_list = decode_names(self.folder_names, self.folder_name_ends)
        return self._folder_list

    def folder_rows(self, number: int) -> tuple[int, int]:
        return (int(self.folder_row_ends[number - 1]) if number else 0), int(self.folder_row_ends[number])

    def __len__(self) -> int:
        return len(self.stem_name_ends)

    def pair_count(self, image_suffix: str, text_suffix: str) -> int:
        image, text = self.suffixes.index(image_suffix), self.suffixes.index(text_suffix)
        return int(((self.header_ndims[:, image] != ABSENT) & (self.header_ndims[:, text] != ABSENT)).sum())

    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in TABLE_ARRAYS)


TABLE_ARRAYS = ("folder_names", "folder_name_ends", "folder_parents", "folder_mtime_ns", "folder_inodes",
           "folder_row_ends", "stem_names", "stem_name_ends", "file_sizes", "file_mtime_ns", "header_ndims",
           "header_shapes", "fresh_digests")


def write_index(table: IndexTable, path: str) -> None:
    """Write ``table`` to ``path`` in one rename: a killed writer leaves the old index or none."""
    meta = {"format": INDEX_FORMAT, "root": table.root, "suffixes": list(table.suffixes), "written": time.time()}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
             **{name: getattr(table, name) for name in TABLE_ARRAYS})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomically(path, buffer.getvalue(), fsync=False)


def _mapped_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of an uncompressed ``.npz``, memory-mapped copy-on-write where it lies in the zip: a start
    reads only the pages of the columns it uses (at 10M pairs, the sizes, mtimes and digests it does not use
    are most of the file), and a change to an array (a cache build's digests) stays in this process."""
    arrays = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
        for member in archive.infolist():
            if member.compress_type != zipfile.ZIP_STORED or not member.filename.endswith(".npy"):
                raise ValueError(f"{member.filename}: not a stored .npy")
            handle.seek(member.header_offset)
            local = handle.read(30)  # the local file header, then the name and the extra field
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise ValueError(f"{member.filename}: no local header")
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            start = member.header_offset + 30 + name_length + extra_length
            handle.seek(start)
            version = np.lib.format.read_magic(handle)
            shape, fortran_order, dtype = (np.lib.format.read_array_header_1_0(handle) if version == (1, 0)
                                           else np.lib.format.read_array_header_2_0(handle))
            if dtype.hasobject:
                raise ValueError(f"{member.filename}: holds objects")
            count = int(np.prod(shape))
            if handle.tell() + count * dtype.itemsize > start + member.compress_size:
                raise ValueError(f"{member.filename}: shorter than its header says")
            order = "F" if fortran_order else "C"
            arrays[member.filename[:-4]] = (np.memmap(path, dtype, "c", handle.tell(), shape, order) if count
                                            else np.zeros(shape, dtype, order=order))
    return arrays


def load_index_file(path: str, root: str) -> IndexTable:
    """Read one index file; raises IndexError_ naming why it cannot be believed."""
    try:
        stored = _mapped_npz(path)
        meta = json.loads(np.asarray(stored["meta"]).tobytes())
        if not isinstance(meta, dict):
            raise IndexError_("its meta is not a JSON object")
        if meta.get("format") != INDEX_FORMAT:
            raise IndexError_(f"format {meta.get('format')!r}, this version reads {INDEX_FORMAT}")
        suffixes = meta.get("suffixes")
        # the suffixes name the columns: anything else would fail later, in the walk or the pairing
        if (not isinstance(suffixes, list) or not all(isinstance(suffix, str) and suffix for suffix in suffixes)
                or len(set(suffixes)) != len(suffixes)):
            raise IndexError_("its meta names no list of distinct suffixes")
        arrays = {name: stored[name] for name in TABLE_ARRAYS}
    except IndexError_:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, struct.error) as error:
        raise IndexError_(f"unreadable ({error})") from None
    # the root it names may differ (a tree moved or mounted elsewhere): names are relative, and the
    # staleness rule (mtime and inode of every folder) tells a moved copy from the original
    table = IndexTable(os.path.abspath(root), tuple(suffixes), **arrays)
    folders, rows, width = len(table.folder_name_ends), len(table.stem_name_ends), len(table.suffixes)
    consistent = (len(table.folder_parents) == len(table.folder_mtime_ns) == len(table.folder_inodes)
                  == len(table.folder_row_ends) == folders
                  and (folders == 0 or int(table.folder_row_ends[-1]) == rows)
                  and table.header_ndims.shape == table.file_sizes.shape == table.file_mtime_ns.shape
                  == table.fresh_digests.shape == (rows, width)
                  and table.header_shapes.shape == (rows, width, 3))
    if not consistent:
        raise IndexError_("its arrays disagree in length")
    return table


def folder_stems(table: IndexTable, start: int, end: int) -> dict[str, int]:
    """stem -> row of the rows start..end (one folder's)."""
    first = int(table.stem_name_ends[start - 1]) if start else 0
    ends = table.stem_name_ends[start:end] - first
    blob = table.stem_names[first: int(table.stem_name_ends[end - 1])]
    return {name: start + row for row, name in enumerate(decode_names(blob, ends))}
