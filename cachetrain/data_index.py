"""The data index: one small file per data root that says what its sidecars are, so a start reads it
instead of walking millions of files and reading their headers.

Format (``index_table.INDEX_FORMAT``; index_table.py writes and reads it): an uncompressed numpy
``.npz`` (zip of ``.npy`` arrays), ``ROOT/.cachetrain/data-index.npz`` (a hidden folder: walks skip it, and
writing the index there leaves the root folder's mtime alone). One row
per *stem* (``dir/name`` of ``dir/name.img_sdvae`` + ``dir/name.txt_clipl``), columns per tracked
sidecar suffix, so a pair is a row with both columns present:

- ``meta``: JSON (as uint8): format, the root it describes, the tracked suffixes, when it was written;
- per folder (walk order): ``folder_names`` / ``folder_name_ends`` (paths relative to the root, one
  UTF-8 blob + end offsets), ``folder_parents``, ``folder_mtime_ns`` and ``folder_inodes`` (the
  staleness rule), ``folder_row_ends`` (rows of folder f end at this row);
- per row (sorted by name within a folder): ``stem_names`` / ``stem_name_ends``;
- per row and suffix: ``file_sizes``, ``file_mtime_ns``, ``header_ndims`` (ABSENT, UNREADABLE,
  NO_TENSOR or the tensor's dimension count), ``header_shapes`` (the first 3 dims of the ``latent``
  or ``emb`` tensor) and ``fresh_digests``: 0, or the digest of the metadata a cache build found the
  sidecar fresh for, at the size and mtime in the same row (cache/plan.py: a rerun that finds the
  sidecar at that size and mtime and expects that digest needs no header read). A row rescanned at the
  same size and mtime keeps its digest.

A folder's rows are trusted while the folder's mtime and inode are what the index recorded: every
create, delete or rename of an entry (sidecar writers rename their temporaries) changes a folder's
mtime. A folder changed within RACY_SECONDS of being listed may change again without its mtime
ticking, so it is listed a second time once RACY_SECONDS have passed since that change (at the end of
a long scan): the same entries (names and inodes) and the same mtime make it believed; otherwise it is
recorded as unverified and scanned again next time. A file rewritten in place, without a rename,
escapes the rule: the trainer's loader still checks every latent against its recorded shape.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .bounded_read import ReadTimedOut, call_bounded_each
from .sidecar import (CLIP_L_SUFFIX, IMAGE_LATENT_KEY, SD_VAE_SUFFIX, SDXL_VAE_SUFFIX, T5_SUFFIX,
                      TEXT_EMBEDDING_KEY, SidecarError, is_temporary, read_header)
from .index_table import (  # noqa: F401  (the table's names, importable from here as before)
    ABSENT, NO_TENSOR, TABLE_ARRAYS, UNREADABLE, IndexError_, IndexTable, encode_names, folder_stems,
    load_index_file, write_index)
from .tree import left_out_reason

INDEX_FOLDER_NAME = ".cachetrain"
INDEX_FILE_NAME = "data-index.npz"
INDEX_DIR_ENV = "CACHETRAIN_INDEX_DIR"  # where indexes of read-only roots live (default below)
DEFAULT_SUFFIXES = (SD_VAE_SUFFIX, SDXL_VAE_SUFFIX, CLIP_L_SUFFIX, T5_SUFFIX)
RACY_SECONDS = 3.0  # coarser than any filesystem's mtime tick (FAT: 2 s)
RACY_NS = int(RACY_SECONDS * 1e9)
UNVERIFIED_MTIME = -1
SCAN_THREADS = 16  # folders scanned at once: header reads wait on storage, not the CPU


def default_index_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get(INDEX_DIR_ENV) or os.path.join(base, "cachetrain", "data-index")


def index_locations(root: str, index_dir: str | None = None) -> tuple[str, str]:
    """(beside the data, in the index folder): where the index of ``root`` lives."""
    root = os.path.abspath(root)
    digest = hashlib.sha256(root.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return os.path.join(root, INDEX_FOLDER_NAME, INDEX_FILE_NAME), os.path.join(index_dir or default_index_dir(), f"{digest}.npz")


def writable_location(root: str, index_dir: str | None = None) -> str:
    """Beside the data when the root may be written, else in the index folder. The hidden folder is made
    here, before any scan, so that making it does not leave the root's recorded mtime stale."""
    beside, elsewhere = index_locations(root, index_dir)
    try:
        os.makedirs(os.path.dirname(beside), exist_ok=True)
    except OSError:
        return elsewhere
    return beside if os.access(os.path.dirname(beside), os.W_OK) else elsewhere


