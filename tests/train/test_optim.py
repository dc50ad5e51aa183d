"""The optimizers: stochastic rounding to bf16, our AdamW and Lion against the reference implementations,
their bf16 state, the on-device skip of a NaN/Inf step, and a --bf16_weights run that learns.
"""

from __future__ import annotations

import pytest
import torch

from cachetrain.train.config import parse_train_args
from cachetrain.train.trainer import train
from tests.training_support import logged as _logged
from tests.training_support import train_args as _args
from tests.training_support import unet_weights as _unet_weights


def test_stochastic_rounding_keeps_updates_that_round_to_nearest_would_lose():
    from cachetrain.train.optim import stochastic_round_to_bf16_

    weights = torch.ones(200_000)
    tiny_update = 1e-3  # below bf16's resolution at 1.0 (2^-7): round-to-nearest drops it
    assert torch.equal((weights + tiny_update).to(torch.bfloat16).float(), weights)
    rounded = torch.empty(200_000, dtype=torch.bfloat16)
    stochastic_round_to_bf16_(rounded, weights + tiny_update)
    assert rounded.float().mean().item() - 1.0 == pytest.approx(tiny_update, rel=0.05)
    assert set(rounded.float().unique().tolist()) == {1.0, 1.0078125}


def test_bf16_optimizer_state_keeps_changes_below_its_resolution():
    from cachetrain.train.optim import StochasticAdamW

    parameter = torch.nn.Parameter(torch.ones(200_000, dtype=torch.bfloat16))
    optimizer = StochasticAdamW([parameter], lr=0.0, betas=(0.9, 0.999))
    parameter.grad = torch.ones_like(parameter)
    optimizer.step()  # second moment = 0.001
    parameter.grad = torch.zeros_like(parameter)
    for _ in range(100):  # each step shrinks it by 0.1%, under half of bf16's spacing there
        optimizer.step()
    second_moment = optimizer.state[parameter]["exp_avg_sq"].float().mean().item()
    assert second_moment == pytest.approx(0.001 * 0.999 ** 100, rel=0.01)  # round-to-nearest stays at 0.001


def test_own_optimizers_match_the_reference_implementations_in_fp32(monkeypatch):
    from lion_pytorch import Lion

    from cachetrain.train import optim
    from cachetrain.train.optim import StochasticAdamW, StochasticLion

    monkeypatch.setattr(optim, "CHUNK_ELEMENTS", 1000)  # several chunks, one of them a single tensor
    # conv weights in channels-last, as --channels_last makes them; one gets gradients of another layout
    shapes = [(40, 30), (7,), (3, 5, 2, 2), (1200,), (9, 9), (6, 4, 3, 3), (5, 3, 3, 3)]
    layouts = [torch.contiguous_format] * 5 + [torch.channels_last] * 2
    grad_layouts = layouts[:-1] + [torch.contiguous_format]
    for reference_class, own_class in ((torch.optim.AdamW, StochasticAdamW), (Lion, StochasticLion)):
        generator = torch.Generator().manual_seed(1)
        starts = [torch.randn(shape, generator=generator).contiguous(memory_format=layout)
                  for shape, layout in zip(shapes, layouts)]
        references = [torch.nn.Parameter(start.clone()) for start in starts]
        owns = [torch.nn.Parameter(start.clone()) for start in starts]
        reference_opt = reference_class(references, lr=1e-2, weight_decay=0.1)
        own_opt = own_class(owns, lr=1e-2, weight_decay=0.1)
        for step in range(4):
            for reference, own, layout in zip(references, owns, grad_layouts):
                grad = torch.randn(reference.shape, generator=generator).contiguous(memory_format=layout)
                reference.grad, own.grad = grad.clone(), grad.clone()
            reference_opt.step()
            own_opt.step()
        for reference, own in zip(references, owns):
            torch.testing.assert_close(own.data, reference.data, rtol=1e-5, atol=1e-6)


def test_own_optimizers_skip_on_the_device_when_found_inf_is_set():
    from cachetrain.train.optim import StochasticAdamW, StochasticLion

    for own_class in (StochasticAdamW, StochasticLion):
        for dtype in (torch.float32, torch.bfloat16):
            parameters = [torch.nn.Parameter(torch.randn(shape).to(dtype)) for shape in ((8, 8), (5,))]
            optimizer = own_class(parameters, lr=1e-2)
            for parameter in parameters:
                parameter.grad = torch.randn(parameter.shape).to(dtype)
            optimizer.step()  # a normal step first, so there is state to keep
            before = [parameter.detach().clone() for parameter in parameters]
            state_before = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in parameters]
            parameters[0].grad = torch.full((8, 8), float("nan")).to(dtype)
            parameters[1].grad = torch.ones(5).to(dtype)  # finite, but the whole step is skipped
            optimizer.found_inf = torch.tensor(1.0)
            optimizer.step()
            for parameter, weights, states in zip(parameters, before, state_before):
                assert torch.equal(parameter.detach(), weights), (own_class, dtype)
                for name, value in optimizer.state[parameter].items():
                    assert torch.equal(value, states[name]), (own_class, dtype, name)


def test_bf16_weights_train_in_bf16_and_lower_the_loss(tiny_sd_model, cached_dataset, tmp_path):
    result = train(parse_train_args(_args(tiny_sd_model, cached_dataset, tmp_path / "run", "--bf16_weights",
                                          "--batch_size", "4", "--max_steps", "24", "--log_every", "6")))
    losses = [value for _, value in _logged(result, "train/loss")]
    # each logged loss is a 6-step window's mean, still noisy at batch 4: the last two against the first; a run
    # whose updates rounded away in bf16 stays near its first loss
    assert sum(losses[-2:]) / 2 < 0.75 * losses[0], losses
    weights = _unet_weights(tmp_path / "run")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
