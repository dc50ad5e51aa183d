"""When a run saves and what failed saves mean (cachetrain.save_policy), without training."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from cachetrain.train import save_policy
from cachetrain.train.config import parse_train_args
from cachetrain.train.save_policy import SavePolicy, StopSignal


def _policy(tmp_path: Path, *flags: str, total_steps: int = 10, speaks: bool = True) -> SavePolicy:
    config = parse_train_args(["--pretrained_model", "m", "--train_data_dir", "d", "--output_dir", str(tmp_path),
                               *flags])
    return SavePolicy(config, total_steps, tmp_path, speaks=speaks)


def test_periodic_saves_fall_every_save_steps_from_save_start_and_the_last_step_is_the_final_save(tmp_path):
    policy = _policy(tmp_path, "--save_steps", "3", "--save_start", "4")
    due = {step: policy.take_due(step, requested=False) for step in range(1, 11)}
    assert {step for step, reason in due.items() if reason} == {6, 9}
    assert due[6] == "periodic"
    assert _policy(tmp_path, "--save_steps", "5").take_due(10, requested=False) is None  # final's, not periodic


def test_a_requested_save_is_due_at_once_and_a_periodic_one_takes_its_place(tmp_path):
    policy = _policy(tmp_path, "--save_steps", "3")
    assert policy.take_due(2, requested=True) == "requested"
    assert policy.take_due(3, requested=True) == "periodic"


def test_an_epoch_save_waits_for_the_next_step_unless_the_run_ends_there(tmp_path):
    policy = _policy(tmp_path, "--save_steps", "0", "--save_on_epoch")
    policy.epoch_ended(4)
    assert policy.take_due(5, requested=False) == "epoch"
    assert policy.take_due(6, requested=False) is None  # taken once
    policy.epoch_ended(4)
    assert policy.take_due(5, requested=True) == "requested"  # one save covers both
    assert policy.take_due(6, requested=False) is None
    policy.epoch_ended(10)  # the last step: the final save covers it
    assert policy.take_due(10, requested=False) is None
    plain = _policy(tmp_path, "--save_steps", "0")
    plain.epoch_ended(4)
    assert plain.take_due(5, requested=False) is None


def test_failed_saves_in_a_row_stop_the_run_at_max_failed_saves_and_a_good_one_resets_the_count(tmp_path, capsys):
    policy = _policy(tmp_path, "--max_failed_saves", "2")
    policy.record(2, "periodic", failed=True)
    assert not policy.gave_up
    assert "training goes on (1 of --max_failed_saves 2 failed saves in a row)" in capsys.readouterr().out
    policy.record(4, "periodic", failed=False)
    assert policy.is_saved(4) and policy.failed_in_a_row == 0
    policy.record(6, "requested", failed=True)
    policy.record(8, "epoch", failed=True)
    assert policy.gave_up and policy.failed_steps == [2, 6, 8]
    assert ("2 checkpoint saves in a row failed (limit --max_failed_saves 2); stopping at step 8 rather than "
            "training on with nothing to show. No checkpoint of this run was saved.") in capsys.readouterr().err


def test_a_failed_final_or_stop_save_is_recorded_but_not_counted_toward_giving_up(tmp_path, capsys):
    policy = _policy(tmp_path, "--max_failed_saves", "1")
    policy.record(3, "interrupted", failed=True)
    policy.record(10, "final", failed=True)
    assert policy.failed_steps == [3, 10] and not policy.gave_up and policy.failed_in_a_row == 0
    assert not policy.is_saved(10)
    quiet = _policy(tmp_path, "--max_failed_saves", "1", speaks=False)  # the other processes keep the record only
    quiet.record(2, "periodic", failed=True)
    assert quiet.gave_up and capsys.readouterr() == ("", "")


def test_a_stop_signal_asks_for_a_save_a_forwarded_repeat_is_said_and_a_later_one_means_out_now(monkeypatch, capsys):
    now = [100.0]
    monkeypatch.setattr(save_policy.time, "monotonic", lambda: now[0])
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal(launched=True) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        now[0] += save_policy.REPEATED_SIGNAL_SECONDS / 2  # the launcher forwarding the same Ctrl-C
        os.kill(os.getpid(), signal.SIGTERM)
        assert "taken as the launcher forwarding the first" in capsys.readouterr().out
        now[0] += save_policy.REPEATED_SIGNAL_SECONDS
        with pytest.raises(save_policy.StopNow):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


def test_without_a_launcher_a_second_signal_at_once_means_out_now():
    with StopSignal(launched=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(save_policy.StopNow):
            os.kill(os.getpid(), signal.SIGINT)
