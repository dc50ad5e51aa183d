"""Validation (cachetrain.validation): the held-out pairs and val/loss at noise and timesteps fixed for
the whole run."""

from __future__ import annotations

import pytest

from cachetrain.train.config import parse_train_args


def _args(model, data, output, *extra) -> list[str]:
    return ["--pretrained_model", str(model), "--train_data_dir", str(data), "--output_dir", str(output),
            "--num_workers", "0", "--no_progress", "--learning_rate", "1e-3", "--save_steps", "0",
            "--gradient_clip", "0", *extra]


def _val_losses(result) -> dict[int, float]:
    return {entry["step"]: entry["val/loss"] for entry in result.logged if "val/loss" in entry}


def test_the_held_out_pairs_are_a_seeded_fixed_share_never_trained_on(cached_dataset):
    from cachetrain.tree import index_training_pairs
    from cachetrain.train.validation import split_validation

    index, _ = index_training_pairs([cached_dataset], ".img_sdvae", ".txt_clipl")
    train_pairs, held_out = split_validation(index, 0.25, seed=0)
    names = lambda pairs: [pairs[i][0] for i in range(len(pairs))]  # noqa: E731
    assert len(held_out) == 12 and len(train_pairs) == 36
    assert not set(names(train_pairs)) & set(names(held_out))
    assert names(split_validation(index, 0.25, seed=0)[1]) == names(held_out)
    assert names(split_validation(index, 0.25, seed=1)[1]) != names(held_out)
    assert split_validation(index, 0.0, seed=0) == (index, None)


def test_validation_loss_of_the_same_weights_is_the_same_at_any_point_of_any_run(tiny_sd_model, cached_dataset,
                                                                                 tmp_path):
    """val/loss at step 2 of one run, and val/loss of that step's checkpoint evaluated at step 0 of a new
    run, see the same weights: they are equal only if the noise and timesteps do not depend on when
    (which step, epoch or evaluation) the loss is computed."""
    common = ("--batch_size", "8", "--validation_split", "0.25", "--seed", "0")
    first = _train(_args(tiny_sd_model, cached_dataset, tmp_path / "first", *common, "--max_steps", "6",
                         "--validation_steps", "2", "--save_steps", "2"))
    values = _val_losses(first)
    assert sorted(values) == [0, 2, 4, 6]
    assert values[6] < values[0]  # training lowers the held-out loss
    assert len(set(values.values())) == 4  # the weights changed between evaluations, and so did val/loss
    assert first.steps == 6  # 36 pairs, batch 8: 4 steps an epoch, so step 6's evaluation is in another epoch
    again = _train(_args(tmp_path / "first" / "checkpoint-00002", cached_dataset, tmp_path / "again", *common,
                         "--max_steps", "1", "--validation_steps", "1"))
    assert _val_losses(again)[0] == pytest.approx(values[2], rel=1e-6)
    later = _train(_args(tmp_path / "first" / "checkpoint-00006", cached_dataset, tmp_path / "later", *common,
                         "--max_steps", "1", "--validation_steps", "1"))
    assert _val_losses(later)[0] == pytest.approx(values[6], rel=1e-6)


def _train(args):
    from cachetrain.train.trainer import train

    return train(parse_train_args(args))
