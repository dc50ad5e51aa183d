"""Aspect-ratio buckets and balanced data folders: each batch one shape, every group its share, exact resume.

The cached dataset (48 pairs in part0..part3, latents 4x8x8) gets a second shape by rewriting the
latents of part1 and part3 as 4x8x12, as a bucketed cache would have written them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cachetrain.train.config import parse_train_args
from cachetrain.train.epoch_order import EpochOrder
from cachetrain.train.trainer import train
from tests.conftest import CACHED_LATENT_SHAPE

REPO = Path(__file__).resolve().parents[2]
WIDE = (4, 8, 12)


def _args(model, output, *extra) -> list[str]:
    return ["--pretrained_model", str(model), "--output_dir", str(output), "--num_workers", "0", "--no_progress",
            "--learning_rate", "1e-3", "--save_steps", "0", "--gradient_clip", "0", "--batch_size", "4", *extra]


def _widen(folder: Path, seed: int = 0) -> None:
    from cachetrain.sidecar import read_metadata, write_sidecar

    generator = torch.Generator().manual_seed(seed)
    for path in sorted(folder.glob("*.img_sdvae")):
        write_sidecar(path, {"latent": torch.randn(WIDE, generator=generator)}, read_metadata(path))


@pytest.fixture
def two_shapes(cached_dataset) -> Path:
    _widen(cached_dataset / "part1", seed=1)
    _widen(cached_dataset / "part3", seed=3)
    return cached_dataset


def _summary(output: Path) -> dict:
    return json.loads((output / "train_summary.json").read_text())


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


# ---------------------------------------------------------------------------------------------
# The order of an epoch


def test_bucketed_batches_hold_one_shape_each_sample_at_most_once_and_remainders_rotate():
    buckets = [0] * 10 + [1] * 7 + [2] * 3
    order = EpochOrder(20, 3, seed=4, buckets=buckets)
    assert order.batches_per_epoch() == 3 + 2 + 1  # each bucket's remainder (1, 1, 0) sits the epoch out
    left_out = set()
    for epoch in range(6):
        numbers, samples, draws, batch_buckets = order.epoch(epoch)
        assert len(numbers) == 6
        for row, bucket in zip(samples.tolist(), batch_buckets):
            assert {buckets[i] for i in row} == {bucket}
        flat = samples.flatten().tolist()
        assert len(flat) == len(set(flat)) == 18
        assert torch.equal(draws, samples)  # a first draw is keyed by the sample itself
        left_out.add(frozenset(set(range(20)) - set(flat)))
        again = order.epoch(epoch)
        assert again[0] == numbers and torch.equal(again[1], samples) and again[3] == batch_buckets
    assert len(left_out) > 1  # a different remainder each epoch
    # several processes: disjoint, equal shares of the same batches
    shares = [EpochOrder(20, 3, seed=4, rank=r, world_size=2, buckets=buckets).epoch(2) for r in range(2)]
    assert len(shares[0][0]) == len(shares[1][0]) == 3
    assert not set(shares[0][1].flatten().tolist()) & set(shares[1][1].flatten().tolist())
    whole = order.epoch(2)
    assert sorted(shares[0][0] + shares[1][0]) == whole[0]


def test_equal_balance_gives_every_folder_the_same_share_of_each_epoch():
    groups = [0] * 6 + [1] * 18  # a small folder and one three times its size
    pooled = EpochOrder(24, 4, seed=1, groups=groups, balance="pooled")
    equal = EpochOrder(24, 4, seed=1, groups=groups, balance="equal")
    assert pooled.batches_per_epoch() == 6 and equal.batches_per_epoch() == 9  # 18 draws from each folder
    for epoch in range(3):
        _, samples, draws, _ = equal.epoch(epoch)
        seen = Counter(samples.flatten().tolist())
        assert sum(seen[i] for i in range(6)) == sum(seen[i] for i in range(6, 24)) == 18
        assert all(seen[i] == 3 for i in range(6)) and all(seen[i] == 1 for i in range(6, 24))
        keys = draws.flatten().tolist()
        assert len(keys) == len(set(keys))  # each repeat of a sample draws noise of its own
        _, pooled_samples, _, _ = pooled.epoch(epoch)
        assert sorted(pooled_samples.flatten().tolist()) == list(range(24))
    # with buckets too: every epoch reaches the count batches_per_epoch promises
    bucketed = EpochOrder(24, 4, seed=1, groups=groups, balance="equal", buckets=[i % 2 for i in range(24)])
    for epoch in range(5):
        numbers, samples, _, batch_buckets = bucketed.epoch(epoch)
        assert len(numbers) == bucketed.batches_per_epoch() == (36 - 2 * 3) // 4
        assert all(len({i % 2 for i in row}) == 1 for row in samples.tolist())


# ---------------------------------------------------------------------------------------------
# Through the trainer


def test_aspect_buckets_train_on_several_shapes_and_print_the_bucket_counts(tiny_sd_model, two_shapes, tmp_path,
                                                                            capsys):
    unreadable = sorted((two_shapes / "part2").glob("*.img_sdvae"))[0]
    unreadable.write_bytes(unreadable.read_bytes()[:100])  # cut short: left out at start, named
    output = tmp_path / "run"
    result = train(parse_train_args(_args(tiny_sd_model, output, "--train_data_dir", str(two_shapes),
                                          "--aspect_buckets", "--max_steps", "1e", "--log_every", "1")))
    err = capsys.readouterr().err
    assert "[train] 2 aspect buckets (latent shape: pairs): 4x8x12: 24, 4x8x8: 23" in err, err  # largest first
    assert f"left out {unreadable}: not a readable safetensors file" in err
    # 23 // 4 + 24 // 4 = 11 batches; the one-shape remainder of each bucket sits the epoch out
    assert "11 batches/epoch/process" in err and result.steps == 11
    summary = _summary(output)
    assert summary["process_sample_counts"] == [44] and summary["skipped_samples"] == 0
    assert summary["left_out_at_start"] == 1
    assert all(torch.isfinite(t).all() for t in _weights(output).values())


def test_buckets_with_equal_folders_and_a_bad_file_resume_exactly(tiny_sd_model, two_shapes, tmp_path, capsys):
    small, large = tmp_path / "small", tmp_path / "large"
    shutil.move(two_shapes / "part0", small)  # 12 pairs, 4x8x8
    large.mkdir()
    for part in ("part1", "part2", "part3"):  # 36 pairs: 24 of 4x8x12, 12 of 4x8x8
        shutil.move(two_shapes / part, large / part)
    from cachetrain.sidecar import read_metadata, write_sidecar

    spoiled = sorted((large / "part2").glob("*.img_sdvae"))[3]
    write_sidecar(spoiled, {"latent": torch.full(CACHED_LATENT_SHAPE, float("nan"))}, read_metadata(spoiled))
    common = ("--train_data_dir", str(small), str(large), "--aspect_buckets", "--data_balance", "equal",
              "--gradient_accum", "2", "--max_steps", "10", "--log_every", "1", "--max_bad_fraction", "0.5")
    straight = train(parse_train_args(_args(tiny_sd_model, tmp_path / "straight", *common)))
    assert "--data_balance equal: 2 folder(s) holding 12, 36 pairs; each gives 36 draws to every epoch" in \
        capsys.readouterr().err
    # 36 draws from each folder: (72 - 2 buckets x 3) // 4 = 16 batches, 8 optimizer steps an epoch
    assert straight.steps == 10
    stopped = train(parse_train_args(_args(tiny_sd_model, tmp_path / "resumed", *common)),
                    interrupt_after_batches=15)  # mid-accumulation of step 8, the end of epoch 0
    assert stopped.interrupted and stopped.steps == 8
    resumed = train(parse_train_args(_args(tiny_sd_model, tmp_path / "resumed", *common, "--resume")))
    assert resumed.steps == 10
    losses = lambda result: [(e["step"], e["train/loss"]) for e in result.logged if "train/loss" in e]  # noqa: E731
    assert losses(stopped) + losses(resumed) == losses(straight)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert _summary(tmp_path / "resumed")["skipped_samples"] == _summary(tmp_path / "straight")["skipped_samples"]
    # the same data under the other balance is another order: refused on resume
    from cachetrain.train.trainer import TrainingError

    with pytest.raises(TrainingError, match="data_balance was equal, now pooled"):
        train(parse_train_args(_args(tiny_sd_model, tmp_path / "resumed", *common, "--resume", "--data_balance",
                                     "pooled")))



def test_a_resume_after_latents_were_re_cached_at_other_shapes_under_their_names_is_refused(tiny_sd_model, two_shapes,
                                                                                            tmp_path):
    """A wide latent and a narrow one swap shapes: the names and the bucket sizes stay, the buckets'
    members do not, so the stopped epoch's order would not continue (samples twice, others never)."""
    from cachetrain.sidecar import read_metadata, write_sidecar
    from cachetrain.train.trainer import TrainingError

    common = ("--train_data_dir", str(two_shapes), "--aspect_buckets", "--max_steps", "4")
    stopped = train(parse_train_args(_args(tiny_sd_model, tmp_path / "run", *common)), interrupt_after_batches=2)
    assert stopped.interrupted
    wide, narrow = sorted((two_shapes / "part1").glob("*.img_sdvae"))[0], sorted((two_shapes / "part2").glob(
        "*.img_sdvae"))[0]
    write_sidecar(wide, {"latent": torch.zeros(CACHED_LATENT_SHAPE)}, read_metadata(wide))
    write_sidecar(narrow, {"latent": torch.zeros(WIDE)}, read_metadata(narrow))
    with pytest.raises(TrainingError, match="buckets_sha256 was [0-9a-f]+, now [0-9a-f]+; the data order would not "
                                            "continue where it stopped"):
        train(parse_train_args(_args(tiny_sd_model, tmp_path / "run", *common, "--resume")))
    # the same shapes again: the run goes on
    write_sidecar(wide, {"latent": torch.zeros(WIDE)}, read_metadata(wide))
    write_sidecar(narrow, {"latent": torch.zeros(CACHED_LATENT_SHAPE)}, read_metadata(narrow))
    assert train(parse_train_args(_args(tiny_sd_model, tmp_path / "run", *common, "--resume"))).steps == 4

