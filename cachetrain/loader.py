"""Sidecar pairs -> batches: the Dataset, the resumable epoch order, and the DataLoader.

The order of an epoch depends only on (seed, epoch), and each process takes a disjoint, equal
share of it; so a resumed run can rebuild the exact order and start at the batch it stopped at.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from .sidecar import IMAGE_LATENT_KEY, TEXT_EMBEDDING_KEY, SidecarError, read_sidecar
from .text_encoding import pad_text_embeddings
from .tree import PairIndex


class CachedPairDataset(Dataset):
    """Reads one (latent, embedding) pair per item; a bad pair yields its reason instead of raising."""

    def __init__(self, index: PairIndex):
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        latent_path, text_path = self.index[i]
        try:
            latent = read_sidecar(latent_path, IMAGE_LATENT_KEY, ndim=3)
            emb = read_sidecar(text_path, TEXT_EMBEDDING_KEY, ndim=2)
        except (SidecarError, OSError) as error:
            return None, None, str(error)
        return latent, emb, ""


@dataclass
class Batch:
    latents: torch.Tensor  # [B, C, h, w], as stored (often fp16)
    embeddings: torch.Tensor  # [B, T, D]
    skipped: int  # unreadable pairs dropped from this batch
    attention_mask: torch.Tensor | None = None  # [B, T], 1 = real token; None when nothing is padded

    def pin_memory(self) -> Batch:
        mask = self.attention_mask.pin_memory() if self.attention_mask is not None else None
        return Batch(self.latents.pin_memory(), self.embeddings.pin_memory(), self.skipped, mask)


def collate_pairs(items, token_length: int | None = None) -> Batch | None:
    """Stack a batch; text embeddings of different lengths (T5 sidecars keep only their real tokens)
    are padded by the shared pad rule, and ``token_length`` pads or truncates all of them to that length."""
    good = [(latent, emb) for latent, emb, _ in items if latent is not None]
    for _, _, reason in items:
        if reason:
            print(f"[loader] skipped sample: {reason}", file=sys.stderr)
    if not good:
        return None
    latents = [latent for latent, _ in good]
    embeddings = [emb for _, emb in good]
    for shapes, what in (({tuple(t.shape) for t in latents}, "latent shapes"),
                         ({t.shape[-1] for t in embeddings}, "text embedding widths")):
        if len(shapes) > 1:
            raise SidecarError("batch", f"{what} differ within a batch: {sorted(shapes)}; "
                                        "caches of one run must share resolution and text encoder")
    context, mask = pad_text_embeddings(embeddings, token_length)
    return Batch(torch.stack(latents), context, skipped=len(items) - len(good), attention_mask=mask)


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


def make_loader(dataset: Dataset, batches: list[list[int]], num_workers: int, pin_memory: bool,
                token_length: int | None = None) -> DataLoader:
    collate = functools.partial(collate_pairs, token_length=token_length) if token_length else collate_pairs
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers,
                      pin_memory=pin_memory, prefetch_factor=4 if num_workers > 0 else None,
                      persistent_workers=False)