def read_index(root: str, index_dir: str | None = None) -> IndexTable | None:
    """The index of ``root`` as stored (beside the data, else in the index folder), or None if there is
    none. Raises IndexError_ for one that exists but cannot be believed. Not checked against the tree:
    ``refresh`` does that."""
    for path in index_locations(root, index_dir):
        if os.path.isfile(path):
            return load_index_file(path, root)
    return None


# -- scanning ---------------------------------------------------------------------------------


@dataclass
class _Folder:
    name: str  # relative to the root, "" for the root itself
    parent: int
    mtime_ns: int
    inode: int
    device: int
    old_number: int | None = None  # rows come from the old index
    previous_number: int | None = None  # a changed folder's number in the old index (digests carried over)
    files: list[tuple[str, int]] = field(default_factory=list)  # (file name, suffix number): to read
    rows: dict | None = None  # stem -> [(size, mtime, ndim, shape)] per suffix, once read
    entries: tuple | None = None  # a racy folder's listing ((name, inode), ...), compared again at the end


def _file_record(path: str) -> tuple[int, int, int, tuple[int, ...]]:
    """(size, mtime, dims, shape) of one sidecar; runs on a bounded-read worker (read_header then reads directly)."""
    try:
        info = os.stat(path)
    except OSError:
        return 0, 0, UNREADABLE, ()
    try:
        header = read_header(path)
    except (OSError, SidecarError):
        return info.st_size, info.st_mtime_ns, UNREADABLE, ()
    entry = header.get(IMAGE_LATENT_KEY) or header.get(TEXT_EMBEDDING_KEY)
    try:
        shape = tuple(int(d) for d in entry["shape"])
    except (TypeError, KeyError, ValueError):
        return info.st_size, info.st_mtime_ns, NO_TENSOR, ()
    return info.st_size, info.st_mtime_ns, min(len(shape), 127), shape[:3]


def _read_folder(root: str, folder: _Folder, width: int) -> None:
    """The folder's files' records, read in one hand-over to a bounded-read worker (one per file costs more than
    the reads)."""
    base = os.path.join(root, folder.name) if folder.name else root
    answers = call_bounded_each([os.path.join(base, name) for name, _ in folder.files], _file_record)
    rows: dict[str, list] = {}
    for (_, (suffix_number, stem)), answer in zip(folder.files, answers):
        try:
            record = answer.result()
        except ReadTimedOut:  # a read that did not answer (or a stop): unreadable now, and read again next time
            record = (0, 0, UNREADABLE, ())
            folder.mtime_ns = UNVERIFIED_MTIME
        rows.setdefault(stem, [None] * width)[suffix_number] = record
    folder.rows = rows


@dataclass
class Refresh:
    """What a refresh did: the table, the folders it scanned (relative names) and where it wrote."""

    table: IndexTable
    scanned: list[str]
    folder_count: int
    had_index: bool = False  # a stored index was believed and used
    seconds: float = 0.0  # reading, checking and scanning (not writing)
    written_to: str | None = None
    write_error: str | None = None
    ignored: str | None = None  # why a stored index was not believed


