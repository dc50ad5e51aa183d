"""Image -> VAE latent sidecars: the one implementation behind create_img_sdvae.py and create_img_sdxl.py.

Images are decoded and resized in DataLoader worker processes (``--num_workers``) while the VAE
encodes batches on the device; sidecars are written on background threads. The stored ``latent``
is the posterior mean, unscaled (the trainer applies the VAE scaling factor).

A VAE whose config asks for ``force_upcast`` (the SDXL VAE) overflows in float16, so it is refused
in that precision; bfloat16 and float32 are fine.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from . import models
from .cli import ArgumentParser
from .cache_build import (CacheSummary, EncodedItem, add_common_cache_flags, default_encoder_dtype, run_cache_build,
                          settings_from_args)
from .cache_build import add_single_file_config_flag
from .images import CONVERSION_REASONS, ImageRejected, load_image, read_image_file
from .shards import agree_on_exit_status, process_device
from .sidecar import IMAGE_LATENT_KEY, content_digest, file_content_digest, image_source_identity
from .tree import DEFAULT_IMAGE_EXTENSIONS, normalize_extensions


class ImageDecodeDataset(Dataset):
    """Decodes one image per item to uint8 pixels; a bad image yields its problem instead of raising.

    uint8 is a quarter of the bytes of float32 on the way from the worker to the encoder.
    """

    def __init__(self, paths: list[str], resolution: int, min_size: int = 0, jpeg_draft: bool = True):
        self.paths = paths
        self.resolution = resolution
        self.min_size = min_size
        self.jpeg_draft = jpeg_draft

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            # The file's size and time are taken before it is read: if it changes while being read,
            # the sidecar records the older ones and the next run rebuilds it. The digest is of the
            # very bytes decoded.
            identity = image_source_identity(self.paths[i])
            data = read_image_file(self.paths[i])
            prepared = load_image(io.BytesIO(data), self.resolution, self.min_size, self.jpeg_draft)
            return i, prepared.pixels, prepared.notes, {**identity, **content_digest(data)}, "", ""
        except ImageRejected as error:
            return i, None, (), None, error.kind, error.reason
        except Exception as error:  # any other decode failure is reported per file, never fatal
            return i, None, (), None, "unreadable", f"{type(error).__name__}: {error}"


@dataclass
class DecodedBatch:
    """A batch as the workers hand it over: the good images stacked, the bad ones with their problem.

    Stacking in the worker means one tensor crosses the process boundary and, on CUDA, one pinned
    buffer is copied to the GPU without blocking.
    """

    indices: list[int]  # into the source list, one per row of ``pixels``
    pixels: torch.Tensor | None  # [B, 3, R, R] uint8, None when every image of the batch failed
    notes: list[tuple[str, ...]]  # conversions, one tuple per row of ``pixels``
    identities: list[dict[str, str]]  # image_source_identity as read before decoding, one per row
    rejected: list[tuple[int, str, str]]  # (index, kind, reason)

    def pin_memory(self) -> DecodedBatch:
        pinned = self.pixels.pin_memory() if self.pixels is not None else None
        return DecodedBatch(self.indices, pinned, self.notes, self.identities, self.rejected)


def collate_decoded(items) -> DecodedBatch:
    good = [item for item in items if item[1] is not None]
    return DecodedBatch(indices=[i for i, *_ in good],
                        pixels=torch.stack([pixels for _, pixels, *_ in good]) if good else None,
                        notes=[notes for _, _, notes, *_ in good],
                        identities=[identity for _, _, _, identity, *_ in good],
                        rejected=[(i, kind, reason) for i, pixels, _, _, kind, reason in items if pixels is None])


def pixels_to_vae_input(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [B, 3, R, R] -> [-1, 1] in the encoder's dtype (on whatever device the pixels are)."""
    return pixels.to(torch.float32).div_(127.5).sub_(1.0).to(dtype)


