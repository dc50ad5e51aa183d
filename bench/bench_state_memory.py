#!/usr/bin/env python3
"""Memory of the training state (weights + gradients + optimizer state), fp32 master vs --bf16_weights.

Runs two real optimizer steps of the tiny UNet in each mode through the trainer's optimizers, sums
the bytes of every parameter, gradient and optimizer-state tensor, and scales the bytes per
parameter to the SD1.5 UNet (859.5M parameters). Activation memory depends on the GPU kernels and
is measured by bench/gpu_train.py on a GPU.

    .venv/bin/python bench/bench_state_memory.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SD15_UNET_PARAMETERS = 859.5e6


def state_bytes(bf16_weights: bool, optimizer_name: str) -> tuple[int, int]:
    from diffusers import UNet2DConditionModel

    from cachetrain.train.optim import build_optimizer
    from cachetrain.tiny.models import TINY_UNET

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    if bf16_weights:
        unet.to(torch.bfloat16)
    parameters = list(unet.parameters())
    optimizer = build_optimizer(optimizer_name, parameters, 1e-4, (0.9, 0.999), 0.01, bf16_weights=bf16_weights)
    for _ in range(2):
        for p in parameters:
            p.grad = torch.randn_like(p)
        optimizer.step()
    tensors = [p for p in parameters] + [p.grad for p in parameters]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v) and v.numel() > 1]
    return sum(t.numel() * t.element_size() for t in tensors), sum(p.numel() for p in parameters)


def main() -> None:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # casting a fresh UNet to bf16 is intended here
    torch.set_num_threads(1)
    print("| mode | optimizer | bytes/parameter (measured, tiny UNet) | SD1.5 UNet training state |")
    print("|---|---|---|---|")
    for bf16_weights, optimizer in ((False, "adamw"), (True, "adamw"), (False, "lion"), (True, "lion")):
        total, count = state_bytes(bf16_weights, optimizer)
        per_parameter = total / count
        mode = "--bf16_weights" if bf16_weights else "fp32 master (default)"
        print(f"| {mode} | {optimizer} | {per_parameter:.2f} | {per_parameter * SD15_UNET_PARAMETERS / 2**30:.1f} GiB |")


if __name__ == "__main__":
    main()
