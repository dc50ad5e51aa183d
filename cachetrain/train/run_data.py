"""The data of a run: its pairs indexed (and bucketed by latent shape), the shapes every pair must
have, the held-out pairs, and the order the processes read them in - all decided before the model loads."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .bad_data import REFERENCE_PAIRS, TrainingError, examples, reference_shapes
from .config import TrainConfig
from .data_folders import DataFolder, describe_shares, folder_draws, read_dataset_file
from .elastic import SavedLayout
from .epoch_order import EpochOrder
from .loader import PairChecks
from ..data_index import Refresh
from ..indexed_pairs import indexed_training_pairs
from ..sidecar import IMAGE_LATENT_KEY
from ..tree import UNREADABLE_SHAPE, PairIndex, index_training_pairs, read_tensor_shape, record_latent_shapes
from .shard_data import ShardIndex, ShardSetError, ShardStore, is_shard_location, print_left_out
from .validation import held_out_pairs


@dataclass
class RunData:
    train_index: PairIndex
    validation_index: PairIndex | None
    checks: PairChecks  # what every pair of the run must be
    order: EpochOrder
    rows_per_epoch: int  # batches of all processes together: the same on every start of the run
    total_steps: int  # optimizer steps of the whole run
    left_out_at_start: int  # latents whose headers could not be read (--aspect_buckets)
    pairs_fingerprint: str  # the training pairs' names, in order (a resume must read the same)
    folders: list[DataFolder] | None = None  # --dataset_config's folders, in --train_data_dir's order


MAX_EPOCH_DRAWS = 2**31 - 1


def load_run_data(config: TrainConfig, rank: int, world: int, is_main: bool,
                  wait_for_main: Callable[[], None] | None = None, resumed: SavedLayout | None = None) -> RunData:
    """``wait_for_main``: a barrier of all processes; with it the main process refreshes the data index
    first and the others then read it, so that only one process walks changed folders. ``resumed``: the
    checkpoint's layout, whose rows per epoch the run keeps."""
    if len(config.train_data_dir) == 1 and is_shard_location(config.train_data_dir[0]):
        return _load_shard_data(config, rank, world, is_main, resumed)
    if config.dataset_config:
        _check_dataset_folders(config.dataset_config)
    text_suffix = None if config.force_txtcache else config.txtcache_suffix  # forced: image-only data trains
    index, unpaired, validation = _find_pairs(config, text_suffix, is_main, wait_for_main)
    if len(index) == 0:
        wanted = f"a {config.imgcache_suffix}" if text_suffix is None else \
            f"both a {config.imgcache_suffix} and a {config.txtcache_suffix}"
        raise TrainingError(f"no sample has {wanted} sidecar under {config.train_data_dir}; run the cache "
                            "scripts first")
    if is_main and (unpaired["image_only"] or unpaired["text_only"]):
        print(f"[train] left out {unpaired['image_only']} latents without text and "
              f"{unpaired['text_only']} texts without latents", file=sys.stderr)
    left_out = 0
    if config.aspect_buckets:
        index, left_out = _index_buckets(index, config.max_bad_fraction, is_main)
    elif index.shape_ids is not None:
        index.shapes, index.shape_ids = [], None  # shapes matter to buckets alone
    checks = reference_shapes(index, with_latent=not config.aspect_buckets)
    if validation is not None and not config.aspect_buckets and validation.shape_ids is not None:
        validation.shapes, validation.shape_ids = [], None
    return _order_run_data(config, index, checks, rank, world, is_main, left_out, validation, resumed)


def _check_dataset_folders(dataset_file: str) -> None:
    """A --dataset_config folder that is not there, named with its file and table."""
    for position, folder in enumerate(read_dataset_file(dataset_file), start=1):
        if not os.path.isdir(folder.path):
            what = "is a file, not a folder" if os.path.exists(folder.path) else "no such folder"
            raise TrainingError(f"--dataset_config {dataset_file}: folder {position}: {folder.path}: {what}")