def scan_tree(root: str, old: IndexTable | None, suffixes: tuple[str, ...], forced: Iterable[str] = (),
              progress=None) -> tuple[IndexTable, list[str]]:
    """Walk ``root`` as tree.walk_files does (sorted, depth-first, hidden names and temporaries skipped,
    each folder once), taking each folder's rows from ``old`` while the folder is unchanged and scanning
    (names, stats, headers) the rest. Returns the new table and the scanned folders' relative names."""
    root = os.path.abspath(root)
    old_numbers = {name: number for number, name in enumerate(old.folders())} if old is not None else {}
    old_children: dict[int, list[str]] = {}
    if old is not None:
        names = old.folders()
        for number, parent in enumerate(old.folder_parents.tolist()):
            if parent >= 0:
                old_children.setdefault(parent, []).append(os.path.basename(names[number]))
    forced = {os.path.normpath(name) if name else "" for name in forced}
    forced.discard(".")
    now_ns = time.time_ns()
    root_stat = os.stat(root)
    visited = {(root_stat.st_dev, root_stat.st_ino)}
    pending = [_Folder("", -1, root_stat.st_mtime_ns, root_stat.st_ino, root_stat.st_dev)]
    ordered: list[_Folder] = []
    while pending:
        folder = pending.pop()
        number = len(ordered)
        ordered.append(folder)
        old_number = old_numbers.get(folder.name)
        folder.previous_number = old_number
        if (old_number is not None and folder.name not in forced
                and int(old.folder_mtime_ns[old_number]) == folder.mtime_ns
                and int(old.folder_inodes[old_number]) == folder.inode):
            folder.old_number = old_number
            children = old_children.get(old_number, [])
        else:
            children = _list_folder(root, folder, suffixes, racy=folder.mtime_ns >= now_ns - RACY_NS)
        found = []
        for child in children:
            name = os.path.join(folder.name, child) if folder.name else child
            try:
                info = os.stat(os.path.join(root, name))
            except OSError:
                continue
            if not stat.S_ISDIR(info.st_mode) or (info.st_dev, info.st_ino) in visited:
                continue
            visited.add((info.st_dev, info.st_ino))
            found.append(_Folder(name, number, info.st_mtime_ns, info.st_ino, info.st_dev))
        pending.extend(reversed(found))
    to_read = [folder for folder in ordered if folder.old_number is None]
    if progress is not None:
        progress.reset(total=len(to_read))
    with ThreadPoolExecutor(max_workers=SCAN_THREADS) as pool:
        for _ in pool.map(lambda folder: _read_folder(root, folder, len(suffixes)), to_read):
            if progress is not None:
                progress.update(1)
    for folder in to_read:
        if folder.entries is not None and not _still_listed(root, folder):
            folder.mtime_ns = UNVERIFIED_MTIME
    if not to_read and old is not None and [folder.old_number for folder in ordered] == list(range(len(old.folders()))):
        # nothing changed: the stored arrays as they are (no copy of a 10M-row table at every start)
        old.folder_devices = np.array([folder.device for folder in ordered], np.uint64)
        return old, []
    return _assemble(root, old, suffixes, ordered), [folder.name for folder in to_read]


def _list_folder(root: str, folder: _Folder, suffixes: tuple[str, ...], racy: bool = False) -> list[str]:
    """The subfolder names of one folder (sorted), recording its sidecar files in ``folder.files`` (and,
    ``racy``, its listing in ``folder.entries``)."""
    path = os.path.join(root, folder.name) if folder.name else root
    try:
        with os.scandir(path) as entries:
            entries = sorted(entries, key=lambda e: e.name)
    except OSError:
        return []
    if racy:
        folder.entries = tuple((entry.name, entry.inode()) for entry in entries)
    subfolders = []
    for entry in entries:
        if entry.name.startswith(".") or is_temporary(entry.name):
            continue
        try:
            if entry.is_dir(follow_symlinks=True):
                subfolders.append(entry.name)
                continue
        except OSError:  # a loop of links: not a folder; named below if its name matches
            pass
        if not entry.name.endswith(suffixes):
            continue
        reason = left_out_reason(entry)  # FIFOs, sockets, devices, dead links: named, never opened
        if reason is not None:
            print(f"[walk] left out {entry.path}: {reason}", file=sys.stderr)
            continue
        for number, suffix in enumerate(suffixes):
            if entry.name.endswith(suffix) and len(entry.name) > len(suffix):
                folder.files.append((entry.name, (number, entry.name[: -len(suffix)])))
    return subfolders


