"""The original cache-utils, as subcommands of ``cachetrain-inspect``:

    cachetrain-inspect validate DIR... --model M [--vae] [--suffix .img_sdvae] [--min_psnr 20]
        decode each image's latent with the VAE and compare it with the image prepared as the cache
        prepares it (scaled to cover, centre-cropped to the latent's size times the VAE's factor): a
        latent made from another image, or by another VAE, decodes to something else (low PSNR)
    cachetrain-inspect compare A B [--atol 0]
        two tensor files (sidecars or any safetensors): keys, shapes, dtypes and the largest differences
    cachetrain-inspect show FILE... --model M [--vae] [--out DIR]
        each latent decoded to an image, written as x<suffix>.webp beside it (the preview the cache
        scripts' --writepreview writes) or into --out

The per-channel statistics and the suggested VAE scaling factor are in the plain report
(``cachetrain-inspect DIR``). Exit status: 0 when all is well; 1 when a latent fails validation, the two
files differ, or a file cannot be read; 2 for bad flags or a model that cannot be loaded.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
from pathlib import Path

import torch
from PIL import Image

from ..atomic import write_atomically
from ..cli import ArgumentParser
from ..sidecar import (DEFAULT_IMAGE_EXTENSIONS, IMAGE_LATENT_KEY, SD_VAE_SUFFIX, SidecarError, preview_path,
                       read_sidecar, sidecar_path)
from ..tree import normalize_extensions, walk_files

TOOLS = ("validate", "compare", "show")
DEFAULT_MIN_PSNR = 20.0  # a VAE's own latents decode far above this; another image's or VAE's far below


def load_bare_or_pipeline_vae(model: str, bare: bool):
    from ..models import loading as models

    return models.load_vae(model, subfolder=None if bare else "vae", dtype=torch.float32).eval().requires_grad_(False)


def decode_to_pixels(vae, latent: torch.Tensor) -> torch.Tensor:
    """A stored (unscaled) latent [C, h, w] -> uint8 [3, H, W], as the cache scripts' previews decode it."""
    with torch.no_grad():
        decoded = vae.decode(latent.float()[None]).sample[0]
    return decoded.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def validate(args: argparse.Namespace) -> int:
    from ..cache.image_cache import vae_downscale_factor
    from ..cache.images import ImageRejected, Sizing, load_image

    vae = load_bare_or_pipeline_vae(args.model, args.vae)
    factor = vae_downscale_factor(vae.config)
    checked, failed = 0, 0
    for root in args.dirs:
        for image_path in walk_files(root, normalize_extensions(args.extensions)):
            latent_path = sidecar_path(image_path, args.suffix)
            if not latent_path.exists():
                continue
            checked += 1
            try:
                latent = read_sidecar(latent_path, IMAGE_LATENT_KEY, ndim=3)
                size = (latent.shape[2] * factor, latent.shape[1] * factor)
                image = load_image(image_path, Sizing([size])).pixels
                if latent.shape[0] != vae.config.latent_channels:
                    raise ValueError(f"{latent.shape[0]} channels, this VAE has {vae.config.latent_channels}")
                score = psnr(decode_to_pixels(vae, latent), image)
            except (SidecarError, ImageRejected, OSError, ValueError, RuntimeError) as error:
                failed += 1
                print(f"FAIL {latent_path}: {error}")
                continue
            verdict = "ok  " if score >= args.min_psnr else "FAIL"
            failed += verdict == "FAIL"
            print(f"{verdict} {latent_path}: decoded vs image {score:.1f} dB PSNR")
    print(f"validated {checked} latents ({args.suffix}) against their images: {checked - failed} ok, {failed} failed "
          f"(under {args.min_psnr:g} dB or unreadable)", file=sys.stderr)
    if not checked:
        print(f"error: no image with a {args.suffix} sidecar under {' '.join(args.dirs)}", file=sys.stderr)
        return 1
    return 1 if failed else 0


