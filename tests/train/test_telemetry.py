"""Telemetry: the health of a logging window's optimizer steps (skipped steps, the longest bad run)."""

from __future__ import annotations

import torch


def test_a_run_of_bad_steps_is_seen_even_when_a_good_step_ends_it_before_logging():
    from cachetrain.train.telemetry import StepHealth

    health = StepHealth(torch.device("cpu"))
    for bad in [0, 1, 1, 1, 1, 0, 1, 0]:
        health.record(found_inf=torch.tensor(float(bad)), grad_norm=torch.tensor(1.0))
    scalars = health.window_scalars()
    assert scalars["_worst_bad_run"].item() == 4
    assert scalars["train/skipped_steps"].item() == 5