def _still_listed(root: str, folder: _Folder) -> bool:
    """Whether a racy folder is unchanged since its listing, asked once its last change is RACY_SECONDS
    old (any later change then ticks its mtime); False while it is younger."""
    if time.time_ns() < folder.mtime_ns + RACY_NS:
        return False
    path = os.path.join(root, folder.name) if folder.name else root
    try:
        info = os.stat(path)
        with os.scandir(path) as entries:
            listing = tuple(sorted((entry.name, entry.inode()) for entry in entries))
    except OSError:
        return False
    return info.st_mtime_ns == folder.mtime_ns and info.st_ino == folder.inode and listing == folder.entries


def _assemble(root: str, old: IndexTable | None, suffixes: tuple[str, ...], ordered: list[_Folder]) -> IndexTable:
    width = len(suffixes)
    stems, sizes, mtimes, ndims, shapes, digests, row_ends = [], [], [], [], [], [], []
    old_stems = None
    total = 0
    for folder in ordered:
        if folder.old_number is not None:
            start, end = old.folder_rows(folder.old_number)
            if old_stems is None:
                old_stems = old.stem_names.tobytes()
            first = int(old.stem_name_ends[start - 1]) if start else 0
            ends = old.stem_name_ends[start:end]
            stems.append((old_stems[first: int(ends[-1])] if end > start else b"", ends - first))
            for column, source in ((sizes, old.file_sizes), (mtimes, old.file_mtime_ns), (ndims, old.header_ndims),
                                   (shapes, old.header_shapes), (digests, old.fresh_digests)):
                column.append(source[start:end])
            total += end - start
        else:
            names = sorted(folder.rows)
            count = len(names)
            size = np.zeros((count, width), np.int64)
            mtime = np.zeros((count, width), np.int64)
            ndim = np.full((count, width), ABSENT, np.int8)
            shape = np.zeros((count, width, 3), np.int32)
            for row, name in enumerate(names):
                for column, record in enumerate(folder.rows[name]):
                    if record is not None:
                        size[row, column], mtime[row, column], ndim[row, column] = record[:3]
                        shape[row, column, : len(record[3])] = record[3]
            blob, ends = encode_names(names)
            stems.append((blob.tobytes(), ends))
            sizes.append(size), mtimes.append(mtime), ndims.append(ndim), shapes.append(shape)
            digests.append(_carried_digests(old, folder.previous_number, names, size, mtime, suffixes))
            total += count
        row_ends.append(total)
    offset, blob_parts, end_parts = 0, [], []
    for blob, ends in stems:
        blob_parts.append(blob)
        end_parts.append(np.asarray(ends, np.int64) + offset)
        offset += len(blob)
    folder_blob, folder_ends = encode_names([folder.name for folder in ordered])
    join = lambda parts, empty: np.concatenate(parts) if parts else empty  # noqa: E731
    return IndexTable(
        root=root, suffixes=suffixes, folder_names=folder_blob, folder_name_ends=folder_ends,
        folder_parents=np.array([folder.parent for folder in ordered], np.int32),
        folder_mtime_ns=np.array([folder.mtime_ns for folder in ordered], np.int64),
        folder_inodes=np.array([folder.inode for folder in ordered], np.uint64),
        folder_row_ends=np.array(row_ends, np.int64),
        stem_names=np.frombuffer(b"".join(blob_parts), np.uint8), stem_name_ends=join(end_parts, np.zeros(0, np.int64)),
        file_sizes=join(sizes, np.zeros((0, width), np.int64)), file_mtime_ns=join(mtimes, np.zeros((0, width), np.int64)),
        header_ndims=join(ndims, np.zeros((0, width), np.int8)),
        header_shapes=join(shapes, np.zeros((0, width, 3), np.int32)),
        fresh_digests=join(digests, np.zeros((0, width), np.uint64)),
        folder_devices=np.array([folder.device for folder in ordered], np.uint64),
        _folder_list=[folder.name for folder in ordered])