def compare_files(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    tensors = []
    for path in (args.a, args.b):
        try:
            tensors.append(load_file(path))
        except Exception as error:  # not a file, or not safetensors: said in one line
            print(f"error: {path}: not a readable safetensors file ({type(error).__name__}: {error})", file=sys.stderr)
            return 1
    first, second = tensors
    differ = False
    for key in sorted(set(first) | set(second)):
        if key not in first or key not in second:
            print(f"{key}: only in {args.a if key in first else args.b}")
            differ = True
            continue
        a, b = first[key], second[key]
        if a.shape != b.shape:
            print(f"{key}: shapes differ, {tuple(a.shape)} {a.dtype} against {tuple(b.shape)} {b.dtype}")
            differ = True
            continue
        error = (a.double() - b.double()).abs()
        largest = float(error.max()) if error.numel() else 0.0
        scale = float(a.double().abs().max()) if a.numel() else 0.0
        print(f"{key}: {tuple(a.shape)} {str(a.dtype).removeprefix('torch.')} / {str(b.dtype).removeprefix('torch.')}, "
              f"max abs difference {largest:.3g} (mean {float(error.mean()) if error.numel() else 0.0:.3g}, "
              f"largest value {scale:.3g})")
        differ |= not largest <= args.atol
    print("the files differ" if differ else f"the files agree (within {args.atol:g})", file=sys.stderr)
    return 1 if differ else 0


def show(args: argparse.Namespace) -> int:
    vae = load_bare_or_pipeline_vae(args.model, args.vae)
    failed = 0
    for path in args.files:
        target = preview_path(path) if args.out is None else Path(args.out) / (Path(path).name + ".webp")
        try:
            pixels = decode_to_pixels(vae, read_sidecar(path, IMAGE_LATENT_KEY, ndim=3))
            buffer = io.BytesIO()
            Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB").save(buffer, format="WEBP", lossless=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(target, buffer.getvalue())
            print(target)
        except (SidecarError, OSError, RuntimeError) as error:
            failed += 1
            print(f"error: {path}: {error}", file=sys.stderr)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="cachetrain-inspect", description="The cache tools: validate, compare, show.")
    tools = parser.add_subparsers(dest="tool", required=True)

    def add_model_flags(sub) -> None:
        sub.add_argument("--model", required=True, help="diffusers folder or hub id with the VAE in vae/")
        sub.add_argument("--vae", action="store_true", help="--model is a bare VAE (config and weights at its root)")

    check = tools.add_parser("validate", help="decode each latent and compare it with its image")
    check.add_argument("dirs", nargs="+", metavar="DIR")
    add_model_flags(check)
    check.add_argument("--suffix", default=SD_VAE_SUFFIX, help=f"latent sidecar suffix (default {SD_VAE_SUFFIX})")
    check.add_argument("--extensions", nargs="+", default=list(DEFAULT_IMAGE_EXTENSIONS), help="image extensions")
    check.add_argument("--min_psnr", type=float, default=DEFAULT_MIN_PSNR,
                       help=f"a latent whose decoding is under this PSNR (dB) against its image fails "
                            f"(default {DEFAULT_MIN_PSNR:g})")
    pair = tools.add_parser("compare", help="compare two tensor files")
    pair.add_argument("a")
    pair.add_argument("b")
    pair.add_argument("--atol", type=float, default=0.0, help="largest difference still called equal (default 0)")
    view = tools.add_parser("show", help="write each latent decoded to an image (x<suffix>.webp)")
    view.add_argument("files", nargs="+", metavar="FILE")
    add_model_flags(view)
    view.add_argument("--out", default=None, help="write the images into this folder instead of beside the files")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.tool == "compare":
        return compare_files(args)
    for root in getattr(args, "dirs", []):
        if not os.path.isdir(root):
            print(f"error: {root}: no such folder", file=sys.stderr)
            return 2
    try:
        return validate(args) if args.tool == "validate" else show(args)
    except (OSError, ValueError) as error:  # no VAE where --model points
        print(f"error: --model {args.model}: cannot load a VAE ({type(error).__name__}: {error})", file=sys.stderr)
        return 2
