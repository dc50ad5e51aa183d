"""The loader: each process's share of an epoch's batches, and caption dropout (which captions the worker
swaps for the data root's empty prompt, and what a run needs for it).
"""

from __future__ import annotations

import torch

from cachetrain.train.config import parse_train_args
from cachetrain.train.trainer import main, train
from tests.conftest import CACHED_LATENT_SHAPE
from tests.training_support import record_unet_text_inputs
from tests.training_support import train_args as _args


def test_each_process_takes_a_disjoint_equal_share_of_every_epoch():
    from cachetrain.train.epoch_order import epoch_batches

    shares = [epoch_batches(50, 4, seed=1, epoch=3, rank=r, world_size=2) for r in range(2)]
    flat = [sorted(i for batch in share for i in batch) for share in shares]
    assert len(shares[0]) == len(shares[1]) == 6  # 25 per process -> 6 full batches of 4
    assert not set(flat[0]) & set(flat[1])
    assert epoch_batches(50, 4, 1, 3, 0, 2) == shares[0]  # same seed and epoch -> same order
    assert epoch_batches(50, 4, 1, 4, 0, 2) != shares[0]


def test_caption_dropout_swaps_in_the_data_roots_empty_prompt(cached_dataset):
    from cachetrain.train.loader import CachedPairDataset, NoisePlan
    from cachetrain.train.objective import draw_sample_noise, sample_key
    from cachetrain.sidecar import read_sidecar
    from cachetrain.tree import index_training_pairs

    index, _ = index_training_pairs([cached_dataset], ".img_sdvae", ".txt_clipl")
    empty = read_sidecar(cached_dataset / ".empty_prompt.txt_clipl", "emb")
    dataset = CachedPairDataset(index, NoisePlan(seed=5, caption_dropout=0.5,
                                                 empty_embeddings=[empty]))
    dropped = 0
    for i in range(len(dataset)):
        emb = dataset[i][1]
        expect_drop = draw_sample_noise(CACHED_LATENT_SHAPE, 0.0, sample_key(5, 0, i))[2] < 0.5
        own = read_sidecar(index[i][1], "emb")
        assert torch.equal(emb, empty if expect_drop else own)
        dropped += expect_drop
    assert 0 < dropped < len(dataset)


def test_caption_dropout_trains_the_drawn_fraction_on_the_empty_prompt_and_needs_each_roots(
        tiny_sd_model, cached_dataset, tmp_path, monkeypatch, capsys):
    from cachetrain.train.objective import draw_sample_noise, sample_key
    from cachetrain.sidecar import read_sidecar

    calls = record_unet_text_inputs(monkeypatch)  # per training call of the UNet: each sample's text
    empty = read_sidecar(cached_dataset / ".empty_prompt.txt_clipl", "emb").float()
    captions = [read_sidecar(path, "emb").float() for path in sorted(cached_dataset.rglob("*.txt_clipl"))]
    # seed 0: each of the 48 pairs has its own draw; below 0.5 it trains on the empty prompt
    expected = sum(draw_sample_noise(CACHED_LATENT_SHAPE, 0.0, sample_key(0, 0, i))[2] < 0.5 for i in range(48))
    assert 12 <= expected <= 36
    for dropout, dropped in (("0.5", expected), ("0.0", 0)):
        calls.clear()
        result = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / f"run-{dropout}",
                                              "--batch_size", "8", "--max_steps", "6", "--seed", "0",
                                              "--caption_dropout", dropout)))
        contexts = [context for call in calls for context in call]
        assert result.steps == 6 and len(contexts) == 48  # one epoch: every pair once
        empties = sum(torch.equal(context, empty) for context in contexts)
        assert empties == dropped, f"--caption_dropout {dropout}: {empties} of 48 on the empty prompt, not {dropped}"
        kept = [context for context in contexts if not torch.equal(context, empty)]
        assert all(any(torch.equal(context, caption) for caption in captions) for context in kept)
    (cached_dataset / ".empty_prompt.txt_clipl").unlink()
    assert main(_args(tiny_sd_model, cached_dataset, tmp_path / "run2", "--caption_dropout", "0.5")) == 2
    assert "--caption_dropout needs the empty prompt's embedding" in capsys.readouterr().err
