"""Walking data roots fast (os.scandir) and the compact index of training pairs."""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterable, Iterator

from .sidecar import is_temporary

DEFAULT_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def normalize_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    """'JPG', '.jpg' and 'jpg' all mean '.jpg' (matching is case-insensitive)."""
    return tuple(sorted({("." + e.lstrip(".")).lower() for e in extensions}))


def walk_files(root: os.PathLike | str, suffixes: Iterable[str],
               temporaries: list[str] | None = None, visited: set | None = None) -> Iterator[str]:
    """Yield the paths under ``root`` whose name ends with one of ``suffixes`` (case-insensitive).

    One os.scandir pass per folder, in sorted order so every process sees the same sequence.
    Hidden folders and files (names starting with '.') are skipped: that is where temporary
    sidecars and tool state live. Names of writers' temporaries (ours, and safetensors' own
    ``.tmpXXXXXX``; see sidecar.is_temporary) are appended to ``temporaries`` when a list is given,
    so a cache builder can check, report and remove what killed writers left.
    Symlinked folders are followed, each folder at most once (a link to an ancestor is no loop);
    pass the same ``visited`` set to the walks of several roots and a folder inside two of them
    (``--data_root D D/part0``) is walked once.
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
            if entry.is_dir(follow_symlinks=True):
                try:
                    folder_stat = entry.stat(follow_symlinks=True)  # one stat per folder, not per file
                except OSError:
                    continue
                identity = (folder_stat.st_dev, folder_stat.st_ino)
                if identity not in visited:
                    visited.add(identity)
                    subfolders.append(entry.path)
            elif entry.name.lower().endswith(suffixes):
                yield entry.path
        pending.extend(reversed(subfolders))  # depth-first, in sorted order


class PairIndex:
    """A compact, picklable list of (image sidecar, text sidecar) pairs.

    Millions of samples must fit in every DataLoader worker, so paths are not kept as Python
    strings: each sample is a folder number plus a stem stored in one shared bytes blob.
    Roughly len(stem) + 12 bytes per sample.
    """

    def __init__(self, image_suffix: str, text_suffix: str):
        self.image_suffix = image_suffix
        self.text_suffix = text_suffix
        self.folders: list[str] = []
        self.folder_roots = array("I")  # which data root each folder came from
        self._folder_ids = array("I")
        self._stem_ends = array("Q")
        self._stems = bytearray()

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
        return base + self.image_suffix, base + self.text_suffix

    def root_id(self, i: int) -> int:
        """Position, in the roots given to index_training_pairs, of the data root sample i came from."""
        return self.folder_roots[self._folder_ids[i]]

    def subset(self, samples: Iterable[int]) -> PairIndex:
        """A new index holding the given samples, in that order."""
        part = PairIndex(self.image_suffix, self.text_suffix)
        for i in samples:
            folder, stem = os.path.split(self.base_path(i))
            part.add(folder, stem, self.root_id(i))
        return part

    def nbytes(self) -> int:
        """Bytes held per the whole index (folders counted once)."""
        return (
            self._folder_ids.itemsize * len(self._folder_ids)
            + self._stem_ends.itemsize * len(self._stem_ends)
            + len(self._stems)
            + sum(len(f) + 53 for f in self.folders)
        )


def index_training_pairs(roots: Iterable[os.PathLike | str], image_suffix: str, text_suffix: str) -> tuple[PairIndex, dict[str, int]]:
    """Find every sample that has both sidecars under ``roots``.

    Returns the index and counts of the unpaired sidecars (``image_only``, ``text_only``) so the
    caller can say how many samples it is leaving out.
    """
    index = PairIndex(image_suffix, text_suffix)
    counts = {"image_only": 0, "text_only": 0}
    walked: set = set()  # shared by the roots' walks: overlapping roots give each pair once
    for root_id, root in enumerate(roots):
        root = os.path.abspath(os.fspath(root))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"training data folder not found: {root}")
        by_folder: dict[str, tuple[set[str], set[str]]] = {}
        for path in walk_files(root, (image_suffix, text_suffix), visited=walked):
            folder, name = os.path.split(path)
            images, texts = by_folder.setdefault(folder, (set(), set()))
            if name.endswith(image_suffix):
                images.add(name[: -len(image_suffix)])
            if name.endswith(text_suffix):
                texts.add(name[: -len(text_suffix)])
        for folder in sorted(by_folder):
            images, texts = by_folder[folder]
            for stem in sorted(images & texts):
                index.add(folder, stem, root_id)
            counts["image_only"] += len(images - texts)
            counts["text_only"] += len(texts - images)
    return index, counts
