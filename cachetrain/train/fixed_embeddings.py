"""Text embeddings a run reads once at the start, not per pair: --force_txtcache's (every step's
conditioning) and each data root's empty prompt (what --caption_dropout swaps in); and the run's
NoisePlan that carries them to the loader's workers."""

from __future__ import annotations

import torch

from .bad_data import TrainingError
from .config import TrainConfig
from .data_folders import DataFolder
from .loader import NoisePlan
from .noise_variants import NoiseVariants
from .shard_data import ShardIndex, ShardStoreUnreachable
from ..sidecar import TEXT_EMBEDDING_KEY, SidecarError, empty_prompt_path, read_sidecar
from ..models.text_encoding import pad_text_embeddings


def forced_embedding(config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """--force_txtcache's embedding as a batch of one, padded by the pad rule as the collate pads."""
    if config.force_txtcache is None:
        return None
    try:
        embedding = read_sidecar(config.force_txtcache, TEXT_EMBEDDING_KEY, ndim=2)
    except (SidecarError, OSError) as error:
        raise TrainingError(f"--force_txtcache: {error}") from None
    return pad_text_embeddings([embedding], config.force_toklen)


def empty_prompt_embeddings(config: TrainConfig, needed: list[bool] | None = None,
                            shards: ShardIndex | None = None) -> list[torch.Tensor | None]:
    """The empty prompt's embedding of each data root, in --train_data_dir's order (--caption_dropout);
    None for a root ``needed`` says drops no caption. From a shard set: the files its manifest names."""
    embeddings = []
    for number, root in enumerate(config.train_data_dir if shards is None else shards.roots):
        if needed is not None and not needed[number]:
            embeddings.append(None)
            continue
        if shards is not None:
            embeddings.append(_shard_empty_prompt(shards, number))
            continue
        path = empty_prompt_path(root, config.txtcache_suffix)
        if not path.exists():
            raise TrainingError(f"--caption_dropout needs the empty prompt's embedding {path}; "
                                "run the text cache script on that data root again to write it")
        embeddings.append(read_sidecar(path, TEXT_EMBEDDING_KEY, ndim=2))
    return embeddings


def _shard_empty_prompt(shards: ShardIndex, number: int) -> torch.Tensor:
    """Data root ``number``'s empty-prompt embedding, as cachetrain-pack put it in the shard set."""
    location, root = shards.store.location, shards.roots[number]
    name = shards.empty_prompts[number] if number < len(shards.empty_prompts) else None
    if name is None:
        raise TrainingError(f"--caption_dropout needs the empty prompt's embedding of data root {root}; the shard "
                            f"set {location} holds none: run the text cache script on that root (it writes it), "
                            "then cachetrain-pack again")
    try:
        return read_sidecar(shards.store.fetch(name), TEXT_EMBEDDING_KEY, ndim=2)
    except FileNotFoundError:
        raise TrainingError(f"--caption_dropout: the shard set {location} names {name} as the empty prompt of data "
                            f"root {root}, but it is not there; run cachetrain-pack again") from None
    except (SidecarError, OSError, ShardStoreUnreachable) as error:
        raise TrainingError(f"--caption_dropout: {location}/{name}: {error}") from None


def noise_plan(config: TrainConfig, folders: list[DataFolder] | None, shards: ShardIndex | None = None) -> NoisePlan:
    """What the workers draw per sample: noise (and its variants), timestep, caption dropout (per folder
    with --dataset_config, whose loss weights ride along). ``shards``: the run reads a shard set, which
    holds the empty prompts."""
    dropouts = None if folders is None else [config.caption_dropout if folder.caption_dropout is None
                                             else folder.caption_dropout for folder in folders]
    loss_weights = None if folders is None or all(f.loss_weight == 1.0 for f in folders) else [
        folder.loss_weight for folder in folders]
    any_dropout = any(dropouts) if dropouts is not None else bool(config.caption_dropout)
    variants = NoiseVariants(config.multires_noise_iterations, config.multires_noise_discount, config.ip_noise_gamma)
    return NoisePlan(seed=config.seed, noise_offset=config.noise_offset, caption_dropout=config.caption_dropout,
                     empty_embeddings=empty_prompt_embeddings(config, dropouts and [d > 0 for d in dropouts], shards)
                     if any_dropout else [],
                     caption_dropouts=dropouts, loss_weights=loss_weights, variants=variants,
                     flip_p=config.flip_p, masked_loss=config.masked_loss)