def test_two_processes_share_bucketed_batches_and_count_bad_pairs_together(tiny_sd_model, two_shapes, tmp_path):
    """Also the data index under two processes: with none yet, only the main process walks (and reads the
    headers), the other takes the main's index without walking."""
    from cachetrain.data_index import INDEX_FILE_NAME, INDEX_FOLDER_NAME
    from cachetrain.sidecar import read_metadata, write_sidecar

    (two_shapes / INDEX_FOLDER_NAME / INDEX_FILE_NAME).unlink()

    for path in (sorted((two_shapes / "part0").glob("*.img_sdvae"))[1], sorted((two_shapes / "part1").glob(
            "*.img_sdvae"))[2]):
        write_sidecar(path, {"latent": torch.full(tuple(load_file(path)["latent"].shape), float("inf"))},
                      read_metadata(path))
    output = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "train_from_cached.py"),
               *_args(tiny_sd_model, output, "--train_data_dir", str(two_shapes), "--aspect_buckets",
                      "--max_steps", "6", "--log_every", "2", "--max_bad_fraction", "0.5")]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("data index of") == 1 and "no index yet; walked 5 folders" in done.stderr
    assert "this process walked" not in done.stderr
    summary = _summary(output)
    first, second = summary["process_weight_checksums"]
    assert first == second
    assert summary["process_sample_counts"] == [24, 24]  # 12 one-shape batches of 4, 6 per process
    assert summary["skipped_samples"] >= 2  # both bad files are in the epoch, whichever process met them
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert events.Scalars("train/skipped_samples")[-1].value == summary["skipped_samples"]


