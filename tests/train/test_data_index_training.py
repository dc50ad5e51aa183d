"""The trainer starts from the data index (train_from_cached.py / train()): it walks only folders that
changed, never trains on pairs that are gone or on a latent of another shape than the index says,
ignores an index it cannot believe, keeps the index of a read-only root elsewhere, resumes exactly,
and in a run of several processes only the main one walks."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from cachetrain.commands import data_index as index_command
from cachetrain.data_index import INDEX_FILE_NAME, INDEX_FOLDER_NAME
from cachetrain.sidecar import read_metadata, write_sidecar
from cachetrain.train.config import parse_train_args
from cachetrain.train.trainer import train
from tests.test_data_index import age_folders

WIDE = (4, 16, 24)


def _args(model, data, output, *extra) -> list[str]:
    return ["--pretrained_model", str(model), "--train_data_dir", str(data), "--output_dir", str(output),
            "--num_workers", "0", "--no_progress", "--learning_rate", "1e-3", "--save_steps", "0",
            "--gradient_clip", "0", "--batch_size", "4", *extra]


def _summary(output: Path) -> dict:
    return json.loads((output / "train_summary.json").read_text())


@pytest.fixture
def indexed(cached_dataset) -> Path:
    """The cached shapes (part1 widened to 4x16x24, as a bucketed cache writes it), cached a while ago
    and indexed by ``cachetrain-index``."""
    generator = torch.Generator().manual_seed(1)
    for path in sorted((cached_dataset / "part1").glob("*.img_sdvae")):
        write_sidecar(path, {"latent": torch.randn(WIDE, generator=generator)}, read_metadata(path))
    (cached_dataset / INDEX_FOLDER_NAME).mkdir(exist_ok=True)
    age_folders(cached_dataset)
    assert index_command([str(cached_dataset), "--no_progress"]) == 0
    return cached_dataset


def test_a_run_from_a_current_index_walks_nothing_and_resumes_to_the_weights_of_a_run_without_index(
        tiny_sd_model, indexed, tmp_path, capsys):
    common = ("--aspect_buckets", "--max_steps", "6", "--log_every", "1")
    straight = train(parse_train_args(_args(tiny_sd_model, indexed, tmp_path / "straight", *common,
                                            "--data_index", "off")))
    assert "data index" not in capsys.readouterr().err
    stopped = train(parse_train_args(_args(tiny_sd_model, indexed, tmp_path / "resumed", *common)),
                    interrupt_after_batches=3)
    err = capsys.readouterr().err
    assert f"data index of {indexed}: 5 folders, 0 changed since indexed" in err
    assert "took 48 latent shapes from the data index" in err and "4x16x24: 12" in err
    resumed = train(parse_train_args(_args(tiny_sd_model, indexed, tmp_path / "resumed", *common, "--resume")))
    assert "0 changed since indexed" in capsys.readouterr().err
    assert stopped.steps == 3 and resumed.steps == straight.steps == 6
    a = load_file(tmp_path / "straight" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "resumed" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_pairs_removed_or_added_after_indexing_are_seen_and_only_their_folder_walked(
        tiny_sd_model, indexed, tmp_path, capsys):
    removed = sorted((indexed / "part0").glob("*.img_sdvae"))[0]
    removed.unlink()  # a cache file removed by hand
    added = indexed / "part3" / "extra.img_sdvae"  # a pair added to another folder
    write_sidecar(added, {"latent": torch.randn(4, 16, 16)}, {})
    write_sidecar(added.with_suffix(".txt_clipl"), {"emb": load_file(next((indexed / "part3").glob("*.txt_clipl")))["emb"]}, {})
    result = train(parse_train_args(_args(tiny_sd_model, indexed, tmp_path / "out", "--aspect_buckets",
                                          "--max_steps", "1")))
    err = capsys.readouterr().err
    assert result.steps == 1
    assert "5 folders, 2 changed since indexed and walked again" in err
    assert "48 training pairs" in err and "left out 1 latents without text and 0 texts without latents" not in err
    assert "left out 0 latents without text and 1 texts without latents" in err
    assert _summary(tmp_path / "out")["left_out_at_start"] == 0


def test_a_latent_rewritten_in_place_with_another_shape_is_skipped_not_trained_on(
        tiny_sd_model, indexed, tmp_path, capsys):
    rewritten = sorted((indexed / "part2").glob("*.img_sdvae"))[0]
    folder_times = os.stat(rewritten.parent)
    with open(rewritten, "r+b") as handle:  # same file, no rename: the folder's mtime does not move
        handle.truncate(0)
        handle.write(save({"latent": torch.randn(WIDE)}))
    assert os.stat(rewritten.parent).st_mtime_ns == folder_times.st_mtime_ns
    result = train(parse_train_args(_args(tiny_sd_model, indexed, tmp_path / "out", "--aspect_buckets",
                                          "--max_steps", "12", "--max_bad_fraction", "0.5")))
    err = capsys.readouterr().err
    assert "0 changed since indexed" in err  # the index is believed ...
    assert result.steps == 12
    assert f"{rewritten}" in err and "its bucket's" in err  # ... and the loader still checks every latent
    assert _summary(tmp_path / "out")["skipped_samples"] >= 1


@pytest.mark.parametrize("spoil", ["garbage", "other_version"])
def test_an_unbelievable_index_is_named_in_one_line_ignored_and_rewritten(tiny_sd_model, indexed, tmp_path,
                                                                          capsys, spoil):
    stored = indexed / INDEX_FOLDER_NAME / INDEX_FILE_NAME
    if spoil == "garbage":
        stored.write_bytes(b"PK\x03\x04 half a zip")
    else:
        import numpy as np

        with np.load(stored) as kept:
            arrays = dict(kept)
        arrays["meta"] = np.frombuffer(b'{"format": 0, "root": "/", "suffixes": []}', np.uint8)
        np.savez(stored, **arrays)
    result = train(parse_train_args(_args(tiny_sd_model, indexed, tmp_path / "out", "--max_steps", "1")))
    err = capsys.readouterr().err
    assert result.steps == 1 and "48 training pairs" in err
    lines = [line for line in err.splitlines() if "data index of" in line]
    assert len(lines) == 1 and "stored index ignored (" in lines[0] and "walked 5 folders" in lines[0]
    assert ("unreadable" if spoil == "garbage" else "format 0, this version reads 2") in lines[0]
    train(parse_train_args(_args(tiny_sd_model, indexed, tmp_path / "again", "--max_steps", "1")))
    assert "ignored" not in capsys.readouterr().err


def test_a_read_only_root_keeps_its_index_in_the_named_folder_or_is_walked_as_before(
        tiny_sd_model, indexed, tmp_path, capsys):
    (indexed / INDEX_FOLDER_NAME / INDEX_FILE_NAME).unlink()
    read_only = tmp_path / "ro"
    read_only.mkdir()
    if os.system(f"mount --bind {indexed} {read_only} 2>/dev/null && mount -o remount,ro,bind {read_only}") != 0:
        pytest.skip("needs a read-only bind mount (root)")
    try:
        nowhere = ["--data_index_dir", "/proc/no-such-place"]
        train(parse_train_args(_args(tiny_sd_model, read_only, tmp_path / "a", "--max_steps", "1", *nowhere)))
        err = capsys.readouterr().err
        assert "could not write the index (/proc/no-such-place/" in err and "48 training pairs" in err
        elsewhere = ["--data_index_dir", str(tmp_path / "indexes")]
        train(parse_train_args(_args(tiny_sd_model, read_only, tmp_path / "b", "--max_steps", "1", *elsewhere)))
        assert f"index written to {tmp_path / 'indexes'}" in capsys.readouterr().err
        train(parse_train_args(_args(tiny_sd_model, read_only, tmp_path / "c", "--max_steps", "1", *elsewhere)))
        assert "5 folders, 0 changed since indexed" in capsys.readouterr().err
    finally:
        os.system(f"umount {read_only}")


# Two processes over one index (only the main one walks): test_buckets_balance's two-process run.


def _val_losses(result) -> list[float]:
    return [entry["val/loss"] for entry in result.logged if "val/loss" in entry]


def test_a_validation_dir_comes_from_its_index_and_a_changed_folder_of_it_is_walked_again(
        tiny_sd_model, indexed, tmp_path, capsys):
    held_out = tmp_path / "held_out"
    for part in ("part2", "part3"):
        shutil.copytree(indexed / part, held_out / part)
    (held_out / INDEX_FOLDER_NAME).mkdir()
    age_folders(held_out)
    assert index_command([str(held_out), "--no_progress"]) == 0
    run = ("--max_steps", "1", "--validation_dir", str(held_out))
    indexed_run = train(parse_train_args(_args(tiny_sd_model, indexed, tmp_path / "a", *run)))
    err = capsys.readouterr().err
    assert f"data index of {held_out}: 3 folders, 0 changed since indexed" in err  # nothing of it walked
    walked_run = train(parse_train_args(_args(tiny_sd_model, indexed, tmp_path / "b", *run, "--data_index", "off")))
    assert _val_losses(indexed_run) == _val_losses(walked_run) and len(_val_losses(indexed_run)) == 2
    # a pair added to one folder of it after indexing: that folder alone is walked, and the pair is held out
    first = sorted((indexed / "part0").glob("*.img_sdvae"))[0]
    for source in (first, first.with_suffix(".txt_clipl")):
        shutil.copy(source, held_out / "part3" / f"added{source.suffix}")
    capsys.readouterr()
    stale_run = train(parse_train_args(_args(tiny_sd_model, indexed, tmp_path / "c", *run)))
    err = capsys.readouterr().err
    assert f"data index of {held_out}: 3 folders, 1 changed since indexed and walked again" in err
    walked_again = train(parse_train_args(_args(tiny_sd_model, indexed, tmp_path / "d", *run, "--data_index", "off")))
    assert _val_losses(stale_run) == _val_losses(walked_again) != _val_losses(walked_run)
