"""Sidecar pairs -> batches: the Dataset, the batch reader and the DataLoader.

Which samples each batch holds is the run's epoch order (epoch_order.py), a function of (seed, epoch)
and the data, so a resumed run rebuilds it and starts at the row it stopped at.
Bad pairs (unreadable, another shape or width, NaN/Inf) are found in the worker, passed over and
replaced by a seeded draw from the rest, so they cost nothing but themselves and a resume meets the
same batches.
Each sample's noise, timestep and caption dropout are drawn in the worker from (seed, epoch,
sample) alone (objective.sample_key), so they too survive a resume, and do not change with batch
size, gradient accumulation or the number of processes. So are its caption variant (a text sidecar
may hold several) and whether it trains mirrored (--flip_p), from a draw of their own
(``data_draws``): runs without variants or flips see the noise they always saw.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset

from .noise_variants import NoiseVariants, draw_noise_variants
from .epoch_order import EpochOrder, RunBatches, draw_generator
from .objective import draw_sample_noise, evenly_spread_draws, sample_key
from ..sidecar import (FLIPPED_LATENT_KEY, IMAGE_LATENT_KEY, MASK_KEY, SidecarError, read_sidecar_tensors,
                       read_text_variants)
from ..models.text_encoding import pad_text_embeddings
from ..tree import PairIndex


@dataclass
class NoisePlan:
    """How the worker draws each sample's noise and timestep draw (a uniform the objective maps), and drops captions."""

    seed: int
    noise_offset: float = 0.0
    caption_dropout: float = 0.0
    empty_embeddings: list[torch.Tensor] = field(default_factory=list)  # one per data root
    fixed_timesteps: bool = False  # validation: timesteps evenly spread over the samples, not random
    caption_dropouts: list[float] | None = None  # one per data root (--dataset_config), instead of caption_dropout
    loss_weights: list[float] | None = None  # one per data root (--dataset_config): each sample's loss weight
    variants: NoiseVariants = field(default_factory=NoiseVariants)  # pyramid noise, input perturbation
    flip_p: float = 0.0  # probability of taking the mirrored latent, where the sidecar holds one
    masked_loss: bool = False  # read each latent's mask (ones where it has none)


def data_draws(seed: int, epoch: int, draw: int) -> tuple[float, float]:
    """(caption variant draw, flip draw), uniforms in [0, 1) for one sample: a function of (seed, epoch, draw)."""
    variant, flip = torch.rand(2, generator=draw_generator(seed, epoch, "data", draw)).tolist()
    return variant, flip


@dataclass(frozen=True)
class PairChecks:
    """What every pair of a run must be, checked in the worker before it reaches the GPU.

    ``latent_shape`` None means "the shape the index recorded for that sample" (aspect buckets)."""

    latent_shape: tuple[int, ...] | None = None
    text_width: int | None = None


NO_TEXT = torch.zeros(1, 1)


