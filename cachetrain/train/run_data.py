"""The data of a run: its pairs indexed (and bucketed by latent shape), the shapes every pair must
have, the held-out pairs, and the order the processes read them in - all decided before the model loads."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

from .bad_data import TrainingError, examples, reference_shapes
from .config import TrainConfig
from .data_folders import DataFolder, describe_shares, folder_draws, read_dataset_file
from .loader import EpochOrder, PairChecks
from ..sidecar import IMAGE_LATENT_KEY
from ..tree import UNREADABLE_SHAPE, PairIndex, index_training_pairs, record_latent_shapes
from .validation import held_out_pairs


@dataclass
class RunData:
    train_index: PairIndex
    validation_index: PairIndex | None
    checks: PairChecks  # what every pair of the run must be
    order: EpochOrder
    batches_per_epoch: int  # per process
    total_steps: int  # optimizer steps of the whole run
    left_out_at_start: int  # latents whose headers could not be read (--aspect_buckets)
    pairs_fingerprint: str  # the training pairs' names, in order (a resume must read the same)
    folders: list[DataFolder] | None = None  # --dataset_config's folders, in --train_data_dir's order


def load_run_data(config: TrainConfig, rank: int, world: int, is_main: bool) -> RunData:
    index, unpaired = index_training_pairs(config.train_data_dir, config.imgcache_suffix, config.txtcache_suffix)
    if len(index) == 0:
        raise TrainingError(f"no sample has both a {config.imgcache_suffix} and a {config.txtcache_suffix} "
                            f"sidecar under {config.train_data_dir}; run the cache scripts first")
    if is_main and (unpaired["image_only"] or unpaired["text_only"]):
        print(f"[train] left out {unpaired['image_only']} latents without text and "
              f"{unpaired['text_only']} texts without latents", file=sys.stderr)
    left_out = 0
    if config.aspect_buckets:
        index, left_out = _index_buckets(index, config.max_bad_fraction, is_main)
    checks = reference_shapes(index, with_latent=not config.aspect_buckets)
    train_index, validation_index = held_out_pairs(config, index)
    folders, draws = None, None
    if config.dataset_config:
        folders = read_dataset_file(config.dataset_config)
        sizes = torch.bincount(torch.as_tensor(train_index.root_ids(), dtype=torch.long),
                               minlength=len(folders)).tolist()
        draws = folder_draws(folders, sizes)
        if is_main:
            print(f"[train] --dataset_config {config.dataset_config}: "
                  f"{describe_shares(folders, sizes, draws, config.caption_dropout)}", file=sys.stderr)
    order = EpochOrder(len(train_index), config.batch_size, config.seed, rank, world,
                       buckets=train_index.shape_ids if config.aspect_buckets else None,
                       groups=train_index.root_ids() if config.data_balance == "equal" or folders else None,
                       balance="weighted" if folders else config.data_balance, group_draws=draws)
    if is_main and config.aspect_buckets:
        _print_buckets(order, train_index, config.batch_size)
    if is_main and config.data_balance == "equal":
        sizes = [len(members) for members in order.group_members]
        print(f"[train] --data_balance equal: {len(config.train_data_dir)} folder(s) holding "
              f"{', '.join(map(str, sizes))} pairs; each gives {max(sizes)} draws to every epoch"
              f"{'' if len(sizes) == len(config.train_data_dir) else ' (folders without pairs give none)'}",
              file=sys.stderr)
    batches_per_epoch = order.batches_per_epoch()
    if batches_per_epoch == 0:
        raise TrainingError(f"{len(train_index)} samples are fewer than one batch of "
                            f"{config.batch_size} per process")
    return RunData(train_index, validation_index, checks, order, batches_per_epoch,
                   config.max_optimizer_steps(batches_per_epoch), left_out, train_index.fingerprint(), folders)


def _index_buckets(index: PairIndex, max_bad_fraction: float, is_main: bool) -> tuple[PairIndex, int]:
    """Record every latent's shape from its header (a thread pool); the unreadable are named and left out."""
    started = time.perf_counter()
    unreadable = record_latent_shapes(index, IMAGE_LATENT_KEY)
    if is_main:
        for path, reason in unreadable:
            print(f"[train] left out {path}: {reason}", file=sys.stderr)
        print(f"[train] --aspect_buckets: read {len(index)} latent headers in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    if len(unreadable) == len(index) or len(unreadable) > max_bad_fraction * len(index):
        raise TrainingError(f"{len(unreadable)} of {len(index)} latents could not be read (more than "
                            f"--max_bad_fraction {max_bad_fraction}), e.g. {examples(unreadable)}")
    if not unreadable:
        return index, 0
    return index.subset(i for i in range(len(index)) if index.shape_ids[i] != UNREADABLE_SHAPE), len(unreadable)


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
