#!/usr/bin/env python3
"""What --gradient_topk costs per optimizer step, next to the optimizer step itself.

Builds tensors shaped like SD1.5 UNet weights (a mix of 320-1280 channel convolutions and linear
layers) up to --elements in all, gives them random gradients, and times keep_top_gradients_ (one
kthvalue and one masked write-back per ~32M-element chunk) against a fused AdamW step on the same
parameters. Runs on CUDA when one is visible, else on the CPU.

    .venv/bin/python bench/bench_gradient_topk.py [--elements 33554432] [--fraction 0.1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# (shape, count) of SD1.5-like weights: 3x3 convolutions, attention projections, feed-forward layers
SD15_LIKE_SHAPES = ((640, 640, 3, 3), (1280, 1280), (320, 320, 3, 3), (1280, 5120), (768, 320), (1280,))


def parameters_of(elements: int, device: torch.device) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    parameters, total, i = [], 0, 0
    while total < elements:
        shape = SD15_LIKE_SHAPES[i % len(SD15_LIKE_SHAPES)]
        parameter = torch.nn.Parameter(torch.randn(shape, generator=generator).to(device) * 0.02)
        parameter.grad = torch.randn(shape, generator=generator).to(device) * 1e-3
        parameters.append(parameter)
        total += parameter.numel()
        i += 1
    return parameters


def timed(action, repeats: int, synchronize) -> float:
    action()  # warm-up
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    from cachetrain.train.optim import keep_top_gradients_

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=1 << 25)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    parameters = parameters_of(args.elements, device)
    grads = [p.grad.clone() for p in parameters]
    elements = sum(p.numel() for p in parameters)

    # both timings include copying fresh gradients in, so they compare like with like
    def top_k():
        for p, g in zip(parameters, grads):
            p.grad.copy_(g)
        keep_top_gradients_(parameters, args.fraction)

    optimizer = torch.optim.AdamW(parameters, lr=1e-4, fused=device.type == "cuda", foreach=device.type != "cuda")

    def adamw():
        for p, g in zip(parameters, grads):
            p.grad.copy_(g)
        optimizer.step()

    topk_s, adamw_s = timed(top_k, args.repeats, synchronize), timed(adamw, args.repeats, synchronize)
    print(f"{device.type}: {elements / 1e6:.1f}M gradient elements in {len(parameters)} tensors, keep {args.fraction}")
    print(f"  gradient top-k: {topk_s * 1e3:.1f} ms   AdamW step: {adamw_s * 1e3:.1f} ms   "
          f"ratio {topk_s / adamw_s:.1f}x   ({topk_s * 1e3 / (elements / 1e6):.2f} ms per million elements)")


if __name__ == "__main__":
    main()
