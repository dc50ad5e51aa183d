#!/usr/bin/env python3
"""Trainer overhead: steady-state optimizer steps/s of train_from_cached.py against a bare loop.

The bare loop trains the same tiny UNet with the same batch, optimizer (fused AdamW), precision and
objective on batches already in memory: no DataLoader, no sidecar reads, no per-sample noise
draws, no telemetry, no accelerate. The ratio says what everything around the step costs.
Goal: ratio >= 0.95 on CPU.

    .venv/bin/python bench/bench_trainer_overhead.py --steps 200 --batch_size 16 --workers 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402



def trainer_steps_per_second(model: Path, data: Path, output: Path, steps: int, batch_size: int, workers: int) -> float:
    from cachetrain.train.config import parse_train_args
    from cachetrain.train.trainer import train

    log_every = 10
    result = train(parse_train_args([
        "--pretrained_model", str(model), "--train_data_dir", str(data), "--output_dir", str(output),
        "--batch_size", str(batch_size), "--max_steps", str(steps), "--save_steps", "0", "--learning_rate", "1e-4",
        "--num_workers", str(workers), "--log_every", str(log_every), "--no_progress", "--gradient_clip", "1.0"]))
    rates = [entry["train/images_per_sec"] / batch_size for entry in result.logged if "train/images_per_sec" in entry]
    return statistics.median(rates[2:])  # the first windows include start-up


def bare_steps_per_second(model: Path, steps: int, batch_size: int) -> float:
    from diffusers import UNet2DConditionModel

    from cachetrain.models.loading import load_training_scheduler, read_vae_scaling_factor
    from cachetrain.train.objective import DiffusionObjective

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").train()
    objective = DiffusionObjective(load_training_scheduler(str(model)))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    generator = torch.Generator().manual_seed(0)
    scale = read_vae_scaling_factor(str(model))
    batches = [(torch.randn(batch_size, 4, 16, 16, generator=generator) * scale,
                torch.randn(batch_size, 77, 32, generator=generator),
                torch.randn(batch_size, 4, 16, 16, generator=generator),
                torch.randint(0, 1000, (batch_size,), generator=generator)) for _ in range(8)]
    timings = []
    for step in range(steps):
        latents, context, noise, timesteps = batches[step % len(batches)]
        start = time.perf_counter()
        prediction = unet(objective.add_noise(latents, noise, timesteps), timesteps, context).sample
        loss, _ = objective.losses(prediction, objective.target(latents, noise, timesteps), timesteps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timings.append(time.perf_counter() - start)
    window = 10  # the same windows the trainer's steps/s are measured over
    rates = [window / sum(timings[i:i + window]) for i in range(0, len(timings) - window + 1, window)]
    return statistics.median(rates[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2, help="trainer and bare loop take turns this many times")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from cachetrain.tiny.models import build_tiny_sd, write_random_pairs

    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as folder:
        root = Path(folder)
        model = build_tiny_sd(root / "model")
        write_random_pairs(root / "data", args.pairs)
        trainer_rates, bare_rates = [], []
        for round_number in range(args.rounds):  # alternate, so a busy neighbour hurts both alike
            trainer_rates.append(trainer_steps_per_second(model, root / "data", root / f"run{round_number}",
                                                          args.steps, args.batch_size, args.workers))
            bare_rates.append(bare_steps_per_second(model, args.steps, args.batch_size))
            print(f"round {round_number}: trainer {trainer_rates[-1]:.2f} steps/s, bare loop {bare_rates[-1]:.2f} "
                  f"steps/s, ratio {trainer_rates[-1] / bare_rates[-1]:.3f}", flush=True)
        trainer, bare = max(trainer_rates), max(bare_rates)
        print(f"trainer overhead: train_from_cached {trainer:.2f} steps/s, bare loop {bare:.2f} steps/s, "
              f"ratio {trainer / bare:.3f} (tiny UNet, batch {args.batch_size}, {args.workers} worker(s), "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
