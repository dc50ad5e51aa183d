"""Walking data roots fast (os.scandir) and the compact index of training pairs."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import sys
from array import array
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from .sidecar import SidecarError, is_temporary, read_header


def normalize_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    """'JPG', '.jpg' and 'jpg' all mean '.jpg' (matching is case-insensitive)."""
    return tuple(sorted({("." + e.lstrip(".")).lower() for e in extensions}))


def left_out_reason(entry: os.DirEntry) -> str | None:
    """Why a matching name is not walked (None for a regular file or a link to one): reads must never
    meet a file that blocks them (a FIFO, a device) or a link that leads nowhere but round."""
    try:
        if entry.is_file(follow_symlinks=True):  # from the folder listing alone unless it is a link
            return None
        mode = entry.stat(follow_symlinks=True).st_mode
    except OSError as error:  # a loop of links (ELOOP), a link to nothing
        return f"{error.strerror or error}: a link that leads to no file" if error.errno != errno.ENOENT \
            else "a link to nothing"
    kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    return f"not a regular file ({kind}); never read, a read of it could block forever"


def walk_files(root: os.PathLike | str, suffixes: Iterable[str],
               temporaries: list[str] | None = None, visited: set | None = None,
               left_out: list[tuple[str, str]] | None = None) -> Iterator[str]:
    """Yield the paths under ``root`` whose name ends with one of ``suffixes`` (case-insensitive).

    One os.scandir pass per folder, in sorted order so every process sees the same sequence.
    Hidden folders and files (names starting with '.') are skipped: that is where temporary
    sidecars and tool state live. Names of writers' temporaries (ours, and safetensors' own
    ``.tmpXXXXXX``; see sidecar.is_temporary) are appended to ``temporaries`` when a list is given,
    so a cache builder can check, report and remove what killed writers left.
    Symlinked folders are followed, each folder at most once (a link to an ancestor is no loop);
    pass the same ``visited`` set to the walks of several roots and a folder inside two of them
    (``--data_root D D/part0``) is walked once.
    Only regular files (and links to them) are yielded: a matching name that is a FIFO, a socket, a
    device, a loop of links or a link to nothing is left out and named, as (path, reason), in
    ``left_out`` when a list is given, else in one line on stderr.
    """
    suffixes = tuple(s.lower() for s in suffixes)
    pending = [os.fspath(root)]
    root_stat = os.stat(pending[0]) if os.path.isdir(pending[0]) else None
    visited = set() if visited is None else visited
    if root_stat:
        if (root_stat.st_dev, root_stat.st_ino) in visited:
            return
        visited.add((root_stat.st_dev, root_stat.st_ino))
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as entries:
                entries = sorted(entries, key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith(".") or is_temporary(entry.name):
                if temporaries is not None and is_temporary(entry.name):
                    temporaries.append(entry.path)
                continue
            try:
                is_folder = entry.is_dir(follow_symlinks=True)
            except OSError:  # a loop of links: not a folder; named below if its name matches
                is_folder = False
            if is_folder:
                try:
                    folder_stat = entry.stat(follow_symlinks=True)  # one stat per folder, not per file
                except OSError:
                    continue
                identity = (folder_stat.st_dev, folder_stat.st_ino)
                if identity not in visited:
                    visited.add(identity)
                    subfolders.append(entry.path)
            elif entry.name.lower().endswith(suffixes):
                reason = left_out_reason(entry)
                if reason is None:
                    yield entry.path
                elif left_out is not None:
                    left_out.append((entry.path, reason))
                else:
                    print(f"[walk] left out {entry.path}: {reason}", file=sys.stderr)
        pending.extend(reversed(subfolders))  # depth-first, in sorted order


class PairIndex:
    """A compact, picklable list of (image sidecar, text sidecar) pairs.

    Millions of samples must fit in every DataLoader worker, so paths are not kept as Python
    strings: each sample is a folder number plus a stem stored in one shared bytes blob.
    Roughly len(stem) + 12 bytes per sample; with latent shapes recorded (aspect buckets), 2 more:
    a number into the short list of distinct shapes.
    """

    def __init__(self, image_suffix: str, text_suffix: str | None, roots: list[str] | None = None):
        self.image_suffix = image_suffix
        self.text_suffix = text_suffix
        self.roots: list[str] = list(roots or [])  # the data roots, by root id (names are relative to them)
        self.folders: list[str] = []
        self.folder_roots = array("I")  # which data root each folder came from
        self._folder_ids = array("I")
        self._stem_ends = array("Q")
        self._stems = bytearray()
        self.shapes: list[tuple[int, ...]] = []  # distinct latent shapes, when recorded
        self.shape_ids: array | None = None  # per sample: position in self.shapes

    @classmethod
    def from_arrays(cls, image_suffix: str, text_suffix: str, roots: list[str], folders: list[str],
                    folder_roots: array, folder_ids: array, stem_ends: array, stems: bytearray) -> PairIndex:
        """An index built in bulk (from the data index) rather than one ``add`` per sample."""
        index = cls(image_suffix, text_suffix, roots)
        index.folders, index.folder_roots = list(folders), folder_roots
        index._folder_ids, index._stem_ends, index._stems = folder_ids, stem_ends, stems
        return index

    def add(self, folder: str, stem: str, root_id: int = 0) -> None:
        if not self.folders or self.folders[-1] != folder:
            self.folders.append(folder)
            self.folder_roots.append(root_id)
        self._folder_ids.append(len(self.folders) - 1)
        self._stems += stem.encode("utf-8", "surrogateescape")
        self._stem_ends.append(len(self._stems))

    def __len__(self) -> int:
        return len(self._folder_ids)

    def base_path(self, i: int) -> str:
        start = self._stem_ends[i - 1] if i > 0 else 0
        stem = self._stems[start : self._stem_ends[i]].decode("utf-8", "surrogateescape")
        return os.path.join(self.folders[self._folder_ids[i]], stem)

    def __getitem__(self, i: int) -> tuple[str, str]:
        base = self.base_path(i)
        # text_suffix None: image-only data (--force_txtcache gives every sample one embedding)
        return base + self.image_suffix, None if self.text_suffix is None else base + self.text_suffix

    def root_id(self, i: int) -> int:
        """Position, in the roots given to index_training_pairs, of the data root sample i came from."""
        return self.folder_roots[self._folder_ids[i]]

    def root_ids(self) -> array:
        """root_id of every sample, in order (one pass, for building epoch orders)."""
        roots = self.folder_roots
        return array("I", (roots[f] for f in self._folder_ids))

    def latent_shape(self, i: int) -> tuple[int, ...] | None:
        """The latent shape recorded for sample i (None when shapes were not recorded)."""
        return None if self.shape_ids is None else self.shapes[self.shape_ids[i]]

    def set_shapes(self, shapes: list[tuple[int, ...]], shape_ids: array) -> None:
        if len(shape_ids) != len(self):
            raise ValueError(f"{len(shape_ids)} shape numbers for {len(self)} samples")
        self.shapes, self.shape_ids = list(shapes), shape_ids

    def subset(self, samples: Iterable[int]) -> PairIndex:
        """A new index holding the given samples, in that order."""
        part = PairIndex(self.image_suffix, self.text_suffix, self.roots)
        kept = array("H")
        for i in samples:
            folder, stem = os.path.split(self.base_path(i))
            part.add(folder, stem, self.root_id(i))
            if self.shape_ids is not None:
                kept.append(self.shape_ids[i])
        if self.shape_ids is not None:
            part.set_shapes(self.shapes, kept)
        return part

    def fingerprint(self) -> str:
        """A digest of the pair list: each sample's root number and name relative to its root, in order.

        Names, not contents: a resume on data that was renamed, reordered or replaced by other files
        (even as many) is told apart, while the same tree mounted elsewhere is the same data. One
        hash update per run of samples in one folder, so millions of samples take a second or so.
        """
        digest = hashlib.sha256()
        count, start = len(self), 0
        while start < count:
            folder_id = self._folder_ids[start]
            end = start
            while end < count and self._folder_ids[end] == folder_id:
                end += 1
            root_id = self.folder_roots[folder_id]
            folder = self.folders[folder_id]
            if root_id < len(self.roots):
                folder = os.path.relpath(folder, self.roots[root_id])
            first = self._stem_ends[start - 1] if start else 0
            digest.update(f"{root_id}\0{folder}\0{end - start}\0".encode("utf-8", "surrogateescape"))
            digest.update(self._stems[first : self._stem_ends[end - 1]])
            digest.update(array("Q", (e - first for e in self._stem_ends[start:end])).tobytes())
            start = end
        return digest.hexdigest()[:16]

    def nbytes(self) -> int:
        """Bytes held per the whole index (folders counted once)."""
        return (
            self._folder_ids.itemsize * len(self._folder_ids)
            + self._stem_ends.itemsize * len(self._stem_ends)
            + len(self._stems)
            + sum(len(f) + 53 for f in self.folders)
            + (0 if self.shape_ids is None else self.shape_ids.itemsize * len(self.shape_ids))
        )


def read_tensor_shape(path: os.PathLike | str, key: str) -> tuple[int, ...]:
    """The shape of tensor ``key`` from a safetensors header alone (a few hundred bytes read).

    Raises ValueError (with the reason) for a file that is not safetensors, is cut short of what
    its header describes, or lacks the tensor; OSError for one that cannot be opened.
    """
    try:
        header = read_header(path)
    except SidecarError as error:
        raise ValueError(error.reason) from None
    entry = header.get(key)
    if not isinstance(entry, dict) or "shape" not in entry:
        raise ValueError(f"has no tensor {key!r} (found {sorted(name for name in header if name != '__metadata__')})")
    return tuple(int(d) for d in entry["shape"])


UNREADABLE_SHAPE = 0xFFFF  # shape number of a sample whose latent header could not be read
SHAPE_CHUNK = 1024  # headers read per thread-pool task


def record_latent_shapes(index: PairIndex, key: str, threads: int = 16) -> list[tuple[str, str]]:
    """Read every latent's shape from its header (threads: the reads wait on storage, not the CPU)
    and record them in ``index``. Returns (path, reason) for each latent that could not be read;
    those samples get the shape number UNREADABLE_SHAPE."""

    def shapes_of(start: int) -> list:
        found = []
        for i in range(start, min(start + SHAPE_CHUNK, len(index))):
            path = index[i][0]
            try:
                found.append(read_tensor_shape(path, key))
            except (OSError, ValueError) as error:
                found.append((path, str(error)))
        return found

    shapes: dict[tuple[int, ...], int] = {}
    shape_ids = array("H")
    unreadable = []
    with ThreadPoolExecutor(max_workers=threads) as pool:  # one task per chunk: no million futures
        for chunk in pool.map(shapes_of, range(0, len(index), SHAPE_CHUNK)):
            for found in chunk:
                if isinstance(found[-1], str):
                    unreadable.append(found)
                    shape_ids.append(UNREADABLE_SHAPE)
                    continue
                if found not in shapes:
                    if len(shapes) == UNREADABLE_SHAPE:
                        raise ValueError(f"more than {UNREADABLE_SHAPE} distinct latent shapes")
                    shapes[found] = len(shapes)
                shape_ids.append(shapes[found])
    index.set_shapes(list(shapes), shape_ids)
    return unreadable


def index_training_pairs(roots: Iterable[os.PathLike | str], image_suffix: str,
                         text_suffix: str | None) -> tuple[PairIndex, dict[str, int]]:
    """Find every sample that has both sidecars under ``roots`` (every latent when ``text_suffix`` is
    None: image-only data, conditioned on one embedding for all).

    Returns the index and counts of the unpaired sidecars (``image_only``, ``text_only``) so the
    caller can say how many samples it is leaving out.
    """
    roots = [os.path.abspath(os.fspath(root)) for root in roots]
    index = PairIndex(image_suffix, text_suffix, roots)
    counts = {"image_only": 0, "text_only": 0}
    walked: set = set()  # shared by the roots' walks: overlapping roots give each pair once
    for root_id, root in enumerate(roots):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"training data folder not found: {root}")
        by_folder: dict[str, tuple[set[str], set[str]]] = {}
        for path in walk_files(root, (image_suffix, text_suffix or image_suffix), visited=walked):
            folder, name = os.path.split(path)
            images, texts = by_folder.setdefault(folder, (set(), set()))
            if name.endswith(image_suffix):
                images.add(name[: -len(image_suffix)])
            if text_suffix is not None and name.endswith(text_suffix):
                texts.add(name[: -len(text_suffix)])
        for folder in sorted(by_folder):
            images, texts = by_folder[folder]
            for stem in sorted(images & texts if text_suffix is not None else images):
                index.add(folder, stem, root_id)
            counts["image_only"] += len(images - texts) if text_suffix is not None else 0
            counts["text_only"] += len(texts - images)
    return index, counts
