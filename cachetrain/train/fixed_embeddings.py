"""Text embeddings a run reads once at the start, not per pair: --force_txtcache's (every step's
conditioning) and each data root's empty prompt (what --caption_dropout swaps in)."""

from __future__ import annotations

import torch

from .bad_data import TrainingError
from .config import TrainConfig
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


def empty_prompt_embeddings(config: TrainConfig) -> list[torch.Tensor]:
    """The empty prompt's embedding of each data root, in --train_data_dir's order (--caption_dropout)."""
    embeddings = []
    for root in config.train_data_dir:
        path = empty_prompt_path(root, config.txtcache_suffix)
        if not path.exists():
            raise TrainingError(f"--caption_dropout needs the empty prompt's embedding {path}; "
                                "run the text cache script on that data root again to write it")
        embeddings.append(read_sidecar(path, TEXT_EMBEDDING_KEY, ndim=2))
    return embeddings
