#!/usr/bin/env python3
"""Encoder throughput of the cache scripts' own encode code: SD1.5 VAE, SDXL VAE, T5-xxl-sized encoder.

Random weights from each model's standard config (nothing downloaded), bf16 on CUDA. The VAEs go
through ImageLatentBuilder.latents_of (what create_img_sdvae.py / create_img_sdxl.py run per batch)
on pinned uint8 batches at 512 px; the T5 encoder + 4096->768 projection go through
T5EmbeddingBuilder.embed (what create_t5cache_768.py runs per batch, tokenization included) at 77
and 512 tokens. Per encoder: items/s (median of timed windows after warm-up), FLOPs per item
(counted with torch's FlopCounterMode on one item) and the MFU they imply against the card's peak.
``--tiny`` runs the tiny models on CPU so the script stays tested without a GPU.

    .venv/bin/python bench/gpu_encode.py
    .venv/bin/python bench/gpu_encode.py --tiny
"""

from __future__ import annotations

import argparse
import json
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

SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512,
                scaling_factor=0.18215)
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
T5_XXL_ENCODER = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0)
MEASURED_PEAK_TFLOPS = {"H100": 790.0, "H200": 790.0}


def flops_of(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def timed(fn, items_per_call: int, windows: int, calls: int, warmup: int, cuda: bool) -> float:
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    synchronize()
    rates = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize()
        rates.append(calls * items_per_call / (time.perf_counter() - start))
    return statistics.median(rates)


def vae_result(name: str, vae_config: dict, args, device: torch.device, dtype: torch.dtype) -> dict:
    from diffusers import AutoencoderKL

    from cachetrain.cache.image_cache import ImageLatentBuilder

    torch.manual_seed(0)
    with device:
        vae = AutoencoderKL(**vae_config)
    builder = ImageLatentBuilder(vae=vae, model_name=name, resolution=args.resolution, device=device, dtype=dtype,
                                 save_dtype=torch.float16, batch_size=args.vae_batch, num_workers=0)
    pixels = torch.randint(0, 256, (args.vae_batch, 3, args.resolution, args.resolution), dtype=torch.uint8)
    if device.type == "cuda":
        pixels = pixels.pin_memory()
    per_item = flops_of(lambda: builder.latents_of(pixels[:1]))
    rate = timed(lambda: builder.latents_of(pixels), args.vae_batch, args.windows, args.calls, args.warmup,
                 device.type == "cuda")
    return {"encoder": name, "item": f"{args.resolution}px image", "batch": args.vae_batch,
            "items_per_sec": round(rate, 2), "gflop_per_item": round(per_item / 1e9, 2)}


def t5_results(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    from transformers import T5Config, T5EncoderModel

    from cachetrain.models.t5 import T5Projection
    from cachetrain.cache.t5_cache import T5EmbeddingBuilder
    from cachetrain.tiny.models import TINY_T5_ENCODER, TINY_T5_PROJECTION_DIM, write_t5_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench-t5-tokenizer-") as folder:
        tokenizer = write_t5_tokenizer(Path(folder))
    encoder_config = TINY_T5_ENCODER if args.tiny else T5_XXL_ENCODER
    projection_dim = TINY_T5_PROJECTION_DIM if args.tiny else 768
    torch.manual_seed(0)
    with device:  # built on the GPU directly: a 4.7B-parameter init on the host takes minutes
        encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1,
                                          **encoder_config)).to(dtype)
    projection = T5Projection.initialised(encoder_config["d_model"], projection_dim, seed=0)
    results = []
    for tokens in args.tokens:
        tokenizer.model_max_length = tokens
        builder = T5EmbeddingBuilder(tokenizer=tokenizer, text_encoder=encoder, model_name="t5", device=device,
                                     dtype=dtype, save_dtype=torch.float16, batch_size=args.t5_batch,
                                     projection=projection.to(dtype), max_length=tokens)
        prompt = " ".join(["red"] * (tokens * 2))  # longer than the limit: every prompt fills it
        prompts = [prompt] * args.t5_batch
        assert builder.embed(prompts[:1])[0].shape[0] == tokens
        per_item = flops_of(lambda: builder.embed(prompts[:1]))
        rate = timed(lambda: builder.embed(prompts), args.t5_batch, args.windows, args.calls, args.warmup,
                     device.type == "cuda")
        results.append({"encoder": "T5 encoder + projection" + (" (tiny)" if args.tiny else " (xxl size)"),
                        "item": f"caption of {tokens} tokens", "batch": args.t5_batch,
                        "items_per_sec": round(rate, 2), "gflop_per_item": round(per_item / 1e9, 3)})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny models on CPU")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default 512; 64 with --tiny)")
    parser.add_argument("--vae_batch", type=int, default=16)
    parser.add_argument("--t5_batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="caption lengths (default 77 512)")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--calls", type=int, default=5, help="batches per timed window")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak_tflops", type=float, default=None, help="the device's bf16 peak, for MFU")
    parser.add_argument("--only", choices=("vae", "t5"), default=None)
    args = parser.parse_args()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        torch.set_num_threads(1)
    args.resolution = args.resolution or (64 if args.tiny else 512)
    args.tokens = args.tokens or ([8, 16] if args.tiny else [77, 512])
    if args.tiny:
        args.vae_batch, args.t5_batch = min(args.vae_batch, 4), min(args.t5_batch, 8)
    card = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in MEASURED_PEAK_TFLOPS.items() if k in card), None)
    print(f"device: {card}; torch {torch.__version__}; dtype {str(dtype).removeprefix('torch.')}", flush=True)
    from cachetrain.tiny.models import TINY_SDXL_VAE, TINY_VAE

    results = []
    if args.only in (None, "vae"):
        results.append(vae_result("SD1.5 VAE encoder", TINY_VAE if args.tiny else SD15_VAE, args, device, dtype))
        results.append(vae_result("SDXL VAE encoder", TINY_SDXL_VAE if args.tiny else SDXL_VAE, args, device, dtype))
    if args.only in (None, "t5"):
        results.extend(t5_results(args, device, dtype))
    for result in results:
        result["card"] = card
        if peak and cuda:
            result["mfu"] = round(result["items_per_sec"] * result["gflop_per_item"] / 1e3 / peak, 3)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
