#!/usr/bin/env python3
"""What the latent cache's precision costs: fp32 encode and fp32 store (the original scripts) against
fp32 encode with fp16 store (the image cache scripts' default) and bf16 encodes (--dtype bfloat16).

A VAE with SD1.5's structure and size (AutoencoderKL from SD1.5's VAE config: 4 levels of
128/256/512/512 channels, 2 layers per block, 83.7M parameters) gets random weights from a fixed
seed: no trained weights can be fetched here. Photo-like 512-768 px images are prepared by the cache
scripts' own ``images.load_image`` and encoded by ``ImageLatentBuilder.latents_of``, the code the
scripts run. For each setting it reports the stored latents' error against the fp32/fp32 reference
(max and mean absolute, and the max relative to the reference latents' std) and the PSNR of the
latents decoded back (by the fp32 VAE, clamped to [-1, 1]) against the reference decoded the same way.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_cache_precision.py --images 2 --resolution 256 --no_bf16
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_cache_precision.py --images 2 --resolution 64
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_image_cache import photo_like  # noqa: E402
from cachetrain.cache.image_cache import ImageLatentBuilder  # noqa: E402
from cachetrain.cache.images import load_image  # noqa: E402

# SD1.5's vae/config.json, less the fields that only name versions
SD15_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
                       block_out_channels=(128, 256, 512, 512), norm_num_groups=32, act_fn="silu",
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                       scaling_factor=0.18215)

# (name, encoder dtype, stored dtype); the first is the reference
SETTINGS = [("fp32 encode, fp32 store (original)", torch.float32, torch.float32),
            ("fp32 encode, fp16 store (the default)", torch.float32, torch.float16),
            ("bf16 encode, fp32 store", torch.bfloat16, torch.float32),
            ("bf16 encode, fp16 store (--dtype bfloat16)", torch.bfloat16, torch.float16)]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--no_bf16", action="store_true",
                        help="only the fp32 encodes (bf16 convolutions on a CPU without bf16 kernels take ~50 s "
                             "per 64 px image here)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD15_VAE_CONFIG).eval().requires_grad_(False)
    print(f"VAE: SD1.5 structure, {sum(p.numel() for p in vae.parameters()) / 1e6:.1f}M parameters, random weights "
          f"(seed 0); {args.images} images at {args.resolution} px; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread")
    pixels = []
    for i in range(args.images):
        buffer = io.BytesIO()
        photo_like(512 + 97 * i, 768 - 61 * i, seed=i).save(buffer, format="PNG")
        buffer.seek(0)
        pixels.append(load_image(buffer, args.resolution).pixels)
    pixels = torch.stack(pixels)

    stored = {}
    for dtype in dict.fromkeys(dtype for _, dtype, _ in SETTINGS):
        if dtype != torch.float32 and args.no_bf16:
            continue
        builder = ImageLatentBuilder(vae=AutoencoderKL(**SD15_VAE_CONFIG), model_name="bench", resolution=args.resolution,
                                     device=torch.device("cpu"), dtype=dtype, save_dtype=torch.float32, batch_size=1,
                                     num_workers=0)
        builder.vae.load_state_dict(vae.state_dict())
        builder.vae.to(dtype)
        start = time.perf_counter()
        latents = torch.cat([builder.latents_of(pixels[i : i + 1]) for i in range(len(pixels))])
        print(f"  encoded in {dtype}: {time.perf_counter() - start:.1f} s", flush=True)
        for name, encode_dtype, save_dtype in SETTINGS:
            if encode_dtype == dtype:
                stored[name] = latents.to(save_dtype).float()

    reference_name = SETTINGS[0][0]
    reference = stored[reference_name]
    with torch.no_grad():
        decoded = {name: torch.cat([vae.decode(latent[None]).sample.clamp(-1, 1) for latent in latents])
                   for name, latents in stored.items()}
    reference_std = float(reference.std())
    print(f"\nreference latents: std {reference_std:.4f}, max |value| {float(reference.abs().max()):.4f}\n")
    print("| setting | latent max abs error | latent mean abs error | max error / latent std | decoded PSNR vs reference (dB), per image |")
    print("|---|---|---|---|---|")
    for name, latents in stored.items():
        if name == reference_name:
            continue
        error = (latents - reference).abs()
        per_image = [psnr(decoded[name][i], decoded[reference_name][i]) for i in range(len(latents))]
        print(f"| {name} | {float(error.max()):.2e} | {float(error.mean()):.2e} | "
              f"{float(error.max()) / reference_std:.2e} | {', '.join(f'{p:.1f}' for p in per_image)} |")


if __name__ == "__main__":
    main()
