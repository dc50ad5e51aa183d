"""Image -> VAE latent sidecars (create_img_sdvae.py, create_img_sdxl.py).

Images are decoded and resized in DataLoader worker processes while the VAE encodes batches; the
stored ``latent`` is the posterior mean, unscaled (the trainer applies the VAE scaling factor).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from . import models
from .cache_build import (CacheSettings, CacheSummary, EncodedItem, add_common_cache_flags, effective_shard,
                          parse_shard, run_cache_build)
from .images import load_image
from .sidecar import IMAGE_LATENT_KEY, image_source_identity
from .tree import DEFAULT_IMAGE_EXTENSIONS, normalize_extensions


class ImageDecodeDataset(Dataset):
    """Decodes one image per item; a bad image yields its error instead of raising in the worker."""

    def __init__(self, paths: list[str], resolution: int):
        self.paths = paths
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            prepared = load_image(self.paths[i], self.resolution)
            return i, prepared.pixels, prepared.notes, ""
        except Exception as error:  # any decode failure is reported per file, never fatal
            return i, None, (), f"unreadable image ({type(error).__name__}: {error})"


def _keep_as_list(batch):
    return batch


@dataclass
class ImageLatentBuilder:
    vae: torch.nn.Module
    model_name: str
    resolution: int
    device: torch.device
    dtype: torch.dtype
    save_dtype: torch.dtype
    batch_size: int
    num_workers: int

    def __post_init__(self):
        self.encoder_class, self.fingerprint = models.encoder_identity(self.vae)
        self.vae = self.vae.to(self.device).eval().requires_grad_(False)

    def settings_metadata(self) -> dict[str, str]:
        return {
            "kind": "image_latent",
            "encoder_class": self.encoder_class,
            "encoder_fingerprint": self.fingerprint,
            "resolution": str(self.resolution),
            "crop": "center",
        }

    def expected_metadata(self, source: str) -> dict[str, str]:
        return {**self.settings_metadata(), **image_source_identity(source)}

    def encode(self, sources: list[str], summary: CacheSummary) -> Iterator[EncodedItem]:
        loader = DataLoader(ImageDecodeDataset(sources, self.resolution), batch_size=self.batch_size,
                            num_workers=self.num_workers, collate_fn=_keep_as_list,
                            pin_memory=self.device.type == "cuda",
                            prefetch_factor=4 if self.num_workers > 0 else None,
                            persistent_workers=False)
        for batch in loader:
            good = []
            for i, pixels, notes, error in batch:
                if pixels is None:
                    summary.fail(sources[i], error)
                    continue
                for note in notes:
                    summary.count(f"note:{note}")
                good.append((i, pixels))
            if not good:
                continue
            pixels = torch.stack([p for _, p in good]).to(self.device, self.dtype, non_blocking=True)
            with torch.no_grad():
                latents = self.vae.encode(pixels).latent_dist.mean
            finite = torch.isfinite(latents).flatten(1).all(dim=1).cpu()
            latents = latents.to(self.save_dtype).cpu()
            for (i, _), latent, ok in zip(good, latents, finite.tolist()):
                source = sources[i]
                if not ok:
                    summary.fail(source, "the VAE produced NaN/Inf for this image; nothing written")
                    continue
                metadata = {**self.expected_metadata(source), "encoder": self.model_name,
                            "dtype": models.dtype_name(self.save_dtype)}
                yield EncodedItem(source, {IMAGE_LATENT_KEY: latent.clone()}, metadata)


@dataclass(frozen=True)
class ImageScriptDefaults:
    """What differs between create_img_sdvae.py and create_img_sdxl.py."""

    model: str
    out_suffix: str
    description: str
    vae_subfolder: str = "vae"


def build_parser(defaults: ImageScriptDefaults) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=defaults.description)
    parser.add_argument("--model", default=defaults.model,
                        help=f"diffusers folder or hub id holding the VAE (default {defaults.model})")
    parser.add_argument("--out_suffix", default=defaults.out_suffix,
                        help=f"sidecar suffix: x.jpg -> x{defaults.out_suffix}")
    parser.add_argument("--resolution", type=int, default=512, help="square side the images are resized and cropped to")
    parser.add_argument("--extensions", nargs="+", default=list(DEFAULT_IMAGE_EXTENSIONS),
                        help="image file extensions to take (case-insensitive)")
    add_common_cache_flags(parser, default_batch=8)
    return parser


def main(argv: list[str] | None, defaults: ImageScriptDefaults) -> int:
    args = build_parser(defaults).parse_args(argv)
    device = torch.device(args.device) if args.device else models.default_device()
    dtype = models.parse_dtype(args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shard_index, shard_count = effective_shard(parse_shard(args.shard))
    vae = models.load_vae(args.model, subfolder=defaults.vae_subfolder, dtype=dtype)
    builder = ImageLatentBuilder(vae=vae, model_name=models.model_name(args.model), resolution=args.resolution,
                                 device=device, dtype=dtype, save_dtype=models.parse_dtype(args.save_dtype),
                                 batch_size=args.batch_size, num_workers=args.num_workers)
    settings = CacheSettings(data_roots=args.data_root, out_suffix=args.out_suffix,
                             extensions=normalize_extensions(args.extensions), batch_size=args.batch_size,
                             overwrite=args.overwrite, num_workers=args.num_workers, shard_index=shard_index,
                             shard_count=shard_count, report_path=args.report, show_progress=not args.no_progress)
    summary = run_cache_build(builder, settings)
    print(summary.render(), file=sys.stderr)
    return 0 if summary.ok else 1
