#!/usr/bin/env python3
"""What caption variants, mirrored latents (--flip) and masks (--mask) cost on disk per image.

Writes sidecars the way the cache scripts do (sidecar.write_sidecar, the same tensor names and
metadata) at SD1.5's shapes: a 512 px image's latent [4, 64, 64] with and without its mirrored latent
and its mask [1, 64, 64]; a CLIP-L embedding [77, 768] with 1 to 5 caption variants; a trimmed T5
embedding (--t5_tokens real tokens, 768 wide after the projection) likewise. Prints each file's size
in bytes and what it takes on disk (allocated blocks) in a temporary folder on --dir's file system.

    .venv/bin/python bench/bench_data_feature_disk.py [--dtype float16] [--t5_tokens 24] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cachetrain.sidecar import (FLIPPED_LATENT_KEY, IMAGE_LATENT_KEY, MASK_KEY, text_variant_key,  # noqa: E402
                                write_sidecar)

# what a cache script's metadata holds, near enough in length (a few hundred bytes of header)
METADATA = {"kind": "image_latent", "encoder_class": "AutoencoderKL", "encoder_fingerprint": "0123456789abcdef",
            "resolution": "512", "crop": "center", "dtype": "float16", "encoder": "stable-diffusion-v1-5",
            "source_size": "123456", "source_mtime_ns": "1764000000000000000", "source_sha256": "0" * 64}


def measure(folder: Path, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[int, int]:
    path = folder / name
    write_sidecar(path, tensors, metadata)
    stat = os.stat(path)
    return stat.st_size, stat.st_blocks * 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--t5_tokens", type=int, default=24)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    latent = torch.randn(4, 64, 64).to(dtype)
    mask = torch.rand(1, 64, 64).to(dtype)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        folder = Path(folder)
        image_cases = {
            "latent": {IMAGE_LATENT_KEY: latent},
            "latent + mirrored (--flip)": {IMAGE_LATENT_KEY: latent, FLIPPED_LATENT_KEY: latent.flip(-1)},
            "latent + mask (--mask)": {IMAGE_LATENT_KEY: latent, MASK_KEY: mask},
            "latent + mirrored + mask": {IMAGE_LATENT_KEY: latent, FLIPPED_LATENT_KEY: latent.flip(-1), MASK_KEY: mask},
        }
        for number, (label, tensors) in enumerate(image_cases.items()):
            rows.append(("image 512 px", label, *measure(folder, f"i{number}.img_sdvae", tensors,
                                                         {**METADATA, "flip": "stored"})))
        for encoder, shape in (("CLIP-L", (77, 768)), (f"T5 {args.t5_tokens} tokens", (args.t5_tokens, 768))):
            for variants in (1, 2, 3, 5):
                tensors = {text_variant_key(v): torch.randn(shape).to(dtype) for v in range(variants)}
                metadata = {**METADATA, "kind": "text_embedding", "caption_variant_count": str(variants)}
                rows.append((encoder, f"{variants} caption variant(s)",
                             *measure(folder, f"t{encoder[:2]}{variants}.txt", tensors, metadata)))
    print(f"| sidecar | holds | bytes | on disk ({args.dtype}) |")
    print("|---|---|---:|---:|")
    for kind, label, size, blocks in rows:
        print(f"| {kind} | {label} | {size:,} | {blocks:,} |")


if __name__ == "__main__":
    main()
