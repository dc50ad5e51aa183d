"""--data_balance round_robin: the original scripts' rule for several --train_data_dir. Each use of the
flag is a stream of its own; an epoch takes one batch from each in turn, as many rounds as the
smallest has batches; a larger one carries on where it stopped; a stopped run resumes exactly."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest
import torch

from cachetrain.train.config import ConfigError, parse_train_args
from cachetrain.train.epoch_order import EpochOrder
from cachetrain.train.trainer import TrainingError, train
from tests.training_support import logged as _logged
from tests.training_support import train_args as _args
from tests.training_support import unet_weights as _unet_weights


def test_an_epoch_is_the_smallest_groups_batches_times_the_groups_drawn_in_turn():
    groups = [0] * 8 + [1] * 20  # 2 batches of 4 in the small group, 5 in the large
    order = EpochOrder(28, 4, seed=3, groups=groups, balance="round_robin")
    assert order.batches_per_epoch() == 2 * 2
    large_seen = Counter()
    for epoch in range(5):
        _, samples, draws, _ = order.epoch(epoch)
        rows = samples.tolist()
        assert [all(i < 8 for i in row) for row in rows] == [True, False, True, False]  # small, large, ...
        assert sorted(i for row in rows[::2] for i in row) == list(range(8))  # the small group: one pass
        large_seen.update(i for row in rows[1::2] for i in row)
        keys = draws.flatten().tolist()
        assert len(keys) == len(set(keys))  # a sample met in two passes of one epoch draws noise of its own
    # 5 epochs took 10 of the large group's batches: two whole passes, not its first 2 batches 5 times
    assert set(large_seen) == set(range(8, 28)) and set(large_seen.values()) == {2}


def test_round_robin_shares_of_two_processes_are_disjoint_batches_of_the_same_epoch():
    groups = [0] * 8 + [1] * 20
    whole = EpochOrder(28, 4, seed=3, groups=groups, balance="round_robin").epoch(2)[1].tolist()
    shares = [EpochOrder(28, 4, seed=3, rank=r, world_size=2, groups=groups, balance="round_robin").epoch(2)[1]
              for r in range(2)]
    assert shares[0].tolist() == whole[0::2] and shares[1].tolist() == whole[1::2]


def test_each_use_of_train_data_dir_is_one_group_as_the_original_loaders_were():
    config = parse_train_args(["--pretrained_model", "m", "--train_data_dir", "a", "b", "--train_data_dir", "c",
                               "--data_balance", "round_robin"])
    assert (config.train_data_dir, config.train_data_groups) == (["a", "b", "c"], [0, 0, 1])
    with pytest.raises(ConfigError, match="--data_balance round_robin takes one latent shape"):
        parse_train_args(["--pretrained_model", "m", "--train_data_dir", "a", "--data_balance", "round_robin",
                          "--aspect_buckets"])


def _flags(model, output, *extra) -> list[str]:
    """The tiny run's flags with the data folders given in ``extra``."""
    flags = _args(model, "-", output, *extra)
    del flags[2:4]  # the helper's own --train_data_dir
    return flags


@pytest.fixture
def two_folders(cached_dataset, tmp_path):
    """12 pairs in one folder, 36 in the other."""
    small, large = tmp_path / "small", tmp_path / "large"
    shutil.move(cached_dataset / "part0", small)
    large.mkdir()
    for part in ("part1", "part2", "part3"):
        shutil.move(cached_dataset / part, large / part)
    return small, large


def test_round_robin_through_the_trainer_resumes_exactly(tiny_sd_model, two_folders, tmp_path, capsys):
    small, large = two_folders
    # batch 4: 3 rounds of (small, large) = 6 batches an epoch; accumulation 2: 3 optimizer steps an epoch
    common = ("--train_data_dir", str(small), "--train_data_dir", str(large), "--data_balance", "round_robin",
              "--batch_size", "4", "--gradient_accum", "2", "--max_steps", "8", "--log_every", "1")
    straight = train(parse_train_args(_flags(tiny_sd_model, tmp_path / "straight", *common)))
    assert "--data_balance round_robin: 2 group(s) holding 12, 36 pairs; an epoch is 3 batch(es) from each" \
        in capsys.readouterr().err
    assert straight.steps == 8
    stopped_args = _flags(tiny_sd_model, tmp_path / "resumed", *common)
    stopped = train(parse_train_args(stopped_args), interrupt_after_batches=9)  # mid-accumulation of step 5
    assert stopped.interrupted and stopped.steps == 5
    resumed = train(parse_train_args([*stopped_args, "--resume"]))
    assert resumed.steps == 8
    assert _logged(stopped, "train/loss") + _logged(resumed, "train/loss") == _logged(straight, "train/loss")
    a = _unet_weights(tmp_path / "straight" / "checkpoint-00008")
    b = _unet_weights(tmp_path / "resumed" / "checkpoint-00008")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_group_without_a_whole_batch_is_refused_naming_it(tiny_sd_model, two_folders, tmp_path):
    small, large = two_folders
    flags = _flags(tiny_sd_model, tmp_path / "out", "--train_data_dir", str(small), "--train_data_dir",
                   str(large), "--data_balance", "round_robin", "--batch_size", "16")
    with pytest.raises(TrainingError, match=r"each --train_data_dir needs at least one batch of 16 pairs; .*small \(12 pairs\)"):
        train(parse_train_args(flags))
