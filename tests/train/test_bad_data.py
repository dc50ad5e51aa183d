"""Bad data is named once, passed over and replaced; never fatal, never a loop; resume compares the pair list.

Bad files are written here by hand into a copy of the cached dataset (48 pairs of 4x8x8 latents and
77x32 CLIP embeddings): a latent of another shape, NaN/Inf values, an embedding of another width, a
truncated file and garbage bytes.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cachetrain.train.config import parse_train_args
from cachetrain.train.trainer import TrainingError, train
from tests.conftest import CACHED_LATENT_SHAPE
from tests.script_runs import run_script


def _args(model, data, output, *extra) -> list[str]:
    return ["--pretrained_model", str(model), "--train_data_dir", str(data), "--output_dir", str(output),
            "--num_workers", "0", "--no_progress", "--learning_rate", "1e-3", "--save_steps", "0",
            "--gradient_clip", "0", "--batch_size", "4", *extra]


def _latents(data: Path) -> list[Path]:
    return sorted(data.rglob("*.img_sdvae"))


def _texts(data: Path) -> list[Path]:
    """The text sidecar of each latent, in the same order (not the data root's empty-prompt file)."""
    return [path.with_suffix(".txt_clipl") for path in _latents(data)]


def _rewrite(path: Path, key: str, tensor: torch.Tensor) -> None:
    from cachetrain.sidecar import read_metadata, write_sidecar

    write_sidecar(path, {key: tensor}, read_metadata(path))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _spoil(data: Path) -> dict[str, str]:
    """Six kinds of bad pair, the very first pair of the index among them; returns path -> what it is."""
    latents, texts = _latents(data), _texts(data)
    _rewrite(latents[0], "latent", torch.zeros(4, 4, 4))
    _rewrite(latents[5], "latent", torch.full(CACHED_LATENT_SHAPE, float("nan")))
    _truncate(latents[9])
    texts[14].write_bytes(b"this is no safetensors file at all")
    _rewrite(texts[20], "emb", torch.zeros(77, 16))
    _rewrite(texts[30], "emb", torch.full((77, 32), float("inf")))
    return {str(latents[0]): "latent of shape [4, 4, 4], the run's is [4, 8, 8]",
            str(latents[5]): "latent holds NaN/Inf values",
            str(latents[9]): "not a readable safetensors file",
            str(texts[14]): "not a readable safetensors file",
            str(texts[20]): "text embedding 16 wide, the run's are 32",
            str(texts[30]): "text embedding holds NaN/Inf values"}


def _scalars(output: Path, name: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(name)]


def _summary(output: Path) -> dict:
    return json.loads((output / "train_summary.json").read_text())


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


# ---------------------------------------------------------------------------------------------
# In the worker: found, named, replaced


def test_a_bad_pair_is_replaced_from_the_rest_the_same_way_every_time(cached_dataset):
    from cachetrain.train.epoch_order import EpochOrder, RunBatches
    from cachetrain.train.loader import CachedPairDataset, NoisePlan, PairChecks, RefillingBatchReader
    from cachetrain.tree import index_training_pairs

    bad_files = _spoil(cached_dataset)
    index, _ = index_training_pairs([cached_dataset], ".img_sdvae", ".txt_clipl")
    bad_samples = {i for i in range(len(index)) if set(index[i]) & set(bad_files)}
    assert len(bad_samples) == 6

    def one_epoch():
        order = EpochOrder(len(index), 4, seed=3)
        reader = RefillingBatchReader(CachedPairDataset(index, NoisePlan(seed=3),
                                                        checks=PairChecks(CACHED_LATENT_SHAPE, 32)), order)
        return [reader[key] for key in RunBatches(order, epochs=1)]

    batches = one_epoch()
    assert len(batches) == 12  # sizes kept
    assert all(batch.latents.shape == (4, *CACHED_LATENT_SHAPE) for batch in batches)
    trained = [i for batch in batches for i in batch.sample_ids]
    assert not set(trained) & bad_samples
    named = {path for batch in batches for path, _ in batch.bad}
    assert named == set(bad_files)  # every bad file of the epoch met, and nothing else
    for batch in batches:
        for path, reason in batch.bad:
            assert bad_files[path] in reason, (path, reason)
        assert len(set(batch.sample_ids)) == 4 and batch.tried == 4 + batch.skipped
    again = one_epoch()  # a resumed run rebuilds the same batches, replacements included
    assert [b.sample_ids for b in again] == [b.sample_ids for b in batches]
    assert all(torch.equal(a.noise, b.noise) for a, b in zip(again, batches))


def test_bad_pairs_are_named_once_counted_and_training_goes_on(tiny_sd_model, cached_dataset, tmp_path, capsys):
    bad_files = _spoil(cached_dataset)
    output = tmp_path / "run"
    # 48 pairs, batch 4: 12 batches an epoch; 3 epochs, so every bad file is met three times or more.
    # Two worker processes: each finds bad files on its own; the run names each once all the same.
    result = train(parse_train_args(_args(tiny_sd_model, cached_dataset, output, "--max_steps", "36",
                                          "--log_every", "12", "--max_bad_fraction", "0.3",  # 6 of 48 are bad
                                          "--num_workers", "2")))
    assert result.steps == 36
    err = capsys.readouterr().err
    for path, reason in bad_files.items():
        lines = [line for line in err.splitlines() if path in line]
        assert len(lines) == 1 and reason in lines[0], (path, lines)  # named once, with its reason
    summary = _summary(output)
    assert summary["process_sample_counts"] == [36 * 4]  # batches kept their size
    assert summary["skipped_samples"] >= 3 * 6  # each bad file is in every epoch, and replacements may be bad too
    logged = _scalars(output, "train/skipped_samples")
    assert [step for step, _ in logged] == [12, 24, 36]
    assert logged[-1][1] == summary["skipped_samples"]
    assert logged[0][1] >= 6
    assert all(torch.isfinite(t).all() for t in _weights(output).values())


def test_a_whole_batch_of_bad_pairs_is_counted_in_the_summary(tiny_sd_model, cached_dataset, tmp_path):
    from cachetrain.train.epoch_order import EpochOrder

    # spoil exactly the pairs of the first batch of epoch 0 (and no others): its replacements are good
    from cachetrain.tree import index_training_pairs

    index, _ = index_training_pairs([cached_dataset], ".img_sdvae", ".txt_clipl")
    first_batch = EpochOrder(len(index), 4, seed=0).epoch(0)[1][0].tolist()
    for i in first_batch:
        _rewrite(Path(index[i][0]), "latent", torch.full(CACHED_LATENT_SHAPE, float("nan")))
    output = tmp_path / "run"
    train(parse_train_args(_args(tiny_sd_model, cached_dataset, output, "--max_steps", "1", "--log_every", "1")))
    summary = _summary(output)
    assert summary["skipped_samples"] == 4 and summary["process_sample_counts"] == [4]
    assert _scalars(output, "train/skipped_samples") == [(1, 4.0)]


# ---------------------------------------------------------------------------------------------
# Resume


def test_a_run_with_bad_files_stopped_and_resumed_equals_one_that_never_stopped(tiny_sd_model, cached_dataset,
                                                                                 tmp_path):
    _spoil(cached_dataset)
    common = ("--gradient_accum", "2", "--max_steps", "8", "--log_every", "1", "--scheduler", "cosine",
              "--max_bad_fraction", "0.3")
    straight = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "straight", *common)))
    stopped = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "resumed", *common)),
                    interrupt_after_batches=7)  # mid-accumulation of step 4: finishes it, then saves
    assert stopped.interrupted and stopped.steps == 4
    resumed = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "resumed", *common,
                                           "--resume")))  # meets the same bad files again: skipped again
    assert resumed.steps == 8
    losses = lambda result: [(e["step"], e["train/loss"]) for e in result.logged if "train/loss" in e]  # noqa: E731
    assert losses(stopped) + losses(resumed) == losses(straight)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert _summary(tmp_path / "resumed")["skipped_samples"] == _summary(tmp_path / "straight")["skipped_samples"] > 0


