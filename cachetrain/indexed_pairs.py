"""Training pairs from the data indexes of the roots: the same PairIndex, in the same order, that
tree.index_training_pairs finds by walking, with every latent's shape taken from the index.

Vectorised over the index's arrays: a million pairs take well under a second, with no per-pair
Python object.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from .data_index import ABSENT, Refresh, refresh
from .tree import UNREADABLE_SHAPE, PairIndex


@dataclass
class IndexedPairs:
    index: PairIndex  # with every latent's shape recorded (UNREADABLE_SHAPE where its header was not)
    unpaired: dict[str, int]  # image_only, text_only: as tree.index_training_pairs counts them
    refreshes: list[Refresh] = field(default_factory=list)  # one per root


def indexed_training_pairs(roots: Iterable[str], image_suffix: str, text_suffix: str, write: bool = True,
                           index_dir: str | None = None, report: Callable[[str, Refresh], None] | None = None
                           ) -> IndexedPairs:
    """Refresh each root's index (only changed folders are walked), then pair its rows."""
    roots = [os.path.abspath(os.fspath(root)) for root in roots]
    refreshes = []
    for root in roots:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"training data folder not found: {root}")
        done = refresh(root, suffixes=(image_suffix, text_suffix), write=write, index_dir=index_dir)
        if report is not None:
            report(root, done)
        refreshes.append(done)
    index, unpaired = pairs_from_tables(roots, [done.table for done in refreshes], image_suffix, text_suffix)
    return IndexedPairs(index, unpaired, refreshes)


def pairs_from_tables(roots: list[str], tables: list, image_suffix: str, text_suffix: str
                      ) -> tuple[PairIndex, dict[str, int]]:
    """One PairIndex over the roots' tables: per root, folders in name order, stems in name order; a
    folder reached through an earlier root (same device and inode) counts once, as in a walk."""
    seen: set = set()
    folder_paths: list[str] = []
    folder_roots = array("I")
    parts = []  # (rows of one folder's pairs, table)
    unpaired = {"image_only": 0, "text_only": 0}
    for root_id, (root, table) in enumerate(zip(roots, tables)):
        image, text = table.suffixes.index(image_suffix), table.suffixes.index(text_suffix)
        has_image = table.header_ndims[:, image] != ABSENT
        has_text = table.header_ndims[:, text] != ABSENT
        names = table.folders()
        identities = list(zip(table.folder_devices.tolist(), table.folder_inodes.tolist()))
        fresh = [number for number, identity in enumerate(identities) if identity not in seen]
        seen.update(identities)
        for number in sorted(fresh, key=names.__getitem__):
            start, end = table.folder_rows(number)
            if start == end:
                continue
            images, texts = has_image[start:end], has_text[start:end]
            unpaired["image_only"] += int((images & ~texts).sum())
            unpaired["text_only"] += int((texts & ~images).sum())
            rows = np.flatnonzero(images & texts) + start
            if len(rows):
                folder_paths.append(os.path.join(root, names[number]) if names[number] else root)
                folder_roots.append(root_id)
                parts.append((rows, table, image))
    return _pair_index(roots, folder_paths, folder_roots, parts, image_suffix, text_suffix), unpaired


def _pair_index(roots, folder_paths, folder_roots, parts, image_suffix, text_suffix) -> PairIndex:
    """Gather the pairs' names into one blob, a table (root) at a time: a few large arrays, which go
    back to the system when freed, not millions of small ones."""
    folder_ids, stem_parts, end_parts, shape_keys = [], [], [], []
    offset = 0
    by_table: dict[int, list] = {}
    for folder_id, (rows, table, image) in enumerate(parts):
        by_table.setdefault(id(table), []).append((folder_id, rows, table, image))
    for members in by_table.values():
        table, image = members[0][2], members[0][3]
        rows = np.concatenate([member[1] for member in members])
        folder_ids.append(np.repeat(np.array([member[0] for member in members], np.uint32),
                                    [len(member[1]) for member in members]))
        ends = table.stem_name_ends
        starts = np.where(rows > 0, ends[np.maximum(rows - 1, 0)], 0)
        lengths = ends[rows] - starts
        new_ends = np.cumsum(lengths)
        del rows
        # one index per byte of the names gathered: the blob's positions, run by run
        gather = np.repeat(starts - (new_ends - lengths), lengths)
        gather += np.arange(len(gather))
        stem_parts.append(table.stem_names[gather])
        del gather, starts
        end_parts.append(new_ends + offset)
        offset += int(new_ends[-1]) if len(new_ends) else 0
        picked = np.concatenate([member[1] for member in members])
        shape_keys.append(np.concatenate([table.header_ndims[picked, image].astype(np.int32)[:, None],
                                          table.header_shapes[picked, image]], 1))
    join = lambda pieces, dtype, width=None: (np.concatenate(pieces) if pieces  # noqa: E731
                                              else np.zeros((0,) if width is None else (0, width), dtype))
    index = PairIndex.from_arrays(image_suffix, text_suffix, roots, folder_paths, folder_roots,
                                  array("I", join(folder_ids, np.uint32).tobytes()),
                                  array("Q", join(end_parts, np.int64).tobytes()),
                                  bytearray(join(stem_parts, np.uint8).tobytes()))
    shapes, shape_ids = _shape_numbers(join(shape_keys, np.int32, 4))
    index.set_shapes(shapes, shape_ids)
    return index


def _shape_numbers(keys: np.ndarray) -> tuple[list[tuple[int, ...]], array]:
    """Numbers for the distinct latent shapes in order of first appearance (as record_latent_shapes
    numbers them); a latent whose header was unreadable or held no latent gets UNREADABLE_SHAPE."""
    readable = keys[:, 0] > 0
    ids = np.full(len(keys), UNREADABLE_SHAPE, np.uint16)
    if readable.any():
        distinct, first, inverse = np.unique(keys[readable], axis=0, return_index=True, return_inverse=True)
        order = np.argsort(first)
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order))
        if len(distinct) >= UNREADABLE_SHAPE:
            raise ValueError(f"more than {UNREADABLE_SHAPE} distinct latent shapes")
        ids[readable] = rank[inverse.reshape(-1)]
        shapes = [tuple(int(d) for d in distinct[number, 1: 1 + min(int(distinct[number, 0]), 3)]) for number in order]
    else:
        shapes = []
    return shapes, array("H", ids.tobytes())
