#!/usr/bin/env python3
"""Operations per step of the bf16 stochastic-rounding optimizers (a proxy for GPU kernel launches).

Counts the aten operations one optimizer step dispatches for the tiny UNet's parameters in bf16,
with the device-side skip armed as the trainer arms it. On a GPU each operation is at least one
kernel launch, so fewer operations per tensor means less launch overhead per step; the time that
saves is measured on a GPU by bench/gpu_train.py.

    .venv/bin/python bench/bench_optimizer_ops.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

VIEW_ONLY = {torch.ops.aten.split_with_sizes, torch.ops.aten.detach}  # return views; not marked is_view


class CountOperations(TorchDispatchMode):
    """All dispatched operations, and those that compute (views and metadata-only ops launch no kernel)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.computing = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        self.computing += not (func.is_view or func.overloadpacket in VIEW_ONLY)
        return func(*args, **(kwargs or {}))


def main() -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    from cachetrain.train.optim import StochasticAdamW, StochasticLion
    from cachetrain.tiny.models import TINY_UNET

    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(1)
    for optimizer_class in (StochasticAdamW, StochasticLion):
        for layout in (torch.contiguous_format, torch.channels_last):  # --channels_last makes conv weights NHWC
            torch.manual_seed(0)
            unet = UNet2DConditionModel(**TINY_UNET).to(torch.bfloat16).to(memory_format=layout)
            parameters = list(unet.parameters())
            for parameter in parameters:
                parameter.grad = torch.randn_like(parameter)  # keeps the parameter's layout, as autograd does
            optimizer = optimizer_class(parameters, lr=1e-4)
            optimizer.found_inf = torch.tensor(0.0)
            optimizer.step()  # the first step creates the state
            with CountOperations() as counter:
                optimizer.step()
            name = "channels-last" if layout == torch.channels_last else "contiguous"
            print(f"{optimizer_class.__name__} ({name}): {counter.count} operations per step for {len(parameters)} "
                  f"tensors ({counter.count / len(parameters):.1f} per tensor), {counter.computing} of them compute "
                  f"({counter.computing / len(parameters):.1f} per tensor)")


if __name__ == "__main__":
    main()