def test_a_resume_on_changed_data_with_the_same_count_is_refused(tiny_sd_model, cached_dataset, tmp_path):
    output = tmp_path / "run"
    common = ("--save_steps", "1", "--max_steps", "1")
    train(parse_train_args(_args(tiny_sd_model, cached_dataset, output, *common)))
    checkpoint = output / "checkpoint-00001"
    state_file = checkpoint / "training_state.pt"
    state = torch.load(state_file, weights_only=True)
    assert state["data"]["pairs"] == 48 and len(state["data"]["pairs_sha256"]) == 16
    # one pair renamed: still 48 pairs, but not the same data
    for path in (_latents(cached_dataset)[3], _texts(cached_dataset)[3]):
        path.rename(path.with_name("renamed" + path.suffix))
    with pytest.raises(TrainingError, match=r"the training data changed \(pairs were 48, now 48; their names or order"):
        train(parse_train_args(_args(tiny_sd_model, cached_dataset, output, "--save_steps", "1", "--max_steps", "2",
                                     "--resume")))
    # a checkpoint from before the fingerprint was recorded resumes, comparing what it has
    del state["data"]["pairs_sha256"]
    torch.save(state, state_file)
    resumed = train(parse_train_args(_args(tiny_sd_model, cached_dataset, output, "--save_steps", "1",
                                           "--max_steps", "2", "--resume")))
    assert resumed.steps == 2