class CachedPairDataset(Dataset):
    """Reads one (latent, embedding) pair per item and draws its noise; a bad pair yields its reason.

    Items are addressed as (epoch, sample): the epoch keys the noise draws. A bare sample number
    uses ``self.epoch``. With ``checks``, a latent of another shape, an embedding of another width
    and NaN/Inf values are bad pairs too, like unreadable files.
    """

    def __init__(self, index: PairIndex, plan: NoisePlan | None = None, epoch: int = 0,
                 checks: PairChecks | None = None):
        self.index = index
        self.plan = plan
        self.epoch = epoch
        self.checks = checks

    def __len__(self) -> int:
        return len(self.index)

    def read(self, i: int) -> tuple | tuple[str, str]:
        """(latent, caption variants, mirrored latent or None, mask or None) of sample i, or (path, reason)
        when the pair cannot be trained on. The mirrored latent and the mask are read only when the plan
        uses them."""
        plan = self.plan
        flipped = mask = None
        if isinstance(self.index, PairIndex):
            latent_path, text_path = self.index[i]
            wanted = [IMAGE_LATENT_KEY]
            wanted += [FLIPPED_LATENT_KEY] if plan is not None and plan.flip_p > 0 else []
            wanted += [MASK_KEY] if plan is not None and plan.masked_loss else []
            try:
                image = read_sidecar_tensors(latent_path, wanted)
                if IMAGE_LATENT_KEY not in image:
                    raise SidecarError(latent_path, f"has no tensor {IMAGE_LATENT_KEY!r}")
                # image-only data (--force_txtcache): a stand-in the step replaces by the forced embedding
                embeddings = [NO_TEXT] if text_path is None else read_text_variants(text_path)
            except SidecarError as error:
                return error.path, error.reason
            except OSError as error:
                return str(error.filename or latent_path), error.strerror or str(error)
            latent, flipped, mask = image[IMAGE_LATENT_KEY], image.get(FLIPPED_LATENT_KEY), image.get(MASK_KEY)
        else:  # a shard set (shard_data.ShardIndex): the pair is one row, with no mirrored latent or mask
            pair = self.index.read_pair(i)
            if isinstance(pair[0], str):
                return pair
            latent, embeddings = pair[0], [pair[1]]
            latent_path = text_path = self.index.where(i)
        if latent.ndim != 3:
            return latent_path, f"tensor {IMAGE_LATENT_KEY!r} has shape {tuple(latent.shape)}, expected 3 dims"
        if flipped is not None and flipped.shape != latent.shape:
            return latent_path, f"mirrored latent of shape {list(flipped.shape)}, its latent's is {list(latent.shape)}"
        if mask is not None and tuple(mask.shape) != (1, *latent.shape[1:]):
            return latent_path, f"mask of shape {list(mask.shape)}, its latent's cells are {list(latent.shape[1:])}"
        if plan is not None and plan.masked_loss and mask is None:  # no mask: every cell weighs fully
            mask = torch.ones((1, *latent.shape[1:]), dtype=latent.dtype)
        checks = self.checks
        if checks is None:
            return latent, embeddings, flipped, mask
        expected = checks.latent_shape or self.index.latent_shape(i)
        if expected is not None and tuple(latent.shape) != expected:
            whose = "the run's" if checks.latent_shape else "its bucket's (read at start)"
            return latent_path, f"latent of shape {list(latent.shape)}, {whose} is {list(expected)}"
        widths = {emb.shape[-1] for emb in embeddings}
        if checks.text_width is not None and widths != {checks.text_width}:
            return text_path, f"text embedding {max(widths - {checks.text_width})} wide, the run's are {checks.text_width}"
        if not all(bool(torch.isfinite(t).all()) for t in (latent, flipped, mask) if t is not None):
            return latent_path, "latent holds NaN/Inf values"
        if not all(bool(torch.isfinite(emb).all()) for emb in embeddings):
            return text_path, "text embedding holds NaN/Inf values"
        return latent, embeddings, flipped, mask

    def with_noise(self, latent: torch.Tensor, embeddings: list[torch.Tensor], flipped: torch.Tensor | None,
                   mask: torch.Tensor | None, epoch: int, i: int, draw: int | None = None):
        """The item tuple of sample i: (latent, embedding, noise, timestep draw, i, input perturbation, mask,
        problem); ``draw`` keys its draws when the sample recurs within an epoch."""
        if self.plan is None:
            return latent, embeddings[0], None, None, i, None, mask, ""
        plan = self.plan
        draw_number = i if draw is None else draw
        key = sample_key(plan.seed, epoch, draw_number)
        noise, timestep, uniform = draw_sample_noise(tuple(latent.shape), plan.noise_offset, key)
        perturbation = None
        if plan.variants.active:
            noise, perturbation = draw_noise_variants(noise, key, plan.variants)
        if plan.fixed_timesteps:
            timestep = evenly_spread_draws(i, len(self.index))
        emb = embeddings[0]
        if len(embeddings) > 1 or (flipped is not None and plan.flip_p > 0):
            variant_draw, flip_draw = data_draws(plan.seed, epoch, draw_number)
            emb = embeddings[min(int(variant_draw * len(embeddings)), len(embeddings) - 1)]
            if flipped is not None and flip_draw < plan.flip_p:
                latent, mask = flipped, None if mask is None else mask.flip(-1)
        dropout = plan.caption_dropouts[self.index.root_id(i)] if plan.caption_dropouts else plan.caption_dropout
        if dropout and uniform < dropout:
            emb = plan.empty_embeddings[self.index.root_id(i)].to(emb.dtype)
        return latent, emb, noise, timestep, i, perturbation, mask, ""

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        pair = self.read(i)
        if isinstance(pair[0], str):
            return None, None, None, None, i, None, None, f"{pair[0]}: {pair[1]}"
        return self.with_noise(*pair, epoch, i)


@dataclass
class Batch:
    latents: torch.Tensor | None  # [B, C, h, w], as stored (often fp16); None when no pair could be read
    embeddings: torch.Tensor | None  # [B, T, D]
    noise: torch.Tensor | None  # [B, C, h, w] float32
    timesteps: torch.Tensor | None  # [B] float32 timestep draws in [0, 1): the objective maps them
    skipped: int  # bad pairs passed over while filling this batch
    attention_mask: torch.Tensor | None = None  # [B, T], 1 = real token; None when nothing is padded
    sample_ids: list[int] = field(default_factory=list)  # positions in the index, one per row
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of each pair passed over
    tried: int = 0  # pairs read to fill it (good and bad)
    perturbation: torch.Tensor | None = None  # [B, C, h, w] --ip_noise_gamma's g * e, added to the input's noise
    loss_weights: torch.Tensor | None = None  # [B] each sample's folder loss weight (--dataset_config)
    masks: torch.Tensor | None = None  # [B, 1, h, w] loss masks (--masked_loss), mirrored with their latent

    def pin_memory(self) -> Batch:
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Batch(pin(self.latents), pin(self.embeddings), pin(self.noise), pin(self.timesteps), self.skipped,
                     pin(self.attention_mask), self.sample_ids, self.bad, self.tried, pin(self.perturbation),
                     pin(self.loss_weights), pin(self.masks))


