"""Training from packed shards (cachetrain-pack, then --train_data_dir SHARD_FOLDER): the same run as
from the per-file tree it was packed from, exact resume, buckets, balance, validation, bad shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cachetrain.commands import pack
from cachetrain.train.config import parse_train_args
from cachetrain.train.trainer import train
from tests.training_support import logged as _logged
from tests.training_support import train_args as _args
from tests.training_support import unet_weights as _unet_weights


def _pack(tree: Path, out: Path, *extra: str) -> Path:
    assert pack([str(tree), "--out", str(out), "--pairs_per_shard", "8", *extra]) == 0
    return out


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _unet_weights(a), _unet_weights(b)
    return all(torch.equal(wa[name], wb[name]) for name in wa)


@pytest.mark.slow
def test_a_run_from_shards_ends_with_the_weights_of_the_run_from_the_tree_it_was_packed_from(
        tiny_sd_model, cached_dataset, tmp_path):
    shards = _pack(cached_dataset, tmp_path / "shards")
    assert len(json.loads((shards / "shards.json").read_text())["shards"]) > 1
    common = ("--batch_size", "4", "--max_steps", "5", "--log_every", "1", "--validation_split", "0.1")
    from_tree = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "tree", *common)))
    from_shards = train(parse_train_args(_args(tiny_sd_model, shards, tmp_path / "shards-run", *common)))
    assert _logged(from_shards, "train/loss") == _logged(from_tree, "train/loss")
    assert _logged(from_shards, "val/loss") == _logged(from_tree, "val/loss")
    assert _same_weights(tmp_path / "tree", tmp_path / "shards-run")


@pytest.mark.slow
def test_a_run_from_shards_stopped_mid_epoch_and_resumed_equals_one_that_never_stopped(
        tiny_sd_model, cached_dataset, tmp_path):
    shards = _pack(cached_dataset, tmp_path / "shards")
    common = ("--batch_size", "4", "--gradient_accum", "2", "--max_steps", "8", "--log_every", "1")
    straight = train(parse_train_args(_args(tiny_sd_model, shards, tmp_path / "straight", *common)))
    stopped = train(parse_train_args(_args(tiny_sd_model, shards, tmp_path / "resumed", *common)),
                    interrupt_after_batches=5)
    assert stopped.interrupted and stopped.steps == 3
    resumed = train(parse_train_args(_args(tiny_sd_model, shards, tmp_path / "resumed", *common, "--resume")))
    assert resumed.steps == 8
    assert _logged(stopped, "train/loss") + _logged(resumed, "train/loss") == _logged(straight, "train/loss")
    assert _same_weights(tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.slow
def test_a_missing_and_a_cut_short_shard_are_named_and_their_pairs_passed_over(
        tiny_sd_model, cached_dataset, tmp_path, capsys):
    shards = _pack(cached_dataset, tmp_path / "shards")
    names = [shard["name"] for shard in json.loads((shards / "shards.json").read_text())["shards"]]
    (shards / names[0]).unlink()
    data = (shards / names[1]).read_bytes()
    (shards / names[1]).write_bytes(data[: len(data) // 2])
    result = train(parse_train_args(_args(tiny_sd_model, shards, tmp_path / "run", "--batch_size", "4",
                                          "--max_steps", "12", "--log_every", "1", "--max_bad_fraction", "0.9")))
    assert result.steps == 12
    err = capsys.readouterr().err
    assert f"{names[0]}#row" in err and "shard is missing" in err
    assert f"{names[1]}#row" in err and "cut short" in err
    assert _logged(result, "train/skipped_samples")[-1][1] > 0



def test_a_shard_file_that_holds_other_pairs_than_its_manifest_lists_is_named_and_passed_over(
        tiny_sd_model, cached_dataset, tmp_path, capsys):
    """A shard file replaced by another (of any size): its rows are not trained as the pairs the manifest
    names; here the manifest's keys of one shard are changed, which is the same mismatch seen from the
    other side."""
    shards = _pack(cached_dataset, tmp_path / "shards")
    manifest_path = shards / "shards.json"
    manifest = json.loads(manifest_path.read_text())
    changed = manifest["shards"][1]
    changed["keys"] = [f"elsewhere/{key}" for key in changed["keys"]]
    manifest_path.write_text(json.dumps(manifest))
    result = train(parse_train_args(_args(tiny_sd_model, shards, tmp_path / "run", "--batch_size", "4",
                                          "--max_steps", "6", "--log_every", "1", "--max_bad_fraction", "0.9")))
    assert result.steps == 6
    err = capsys.readouterr().err
    assert f"{changed['name']}#row" in err and "its rows are not the pairs its manifest lists" in err
    skipped = _logged(result, "train/skipped_samples")[-1][1]
    assert 0 < skipped <= changed["rows"]

def test_aspect_buckets_and_equal_balance_come_from_the_manifest(tiny_sd_model, cached_dataset, tmp_path, capsys):
    second = tmp_path / "second"
    second.mkdir()
    for path in sorted((cached_dataset / "part0").iterdir())[:12]:  # a smaller second data root
        (second / path.name).write_bytes(path.read_bytes())
    assert pack([str(cached_dataset), str(second), "--out", str(tmp_path / "shards"), "--pairs_per_shard", "8"]) == 0
    common = ("--batch_size", "4", "--max_steps", "3", "--aspect_buckets", "--data_balance", "equal")
    from_tree = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "tree", *common)
                                       + ["--train_data_dir", str(second)]))
    tree_log = capsys.readouterr().err
    from_shards = train(parse_train_args(_args(tiny_sd_model, tmp_path / "shards", tmp_path / "shards-run", *common)))
    shard_log = capsys.readouterr().err
    assert "each gives 48 draws to every epoch" in tree_log and "each gives 48 draws to every epoch" in shard_log
    assert "aspect buckets" in shard_log
    assert from_shards.steps == from_tree.steps == 3
    assert _same_weights(tmp_path / "tree", tmp_path / "shards-run")


def test_caption_dropout_from_shards_swaps_in_the_empty_prompt_the_pack_carried(tiny_sd_model, cached_dataset,
                                                                                tmp_path, capsys):
    from cachetrain.sidecar import CLIP_L_SUFFIX, empty_prompt_path
    from cachetrain.train.trainer import main

    shards = _pack(cached_dataset, tmp_path / "shards")
    carried = shards / json.loads((shards / "shards.json").read_text())["empty_prompts"][0]
    assert carried.read_bytes() == empty_prompt_path(cached_dataset, CLIP_L_SUFFIX).read_bytes()
    flags = ("--batch_size", "8", "--max_steps", "2", "--caption_dropout", "0.5")
    for data, output in ((shards, "from-shards"), (cached_dataset, "from-tree")):
        assert main(_args(tiny_sd_model, data, tmp_path / output, *flags)) == 0
    assert _same_weights(tmp_path / "from-shards", tmp_path / "from-tree")  # the same captions dropped, alike
    assert main(_args(tiny_sd_model, shards, tmp_path / "no-dropout", *flags[:-2])) == 0
    assert not _same_weights(tmp_path / "from-shards", tmp_path / "no-dropout")
    # a set packed from a tree whose text cache wrote no empty prompt: refused at start, naming what to do
    empty_prompt_path(cached_dataset, CLIP_L_SUFFIX).unlink()
    bare = _pack(cached_dataset, tmp_path / "bare")
    capsys.readouterr()
    assert main(_args(tiny_sd_model, bare, tmp_path / "refused", *flags)) == 2
    assert "--caption_dropout needs the empty prompt's embedding of data root cached; the shard set" in \
        capsys.readouterr().err


def _damaged(manifest: dict, damage: str):
    shard = manifest["shards"][0]
    if damage == "a list":
        return [manifest]
    if damage == "no shards":
        del manifest["shards"]
    elif damage == "bytes not a number":
        shard["bytes"] = "many"
    elif damage == "empty text_widths":
        shard["text_widths"] = {}
    elif damage == "bad shape_ids":
        shard["shape_ids"] = [99] * shard["rows"]
    elif damage == "negative shape_ids":
        shard["shape_ids"] = [-1] * shard["rows"]
    elif damage == "roots null":
        manifest["roots"] = None
    elif damage == "a shard listed twice":
        manifest["shards"].append(shard)
    elif damage == "sha256 not a digest":
        shard["sha256"] = "abc"
    return manifest


@pytest.mark.parametrize("damage, reason", [
    ("a list", "not a readable shard manifest (a JSON list, not an object)"),
    ("no shards", "not a readable shard manifest (no 'shards' list)"),
    ("bytes not a number", "not a readable shard manifest (shard 0 (shard-"),
    ("empty text_widths", "'text_widths' is not a count of text widths"),
    ("bad shape_ids", "'shape_ids' is not a list of"),
    ("negative shape_ids", "'shape_ids' is not a list of"),
    ("roots null", "not a readable shard manifest ('roots' is None, not a list of data root names)"),
    ("a shard listed twice", "is listed twice (also shard 0)"),
    ("sha256 not a digest", "'sha256' is 'abc', not a SHA-256 digest"),
])
def test_a_damaged_shard_manifest_is_refused_at_start_in_one_line(tiny_sd_model, cached_dataset, tmp_path, capsys,
                                                                  damage, reason):
    from cachetrain.train.trainer import main

    shards = _pack(cached_dataset, tmp_path / "shards")
    manifest_path = shards / "shards.json"
    manifest_path.write_text(json.dumps(_damaged(json.loads(manifest_path.read_text()), damage)))
    capsys.readouterr()
    assert main(_args(tiny_sd_model, shards, tmp_path / "run", "--batch_size", "4", "--max_steps", "1")) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"error: {manifest_path}: ") and reason in lines[0]
    assert not (tmp_path / "run" / "unet").exists()


def test_a_shard_manifest_of_a_newer_format_version_is_refused_naming_it(tiny_sd_model, cached_dataset, tmp_path,
                                                                        capsys):
    from cachetrain.train.trainer import main

    shards = _pack(cached_dataset, tmp_path / "shards")
    manifest_path = shards / "shards.json"
    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "version": 99}))
    capsys.readouterr()
    assert main(_args(tiny_sd_model, shards, tmp_path / "run", "--batch_size", "4", "--max_steps", "1")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (f"error: {manifest_path}: shard manifest format version 99 is newer than this cachetrain reads (<= 1)"
            in err)
