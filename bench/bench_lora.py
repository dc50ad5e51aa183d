#!/usr/bin/env python3
"""A LoRA step against a full step, and the training state of each, on the tiny SD1.5-structure UNet.

Both runs go through the trainer's own pieces: the adapter attached by cachetrain.train.adapters
(PEFT), the optimizer from cachetrain.train.optim, the objective's loss; one step is forward,
backward, optimizer step. Timed as the median of windows of steps after warm-up, the two modes
alternating window by window so both see the same load on a shared machine. The state is the bytes
of the trainable parameters, their gradients and the optimizer's state after two steps; the same
ratio for the SD1.5 UNet itself is counted on the meta device (no weights are made). The defaults
take 16 steps of each mode (2 warm-up, 4 windows of 3, 2 for the state) at batch 8; the two lines after the
first JSON line are the goals' figures on the tiny UNet.

    .venv/bin/python bench/bench_lora.py [--rank 16] [--batch 8] [--windows 4] [--steps 3] [--widths W ...]

``--widths 32 64 96 128``: then the same pair of steps, timed the same way, on UNets of SD1.5's own structure
(widths W-2W-4W-4W, 2 layers per block, 8 heads, cross-attention 768) between the tiny UNet and SD1.5's
(W = 320), to show at which size the goals hold; the state there is counted (AdamW in fp32 keeps 16 bytes
per trainable parameter in both modes); one JSON line and one line of figures per width.

``--sd15_t5 WORKDIR``: the T5 model's setup (SDXL VAE, T5 through the projection, preset t5) with a
UNet of SD1.5's size (random weights from SD1.5's config, cross-attention 768) trains a LoRA at batch 1
through train_from_cached.py: 2 steps and a checkpoint, a resume to step 3, then (``--full``) one full
step; each run's peak RSS and wall time from /usr/bin/time -v. Needs ~4 GB of memory for the LoRA
runs, ~15 GB for the full one, and ~10 GB of disk in WORKDIR; minutes per run on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


SD15_UNET = dict(sample_size=64, cross_attention_dim=768)  # diffusers' defaults are SD1.5's UNet otherwise


def sd15_at_width(width: int, latent: int) -> dict:
    """SD1.5's UNet config (diffusers' defaults) with its widths 320-640-1280-1280 scaled to W-2W-4W-4W."""
    return dict(sample_size=latent, cross_attention_dim=768, block_out_channels=(width, 2 * width, 4 * width, 4 * width))


def build(mode: str, rank: int, targets: list[str], sd15: bool = False, config: dict | None = None):
    from diffusers import UNet2DConditionModel

    from cachetrain.tiny.models import SD15_STRUCTURE_UNET
    from cachetrain.train.adapters import AdapterSpec, attach_adapter
    from cachetrain.train.optim import build_optimizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(config or (SD15_UNET if sd15 else SD15_STRUCTURE_UNET))).train()
    if mode == "lora":
        trainable = attach_adapter(unet, AdapterSpec(kind="lora", rank=rank, alpha=rank, targets=targets), seed=0)
    else:
        trainable = list(unet.parameters())
    optimizer = build_optimizer("adamw", trainable, 1e-4, (0.9, 0.999), 0.01)
    total = sum(p.numel() for p in unet.parameters())
    return unet, trainable, optimizer, total


def step(unet, optimizer, batch) -> None:
    latents, timesteps, context, target = batch
    loss = torch.nn.functional.mse_loss(unet(latents, timesteps, context).sample, target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def random_batch(n: int, side: int, context_width: int) -> tuple:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(n, 4, side, side, generator=generator), torch.randint(0, 1000, (n,), generator=generator),
            torch.randn(n, 77, context_width, generator=generator), torch.randn(n, 4, side, side, generator=generator))


def alternating_medians(runs: dict, batch, args) -> dict[str, float]:
    """Median seconds per step of each run after warm-up, the runs taking turns window by window so a
    shared machine's load falls on both alike."""
    for unet, _, optimizer, _ in runs.values():
        for _ in range(args.warmup):
            step(unet, optimizer, batch)
    times: dict[str, list[float]] = {mode: [] for mode in runs}
    for _ in range(args.windows):
        for mode, (unet, _, optimizer, _) in runs.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step(unet, optimizer, batch)
            times[mode].append((time.perf_counter() - start) / args.steps)
    return {mode: statistics.median(values) for mode, values in times.items()}


