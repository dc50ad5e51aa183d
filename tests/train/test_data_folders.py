"""Per-folder repeats, weights, loss weights and caption dropout (--dataset_config): each folder's share
of an epoch, printed at start; its loss weight applied per sample; its own caption dropout; exact resume.

The cached dataset (48 pairs in part0..part3) is split into two data folders: "small" (part0, 12 pairs)
and "large" (part1..part3, 36 pairs), each with the empty prompt's embedding.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from cachetrain.train.config import ConfigError, parse_train_args
from cachetrain.train.epoch_order import EpochOrder
from cachetrain.train.trainer import train
from tests.conftest import CACHED_LATENT_SHAPE
from tests.training_support import logged, record_unet_text_inputs, unet_weights


@pytest.fixture
def two_folders(cached_dataset, tmp_path) -> tuple[Path, Path]:
    small, large = tmp_path / "small", tmp_path / "large"
    shutil.move(cached_dataset / "part0", small)
    large.mkdir()
    for part in ("part1", "part2", "part3"):
        shutil.move(cached_dataset / part, large / part)
    for folder in (small, large):
        shutil.copy(cached_dataset / ".empty_prompt.txt_clipl", folder)
    return small, large


def _dataset_file(path: Path, *tables: dict) -> Path:
    lines = []
    for table in tables:
        lines.append("[[folder]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    path.write_text("# the data of this test\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def _args(model, output, dataset_file, *extra) -> list[str]:
    return ["--pretrained_model", str(model), "--dataset_config", str(dataset_file), "--output_dir", str(output),
            "--num_workers", "0", "--no_progress", "--learning_rate", "1e-3", "--save_steps", "0",
            "--gradient_clip", "0", "--batch_size", "4", *extra]


# ---------------------------------------------------------------------------------------------
# The file and the order


@pytest.mark.parametrize("content, message", [
    ("[[folder]]\npath = 'a'\nrepeat = 2\n", "folder 1: unknown key\\(s\\) repeat"),
    ("[[folder]]\npath = 'a'\nrepeats = 2\nweight = 1\n", "folder 1: give repeats or weight, not both"),
    ("[[folder]]\npath = 'a'\nweight = 1\n[[folder]]\npath = 'b'\n", "give weight in every \\[\\[folder\\]\\] table"),
    ("[[folder]]\npath = 'a'\nrepeats = 0\n", "folder 1: repeats must be > 0, got 0"),
    ("[[folder]]\npath = 'a'\ncaption_dropout = 1\n", "caption_dropout must be >= 0 and < 1"),
    ("[[folder]]\nrepeats = 1\n", "folder 1: needs path"),
    ("path = 'a'\n", "wants one \\[\\[folder\\]\\] table per data folder"),
    ("[[folder]\n", "not a TOML file"),
    ("[[folder]]\npath = 'a'\n[[folder]]\npath = './a/'\nrepeats = 3\n", "folders 1 and 2 are the same folder"),
    ("[[folder]]\npath = 'a'\n[[folder]]\npath = 'a/faces'\nrepeats = 3\n",
     "folder 2 \\(.*faces\\) lies inside folder 1 \\(.*\\), which takes its pairs first; list it before folder 1"),
])
def test_a_bad_dataset_file_is_refused_naming_the_file_and_the_folder(tmp_path, content, message):
    dataset_file = tmp_path / "data.toml"
    dataset_file.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=f"--dataset_config {dataset_file}: .*{message}"):
        parse_train_args(["--pretrained_model", "m", "--dataset_config", str(dataset_file)])


def test_a_folder_listed_before_the_folder_around_it_keeps_its_own_pairs(tmp_path):
    # a pair belongs to the first listed folder holding it: faces first gives its table the faces,
    # and the folder around it the rest
    from cachetrain.sidecar import CLIP_L_SUFFIX, SD_VAE_SUFFIX
    from cachetrain.train.data_folders import read_dataset_file
    from cachetrain.tree import index_training_pairs

    for stem in ("all/a", "all/b", "all/faces/c"):
        (tmp_path / stem).parent.mkdir(parents=True, exist_ok=True)
        for suffix in (SD_VAE_SUFFIX, CLIP_L_SUFFIX):
            (tmp_path / f"{stem}{suffix}").write_bytes(b"")
    folders = read_dataset_file(_dataset_file(tmp_path / "data.toml", {"path": "all/faces", "repeats": 3},
                                              {"path": "all"}))
    index, _ = index_training_pairs([folder.path for folder in folders], SD_VAE_SUFFIX, CLIP_L_SUFFIX)
    assert Counter(index.root_ids()) == {0: 1, 1: 2}


def test_dataset_file_folders_are_relative_to_it_and_exclude_train_data_dir_and_data_balance(tmp_path):
    dataset_file = _dataset_file(tmp_path / "data.toml", {"path": "a"}, {"path": str(tmp_path / "b")})
    config = parse_train_args(["--pretrained_model", "m", "--dataset_config", str(dataset_file)])
    assert config.train_data_dir == [str(tmp_path / "a"), str(tmp_path / "b")]
    with pytest.raises(ConfigError, match="give --dataset_config or --train_data_dir, not both"):
        parse_train_args(["--pretrained_model", "m", "--dataset_config", str(dataset_file), "--train_data_dir", "x"])
    with pytest.raises(ConfigError, match="--data_balance: with --dataset_config"):
        parse_train_args(["--pretrained_model", "m", "--dataset_config", str(dataset_file), "--data_balance", "equal"])
    with pytest.raises(ConfigError, match="--train_data_dir is required \\(or --dataset_config\\)"):
        parse_train_args(["--pretrained_model", "m"])


def test_a_weighted_order_gives_each_folder_its_draws_and_a_fractional_repeat_a_fresh_subset_each_epoch():
    from cachetrain.train.data_folders import DataFolder, folder_draws

    groups = [0] * 6 + [1] * 18
    assert folder_draws([DataFolder("a", repeats=2.5), DataFolder("b", repeats=0.5)], [6, 18]) == [15, 9]
    assert folder_draws([DataFolder("a", weight=3), DataFolder("b", weight=1)], [6, 18]) == [18, 6]
    order = EpochOrder(24, 4, seed=1, groups=groups, balance="weighted", group_draws=[15, 9])
    assert order.batches_per_epoch() == 6  # 24 draws
    subsets = set()
    for epoch in range(4):
        _, samples, draws, _ = order.epoch(epoch)
        seen = Counter(samples.flatten().tolist())
        assert sum(seen[i] for i in range(6)) == 15 and sum(seen[i] for i in range(6, 24)) == 9
        assert all(seen[i] in (2, 3) for i in range(6))  # 2.5 passes: every sample twice, half of them thrice
        assert all(seen[i] <= 1 for i in range(6, 24))
        keys = draws.flatten().tolist()
        assert len(keys) == len(set(keys))  # each repeat draws noise of its own
        subsets.add(frozenset(i for i in range(6, 24) if seen[i]))
        again = order.epoch(epoch)
        assert torch.equal(again[1], samples) and torch.equal(again[2], draws)
    assert len(subsets) > 1  # the half of the large folder changes from epoch to epoch
    # equal balance is the weighted order with every folder drawn as often as the largest has pairs
    equal = EpochOrder(24, 4, seed=1, groups=groups, balance="equal").epoch(2)
    same = EpochOrder(24, 4, seed=1, groups=groups, balance="weighted", group_draws=[18, 18]).epoch(2)
    assert torch.equal(equal[1], same[1]) and torch.equal(equal[2], same[2])


# ---------------------------------------------------------------------------------------------
# Through the trainer


@pytest.mark.slow
def test_repeats_set_each_folders_share_of_an_epoch_and_the_start_prints_them(tiny_sd_model, two_folders, tmp_path,
                                                                             capsys):
    from cachetrain.commands import train_from_cached

    small, large = two_folders
    dataset_file = _dataset_file(tmp_path / "data.toml", {"path": "small", "repeats": 3},
                                 {"path": "large", "repeats": 0.5, "loss_weight": 0.5})
    assert train_from_cached(_args(tiny_sd_model, tmp_path / "run", dataset_file, "--max_steps", "1e")) == 0
    err = capsys.readouterr().err
    assert (f"[train] --dataset_config {dataset_file}: 54 draws an epoch; {small}: 12 pairs x 3 repeats = 36 draws "
            f"(66.7% of an epoch), loss weight 1, caption dropout 0; {large}: 36 pairs x 0.5 repeats = 18 draws "
            "(33.3% of an epoch), loss weight 0.5, caption dropout 0") in err, err
    assert "13 batches/epoch/process" in err  # 54 draws, batches of 4
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 13 and summary["process_sample_counts"] == [52]

    weights_file = _dataset_file(tmp_path / "weights.toml", {"path": "small", "weight": 1}, {"path": "large", "weight": 1})
    assert train_from_cached(_args(tiny_sd_model, tmp_path / "weighted", weights_file, "--max_steps", "1")) == 0
    assert (f"48 draws an epoch; {small}: 12 pairs, weight 1: 24 draws (50.0% of an epoch)"
            in capsys.readouterr().err)


def test_a_folder_with_loss_weight_zero_teaches_nothing(tiny_sd_model, two_folders, tmp_path):
    """Its samples still fill batches, but their loss is multiplied by 0: whatever its latents hold,
    the trained weights are the same (AdamW without weight decay moves nothing on zero gradients)."""
    from cachetrain.sidecar import read_metadata, write_sidecar

    small, large = two_folders
    dataset_file = _dataset_file(tmp_path / "data.toml", {"path": "small", "loss_weight": 0.0},
                                 {"path": "large", "loss_weight": 2.0})
    common = ("--max_steps", "4", "--weight_decay", "0", "--log_every", "1")
    first = train(parse_train_args(_args(tiny_sd_model, tmp_path / "first", dataset_file, *common)))
    generator = torch.Generator().manual_seed(9)
    for path in sorted(small.glob("*.img_sdvae")):  # other latents in the loss-weight-0 folder
        write_sidecar(path, {"latent": torch.randn(CACHED_LATENT_SHAPE, generator=generator) * 5}, read_metadata(path))
    second = train(parse_train_args(_args(tiny_sd_model, tmp_path / "second", dataset_file, *common)))
    a, b = unet_weights(tmp_path / "first"), unet_weights(tmp_path / "second")
    assert all(torch.allclose(a[name], b[name], rtol=0, atol=1e-7) for name in a)
    assert logged(first, "train/loss_raw") != logged(second, "train/loss_raw")  # the folder was trained on
    assert logged(first, "train/loss") != logged(first, "train/loss_raw")


def test_repeats_that_make_an_epoch_too_large_to_hold_are_refused_at_start(tiny_sd_model, two_folders, tmp_path,
                                                                          capsys):
    from cachetrain.commands import train_from_cached

    dataset_file = _dataset_file(tmp_path / "data.toml", {"path": "small", "repeats": 1e9}, {"path": "large"})
    assert train_from_cached(_args(tiny_sd_model, tmp_path / "run", dataset_file, "--max_steps", "1")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --dataset_config {dataset_file}: its repeats make an epoch of 12,000,000,036 draws, "
                      "more than 2,147,483,647; lower them"]
    assert not list((tmp_path / "run").glob("checkpoint-*"))



@pytest.mark.parametrize("case", ["a missing folder", "a file for a folder", "repeats too few for a batch"])
def test_a_dataset_file_the_data_cannot_follow_is_refused_at_start_naming_the_file_and_the_folder(
        tiny_sd_model, two_folders, tmp_path, capsys, case):
    from cachetrain.commands import train_from_cached

    (tmp_path / "notes.txt").write_text("not a folder")
    tables = {"a missing folder": [{"path": "small"}, {"path": "gone"}],
              "a file for a folder": [{"path": "small"}, {"path": "notes.txt"}],
              "repeats too few for a batch": [{"path": "small", "repeats": 0.1}]}[case]
    dataset_file = _dataset_file(tmp_path / "data.toml", *tables)
    # batch 1: 12 pairs x 0.1 repeats = 1 draw, one batch; batch 2 is more than the draws, not the pairs
    assert train_from_cached(_args(tiny_sd_model, tmp_path / "run", dataset_file, "--max_steps", "1",
                                   "--batch_size", "2")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    expected = {"a missing folder": f"folder 2: {tmp_path / 'gone'}: no such folder",
                "a file for a folder": f"folder 2: {tmp_path / 'notes.txt'}: is a file, not a folder",
                "repeats too few for a batch": "its folders give 1 draws an epoch, fewer than one batch of 2; "
                                               "raise their repeats"}[case]
    assert errors == [f"error: --dataset_config {dataset_file}: {expected}"]
    assert not list((tmp_path / "run").glob("checkpoint-*"))

def test_each_folder_drops_captions_at_its_own_rate(tiny_sd_model, two_folders, tmp_path, monkeypatch):
    from cachetrain.sidecar import TEXT_EMBEDDING_KEY, read_sidecar
    from cachetrain.train.objective import draw_sample_noise, sample_key

    small, _ = two_folders
    dataset_file = _dataset_file(tmp_path / "data.toml", {"path": "small", "caption_dropout": 0.5},
                                 {"path": "large", "caption_dropout": 0.0})
    contexts = record_unet_text_inputs(monkeypatch)
    train(parse_train_args(_args(tiny_sd_model, tmp_path / "run", dataset_file, "--max_steps", "12",
                                 "--caption_dropout", "0.9")))  # the file's rates win over the flag
    empty = read_sidecar(small / ".empty_prompt.txt_clipl", TEXT_EMBEDDING_KEY, ndim=2).float()
    dropped = sum(int(torch.equal(row, empty)) for batch in contexts for row in batch)
    # expected: the small folder's samples whose dropout draw of this epoch is below 0.5; none of the large one
    order = EpochOrder(48, 4, seed=0, groups=[0] * 12 + [1] * 36, balance="weighted", group_draws=[12, 36])
    _, samples, draws, _ = order.epoch(0)
    expected = sum(draw_sample_noise(CACHED_LATENT_SHAPE, 0.0, sample_key(0, 0, d))[2] < 0.5
                   for s, d in zip(samples.flatten().tolist(), draws.flatten().tolist()) if s < 12)
    assert 0 < dropped == expected < 12


@pytest.mark.slow
def test_a_dataset_file_run_stopped_and_resumed_ends_with_the_weights_of_an_unbroken_run(tiny_sd_model, two_folders,
                                                                                        tmp_path):
    from cachetrain.train.trainer import TrainingError

    dataset_file = _dataset_file(tmp_path / "data.toml",
                                 {"path": "small", "repeats": 1.5, "loss_weight": 2.0, "caption_dropout": 0.3},
                                 {"path": "large", "repeats": 0.5})
    common = ("--gradient_accum", "2", "--max_steps", "8", "--log_every", "1")
    straight = train(parse_train_args(_args(tiny_sd_model, tmp_path / "straight", dataset_file, *common)))
    # 18 + 18 draws: 9 batches, 4 optimizer steps an epoch; stopped inside epoch 1
    stopped = train(parse_train_args(_args(tiny_sd_model, tmp_path / "resumed", dataset_file, *common)),
                    interrupt_after_batches=11)
    assert stopped.interrupted and stopped.steps == 6
    resumed = train(parse_train_args(_args(tiny_sd_model, tmp_path / "resumed", dataset_file, *common, "--resume")))
    assert resumed.steps == 8
    assert logged(stopped, "train/loss") + logged(resumed, "train/loss") == logged(straight, "train/loss")
    a, b = unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "resumed")
    assert all(torch.equal(a[name], b[name]) for name in a)
    # other repeats are another order: refused on resume, naming what changed
    _dataset_file(dataset_file, {"path": "small", "repeats": 2}, {"path": "large", "repeats": 0.5})
    with pytest.raises(TrainingError, match="folder_draws was 18,18, now 24,18"):
        train(parse_train_args(_args(tiny_sd_model, tmp_path / "resumed", dataset_file, *common, "--resume")))
