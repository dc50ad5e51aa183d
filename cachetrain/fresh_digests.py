"""Fresh digests: what lets a cache rerun decide "fresh" from the data index, without reading headers.

A cache build decides a sidecar is fresh when its metadata holds what the builder expects now (the
encoder, the settings, the source's size and mtime: freshness.check_freshness). Having decided so by
reading the header, or having written the sidecar itself, it records in the data index, in the
sidecar's row, the digest of what was expected (``freshness_digest``) beside the sidecar's size and
mtime. The next run computes the digest of what it expects; where the row holds the same digest and a
stat of the sidecar still finds that size and mtime, the sidecar is fresh by the same rule, and its
header is not read. Anything else (no index, no digest, another digest, another size or mtime, --verify,
--overwrite) falls back to reading the header.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading

from .data_index import IndexError_, IndexTable, folder_stems, read_index


def freshness_digest(expected: dict) -> int:
    """A non-zero 64-bit digest of expected metadata (keys whose value must be absent included). Runs once
    per source of a rerun: plain string joins, no JSON (metadata holds no NUL, \x01 or \x02)."""
    text = "\0".join(key + ("\x01" if value is None else "\x02" + str(value)) for key, value in sorted(expected.items()))
    digest = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")
    return digest or 1


def written_digest(metadata: dict, expected_keys: tuple[str, ...]) -> int:
    """The digest of what a written sidecar's ``metadata`` says under the keys the run expected: equal to
    ``freshness_digest`` of the expected metadata exactly when the sidecar is fresh for it."""
    return freshness_digest({key: metadata.get(key) for key in expected_keys})


class FolderRows:
    """Rows of a table by folder and stem, built a folder at a time on first use."""

    def __init__(self, table: IndexTable):
        self.table = table
        self.numbers = {name: number for number, name in enumerate(table.folders())}
        self._stems: dict[int, dict[str, int]] = {}
        self._lock = threading.Lock()

    def row(self, folder: str, stem: str) -> int | None:
        number = self.numbers.get(folder)
        if number is None:
            return None
        stems = self._stems.get(number)
        if stems is None:
            with self._lock:
                stems = self._stems.get(number)
                if stems is None:
                    start, end = self.table.folder_rows(number)
                    stems = self._stems[number] = folder_stems(self.table, start, end) if end > start else {}
        return stems.get(stem)


def record_fresh_digests(table: IndexTable, suffix: str, digests: dict[str, tuple[int, int, int]]) -> int:
    """Store ``digests`` (sidecar path -> (size, mtime_ns, digest)) of ``suffix`` sidecars under the table's
    root in their rows, where the row holds that size and mtime. Returns how many rows changed."""
    if suffix not in table.suffixes or not digests:
        return 0
    column, rows, changed = table.suffixes.index(suffix), FolderRows(table), 0
    for path, (size, mtime_ns, digest) in digests.items():
        folder, name = os.path.split(os.path.relpath(path, table.root))
        if folder.startswith("..") or not name.endswith(suffix):
            continue
        row = rows.row(folder, name[: -len(suffix)])
        if (row is not None and int(table.file_sizes[row, column]) == size
                and int(table.file_mtime_ns[row, column]) == mtime_ns
                and int(table.fresh_digests[row, column]) != digest):
            table.fresh_digests[row, column] = digest
            changed += 1
    return changed


class FreshnessRecord:
    """One cache run's use of the fresh digests: what the roots' indexes recorded (``is_fresh``), and what
    this run learned (``learned``: sidecar path -> (size, mtime_ns, digest)) to store at its end."""

    def __init__(self, roots: list[str], suffix: str, index_dir: str | None = None):
        self.suffix = suffix
        self.learned: dict[str, tuple[int, int, int]] = {}
        self.expected_keys: dict[str, tuple[str, ...]] = {}  # due source -> the keys its sidecar must match
        self._key_sets: dict[tuple[str, ...], tuple[str, ...]] = {}  # one tuple per distinct key set
        self._tables: list[tuple[str, FolderRows, int]] = []  # (root + os.sep, rows, column)
        for given in roots:
            root = os.path.abspath(given)
            try:
                table = read_index(root, index_dir)
            except (IndexError_, OSError) as error:
                print(f"[cache] data index of {root} not used to skip header reads: {error}", file=sys.stderr)
                continue
            if table is not None and suffix in table.suffixes and table.fresh_digests.any():
                rows, column = FolderRows(table), table.suffixes.index(suffix)
                # the root as given first: the walk's paths start with it, so no abspath per file
                for prefix in dict.fromkeys((given.rstrip(os.sep) + os.sep, root.rstrip(os.sep) + os.sep)):
                    self._tables.append((prefix, rows, column))

    def is_fresh(self, sidecar: str, digest: int) -> bool:
        """True when an index recorded ``digest`` for ``sidecar`` at the size and mtime it has now."""
        if not any(sidecar.startswith(prefix) for prefix, _, _ in self._tables):
            sidecar = os.path.abspath(sidecar)
        for prefix, rows, column in self._tables:
            if not sidecar.startswith(prefix):
                continue
            folder, name = os.path.split(sidecar[len(prefix):])
            row = rows.row(folder, name[: -len(self.suffix)]) if name.endswith(self.suffix) else None
            if row is None or int(rows.table.fresh_digests[row, column]) != digest:
                continue
            try:
                info = os.stat(sidecar)
            except OSError:
                return False
            return (info.st_size == int(rows.table.file_sizes[row, column])
                    and info.st_mtime_ns == int(rows.table.file_mtime_ns[row, column]))
        return False

    def learn(self, sidecar: str, digest: int, info: os.stat_result) -> None:
        self.learned[os.path.abspath(sidecar)] = (info.st_size, info.st_mtime_ns, digest)

    def expect(self, source: str, expected: dict) -> None:
        """A due source: its sidecar, once written, is fresh for ``expected`` (see ``written``)."""
        keys = tuple(sorted(expected))
        self.expected_keys[source] = self._key_sets.setdefault(keys, keys)

    def written(self, source: str, sidecar: str, metadata: dict) -> None:
        """A sidecar this run wrote (called on the writer's threads): learned for the keys planned."""
        keys = self.expected_keys.get(source)
        if keys is None:
            return
        try:
            info = os.stat(sidecar)
        except OSError:
            return
        self.learn(sidecar, written_digest(metadata, keys), info)
