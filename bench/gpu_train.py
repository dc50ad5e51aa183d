#!/usr/bin/env python3
"""Training throughput and memory of the real SD1.5 UNet through the trainer's own step code.

Builds the SD1.5 UNet from its standard config (random weights, nothing downloaded), feeds it
synthetic in-memory batches (64x64x4 latents, 77x768 text, pinned host memory as the loader gives
them) through cachetrain.train.step.TrainStep - the code train_from_cached.py runs - and prints per
configuration: images/s (median over timed windows after warm-up), MFU against 2.41 TFLOP per image
and the device's peak, peak allocated and reserved memory, host syncs seen in the timed steps, and
the card's name. Configurations named ``-loraR`` train a rank-R LoRA on the attention projections
instead (attached by cachetrain.train.adapters, as ``--lora_type lora`` does; the base frozen, in bf16
with ``bf16w``, the adapter and its AdamW state in fp32); their MFU is left out, since a LoRA step
skips the frozen weights' gradients that the 2.41 TFLOP count holds. ``--profile N`` profiles N more
steps per configuration: the share of kernel time by kind (attention, convolution, matmul, ...) and
the top kernels. ``--tiny`` runs the tiny UNet on CPU (LoRA rank at most 8) so the script stays tested
without a GPU.

    .venv/bin/python bench/gpu_train.py                       # the default set of configurations
    .venv/bin/python bench/gpu_train.py --grid                # every combination
    .venv/bin/python bench/gpu_train.py --only b64-ckpt-bf16w-adamw b64-nockpt-bf16w-adamw-lora32
    .venv/bin/python bench/gpu_train.py --tiny --steps 3      # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import os
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
TFLOP_PER_IMAGE = 2.41  # SD1.5 UNet forward + backward at 64x64 latents, 77x768 text (matmul/conv/attention)
MEASURED_PEAK_TFLOPS = {"H100": 790.0, "H200": 790.0}  # large bf16 matmuls measured on these cards


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    batch_size: int
    checkpointing: bool
    bf16_weights: bool
    optimizer: str
    compile: bool
    channels_last: bool = False
    lora_rank: int = 0  # > 0: a LoRA of this rank on the attention projections trains, the UNet frozen

    @property
    def name(self) -> str:
        return (f"b{self.batch_size}-{'ckpt' if self.checkpointing else 'nockpt'}-"
                f"{'bf16w' if self.bf16_weights else 'fp32m'}-{self.optimizer}"
                f"{'-compile' if self.compile else ''}{'-cl' if self.channels_last else ''}"
                f"{f'-lora{self.lora_rank}' if self.lora_rank else ''}")


# In order of what the goals need, since a time limit may cut the tail: the speed baseline, a rank-32
# LoRA beside it (bf16 base as with --bf16_weights, fp32 base under autocast as without), the two
# memory-goal set-ups, then the variants that may be faster (channels-last, compiled: slow to start).
LORA_RANK = 32
DEFAULT_CONFIGS = [
    BenchConfig(64, False, False, "adamw", False),
    BenchConfig(64, False, True, "adamw", False, lora_rank=LORA_RANK),
    BenchConfig(64, False, False, "adamw", False, lora_rank=LORA_RANK),
    BenchConfig(64, True, True, "adamw", False),
    BenchConfig(64, True, False, "adamw8", False),
    BenchConfig(64, True, True, "adamw", False, lora_rank=LORA_RANK),
    BenchConfig(64, False, False, "adamw", False, channels_last=True),
    BenchConfig(64, False, False, "adamw", True),
    BenchConfig(32, False, False, "adamw", False),
    BenchConfig(64, True, True, "lion", False),
    BenchConfig(64, False, True, "adamw", True),
    BenchConfig(64, True, True, "adamw", True),
]


def grid() -> list[BenchConfig]:
    configs = []
    for batch, ckpt, bf16w, optimizer, compiled in itertools.product((32, 64), (False, True), (False, True),
                                                                    ("adamw", "adamw8", "lion"), (False, True)):
        if bf16w and optimizer == "adamw8":
            continue  # refused by the trainer: 8-bit AdamW has no stochastic rounding
        configs.append(BenchConfig(batch, ckpt, bf16w, optimizer, compiled))
    return configs


def device_peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((value for key, value in MEASURED_PEAK_TFLOPS.items() if key in name), None)


def synthetic_batch(batch_size: int, latent_size: int, text_shape: tuple[int, int], pin: bool):
    from cachetrain.train.loader import Batch

    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(batch_size, 4, latent_size, latent_size, generator=generator).half(),
               torch.randn(batch_size, *text_shape, generator=generator).half(),
               torch.randn(batch_size, 4, latent_size, latent_size, generator=generator),
               torch.rand(batch_size, generator=generator)]  # timestep draws in [0, 1)
    batch = Batch(*tensors, skipped=0)
    return batch.pin_memory() if pin else batch


# kernel (or, on CPU, operator) names by what they do, to say where a step's time goes
KERNEL_KINDS = [
    ("attention", re.compile(r"flash|fmha|attention|sdpa|softmax", re.I)),
    ("convolution", re.compile(r"conv|cudnn|implicit|wgrad|dgrad|fprop", re.I)),  # cuDNN's are implicit gemms
    ("matmul", re.compile(r"gemm|matmul|\bmm\b|addmm|bmm|xmma|cutlass|nvjet|cublas", re.I)),
    ("optimizer and clipping", re.compile(r"adam|multi_tensor|foreach|lion", re.I)),
    ("normalization", re.compile(r"norm|welford|moments", re.I)),
]


def profile_steps(one_step, steps: int, cuda: bool) -> dict:
    """Share of device time (CPU time without a GPU) by kind of kernel over ``steps`` steps, and the top kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as profiler:
        started = time.perf_counter()
        for _ in range(steps):
            one_step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - started  # the profiled steps' own: the kernels' sum cannot exceed it
    if cuda:  # kernels only: the operators that launch them carry their kernels' time too, which would count it twice;
        # CUPTI's "Command Buffer Full" marks a full launch queue (the host ahead of the GPU), not a kernel's time
        events = [(event.key, event.self_device_time_total) for event in profiler.key_averages()
                  if event.device_type == DeviceType.CUDA and event.key != "Command Buffer Full"]
    else:
        events = [(event.key, event.self_cpu_time_total) for event in profiler.key_averages()]
    total = sum(us for _, us in events) or 1
    kinds: dict[str, float] = {}
    for name, us in events:
        kind = next((kind for kind, pattern in KERNEL_KINDS if pattern.search(name)), "elementwise and other")
        kinds[kind] = kinds.get(kind, 0) + us
    top = sorted(events, key=lambda event: -event[1])[:10]
    return {"ms_per_step": round(total / 1000 / steps, 2), "wall_ms_per_step": round(1000 * wall / steps, 2),
            "share_by_kind": {kind: round(us / total, 3) for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [[name[:90], round(us / total, 3)] for name, us in top]}


def run_config(config: BenchConfig, accelerator, args) -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from cachetrain.train.adapters import AdapterSpec, attach_adapter
    from cachetrain.train.objective import DiffusionObjective
    from cachetrain.train.optim import build_optimizer
    from cachetrain.train.step import TrainStep
    from cachetrain.train.telemetry import qk_weight_parameters
    from cachetrain.tiny.models import TINY_UNET

    device = accelerator.device
    cuda = device.type == "cuda"
    unet_config = TINY_UNET if args.tiny else SD15_UNET
    text_shape = (77, unet_config["cross_attention_dim"])
    torch.manual_seed(0)
    with device:  # built where it trains
        unet = UNet2DConditionModel(**unet_config)
    if config.bf16_weights:
        unet.to(torch.bfloat16)
    if config.lora_rank:  # as the trainer's load_run_model: attach, then checkpointing and layout
        trainable = attach_adapter(unet, AdapterSpec(kind="lora", rank=config.lora_rank, alpha=config.lora_rank),
                                   seed=0)
    else:
        trainable = [p for p in unet.parameters() if p.requires_grad]
    if config.checkpointing:
        unet.enable_gradient_checkpointing()
    if config.channels_last:
        unet.to(memory_format=torch.channels_last)
    unet.train()
    # an adapter trains in fp32 beside a bf16 base, as in the trainer
    optimizer = build_optimizer(config.optimizer, trainable, 1e-5, (0.9, 0.999), 0.01,
                                bf16_weights=config.bf16_weights and not config.lora_rank)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    objective = DiffusionObjective(DDPMScheduler(**SD15_SCHEDULE)).to(device)
    step = TrainStep(accelerator, unet, optimizer, objective, trainable,
                     qk_weight_parameters(accelerator.unwrap_model(unet)), vae_scale=0.18215, gradient_clip=1.0,
                     channels_last=config.channels_last, compile_backend="inductor" if config.compile else None)
    batch = synthetic_batch(config.batch_size, unet_config["sample_size"], text_shape, pin=cuda)

    def one_step():
        with accelerator.accumulate(unet):
            step.forward_backward(batch)
            if accelerator.sync_gradients:
                step.optimizer_step(want_qk_grads=False)

    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        one_step()
    synchronize()
    window_rates = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")  # every host sync in the step becomes a warning
        for _ in range(args.windows):
            start = time.perf_counter()
            for _ in range(args.steps):
                one_step()
            synchronize()
            window_rates.append(args.steps * config.batch_size / (time.perf_counter() - start))
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
        sync_warnings = [w for w in caught if "synchroniz" in str(w.message)]
    syncs = len(sync_warnings)
    # the Python line running when each sync was reported (the op's caller, where Python made the call)
    sync_sites = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in sync_warnings})
    images_per_sec = statistics.median(window_rates)
    result = {"config": config.name, "images_per_sec": round(images_per_sec, 2), "host_syncs_in_timed_steps": syncs,
              **({"host_sync_sites": sync_sites} if sync_sites else {}),
              "trainable_parameters": sum(p.numel() for p in trainable)}
    if cuda:
        name = torch.cuda.get_device_name(device)
        peak = device_peak_tflops(name, args.peak_tflops)
        result.update(card=name, peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2))
        if peak and not args.tiny and not config.lora_rank:
            result["mfu"] = round(images_per_sec * TFLOP_PER_IMAGE / peak, 3)
    else:
        result["card"] = "cpu (tiny UNet)" if args.tiny else "cpu"
    if args.profile:
        result["profile"] = profile_steps(one_step, args.profile, cuda)
    accelerator.free_memory()  # drops accelerate's references; the rest go when this function returns
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny UNet (for CPU)")
    parser.add_argument("--grid", action="store_true", help="every combination instead of the default set")
    parser.add_argument("--only", nargs="+", help="configuration names to run (see the default set)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per timed window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows (the median is reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile happens here)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the device's bf16 peak, for MFU")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after timing, profile this many steps: device time by kind of kernel, the top kernels")
    parser.add_argument("--json", default=None, help="also append one JSON line per configuration here")
    args = parser.parse_args()
    from accelerate import Accelerator
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # casting a fresh UNet to bf16 is intended here
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda:
        torch.set_num_threads(1)
    configs = grid() if args.grid else DEFAULT_CONFIGS
    if args.only:  # names as on the GPU (b32/b64); --tiny runs them at a small batch
        known = {c.name: c for base in grid() for c in (base, dataclasses.replace(base, channels_last=True))}
        known |= {c.name: c for c in DEFAULT_CONFIGS}
        known |= {c.name: c for base in grid() if base.optimizer == "adamw"
                  for c in [dataclasses.replace(base, lora_rank=LORA_RANK)]}
        unknown = [name for name in args.only if name not in known]
        if unknown:
            parser.error(f"unknown configuration {', '.join(unknown)}; names look like {DEFAULT_CONFIGS[0].name} "
                         f"(batch-checkpointing-weights-optimizer[-compile][-cl]); --grid runs them all")
        configs = list(dict.fromkeys(known[name] for name in args.only))
    if not cuda:  # compile on CPU is minutes of compilation for nothing
        configs = [dataclasses.replace(c, compile=False) for c in configs]
        configs = list(dict.fromkeys(configs))
        if args.tiny:
            # the tiny UNet's layers are 32 wide: its LoRA is rank 8 at most
            configs = [dataclasses.replace(c, batch_size=min(c.batch_size, 2), lora_rank=min(c.lora_rank, 8))
                       for c in configs]
            configs = list(dict.fromkeys(configs))
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)
    print(f"device: {torch.cuda.get_device_name(0) if cuda else 'cpu'}; torch {torch.__version__}; "
          f"{len(configs)} configurations", flush=True)
    for config in configs:
        try:
            result = run_config(config, accelerator, args)
        except torch.OutOfMemoryError:
            result = {"config": config.name, "error": "out of memory"}
            accelerator.free_memory()
        except RuntimeError as error:
            result = {"config": config.name, "error": str(error).splitlines()[0][:200]}
        gc.collect()  # the configuration's model and optimizer state, before the next one is built
        if cuda:
            torch.cuda.empty_cache()
        print(json.dumps(result), flush=True)
        if args.json:
            with open(args.json, "a", encoding="utf-8") as out:
                out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