def _carried_digests(old: IndexTable | None, old_number: int | None, names: list[str], size: np.ndarray,
                     mtime: np.ndarray, suffixes: tuple[str, ...]) -> np.ndarray:
    """The digests of a rescanned folder's rows: the old row's, where its file has the same size and mtime."""
    carried = np.zeros(size.shape, np.uint64)
    if old is None or old_number is None:
        return carried
    start, end = old.folder_rows(old_number)
    if start == end or not old.fresh_digests[start:end].any():
        return carried
    old_rows = folder_stems(old, start, end)
    for column, suffix in enumerate(suffixes):
        if suffix not in old.suffixes:
            continue
        old_column = old.suffixes.index(suffix)
        for row, name in enumerate(names):
            old_row = old_rows.get(name)
            if (old_row is not None and old.fresh_digests[old_row, old_column]
                    and old.file_sizes[old_row, old_column] == size[row, column]
                    and old.file_mtime_ns[old_row, old_column] == mtime[row, column]):
                carried[row, column] = old.fresh_digests[old_row, old_column]
    return carried


def _same_rows(table: IndexTable, old: IndexTable) -> bool:
    """Whether a rescan found what the stored index already says (a racy folder listed again, still
    unverified): rewriting a 10M-row index for that would cost every start a second."""
    return table.suffixes == old.suffixes and all(np.array_equal(getattr(table, name), getattr(old, name))
                                                  for name in TABLE_ARRAYS)


def refresh(root: str, folders: Iterable[str] | None = None, suffixes: Iterable[str] = (), write: bool = True,
            index_dir: str | None = None, progress=None, rebuild: bool = False,
            amend: Callable[[IndexTable], int] | None = None) -> Refresh:
    """Bring the index of ``root`` up to date and (``write``) store it: ``folders`` (absolute or relative
    to the root) are scanned again whatever their mtime, every other folder only when changed. A stored
    index that cannot be believed, or that lacks one of ``suffixes``, is rebuilt from the tree; so is
    every index with ``rebuild``. ``amend``: changes the table before it is stored (a cache build's fresh
    digests: fresh_digests.record_fresh_digests) and returns how many rows it changed."""
    root = os.path.abspath(root)
    started = time.perf_counter()
    ignored = None
    try:
        old = None if rebuild else read_index(root, index_dir)
    except IndexError_ as error:
        old, ignored = None, str(error)
    wanted = tuple(dict.fromkeys((*DEFAULT_SUFFIXES, *(old.suffixes if old is not None else ()), *suffixes)))
    if old is not None and not set(wanted) <= set(old.suffixes):
        old, ignored = None, f"it does not track {', '.join(sorted(set(wanted) - set(old.suffixes)))}"
    forced = [os.path.relpath(os.path.abspath(os.path.join(root, name)), root) for name in (folders or ())]
    forced = ["" if name == "." else name for name in forced if not name.startswith("..")]
    location = writable_location(root, index_dir) if write else None
    table, scanned = scan_tree(root, old, wanted, forced, progress)
    learned = amend(table) if amend is not None else 0
    result = Refresh(table, scanned, len(table.folder_name_ends), had_index=old is not None, ignored=ignored,
                     seconds=time.perf_counter() - started)
    changed = old is None or learned or (scanned and not _same_rows(table, old))
    if location is not None and changed:
        try:
            write_index(table, location)
            result.written_to = location
        except OSError as error:
            result.write_error = f"{location}: {error.strerror or error}"
    return result