def test_equal_balance_shares_of_two_processes_are_disjoint_draws_of_the_same_epoch():
    groups = [0] * 6 + [1] * 18
    whole = EpochOrder(24, 4, seed=2, groups=groups, balance="equal").epoch(1)
    shares = [EpochOrder(24, 4, seed=2, rank=r, world_size=2, groups=groups, balance="equal").epoch(1)
              for r in range(2)]
    assert len(shares[0][0]) == len(shares[1][0]) == 4  # 9 batches: the odd one sits the epoch out
    keys = [set(share[2].flatten().tolist()) for share in shares]
    assert not keys[0] & keys[1]
    assert keys[0] | keys[1] <= set(whole[2].flatten().tolist())


def test_a_latent_whose_shape_left_its_bucket_after_the_start_is_bad_data(two_shapes):
    from cachetrain.train.epoch_order import RunBatches
    from cachetrain.train.loader import CachedPairDataset, PairChecks, RefillingBatchReader
    from cachetrain.sidecar import read_metadata, write_sidecar
    from cachetrain.tree import index_training_pairs, record_latent_shapes

    index, _ = index_training_pairs([two_shapes], ".img_sdvae", ".txt_clipl")
    assert record_latent_shapes(index, "latent") == [] and sorted(index.shapes) == [CACHED_LATENT_SHAPE, WIDE]
    moved = index[0][0]  # recorded as 4x8x8, then rewritten by another cache run
    write_sidecar(moved, {"latent": torch.zeros(WIDE)}, read_metadata(moved))
    order = EpochOrder(len(index), 4, seed=0, buckets=index.shape_ids)
    reader = RefillingBatchReader(CachedPairDataset(index, checks=PairChecks(text_width=32)), order)
    batches = [reader[key] for key in RunBatches(order, epochs=1)]
    bad = [entry for batch in batches for entry in batch.bad]
    # both buckets hold 24 pairs, 6 whole batches: every pair is met, the moved one as bad data
    assert bad == [(moved, "latent of shape [4, 8, 12], its bucket's (read at start) is [4, 8, 8]")]
    assert sum(len(batch.sample_ids) for batch in batches) == 48
    assert all(len({tuple(t.shape) for t in batch.latents}) == 1 for batch in batches)