def width_sweep(args) -> None:
    """The step and state ratios on SD1.5-structure UNets of the given base widths, one line each."""
    import gc

    batch = random_batch(args.batch, args.tiny_latent, 768)
    for width in args.widths:
        config = sd15_at_width(width, args.tiny_latent)
        runs = {mode: build(mode, args.rank, args.targets, config=config) for mode in ("full", "lora")}
        medians = alternating_medians(runs, batch, args)
        trainable = {mode: sum(p.numel() for p in run[1]) for mode, run in runs.items()}
        result = {"width": width, "block_out_channels": config["block_out_channels"], "rank": args.rank,
                  "targets": args.targets, "batch": args.batch, "latent": args.tiny_latent,
                  "parameters": runs["full"][3], "lora_parameters": trainable["lora"],
                  "full_step_s": medians["full"], "lora_step_s": medians["lora"],
                  "step_ratio": medians["lora"] / medians["full"], "state_ratio": trainable["lora"] / trainable["full"],
                  "load_average": os.getloadavg()[0]}
        print(json.dumps(result))
        print(f"width {width}-{2 * width}-{4 * width}-{4 * width} ({runs['full'][3] / 1e6:.1f}M parameters): "
              f"LoRA step {medians['lora']:.3f} s / full {medians['full']:.3f} s = {result['step_ratio']:.2f}, "
              f"state {100 * result['state_ratio']:.2f}% (goals <= 0.7 and <= 2%; load average "
              f"{result['load_average']:.1f})", flush=True)
        del runs
        gc.collect()


def state_bytes(trainable, optimizer, batch, unet) -> int:
    step(unet, optimizer, batch)
    latents, timesteps, context, target = batch
    torch.nn.functional.mse_loss(unet(latents, timesteps, context).sample, target).backward()
    tensors = list(trainable) + [p.grad for p in trainable if p.grad is not None]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v) and v.numel() > 1]
    optimizer.zero_grad(set_to_none=True)
    return sum(t.numel() * t.element_size() for t in tensors)


def sd15_size_counts(rank: int, targets: list[str]) -> dict:
    """Parameters of the SD1.5 UNet (built on the meta device: no memory) and of a LoRA on its targets;
    with AdamW in fp32 both states take 16 bytes per trainable parameter, so the counts' ratio is the states'."""
    from diffusers import UNet2DConditionModel

    from cachetrain.train.adapters import AdapterSpec, target_layers

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    layers = target_layers(unet, AdapterSpec(kind="lora", rank=rank, alpha=rank, targets=targets))
    adapter = sum(rank * (layer.weight[0].numel() + layer.weight.shape[0]) for layer in layers.values())
    total = sum(p.numel() for p in unet.parameters())
    return {"parameters": total, "lora_parameters": adapter, "lora_layers": len(layers), "state_ratio": adapter / total}


