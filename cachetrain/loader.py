"""Sidecar pairs -> batches: the Dataset, the resumable epoch order, and the DataLoader.

The order of an epoch depends only on (seed, epoch), and each process takes a disjoint, equal
share of it; so a resumed run rebuilds the exact order and starts at the batch it stopped at.
Each sample's noise, timestep and caption dropout are drawn in the worker from (seed, epoch,
sample) alone (objective.sample_key), so they too survive a resume, and do not change with batch
size, gradient accumulation or the number of processes.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset

from .objective import draw_sample_noise, evenly_spread_draws, sample_key
from .sidecar import IMAGE_LATENT_KEY, TEXT_EMBEDDING_KEY, SidecarError, read_sidecar
from .text_encoding import pad_text_embeddings
from .tree import PairIndex


@dataclass
class NoisePlan:
    """How the worker draws each sample's noise and timestep draw (a uniform the objective maps), and drops captions."""

    seed: int
    noise_offset: float = 0.0
    caption_dropout: float = 0.0
    empty_embeddings: list[torch.Tensor] = field(default_factory=list)  # one per data root
    fixed_timesteps: bool = False  # validation: timesteps evenly spread over the samples, not random


class CachedPairDataset(Dataset):
    """Reads one (latent, embedding) pair per item and draws its noise; a bad pair yields its reason.

    Items are addressed as (epoch, sample): the epoch keys the noise draws. A bare sample number
    uses ``self.epoch``.
    """

    def __init__(self, index: PairIndex, plan: NoisePlan | None = None, epoch: int = 0):
        self.index = index
        self.plan = plan
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        latent_path, text_path = self.index[i]
        try:
            latent = read_sidecar(latent_path, IMAGE_LATENT_KEY, ndim=3)
            emb = read_sidecar(text_path, TEXT_EMBEDDING_KEY, ndim=2)
        except (SidecarError, OSError) as error:
            return None, None, None, None, i, str(error)
        if self.plan is None:
            return latent, emb, None, None, i, ""
        plan = self.plan
        noise, timestep, uniform = draw_sample_noise(tuple(latent.shape), plan.noise_offset,
                                                     sample_key(plan.seed, epoch, i))
        if plan.fixed_timesteps:
            timestep = evenly_spread_draws(i, len(self.index))
        if plan.caption_dropout and uniform < plan.caption_dropout:
            emb = plan.empty_embeddings[self.index.root_id(i)].to(emb.dtype)
        return latent, emb, noise, timestep, i, ""


@dataclass
class Batch:
    latents: torch.Tensor  # [B, C, h, w], as stored (often fp16)
    embeddings: torch.Tensor  # [B, T, D]
    noise: torch.Tensor | None  # [B, C, h, w] float32
    timesteps: torch.Tensor | None  # [B] float32 timestep draws in [0, 1): the objective maps them
    skipped: int  # unreadable pairs dropped from this batch
    attention_mask: torch.Tensor | None = None  # [B, T], 1 = real token; None when nothing is padded
    sample_ids: list[int] = field(default_factory=list)  # positions in the index, one per row

    def pin_memory(self) -> Batch:
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Batch(pin(self.latents), pin(self.embeddings), pin(self.noise), pin(self.timesteps), self.skipped,
                     pin(self.attention_mask), self.sample_ids)


def collate_pairs(items, token_length: int | None = None) -> Batch | None:
    """Stack a batch. Text embeddings of different lengths (T5 sidecars keep only their real tokens)
    are padded by the shared pad rule; ``token_length`` pads or truncates all of them to that length."""
    good = [item for item in items if item[0] is not None]
    for *_, reason in items:
        if reason:
            print(f"[loader] skipped sample: {reason}", file=sys.stderr)
    if not good:
        return None
    latents = [item[0] for item in good]
    embeddings = [item[1] for item in good]
    for shapes, what in (({tuple(t.shape) for t in latents}, "latent shapes"),
                         ({t.shape[-1] for t in embeddings}, "text embedding widths")):
        if len(shapes) > 1:
            raise SidecarError("batch", f"{what} differ within a batch: {sorted(shapes)}; "
                                        "caches of one run must share resolution and text encoder")
    context, mask = pad_text_embeddings(embeddings, token_length)
    has_noise = good[0][2] is not None
    return Batch(torch.stack(latents), context,
                 torch.stack([item[2] for item in good]) if has_noise else None,
                 torch.stack([item[3] for item in good]) if has_noise else None,
                 skipped=len(items) - len(good), attention_mask=mask, sample_ids=[item[4] for item in good])


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1) -> list[list[int]]:
    """This process's batches of one epoch: a seeded shuffle, split evenly across processes.

    Incomplete trailing batches are dropped so every optimizer step sees full, equal batches and
    every process takes the same number of steps.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_samples, generator=generator)
    per_process = num_samples // world_size
    mine = order[rank * per_process : (rank + 1) * per_process].tolist()
    usable = len(mine) - len(mine) % batch_size
    return [mine[i : i + batch_size] for i in range(0, usable, batch_size)]


class RunBatches:
    """This process's batches from a given (epoch, batch) on, epoch after epoch, as (epoch, sample) keys.

    One sampler for the whole run keeps the DataLoader's workers alive across epochs.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int, world_size: int,
                 start_epoch: int = 0, start_batch: int = 0, epochs: int | None = None):
        self.args = (num_samples, batch_size, seed)
        self.rank, self.world_size = rank, world_size
        self.start_epoch, self.start_batch, self.epochs = start_epoch, start_batch, epochs

    def __iter__(self):
        epoch, skip = self.start_epoch, self.start_batch
        while self.epochs is None or epoch < self.start_epoch + self.epochs:
            num_samples, batch_size, seed = self.args
            for batch in epoch_batches(num_samples, batch_size, seed, epoch, self.rank, self.world_size)[skip:]:
                yield [(epoch, i) for i in batch]
            epoch, skip = epoch + 1, 0


def make_loader(dataset: Dataset, batches, num_workers: int, pin_memory: bool,
                token_length: int | None = None) -> DataLoader:
    collate = functools.partial(collate_pairs, token_length=token_length) if token_length else collate_pairs
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers,
                      pin_memory=pin_memory, prefetch_factor=4 if num_workers > 0 else None,
                      persistent_workers=False, generator=torch.Generator())