def _load_shard_data(config: TrainConfig, rank: int, world: int, is_main: bool,
                     resumed: SavedLayout | None) -> RunData:
    """The run's data from a shard set: its manifest gives the pairs, shapes and data roots."""
    store = ShardStore(config.train_data_dir[0], config.shard_cache_dir, config.shard_cache_gb * 1e9,
                       config.shard_retries)
    try:
        index, left_out = ShardIndex.open(store)
    except ShardSetError as error:
        raise TrainingError(str(error)) from None
    print_left_out(left_out, is_main)
    if len(index) == 0:
        raise TrainingError(f"--train_data_dir {store.location}: the shard set holds no pairs")
    first = [index.shape_ids[i] for i in range(min(REFERENCE_PAIRS, len(index)))]
    commonest = max(set(first), key=first.count)  # as reference_shapes picks from the first pairs' headers
    checks = PairChecks(latent_shape=None if config.aspect_buckets else index.shapes[commonest],
                        text_width=index.text_widths[0])
    if is_main:
        print(f"[train] {len(index)} pairs in {len(index.shard_names)} shards at {store.location}", file=sys.stderr)
    return _order_run_data(config, index, checks, rank, world, is_main, 0, resumed=resumed)


def _order_run_data(config: TrainConfig, index, checks: PairChecks, rank: int, world: int, is_main: bool,
                    left_out: int, validation_dir_index: PairIndex | None = None,
                    resumed: SavedLayout | None = None) -> RunData:
    train_index, validation_index = held_out_pairs(config, index, validation_dir_index)
    folders, draws = None, None
    if config.dataset_config:
        folders = read_dataset_file(config.dataset_config)
        sizes = torch.bincount(torch.as_tensor(train_index.root_ids(), dtype=torch.long),
                               minlength=len(folders)).tolist()
        draws = folder_draws(folders, sizes)
        if sum(draws) > MAX_EPOCH_DRAWS:  # an epoch's order is held in memory: this many would not fit
            raise TrainingError(f"--dataset_config {config.dataset_config}: its repeats make an epoch of "
                                f"{sum(draws):,} draws, more than {MAX_EPOCH_DRAWS:,}; lower them")
        if is_main:
            print(f"[train] --dataset_config {config.dataset_config}: "
                  f"{describe_shares(folders, sizes, draws, config.caption_dropout)}", file=sys.stderr)
    order = EpochOrder(len(train_index), config.batch_size, config.seed, rank, world,
                       buckets=train_index.shape_ids if config.aspect_buckets else None,
                       groups=(train_index.root_ids() if folders else
                               _groups(train_index, config) if config.data_balance != "pooled" else None),
                       balance="weighted" if folders else config.data_balance, group_draws=draws)
    if is_main and config.aspect_buckets:
        _print_buckets(order, train_index, config.batch_size)
    if is_main and config.data_balance == "equal":
        sizes = [len(members) for members in order.group_members]
        print(f"[train] --data_balance equal: {len(index.roots)} folder(s) holding "
              f"{', '.join(map(str, sizes))} pairs; each gives {max(sizes)} draws to every epoch"
              f"{'' if len(sizes) == len(index.roots) else ' (folders without pairs give none)'}",
              file=sys.stderr)
    if config.data_balance == "round_robin":
        _describe_round_robin(order, config, is_main)
    if resumed is not None:  # the run's epochs keep their rows, on any number of processes
        order.set_rows_per_epoch(min(resumed.epoch_rows_for(order.whole_rows()), order.whole_rows()))
    rows = order.rows_per_epoch()
    if rows < world or rows == 0:
        raise TrainingError(_no_whole_batch(order, config, world))
    return RunData(train_index, validation_index, checks, order, rows,
                   config.max_optimizer_steps(rows, world), left_out, train_index.fingerprint(), folders)


