"""The dataset file (--dataset_config): the data folders of a run, each with what it gives an epoch.

TOML, because it is what a person writes by hand with comments, Python reads it without a dependency
(tomllib), and kohya's dataset configs are TOML too. One ``[[folder]]`` table per data folder:

    [[folder]]
    path = "faces"          # relative paths are relative to the file's folder
    repeats = 3             # draws per epoch = repeats x its pairs (may be fractional: a fresh subset each epoch)
    loss_weight = 1.5       # each of its samples' loss is multiplied by this
    caption_dropout = 0.2   # its own --caption_dropout

or ``weight = W`` instead of ``repeats`` in every table: the folders share an epoch as long as all
their pairs together, each W / (sum of W) of it, whatever its size. A file gives repeats or weights,
not both. The draws per epoch feed loader.EpochOrder (balance "weighted").
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

KEYS = ("path", "repeats", "weight", "loss_weight", "caption_dropout")


class DatasetFileError(ValueError):
    """A dataset file that cannot be read or says something impossible; the message names the file."""


@dataclass(frozen=True)
class DataFolder:
    path: str
    repeats: float = 1.0
    weight: float | None = None  # set in every table or in none
    loss_weight: float = 1.0
    caption_dropout: float | None = None  # None: the run's --caption_dropout


def _number(path, position: int, table: dict, key: str, low: float, high: float | None, closed_low: bool):
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DatasetFileError(f"{path}: folder {position}: {key} must be a number, got {value!r}")
    if (value < low if closed_low else value <= low) or (high is not None and value >= high):
        bound = f"{'>=' if closed_low else '>'} {low}" + (f" and < {high}" if high is not None else "")
        raise DatasetFileError(f"{path}: folder {position}: {key} must be {bound}, got {value}")
    return float(value)


def read_dataset_file(path: os.PathLike | str) -> list[DataFolder]:
    """The folders a dataset file lists, in order (DatasetFileError says what is wrong, and where)."""
    try:
        with open(path, "rb") as handle:
            content = tomllib.load(handle)
    except FileNotFoundError:
        raise DatasetFileError(f"{path}: no such file") from None
    except OSError as error:
        raise DatasetFileError(f"{path}: cannot be read ({error.strerror or error})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise DatasetFileError(f"{path}: not a TOML file ({error})") from None
    other = sorted(set(content) - {"folder"})
    tables = content.get("folder")
    if other or not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise DatasetFileError(f"{path}: wants one [[folder]] table per data folder"
                               + (f" and nothing else (found {', '.join(other)})" if other else ""))
    base = Path(path).parent
    folders = []
    for position, table in enumerate(tables, start=1):
        unknown = sorted(set(table) - set(KEYS))
        if unknown:
            raise DatasetFileError(f"{path}: folder {position}: unknown key(s) {', '.join(unknown)} "
                                   f"(known: {', '.join(KEYS)})")
        folder = table.get("path")
        if not isinstance(folder, str) or not folder:
            raise DatasetFileError(f"{path}: folder {position}: needs path = \"...\"")
        repeats = _number(path, position, table, "repeats", 0, None, closed_low=False)
        weight = _number(path, position, table, "weight", 0, None, closed_low=False)
        if repeats is not None and weight is not None:
            raise DatasetFileError(f"{path}: folder {position}: give repeats or weight, not both")
        loss_weight = _number(path, position, table, "loss_weight", 0, None, closed_low=True)
        dropout = _number(path, position, table, "caption_dropout", 0, 1, closed_low=True)
        resolved = folder if os.path.isabs(folder) else str(base / folder)
        folders.append(DataFolder(resolved, 1.0 if repeats is None else repeats, weight,
                                  1.0 if loss_weight is None else loss_weight, dropout))
    _check_no_folder_is_taken_first(path, folders)
    weighted = [f.weight is not None for f in folders]
    if any(weighted) and not all(weighted):
        raise DatasetFileError(f"{path}: give weight in every [[folder]] table or in none")
    return folders


def _check_no_folder_is_taken_first(path, folders: list[DataFolder]) -> None:
    """The folders are walked in order and a pair belongs to the first folder holding it: a folder listed
    twice, or inside one listed before it, would get no pairs and its table would say nothing."""
    real = [Path(os.path.realpath(folder.path)) for folder in folders]
    for later in range(len(real)):
        for earlier in range(later):
            if real[later] == real[earlier]:
                raise DatasetFileError(f"{path}: folders {earlier + 1} and {later + 1} are the same folder "
                                       f"({folders[later].path}); give each folder one table")
            if real[later].is_relative_to(real[earlier]):
                raise DatasetFileError(f"{path}: folder {later + 1} ({folders[later].path}) lies inside folder "
                                       f"{earlier + 1} ({folders[earlier].path}), which takes its pairs first; "
                                       f"list it before folder {earlier + 1} to give it a table of its own")


def folder_draws(folders: list[DataFolder], sizes: list[int]) -> list[int]:
    """Draws each folder gives every epoch: repeats x its pairs (rounded), or, with weights, its
    weight's share of all the pairs together. A folder without pairs gives none."""
    if folders[0].weight is not None:
        total, weights = sum(sizes), sum(f.weight for f, size in zip(folders, sizes) if size)
        return [round(total * f.weight / weights) if size else 0 for f, size in zip(folders, sizes)]
    return [round(f.repeats * size) for f, size in zip(folders, sizes)]


def describe_shares(folders: list[DataFolder], sizes: list[int], draws: list[int], caption_dropout: float) -> str:
    """One line: each folder's pairs, draws and share of an epoch, loss weight and caption dropout."""
    total = sum(draws)
    parts = []
    for folder, size, count in zip(folders, sizes, draws):
        how = f", weight {folder.weight:g}:" if folder.weight is not None else f" x {folder.repeats:g} repeats ="
        dropout = caption_dropout if folder.caption_dropout is None else folder.caption_dropout
        parts.append(f"{folder.path}: {size} pairs{how} {count} draws ({100 * count / max(total, 1):.1f}% of "
                     f"an epoch), loss weight {folder.loss_weight:g}, caption dropout {dropout:g}")
    return f"{total} draws an epoch; " + "; ".join(parts)
