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
# what write_index stores (IndexTable's fields): an array read as another type is a damaged header
TABLE_TYPES = {"folder_names": (np.uint8, 1), "folder_name_ends": (np.int64, 1), "folder_parents": (np.int32, 1),
               "folder_mtime_ns": (np.int64, 1), "folder_inodes": (np.uint64, 1), "folder_row_ends": (np.int64, 1),
               "stem_names": (np.uint8, 1), "stem_name_ends": (np.int64, 1), "file_sizes": (np.int64, 2),
               "file_mtime_ns": (np.int64, 2), "header_ndims": (np.int8, 2), "header_shapes": (np.int32, 3),
               "fresh_digests": (np.uint64, 2)}


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
    wrong_type = [name for name, (dtype, ndim) in TABLE_TYPES.items()
                  if arrays[name].dtype != dtype or arrays[name].ndim != ndim]
    if wrong_type:
        raise IndexError_(f"{wrong_type[0]} is not of the type written")
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
    damage = _structure_damage(table)
    if damage is not None:
        raise IndexError_(damage)
    return table


def _offsets_hold(ends: np.ndarray, total: int) -> bool:
    """Whether end offsets never run backwards and the last one is ``total`` (an empty list: ``total`` is 0)."""
    if not len(ends):
        return total == 0
    return int(ends[0]) >= 0 and int(ends[-1]) == total and bool((ends[1:] >= ends[:-1]).all())


def _structure_damage(table: IndexTable) -> str | None:
    """What, in a table whose arrays agree in length, no writer leaves: offsets that run backwards or past
    their blob, or a folder's names out of the order they are written in. A start maps the file without
    checking its CRC (that would read every byte of it), so this is what catches a byte changed in place."""
    if not (_offsets_hold(table.folder_name_ends, len(table.folder_names))
            and _offsets_hold(table.stem_name_ends, len(table.stem_names))):
        return "its name offsets run backwards or past the names"
    if not _offsets_hold(table.folder_row_ends, len(table.stem_name_ends)):
        return "its folders' rows run backwards"
    if not _names_increase(table.stem_names, table.stem_name_ends, table.folder_row_ends):
        return "its names are out of order within a folder"
    return None


# the leading n bytes of a big-endian uint64, for n = 0..8
_LEADING_BYTES = np.array([((1 << 64) - 1) ^ ((1 << (64 - 8 * n)) - 1) for n in range(9)], np.uint64)
_ROWS_AT_ONCE = 1 << 16  # a block's arrays stay in the CPU's cache (measured fastest at 1M names)


def _names_increase(blob: np.ndarray, ends: np.ndarray, row_ends: np.ndarray) -> bool:
    """Whether the names of each folder's rows strictly increase in the order the writer sorts them
    (Python's str order: sorted() in data_index._assemble), given offsets that hold. Adjacent names are
    compared 8 bytes at a time as big-endian numbers, a block of rows at once: UTF-8's byte order is its
    code point order. A name with undecodable bytes (kept as surrogates) sorts apart from its bytes, so a
    block that holds one is compared as str, and so is any pair whose bytes are out of order before it
    counts as damage (a written table is never refused)."""
    count = len(ends)
    if count < 2:
        return True
    if len(blob) < 8:  # too short for one 8-byte window
        blob = np.concatenate([blob, np.zeros(8, np.uint8)])
    last = len(blob) - 8
    windows = np.ndarray((last + 1,), ">u8", blob, 0, (1,))  # the 8 bytes from each position, no copy
    first_rows = row_ends[row_ends < count]

    def leading(positions, name_ends):
        """The next 8 bytes of each name from ``positions``, zero past its end; and how many bytes it has left."""
        keys = windows[np.minimum(positions, last)]
        near_end = np.flatnonzero(positions > last)  # a window in the blob's last 8 bytes starts earlier
        if len(near_end):
            keys[near_end] <<= (np.minimum(positions[near_end] - last, 7) * 8).astype(np.uint64)
        left = name_ends - positions
        keys &= _LEADING_BYTES[np.clip(left, 0, 8)]
        return keys, left

    def judge(before, after, before_left, after_left):
        """(pairs out of byte order, pairs tied so far with bytes left to compare)."""
        tied = before == after
        # tied where one name ends within these 8 bytes: the shorter (a prefix of the other) comes first
        wrong = (before > after) | (tied & (np.minimum(before_left, after_left) <= 8) & (before_left >= after_left))
        return wrong, tied & (before_left > 8) & (after_left > 8)

    doubtful = []
    for first in range(0, count - 1, _ROWS_AT_ONCE):
        stop = min(first + _ROWS_AT_ONCE + 1, count)  # pair i of the block: rows first + i and first + i + 1
        name_ends = ends[first:stop]
        starts = np.empty(stop - first, np.int64)
        starts[0] = ends[first - 1] if first else 0
        starts[1:] = name_ends[:-1]
        undecided = np.ones(stop - first - 1, bool)
        undecided[first_rows[(first_rows > first) & (first_rows < stop)] - first - 1] = False  # across folders
        text = blob[starts[0]: name_ends[-1]].tobytes()
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:  # a name with undecodable bytes: this block compared as str
            names = decode_names(np.frombuffer(text, np.uint8), name_ends - starts[0])
            if not all(names[pair] < names[pair + 1] for pair in np.flatnonzero(undecided).tolist()):
                return False
            continue
        offset = 0
        while undecided.sum() * 4 > len(undecided):  # most pairs still tied: every row's next 8 bytes at once
            keys, left = leading(starts + offset, name_ends)
            wrong, going_on = judge(keys[:-1], keys[1:], left[:-1], left[1:])
            doubtful.extend((first + 1 + np.flatnonzero(undecided & wrong)).tolist())
            undecided &= going_on
            offset += 8
        pairs = np.flatnonzero(undecided)  # the few still tied: only their rows
        before_positions, after_positions = starts[pairs] + offset, starts[pairs + 1] + offset
        before_ends, after_ends = name_ends[pairs], name_ends[pairs + 1]
        while len(pairs):
            (before, before_left), (after, after_left) = (leading(before_positions, before_ends),
                                                          leading(after_positions, after_ends))
            wrong, going_on = judge(before, after, before_left, after_left)
            doubtful.extend((first + 1 + pairs[wrong]).tolist())
            going_on = np.flatnonzero(going_on)
            pairs, before_ends, after_ends = pairs[going_on], before_ends[going_on], after_ends[going_on]
            before_positions, after_positions = before_positions[going_on] + 8, after_positions[going_on] + 8

    def name(row):
        return blob[int(ends[row - 1]) if row else 0: int(ends[row])].tobytes().decode("utf-8", "surrogateescape")

    return all(name(row - 1) < name(row) for row in doubtful)


def folder_stems(table: IndexTable, start: int, end: int) -> dict[str, int]:
    """stem -> row of the rows start..end (one folder's)."""
    first = int(table.stem_name_ends[start - 1]) if start else 0
    ends = table.stem_name_ends[start:end] - first
    blob = table.stem_names[first: int(table.stem_name_ends[end - 1])]
    return {name: start + row for row, name in enumerate(decode_names(blob, ends))}
