"""The EMA of the trained weights (cachetrain.ema): made in one place, swapped in by one context."""

from __future__ import annotations

import pytest
import torch

from cachetrain.train.ema import ema_weights, make_ema


def _parameters(dtype=torch.float32) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return list(torch.nn.Linear(4, 3).to(dtype).parameters())


def _moved_on(parameters, ema) -> list[torch.Tensor]:
    """One EMA step after the weights moved; the trained weights as they are then."""
    with torch.no_grad():
        for p in parameters:
            p.add_(1.0)
    ema.step(parameters)
    return [p.detach().clone() for p in parameters]


def test_inside_ema_weights_the_parameters_hold_the_average_and_after_it_the_trained_weights():
    parameters = _parameters()
    ema = make_ema(parameters, 0.75, torch.device("cpu"))
    first = _moved_on(parameters, ema)  # diffusers' EMA takes the weights as they are at its first step
    trained = _moved_on(parameters, ema)
    decay = ema.cur_decay_value  # its warm-up: below the 0.75 asked for, above 0
    assert 0 < decay <= 0.75
    with ema_weights(ema, parameters):
        for p, f, t in zip(parameters, first, trained):
            torch.testing.assert_close(p.detach(), decay * f + (1 - decay) * t)
            assert not torch.equal(p, t)
    assert all(torch.equal(p, t) for p, t in zip(parameters, trained))


def test_the_trained_weights_come_back_when_the_block_fails():
    parameters = _parameters()
    ema = make_ema(parameters, 0.9, torch.device("cpu"))
    _moved_on(parameters, ema)
    trained = _moved_on(parameters, ema)  # two steps: the average now differs from the weights
    with pytest.raises(RuntimeError, match="sample failed"):
        with ema_weights(ema, parameters):
            assert not all(torch.equal(p, t) for p, t in zip(parameters, trained))
            raise RuntimeError("sample failed")
    assert all(torch.equal(p, t) for p, t in zip(parameters, trained))


def test_without_ema_decay_there_is_no_ema_and_the_weights_stay():
    parameters = _parameters()
    assert make_ema(parameters, 0.0, torch.device("cpu")) is None
    before = [p.detach().clone() for p in parameters]
    with ema_weights(None, parameters):
        assert all(torch.equal(p, b) for p, b in zip(parameters, before))


def test_the_ema_shadow_is_fp32_for_bf16_weights_and_a_saved_state_is_taken_as_it_was():
    parameters = _parameters(torch.bfloat16)
    ema = make_ema(parameters, 0.9, torch.device("cpu"))
    assert all(shadow.dtype == torch.float32 for shadow in ema.shadow_params)
    _moved_on(parameters, ema)
    _moved_on(parameters, ema)
    restored = make_ema(_parameters(torch.bfloat16), 0.9, torch.device("cpu"), state=ema.state_dict())
    assert restored.optimization_step == ema.optimization_step == 2
    assert all(torch.equal(a, b) for a, b in zip(restored.shadow_params, ema.shadow_params))
