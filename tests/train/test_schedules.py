"""LR schedules and run lengths: every schedule name, rex and linear_with_min_lr against their formulas,
fractional epochs, the per-epoch schedule, --learning_rate_decay, and exact resume for all of them.
"""

from __future__ import annotations


import pytest
import torch

from cachetrain.train.config import SCHEDULERS, parse_train_args
from cachetrain.train.optim import build_lr_schedule
from cachetrain.train.trainer import train
from tests.training_support import logged as _logged
from tests.training_support import train_args as _args
from tests.training_support import unet_weights as _unet_weights
from tests.script_runs import run_script

METRIC_SCHEDULES = ("reduce_lr_on_plateau", "greedy")  # refused: they follow a metric, not steps
STEP_SCHEDULES = [name for name in SCHEDULERS if name not in METRIC_SCHEDULES]


def _schedule(name: str, **options):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return optimizer, build_lr_schedule(name, optimizer, warmup_steps=3, total_steps=12, min_lr_ratio=0.2, **options)


def _rates(schedule, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        schedule.optimizer.step()
        schedule.step()
        rates.append(schedule.get_last_lr()[0])
    return rates


@pytest.mark.parametrize("name", STEP_SCHEDULES)
def test_every_schedule_resumes_from_its_state_to_the_same_rates(name):
    straight = _rates(_schedule(name, num_cycles=2 if "cosine" in name else None)[1], 12)
    _, first = _schedule(name, num_cycles=2 if "cosine" in name else None)
    before = _rates(first, 5)
    _, second = _schedule(name, num_cycles=2 if "cosine" in name else None)  # a new process
    second.load_state_dict(first.state_dict())
    assert before + _rates(second, 7) == straight
    assert len(set(straight)) > 1 or name == "constant"  # the schedule moves


def test_rex_and_linear_with_min_lr_follow_their_formulas():
    # rex as the original scripts run it: torch's LinearLR warm-up from --rex_start_factor to the peak,
    # then REX z / (0.1 + 0.9 z) from the peak down to --min_lr_ratio, z the share of the decay to go
    rex = _rates(_schedule("rex", rex_start_factor=0.8)[1], 12)
    linear = _rates(_schedule("linear_with_min_lr")[1], 12)
    for step in range(1, 13):
        if step < 3:
            expected_rex, expected_linear = 0.8 + 0.2 * step / 3, step / 3
        else:
            done = (step - 3) / 9
            expected_rex = 0.2 + 0.8 * (1 - done) / (0.1 + 0.9 * (1 - done))
            expected_linear = 0.2 + 0.8 * (1 - done)
        assert rex[step - 1] == pytest.approx(expected_rex)
        assert linear[step - 1] == pytest.approx(expected_linear)
    assert rex[-1] == pytest.approx(0.2)  # the floor is --min_lr_ratio of the peak


def test_rex_flags_take_the_original_scripts_command_line_and_meaning():
    config = parse_train_args(["--pretrained_model", "m", "--train_data_dir", "d", "--scheduler", "rex",
                               "--rex_start_factor", "0.5", "--rex_end_factor", "--min_lr_ratio", "0.05"])
    assert (config.rex_start_factor, config.min_lr_ratio) == (0.5, 0.05)
    old_name = parse_train_args(["--pretrained_model", "m", "--train_data_dir", "d", "--min_learning_rate", "0.3"])
    assert old_name.min_lr_ratio == 0.3


def test_num_cycles_sets_the_cosine_periods():
    import math

    for num_cycles in (None, 2.0, 0.75):  # None: the default half-wave, from the peak down to 0
        rates = _rates(_schedule("cosine", num_cycles=num_cycles)[1], 12)
        cycles = 0.5 if num_cycles is None else num_cycles
        expected = [0.5 * (1 + math.cos(2 * math.pi * cycles * (step - 3) / 9)) for step in range(3, 13)]
        assert rates[2:] == pytest.approx(expected)


def test_fractional_epochs_set_the_run_length_and_warm_up(tiny_sd_model, cached_dataset, tmp_path):
    # 48 pairs, batch 8: 6 steps per epoch; 2.5 epochs = 15 steps; half an epoch of warm-up = 3 steps
    result = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--batch_size", "8",
                                          "--max_steps", "2.5e", "--warmup_steps", "0.5e", "--log_every", "1")))
    rates = dict(_logged(result, "train/learning_rate"))
    assert result.steps == 15
    assert rates[1] == pytest.approx(1e-3 / 3) and rates[2] == pytest.approx(2e-3 / 3)
    assert rates[3] == pytest.approx(1e-3) and rates[15] == pytest.approx(1e-3)