def test_the_pair_fingerprint_follows_names_and_order_not_where_the_tree_is(cached_dataset, tmp_path):
    import shutil

    from cachetrain.tree import index_training_pairs

    def fingerprint(*roots):
        return index_training_pairs(roots, ".img_sdvae", ".txt_clipl")[0].fingerprint()

    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(cached_dataset, moved)
    assert fingerprint(cached_dataset) == fingerprint(moved)
    parts = sorted(p for p in cached_dataset.iterdir() if p.is_dir())
    assert fingerprint(parts[0], parts[1]) != fingerprint(parts[1], parts[0])
    for path in (_latents(moved)[0], _texts(moved)[0]):
        path.rename(path.with_name("other" + path.suffix))
    assert fingerprint(cached_dataset) != fingerprint(moved)


# ---------------------------------------------------------------------------------------------
# What cannot be skipped: a clear stop within seconds, through the real script


def _run_script(model, data, output, *extra) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = run_script("train_from_cached.py", *_args(model, data, output, "--max_steps", "1000", *extra))
    return done, time.monotonic() - started


def _error_line(done: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    return errors[0]


@pytest.mark.parametrize("spoil, status, message", [
    ("garbage", 2, r"none of the first 16 pairs could be read, e\.g\. \S+img00000\.img_sdvae: not a readable"),
    ("nan", 5, r"no pair could be read for a batch: all \d+ pairs tried were bad, e\.g\. \S+\.img_sdvae: latent holds "
            r"NaN/Inf values"),
    ("half_other_shape", 5, r"\d+ of the \d+ pairs read were bad \(more than --max_bad_fraction 0\.05\), e\.g\. "
                         r"\S+\.img_sdvae: latent of shape \[4, 16, 24\].*trains with --aspect_buckets"),
], ids=["no-file-readable", "every-latent-nan", "too-many-bad"])
def test_data_that_cannot_be_trained_on_stops_the_script_with_one_line(tiny_sd_model, cached_dataset, tmp_path,
                                                                       spoil, status, message):
    for number, path in enumerate(_latents(cached_dataset)):
        if spoil == "garbage":
            path.write_bytes(b"\x00garbage" * 4)
        elif spoil == "nan":
            _rewrite(path, "latent", torch.full(CACHED_LATENT_SHAPE, float("nan")))
        elif number % 2:
            _rewrite(path, "latent", torch.zeros(4, 16, 24))
    output = tmp_path / "run"
    done, seconds = _run_script(tiny_sd_model, cached_dataset, output)
    # refused at start (2) when no header can be read; halted (5) when training meets only bad pairs
    assert done.returncode == status, done.stderr
    import re

    assert re.search(message, _error_line(done)), _error_line(done)
    assert seconds < 120  # seconds of work after ~10 s of imports, never a loop
    assert len(done.stderr) < 20_000  # each bad file named once, not once per batch
    assert not list(output.glob("checkpoint-*"))