def _no_whole_batch(order: EpochOrder, config: TrainConfig, world: int) -> str:
    """Why an epoch holds no batch for every process, in the terms the user set it by."""
    wanted = f"one batch of {config.batch_size}" + (f" for each of {world} processes" if world > 1 else "")
    draws = order.draws_per_epoch()
    if config.dataset_config and draws < config.batch_size * world:
        return (f"--dataset_config {config.dataset_config}: its folders give {draws} draws an epoch, fewer than "
                f"{wanted}; raise their repeats")
    if config.aspect_buckets:
        return (f"{draws} samples an epoch in {order.num_buckets} aspect buckets make fewer than {wanted} (a batch "
                "is one bucket's, and each bucket's remainder sits the epoch out)")
    return f"{draws} samples an epoch are fewer than {wanted}"


def trained_latent_shape(data: RunData, config: TrainConfig) -> tuple[int, ...] | None:
    """The latent shape samples are drawn at: the run's, or with --aspect_buckets the commonest bucket's."""
    if config.aspect_buckets:
        sizes = data.order.bucket_sizes
        return tuple(data.train_index.shapes[int(sizes.argmax())]) if len(sizes) else None
    return data.checks.latent_shape


def _find_pairs(config: TrainConfig, text_suffix: str | None, is_main: bool,
                wait_for_main: Callable[[], None] | None) -> tuple[PairIndex, dict[str, int], PairIndex | None]:
    """The run's pairs and --validation_dir's: from the data indexes (refreshed where folders changed)
    or, with --data_index off or image-only data (--force_txtcache: the index records pairs), by walking
    every folder. With ``wait_for_main`` the main process refreshes both before the others read them."""
    suffixes = (config.imgcache_suffix, text_suffix)
    root_sets = [config.train_data_dir] + ([config.validation_dir] if config.validation_dir else [])
    if config.data_index == "off" or text_suffix is None:
        found = [index_training_pairs(roots, *suffixes) for roots in root_sets]
    else:
        found = _indexed_pairs(config, root_sets, suffixes, is_main, wait_for_main)
    (index, unpaired), validation = found[0], (found[1][0] if len(found) > 1 else None)
    return index, unpaired, validation


def _indexed_pairs(config: TrainConfig, root_sets: list[list[str]], suffixes, is_main: bool,
                   wait_for_main: Callable[[], None] | None) -> list[tuple[PairIndex, dict[str, int]]]:
    report = _report_refresh if is_main else None

    def find(write: bool, report) -> list[tuple[PairIndex, dict[str, int]]]:
        results = [indexed_training_pairs(roots, *suffixes, write=write, index_dir=config.data_index_dir,
                                          report=report) for roots in root_sets]
        return [(result.index, result.unpaired) for result in results]

    if wait_for_main is None:
        return find(True, report)
    failure, found = None, None
    if is_main:
        try:
            found = find(True, report)
        except Exception as error:  # noqa: BLE001  (raised after the barrier, which the others wait at)
            failure = error
    wait_for_main()
    if failure is not None:
        raise failure
    if found is None:  # the others read what the main process wrote and check it; they never write
        found = find(False, _report_own_walk)
    return found


def _report_own_walk(root: str, done: Refresh) -> None:
    """A process other than the main one walks only what the main process's index could not tell it."""
    if done.scanned:
        print(f"[train] this process walked {len(done.scanned)} folders of {root} itself (the main process's "
              f"index of them was {'missing' if not done.had_index else 'not yet verified'})", file=sys.stderr)


def _report_refresh(root: str, done: Refresh) -> None:
    scanned = len(done.scanned)
    if done.ignored:
        what = f"stored index ignored ({done.ignored}); walked {scanned} folders"
    elif not done.had_index:
        what = f"no index yet; walked {scanned} folders"
    else:
        what = f"{done.folder_count} folders, {scanned} changed since indexed and walked again"
    if done.write_error:
        what += f"; could not write the index ({done.write_error}), so the next start walks them too"
    elif done.written_to:
        what += f"; index written to {done.written_to}"
    print(f"[train] data index of {root}: {what} ({done.seconds:.1f} s)", file=sys.stderr)