def sd15_step_ratio(args) -> None:
    """A LoRA step against a full step on SD1.5's UNet: one mode built, warmed, timed and freed before the
    other (both at once would not fit a small machine), so a quiet machine is needed."""
    import gc

    side, n = args.latent, args.batch
    batch = random_batch(n, side, 768)
    result = {"unet": "sd15", "rank": args.rank, "targets": args.targets, "batch": n, "latent": side}
    for mode in ("full", "lora"):
        unet, trainable, optimizer, total = build(mode, args.rank, args.targets, sd15=True)
        for _ in range(args.warmup):
            step(unet, optimizer, batch)
        times = []
        for _ in range(args.windows):
            start = time.perf_counter()
            for _ in range(args.steps):
                step(unet, optimizer, batch)
            times.append((time.perf_counter() - start) / args.steps)
        result[mode] = {"step_s": statistics.median(times), "trainable": sum(p.numel() for p in trainable),
                        "parameters": total, "load_average": os.getloadavg()[0]}
        del unet, trainable, optimizer
        gc.collect()
    result["step_ratio"] = result["lora"]["step_s"] / result["full"]["step_s"]
    print(json.dumps(result))
    print(f"step time on the SD1.5 UNet: LoRA {result['lora']['step_s']:.2f} s / full {result['full']['step_s']:.2f} s "
          f"= {result['step_ratio']:.2f} (goal <= 0.7; batch {n}, {side}x{side} latents, rank {args.rank})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["attention"])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="steps per window")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sd15_t5", metavar="WORKDIR", help="the SD1.5-size T5-model runs (see above) in WORKDIR")
    parser.add_argument("--full", action="store_true", help="--sd15_t5: also one full step (needs ~15 GB)")
    parser.add_argument("--latent", type=int, default=32, help="--sd15_t5, --sd15_steps: latent side")
    parser.add_argument("--tiny_latent", type=int, default=16, help="the tiny UNet's latent side (16: 128 px through "
                        "an SD VAE; 64 would be 512 px)")
    parser.add_argument("--sd15_steps", action="store_true",
                        help="the step ratio on the SD1.5 UNet itself (random weights; one mode after the other, "
                             "~20 GB at the peak; --batch 1 --latent 32 --windows 2 --steps 2 advised on a CPU)")
    parser.add_argument("--widths", type=int, nargs="+", metavar="W",
                        help="then SD1.5-structure UNets of widths W-2W-4W-4W (W a multiple of 32)")
    args = parser.parse_args()
    if any(width < 32 or width % 32 for width in args.widths or ()):
        parser.error("--widths: each width a multiple of 32 (SD1.5's 32 groups in each GroupNorm)")
    torch.set_num_threads(1)
    if args.sd15_t5:
        from bench_lora_sd15 import run_sd15_t5

        run_sd15_t5(Path(args.sd15_t5), rank=args.rank, latent=args.latent, full=args.full)
        return
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    if args.sd15_steps:
        sd15_step_ratio(args)
        return
    side = args.tiny_latent
    batch = random_batch(args.batch, side, 32)
    runs = {mode: build(mode, args.rank, args.targets) for mode in ("full", "lora")}
    medians = alternating_medians(runs, batch, args)
    result = {"rank": args.rank, "targets": args.targets, "batch": args.batch, "latent": side,
              "load_average": os.getloadavg()[0]}
    for mode, (unet, trainable, optimizer, total) in runs.items():
        result[mode] = {"step_s": medians[mode], "trainable": sum(p.numel() for p in trainable),
                        "parameters": total, "state_bytes": state_bytes(trainable, optimizer, batch, unet)}
    result["step_ratio"] = result["lora"]["step_s"] / result["full"]["step_s"]
    result["state_ratio"] = result["lora"]["state_bytes"] / result["full"]["state_bytes"]
    result["sd15_size"] = sd15_size_counts(args.rank, args.targets)
    print(json.dumps(result))
    full, lora = result["full"], result["lora"]
    print(f"step time: LoRA {lora['step_s']:.3f} s / full {full['step_s']:.3f} s = {result['step_ratio']:.2f} "
          f"(goal <= 0.7; batch {args.batch}, {side}x{side} latents, rank {args.rank}, load average {result['load_average']:.1f})")
    print(f"trainable state: LoRA {lora['state_bytes'] / 1e6:.2f} MB / full {full['state_bytes'] / 1e6:.1f} MB = "
          f"{100 * result['state_ratio']:.2f}% on the tiny UNet; on SD1.5's UNet (counted) "
          f"{100 * result['sd15_size']['state_ratio']:.2f}% (goal <= 2%)", flush=True)
    if args.widths:
        del runs
        width_sweep(args)


if __name__ == "__main__":
    main()
