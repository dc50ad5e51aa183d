"""Validation: the held-out pairs (--validation_split of the training pairs, or --validation_dir) and
val/loss, their mean raw MSE at noise and timesteps fixed for the whole run, so that two evaluations
differ only by the weights."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .bad_data import TrainingError
from .config import TrainConfig
from .loader import CachedPairDataset, NoisePlan, PairChecks, make_loader
from ..sidecar import IMAGE_LATENT_KEY
from ..tree import UNREADABLE_SHAPE, PairIndex, index_training_pairs, record_latent_shapes

VALIDATION_EPOCH = -1  # the noise key of held-out pairs: the same draws at every evaluation


def split_validation(index: PairIndex, fraction: float, seed: int) -> tuple[PairIndex, PairIndex | None]:
    """Hold out a seeded, fixed fraction of the pairs (the same pairs on every run with this seed)."""
    if not fraction:
        return index, None
    order = torch.randperm(len(index), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    held_out = max(1, round(fraction * len(index)))
    return index.subset(sorted(order[held_out:])), index.subset(sorted(order[:held_out]))


def held_out_pairs(config: TrainConfig, index: PairIndex, validation_dir_index: PairIndex | None = None
                   ) -> tuple[PairIndex, PairIndex | None]:
    """(pairs to train on, held-out pairs or None) as --validation_split or --validation_dir say.
    ``validation_dir_index``: --validation_dir's pairs as already found (from its data index); walked
    here when not given."""
    train_index, validation_index = split_validation(index, config.validation_split, config.seed)
    if config.validation_dir:
        validation_index = validation_dir_index
        if validation_index is None:
            validation_index, _ = index_training_pairs(config.validation_dir, config.imgcache_suffix,
                                                       None if config.force_txtcache else
                                                       config.txtcache_suffix)
        if len(validation_index) == 0:
            raise TrainingError(f"--validation_dir {config.validation_dir}: no sample has both sidecars there")
        if config.aspect_buckets and validation_index.shape_ids is None:
            record_latent_shapes(validation_index, IMAGE_LATENT_KEY)  # unreadable ones: named at val/loss
    return train_index, validation_index


def validation_loss(index: PairIndex, plan: NoisePlan, checks: PairChecks, config: TrainConfig,
                    held_out_errors: Callable[[object], torch.Tensor], device: torch.device) -> float:
    """val/loss: the mean of ``held_out_errors`` (per-sample raw MSE) over the held-out pairs, with the
    noise of VALIDATION_EPOCH and fixed timesteps, without caption dropout; one read back."""
    dataset = CachedPairDataset(index, dataclasses.replace(plan, fixed_timesteps=True, caption_dropout=0.0,
                                                              caption_dropouts=None, loss_weights=None, flip_p=0.0),
                                epoch=VALIDATION_EPOCH,
                                checks=dataclasses.replace(checks, latent_shape=None) if config.aspect_buckets
                                else checks)
    shape_ids = index.shape_ids
    by_shape: dict[int, list[int]] = {}  # each batch one shape (one group without buckets)
    for i in range(len(dataset)):
        if shape_ids is None or shape_ids[i] != UNREADABLE_SHAPE:
            by_shape.setdefault(0 if shape_ids is None else shape_ids[i], []).append(i)
    batches = [order[i:i + config.batch_size] for _, order in sorted(by_shape.items())
               for i in range(0, len(order), config.batch_size)]
    total, count = torch.zeros((), device=device), 0
    for batch in make_loader(dataset, batches, 0, pin_memory=False, token_length=config.force_toklen):
        if batch is not None:
            errors = held_out_errors(batch)
            total += errors.sum()
            count += errors.numel()
    if count == 0:
        raise TrainingError("no held-out pair could be read for val/loss (see the files listed above)")
    return (total / count).item()