def test_scheduler_at_epoch_moves_the_rate_only_when_an_epoch_ends(tiny_sd_model, cached_dataset, tmp_path):
    result = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--batch_size", "8",
                                          "--max_steps", "3e", "--scheduler", "linear", "--scheduler_at_epoch",
                                          "--log_every", "1")))
    rates = dict(_logged(result, "train/learning_rate"))
    assert result.steps == 18
    # a linear decay over 3 epochs: epoch 0 at the peak, epoch 1 at 2/3, epoch 2 at 1/3 of it
    for steps, factor in ((range(1, 7), 1.0), (range(7, 13), 2 / 3), (range(13, 19), 1 / 3)):
        assert [rates[step] for step in steps] == pytest.approx([1e-3 * factor] * 6)


@pytest.mark.parametrize("schedule", [
    ["--scheduler", "rex", "--scheduler_at_epoch", "--warmup_steps", "1e", "--max_steps", "3e",
     "--rex_start_factor", "0.5"],
    ["--scheduler", "linear_with_min_lr", "--warmup_steps", "0.5e", "--max_steps", "1.5e"],
    ["--scheduler", "cosine_with_restarts", "--num_cycles", "2", "--warmup_steps", "2", "--max_steps", "9"],
], ids=lambda flags: flags[1])
def test_a_stopped_and_resumed_run_keeps_the_schedule_exactly(tiny_sd_model, cached_dataset, tmp_path, schedule):
    # batch 4, accumulation 2: 6 optimizer steps per epoch; the stop comes in epoch 1 (micro-batch 15)
    common = ("--batch_size", "4", "--gradient_accum", "2", "--log_every", "1", *schedule)
    straight = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "straight", *common)))
    stopped = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "resumed", *common)),
                    interrupt_after_batches=15)
    assert stopped.interrupted and stopped.steps == 8
    resumed = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "resumed", *common, "--resume")))
    assert resumed.steps == straight.steps
    rates = _logged(stopped, "train/learning_rate") + _logged(resumed, "train/learning_rate")
    assert rates == _logged(straight, "train/learning_rate")
    assert len({rate for _, rate in rates}) > 2
    final = f"checkpoint-{straight.steps:05d}"
    a, b = _unet_weights(tmp_path / "straight" / final), _unet_weights(tmp_path / "resumed" / final)
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("flags, message", [
    (["--scheduler", "reduce_lr_on_plateau"], "follow; use a schedule of steps"),
    (["--warmup_steps", "half"], "--warmup_steps wants a number of steps or Ne"),
])
def test_schedule_flags_that_cannot_work_fail_at_start(flags, message, tmp_path):
    done = run_script("train_from_cached.py", "--pretrained_model", tmp_path / "none", "--train_data_dir", tmp_path,
                      *flags)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_learning_rate_decay_subtracts_once_per_epoch(tiny_sd_model, cached_dataset, tmp_path):
    result = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--batch_size", "8",
                                          "--max_steps", "3e", "--log_every", "1", "--learning_rate_decay", "1e-4")))
    rates = dict(_logged(result, "train/learning_rate"))
    assert result.steps == 18  # 6 steps per epoch
    assert rates[6] == pytest.approx(1e-3) and rates[7] == pytest.approx(9e-4) and rates[13] == pytest.approx(8e-4)