def _stack(good: list, token_length: int | None, skipped: int) -> Batch:
    latents = [item[0] for item in good]
    embeddings = [item[1] for item in good]
    for shapes, what in (({tuple(t.shape) for t in latents}, "latent shapes"),
                         ({t.shape[-1] for t in embeddings}, "text embedding widths")):
        if len(shapes) > 1:
            raise SidecarError("batch", f"{what} differ within a batch: {sorted(shapes)}; "
                                        "caches of one run must share resolution and text encoder")
    context, mask = pad_text_embeddings(embeddings, token_length)
    has_noise = good[0][2] is not None
    has_masks = good[0][6] is not None  # all or none: the plan decides
    return Batch(torch.stack(latents), context,
                 torch.stack([item[2] for item in good]) if has_noise else None,
                 torch.stack([item[3] for item in good]) if has_noise else None,
                 skipped=skipped, attention_mask=mask, sample_ids=[item[4] for item in good],
                 perturbation=torch.stack([item[5] for item in good]) if good[0][5] is not None else None,
                 masks=torch.stack([item[6].float() for item in good]) if has_masks else None)


def collate_pairs(items, token_length: int | None = None) -> Batch | None:
    """Stack a batch. Text embeddings of different lengths (T5 sidecars keep only their real tokens)
    are padded by the shared pad rule; ``token_length`` pads or truncates all of them to that length."""
    good = [item for item in items if item[0] is not None]
    for *_, reason in items:
        if reason:
            print(f"[loader] skipped sample: {reason}", file=sys.stderr)
    if not good:
        return None
    return _stack(good, token_length, len(items) - len(good))


class RefillingBatchReader(Dataset):
    """Reads one whole batch per key; a bad pair is passed over and its place filled from the rest.

    A replacement is drawn at random from the batch's bucket, seeded by (seed, epoch, batch number),
    so what a batch holds is a function of its key and the data: the same on a resumed run. It may
    be a sample the epoch also draws elsewhere; it gets noise of its own. After ``refill_draws``
    draws the batch is trained smaller; when no pair at all could be read, the batch comes back
    empty (latents None) with what went wrong.
    """

    def __init__(self, pairs: CachedPairDataset, order: EpochOrder, token_length: int | None = None):
        self.pairs, self.order, self.token_length = pairs, order, token_length
        self.refill_draws = 2 * order.batch_size + 16
        self._members: dict[int, torch.Tensor] = {}  # bucket -> samples, built on first use per worker
        self._bad: dict[int, tuple[str, str]] = {}  # known bad samples of this worker: not read again

    def __len__(self) -> int:
        return len(self.pairs)

    def _read(self, i: int):
        if i in self._bad:
            return self._bad[i]
        pair = self.pairs.read(i)
        if isinstance(pair[0], str):
            self._bad[i] = pair
        return pair

    def __getitem__(self, key) -> Batch:
        epoch, number, bucket, samples, draws = key
        good, bad, tried = [], [], 0
        for i, draw in zip(samples, draws):
            tried += 1
            pair = self._read(i)
            if isinstance(pair[0], str):
                bad.append(pair)
            else:
                good.append(self.pairs.with_noise(*pair, epoch, i, draw))
        if bad:
            in_batch = set(samples)
            members = self._members.get(bucket)
            if members is None:
                members = self._members[bucket] = self.order.bucket_members(bucket)
            generator = draw_generator(self.order.seed, epoch, "refill", number)
            picks = torch.randint(len(members), (self.refill_draws,), generator=generator).tolist()
            for k, pick in enumerate(picks):
                if len(good) == len(samples):
                    break
                i = int(members[pick])
                if i in in_batch:
                    continue
                in_batch.add(i)
                tried += 1
                pair = self._read(i)
                if isinstance(pair[0], str):
                    bad.append(pair)
                else:  # a draw key no first or repeated draw of the epoch uses
                    good.append(self.pairs.with_noise(*pair, epoch, i, -1 - number * self.refill_draws - k))
        if not good:
            return Batch(None, None, None, None, skipped=len(bad), bad=bad, tried=tried)
        batch = _stack(good, self.token_length, len(bad))
        batch.bad, batch.tried = bad, tried
        plan = self.pairs.plan
        if plan is not None and plan.loss_weights:
            index = self.pairs.index
            batch.loss_weights = torch.tensor([plan.loss_weights[index.root_id(i)] for i in batch.sample_ids])
        return batch


def _as_is(batch):
    return batch


def make_training_loader(reader: RefillingBatchReader, batches: RunBatches, num_workers: int,
                         pin_memory: bool) -> DataLoader:
    return DataLoader(reader, sampler=batches, batch_size=None, collate_fn=_as_is, num_workers=num_workers,
                      pin_memory=pin_memory, prefetch_factor=4 if num_workers > 0 else None,
                      persistent_workers=False, generator=torch.Generator())


def make_loader(dataset: Dataset, batches, num_workers: int, pin_memory: bool,
                token_length: int | None = None) -> DataLoader:
    collate = functools.partial(collate_pairs, token_length=token_length) if token_length else collate_pairs
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers,
                      pin_memory=pin_memory, prefetch_factor=4 if num_workers > 0 else None,
                      persistent_workers=False, generator=torch.Generator())