def _index_buckets(index: PairIndex, max_bad_fraction: float, is_main: bool) -> tuple[PairIndex, int]:
    """Every latent's shape: from the data index when it recorded them, else read from each header (a
    thread pool). The unreadable are named and left out."""
    started = time.perf_counter()
    if index.shape_ids is None:
        unreadable = record_latent_shapes(index, IMAGE_LATENT_KEY)
        how = f"read {len(index)} latent headers"
    else:
        unreadable = [(index[i][0], _unreadable_reason(index[i][0]))
                      for i in np.flatnonzero(np.frombuffer(index.shape_ids, np.uint16) == UNREADABLE_SHAPE).tolist()]
        how = f"took {len(index)} latent shapes from the data index"
    if is_main:
        for path, reason in unreadable:
            print(f"[train] left out {path}: {reason}", file=sys.stderr)
        print(f"[train] --aspect_buckets: {how} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    if len(unreadable) == len(index) or len(unreadable) > max_bad_fraction * len(index):
        raise TrainingError(f"{len(unreadable)} of {len(index)} latents could not be read (more than "
                            f"--max_bad_fraction {max_bad_fraction}), e.g. {examples(unreadable)}")
    if not unreadable:
        return index, 0
    return index.subset(i for i in range(len(index)) if index.shape_ids[i] != UNREADABLE_SHAPE), len(unreadable)


def _unreadable_reason(path: str) -> str:
    try:
        read_tensor_shape(path, IMAGE_LATENT_KEY)
    except (OSError, ValueError) as error:
        return str(error)
    return "its header was unreadable when the data index was written"


def _print_buckets(order: EpochOrder, index: PairIndex, batch_size: int) -> None:
    counts = order.bucket_sizes.tolist()
    described = []
    for number in sorted(range(len(counts)), key=lambda n: -counts[n]):
        shape, count = index.shapes[number], counts[number]
        if count:
            note = "" if count >= batch_size else " (fewer than a batch: not trained)"
            described.append(f"{'x'.join(str(d) for d in shape)}: {count}{note}")
    print(f"[train] {len(described)} aspect buckets (latent shape: pairs): " + ", ".join(described),
          file=sys.stderr)


def _groups(index: PairIndex, config: TrainConfig):
    """The group of each pair: its data root (equal), or the use of --train_data_dir that named its root
    (round_robin, as the original scripts' loaders)."""
    roots = index.root_ids()
    numbers = config.train_data_groups
    if config.data_balance != "round_robin" or len(numbers) != len(config.train_data_dir):
        return roots
    return [numbers[root] for root in roots]


def _describe_round_robin(order: EpochOrder, config: TrainConfig, is_main: bool) -> None:
    """Refuse a group without a whole batch (it would make the epoch empty); say what an epoch is."""
    numbers = config.train_data_groups if len(config.train_data_groups) == len(config.train_data_dir) \
        else list(range(len(config.train_data_dir)))
    names: dict[int, list[str]] = {}
    for root, number in zip(config.train_data_dir, numbers):
        names.setdefault(number, []).append(root)
    counts = order.group_of.bincount(minlength=len(names)).tolist()
    sizes = {" ".join(roots): counts[number] for number, roots in sorted(names.items())}
    short = [f"{group} ({count} pairs)" for group, count in sizes.items() if count < config.batch_size]
    if short:
        raise TrainingError(f"--data_balance round_robin: each --train_data_dir needs at least one batch of "
                            f"{config.batch_size} pairs; {', '.join(short)}")
    if is_main:
        rounds = order.rounds_per_epoch()
        print(f"[train] --data_balance round_robin: {len(sizes)} group(s) holding "
              f"{', '.join(map(str, sizes.values()))} pairs; an epoch is {rounds} batch(es) from each in turn "
              f"({rounds * len(sizes) * config.batch_size} samples)", file=sys.stderr)