def check_vae_precision(vae_config, dtype: torch.dtype) -> None:
    """Refuse float16 for a VAE that its config says must be upcast (the SDXL VAE: fp16 gives NaNs)."""
    if dtype == torch.float16 and vae_config.get("force_upcast", False):
        raise ValueError("this VAE (force_upcast=True in its config, as the SDXL VAE) overflows in float16 "
                         "and would write NaN latents; use --dtype bfloat16 or --dtype float32")


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
    min_size: int = 0
    jpeg_draft: bool = True  # see images.load_image

    def __post_init__(self):
        check_vae_precision(self.vae.config, self.dtype)
        self.encoder_class, self.fingerprint = models.encoder_identity(self.vae)
        self.vae = self.vae.to(self.device).eval().requires_grad_(False)
        if self.dtype != torch.float32:  # loaded in fp32 so the fingerprint never depends on --dtype
            self.vae = self.vae.to(self.dtype)

    def settings_metadata(self) -> dict[str, str]:
        return {
            "kind": "image_latent",
            "encoder_class": self.encoder_class,
            "encoder_fingerprint": self.fingerprint,
            "resolution": str(self.resolution),
            "crop": "center",
            "dtype": models.dtype_name(self.save_dtype),
        }

    def expected_metadata(self, source: str) -> dict[str, str]:
        return {**self.settings_metadata(), **image_source_identity(source)}

    def source_digest(self, source: str) -> dict[str, str]:
        return file_content_digest(source)

    def latents_of(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, R, R] (pinned host memory or device) -> the VAE posterior mean on the device."""
        pixels = pixels.to(self.device, non_blocking=True)
        with torch.no_grad():
            return self.vae.encode(pixels_to_vae_input(pixels, self.dtype)).latent_dist.mean

    def encode(self, sources: list[str], summary: CacheSummary) -> Iterator[EncodedItem]:
        decode = ImageDecodeDataset(sources, self.resolution, self.min_size, self.jpeg_draft)
        loader = DataLoader(decode, batch_size=self.batch_size, num_workers=self.num_workers,
                            collate_fn=collate_decoded, pin_memory=self.device.type == "cuda",
                            prefetch_factor=4 if self.num_workers > 0 else None,
                            persistent_workers=False)
        for batch in loader:
            for i, kind, reason in batch.rejected:
                summary.fail(sources[i], kind, reason)
            for i, notes in zip(batch.indices, batch.notes):
                for note in notes:
                    summary.note(sources[i], note, CONVERSION_REASONS.get(note, f"converted from mode {note}"))
            if batch.pixels is None:
                continue
            latents = self.latents_of(batch.pixels)
            finite = torch.isfinite(latents).flatten(1).all(dim=1).cpu()
            latents = latents.to(self.save_dtype).cpu()
            settings = {**self.settings_metadata(), "encoder": self.model_name}
            for i, identity, latent, ok in zip(batch.indices, batch.identities, latents, finite.tolist()):
                if not ok:
                    summary.fail(sources[i], "non-finite output",
                                 "the VAE produced NaN/Inf for this image; nothing written")
                    continue
                yield EncodedItem(sources[i], {IMAGE_LATENT_KEY: latent.clone()}, {**settings, **identity})


@dataclass(frozen=True)
class ImageScriptDefaults:
    """What differs between create_img_sdvae.py and create_img_sdxl.py."""

    model: str
    out_suffix: str
    description: str
    vae_subfolder: str = "vae"


def build_parser(defaults: ImageScriptDefaults) -> argparse.ArgumentParser:
    parser = ArgumentParser(description=defaults.description)
    parser.add_argument("--model", default=defaults.model,
                        help=f"diffusers folder or hub id holding the VAE in vae/, or a single-file model "
                             f"(.safetensors) (default {defaults.model})")
    parser.add_argument("--custom", default=None, metavar="FOLDER",
                        help="take the VAE from this custom pipeline folder's vae/ (such as an SD1.5+T5 "
                             "pipeline) instead of --model; the pipeline's own code is not loaded")
    parser.add_argument("--out_suffix", default=defaults.out_suffix,
                        help=f"sidecar suffix: x.jpg -> x{defaults.out_suffix}")
    parser.add_argument("--resolution", type=int, default=512, help="square side the images are resized and cropped to")
    parser.add_argument("--min_size", type=int, default=0,
                        help="skip images whose short side is under this many pixels (default: upscale them)")
    parser.add_argument("--extensions", nargs="+", default=list(DEFAULT_IMAGE_EXTENSIONS),
                        help="image file extensions to take (case-insensitive)")
    add_common_cache_flags(parser, default_batch=8)
    add_single_file_config_flag(parser)
    return parser


def vae_source(args: argparse.Namespace) -> str:
    """The folder or hub id to load vae/ from: --custom wins over --model."""
    if args.custom is None:
        return args.model
    if not os.path.isdir(os.path.join(args.custom, "vae")):
        raise ValueError(f"--custom {args.custom}: no vae/ folder in it")
    return args.custom


def main(argv: list[str] | None, defaults: ImageScriptDefaults) -> int:
    args = build_parser(defaults).parse_args(argv)
    device = process_device(args.device)
    try:
        dtype = models.parse_dtype(args.dtype) if args.dtype else default_encoder_dtype(device)
        save_dtype = models.parse_dtype(args.save_dtype)
        settings = settings_from_args(args, normalize_extensions(args.extensions), args.num_workers)
        model = vae_source(args)
        vae = models.load_vae(model, subfolder=defaults.vae_subfolder, dtype=torch.float32,
                              single_file_config=args.single_file_config or defaults.model)
        builder = ImageLatentBuilder(vae=vae, model_name=models.model_name(model), resolution=args.resolution,
                                     device=device, dtype=dtype, save_dtype=save_dtype,
                                     batch_size=args.batch_size, num_workers=args.num_workers,
                                     min_size=args.min_size)
    except (ValueError, OSError) as error:  # bad flags, or no VAE where --model / --custom points
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = run_cache_build(builder, settings)
    print(summary.render(), file=sys.stderr)
    return agree_on_exit_status(summary.exit_status())
