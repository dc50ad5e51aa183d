"""Image -> VAE latent sidecars: the one implementation behind create_img_sdvae.py and create_img_sdxl.py.

Images are decoded and resized in DataLoader worker processes (``--num_workers``) while the VAE
encodes batches on the device; sidecars are written on background threads. The stored ``latent``
is the posterior mean, unscaled (the trainer applies the VAE scaling factor).

A VAE whose config asks for ``force_upcast`` (the SDXL VAE) overflows in float16, so it is refused
in that precision; bfloat16 and float32 are fine.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..bounded_read import call_bounded
from ..models import loading as models
from ..cli import ArgumentParser
from .build import (add_common_cache_flags, add_custom_flag, add_single_file_config_flag, check_cache_flags,
                    custom_model_source, requested_device, run_cache_build, settings_from_args)
from .previews import write_previews
from .summary import CacheSummary
from .writer import EncodedItem
from .image_extras import FLIP_STORED, flip_state, latent_mask, load_mask_pixels, mask_identity
from .images import (CONVERSION_REASONS, ORIENTATION_TAG, ImageRejected, Sizing, load_image, parse_size,
                     read_image_file, size_text, standard_buckets)
from .shares import agree_on_exit_status, process_device
from ..freshness import content_digest, file_content_digest, image_source_identity
from ..sidecar import (CAPTION_EXTENSION, DEFAULT_IMAGE_EXTENSIONS, FLIPPED_LATENT_KEY, IMAGE_LATENT_KEY, MASK_KEY,
                       mask_path, preview_path, sidecar_path)
from ..tree import normalize_extensions


class ImageDecodeDataset(Dataset):
    """Decodes one image per item to uint8 pixels; a bad image yields its problem instead of raising.

    uint8 is a quarter of the bytes of float32 on the way from the worker to the encoder.
    """

    def __init__(self, paths: list[str], sizing: Sizing | int, min_size: int = 0, jpeg_draft: bool = True,
                 with_masks: bool = False):
        self.paths = paths
        self.with_masks = with_masks  # also each image's mask (x.mask.png or alpha) at the same crop
        self.sizing = sizing if isinstance(sizing, Sizing) else Sizing.square(sizing)
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
            prepared = load_image(io.BytesIO(data), self.sizing, self.min_size, self.jpeg_draft)
        except ImageRejected as error:
            return i, None, (), None, error.kind, error.reason, None
        except Exception as error:  # any other decode failure is reported per file, never fatal
            return i, None, (), None, "unreadable", f"{type(error).__name__}: {error}", None
        try:
            mask = load_mask_pixels(self.paths[i], data, self.sizing) if self.with_masks else None
        except Exception as error:  # a mask that cannot be read: the image is reported, not trained unmasked
            return i, None, (), None, "unreadable mask", f"{mask_path(self.paths[i]).name}: {error}", None
        return i, prepared.pixels, prepared.notes, {**identity, **content_digest(data)}, "", "", mask


@dataclass
class DecodedGroup:
    """Images of one batch that share one size (all of them, unless aspect buckets are in use)."""

    indices: list[int]  # into the source list, one per row of ``pixels``
    pixels: torch.Tensor  # [B, 3, H, W] uint8
    notes: list[tuple[str, ...]]  # conversions, one tuple per row of ``pixels``
    identities: list[dict[str, str]]  # image_source_identity as read before decoding, one per row
    masks: list[torch.Tensor | None] = field(default_factory=list)  # uint8 [1, H, W] per row (--mask)


@dataclass
class DecodedBatch:
    """A batch as the workers hand it over: the good images stacked by size, the bad ones with their problem.

    Stacking in the worker means one tensor per size crosses the process boundary and, on CUDA, one
    pinned buffer is copied to the GPU without blocking.
    """

    groups: list[DecodedGroup]
    rejected: list[tuple[int, str, str]]  # (index, kind, reason)

    def pin_memory(self) -> DecodedBatch:
        return DecodedBatch([DecodedGroup(g.indices, g.pixels.pin_memory(), g.notes, g.identities, g.masks)
                             for g in self.groups], self.rejected)


def collate_decoded(items) -> DecodedBatch:
    by_size: dict[tuple[int, ...], list] = {}
    for item in items:
        if item[1] is not None:
            by_size.setdefault(tuple(item[1].shape), []).append(item)
    groups = [DecodedGroup(indices=[i for i, *_ in good], pixels=torch.stack([pixels for _, pixels, *_ in good]),
                           notes=[notes for _, _, notes, *_ in good],
                           identities=[identity for _, _, _, identity, *_ in good],
                           masks=[item[6] for item in good])
              for good in by_size.values()]
    return DecodedBatch(groups=groups,
                        rejected=[(i, kind, reason) for i, pixels, _, _, kind, reason, _ in items if pixels is None])


def pixels_to_vae_input(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> [-1, 1] in the encoder's dtype (on whatever device the pixels are)."""
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
    sizing: Sizing | None = None  # None: squares of ``resolution``
    write_preview: bool = False  # also write each latent decoded back, as x<suffix>.webp
    out_suffix: str = ""  # for the preview's name
    flip: bool = False  # also store the mirrored image's latent (image_extras), unless the caption names a side
    caption_suffix: str = CAPTION_EXTENSION  # where --flip reads the caption that may opt an image out
    masks: bool = False  # also store each image's mask at latent resolution (image_extras)

    def __post_init__(self):
        check_vae_precision(self.vae.config, self.dtype)
        if self.write_preview and not self.out_suffix:
            raise ValueError("write_preview needs the sidecars' out_suffix (the preview is x<out_suffix>.webp)")
        self.sizing = self.sizing or Sizing.square(self.resolution)
        check_sizes_fit_the_vae(self.sizing, vae_downscale_factor(self.vae.config))
        self.encoder_class, self.fingerprint = models.encoder_identity(self.vae)
        self.vae = self.vae.to(self.device).eval().requires_grad_(False)
        if self.dtype != torch.float32:  # loaded in fp32 so the fingerprint never depends on --dtype
            self.vae = self.vae.to(self.dtype)

    def settings_metadata(self) -> dict[str, str]:
        return {
            "kind": "image_latent",
            "encoder_class": self.encoder_class,
            "encoder_fingerprint": self.fingerprint,
            **self.sizing.metadata(),
            "crop": "center",
            "dtype": models.dtype_name(self.save_dtype),
        }

    def expected_metadata(self, source: str) -> dict[str, str]:
        # --flip and --mask add keys only when given, so sidecars cached without them stay fresh; without
        # them the keys must be absent (None), so a sidecar cached with them is rebuilt without
        return {**self.settings_metadata(), **image_source_identity(source),
                "flip": flip_state(source, self.caption_suffix) if self.flip else None,
                **(mask_identity(source) if self.masks else {"mask_source": None})}

    def source_digest(self, source: str) -> dict[str, str]:
        return file_content_digest(source)

    def latents_of(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, R, R] (pinned host memory or device) -> the VAE posterior mean on the device."""
        pixels = pixels.to(self.device, non_blocking=True)
        with torch.no_grad():
            return self.vae.encode(pixels_to_vae_input(pixels, self.dtype)).latent_dist.mean

    def preview_of(self, latents: torch.Tensor) -> list[bytes]:
        """WebP files of ``latents`` [B, C, h, w] (as stored) decoded back by the VAE, for spot checks."""
        with torch.no_grad():
            decoded = self.vae.decode(latents.to(self.device, self.dtype)).sample
        pixels = decoded.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        files = []
        for image in pixels.numpy():
            buffer = io.BytesIO()
            Image.fromarray(image, "RGB").save(buffer, format="WEBP", lossless=True)  # as the original's previews
            files.append(buffer.getvalue())
        return files

    def encode(self, sources: list[str], summary: CacheSummary) -> Iterator[EncodedItem]:
        if self.sizing.bucketed:  # one shape per batch, so the VAE runs full batches
            sources = order_by_bucket(sources, self.sizing)
        decode = ImageDecodeDataset(sources, self.sizing, self.min_size, self.jpeg_draft, with_masks=self.masks)
        factor = vae_downscale_factor(self.vae.config)
        loader = DataLoader(decode, batch_size=self.batch_size, num_workers=self.num_workers,
                            collate_fn=collate_decoded, pin_memory=self.device.type == "cuda",
                            prefetch_factor=4 if self.num_workers > 0 else None,
                            persistent_workers=False)
        settings = {**self.settings_metadata(), "encoder": self.model_name}
        for batch in loader:
            for i, kind, reason in batch.rejected:
                summary.fail(sources[i], kind, reason)
            for group in batch.groups:
                for i, notes in zip(group.indices, group.notes):
                    for note in notes:
                        summary.note(sources[i], note, CONVERSION_REASONS.get(note, f"converted from mode {note}"))
                latents = self.latents_of(group.pixels)
                finite = torch.isfinite(latents).flatten(1).all(dim=1)
                flips = [flip_state(sources[i], self.caption_suffix) if self.flip else "" for i in group.indices]
                mirrored = [row for row, state in enumerate(flips) if state == FLIP_STORED]
                flipped = {}
                if mirrored:  # the mirrored pixels encoded, not the latent mirrored: the VAE is not symmetric
                    flipped_latents = self.latents_of(group.pixels[mirrored].flip(-1))
                    finite[mirrored] &= torch.isfinite(flipped_latents).flatten(1).all(dim=1)
                    flipped = dict(zip(mirrored, flipped_latents.to(self.save_dtype).cpu()))
                finite = finite.cpu()
                latents = latents.to(self.save_dtype).cpu()
                previews = self.preview_of(latents) if self.write_preview else [None] * len(latents)
                size = {"size": size_text((group.pixels.shape[3], group.pixels.shape[2]))}  # the image's bucket
                masks = group.masks or [None] * len(latents)
                for row, (i, identity, latent, ok, preview) in enumerate(zip(group.indices, group.identities,
                                                                             latents, finite.tolist(), previews)):
                    if not ok:
                        summary.fail(sources[i], "non-finite output",
                                     "the VAE produced NaN/Inf for this image; nothing written")
                        continue
                    extra = {os.fspath(preview_path(sidecar_path(sources[i], self.out_suffix))): preview} \
                        if preview is not None else {}
                    tensors = {IMAGE_LATENT_KEY: latent.clone()}
                    extras = {}
                    if self.flip:
                        extras["flip"] = flips[row]
                        if row in flipped:
                            tensors[FLIPPED_LATENT_KEY] = flipped[row].clone()
                    if self.masks:
                        extras.update(mask_identity(sources[i]))
                        if masks[row] is not None:
                            tensors[MASK_KEY] = latent_mask(masks[row], factor).to(self.save_dtype)
                    yield EncodedItem(sources[i], tensors, {**settings, **size, **identity, **extras},
                                      extra_files=extra)


# Image headers are read on this many threads when ordering by bucket (each is a round trip on network storage)
HEADER_THREADS = 8


def bucket_of(path: str, sizing: Sizing) -> int:
    """The position in ``sizing.sizes`` of the image's bucket, from its header alone; -1 if unreadable
    (the decode then reports why)."""
    try:
        width, height = call_bounded(path, _oriented_size, path)  # a header that never comes: -1, as unreadable
        return sizing.sizes.index(sizing.size_for(width, height))
    except Exception:
        return -1


def _oriented_size(path: str) -> tuple[int, int]:
    with Image.open(path) as image:
        width, height = image.size
        return (height, width) if image.getexif().get(ORIENTATION_TAG, 1) >= 5 else (width, height)


def order_by_bucket(sources: list[str], sizing: Sizing) -> list[str]:
    """``sources`` grouped by bucket (stable: walk order within each), so consecutive images share a size."""
    with ThreadPoolExecutor(max_workers=HEADER_THREADS, thread_name_prefix="image-header") as pool:
        buckets = list(pool.map(functools.partial(bucket_of, sizing=sizing), sources, chunksize=256))
    return [source for _, source in sorted(zip(buckets, sources), key=lambda pair: pair[0])]


def vae_downscale_factor(vae_config) -> int:
    """How many pixels one latent cell covers on a side: 2 per down block after the first (8 for SD's VAE)."""
    return 2 ** (len(vae_config.get("block_out_channels", (0,) * 4)) - 1)


def check_sizes_fit_the_vae(sizing: Sizing, factor: int) -> None:
    """Every target side must be a multiple of the VAE's factor (else the latent would not match the image)."""
    for width, height in sizing.sizes:
        if width % factor or height % factor:
            raise ValueError(f"target size {width}x{height} (--resolution, --target_width/--target_height or "
                             f"--buckets): both sides must be multiples of {factor}, this VAE's downscale factor")


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
    parser.add_argument("--vae", action="store_true",
                        help="--model is a bare VAE: config and weights at its root, as stabilityai/sd-vae-ft-mse")
    add_custom_flag(parser, "VAE (vae/; only the VAE is loaded, so none of the pipeline's code runs)")
    parser.add_argument("--out_suffix", default=defaults.out_suffix,
                        help=f"sidecar suffix: x.jpg -> x{defaults.out_suffix}")
    parser.add_argument("--resolution", type=int, default=512, help="square side the images are resized and cropped to")
    parser.add_argument("--target_width", type=int, default=None,
                        help="with --target_height: one fixed size instead of a square (the image is scaled to "
                             "cover it, then center-cropped to exactly it); multiples of the VAE's factor (8)")
    parser.add_argument("--target_height", type=int, default=None, help="see --target_width")
    parser.add_argument("--buckets", nargs="+", default=None, metavar="WxH",
                        help="aspect-ratio buckets such as 512x512 448x576 576x448: each image goes to the one "
                             "nearest its aspect ratio (log-ratio distance; ties to the one listed first)")
    parser.add_argument("--aspect_buckets", action="store_true",
                        help="the standard buckets at --resolution: sides multiples of 64, area <= resolution^2, "
                             "aspect ratios up to 2:1 (512 gives 384x640 448x576 512x512 576x448 640x384)")
    parser.add_argument("--write_preview", "--writepreview", action="store_true",
                        help="also write each new latent decoded back by the VAE as x<out_suffix>.webp, for spot "
                             "checks (never taken for a source image)")
    parser.add_argument("--previewonly", action="store_true",
                        help="write only the previews x<out_suffix>.webp, no sidecars: an existing latent is decoded, "
                             "an image without one is encoded for its preview alone; existing previews are kept "
                             "unless --overwrite")
    parser.add_argument("--min_size", type=int, default=0,
                        help="skip images whose short side is under this many pixels (default: upscale them)")
    parser.add_argument("--extensions", nargs="+", default=list(DEFAULT_IMAGE_EXTENSIONS),
                        help="image file extensions to take (case-insensitive)")
    parser.add_argument("--flip", action="store_true",
                        help="also store the latent of the horizontally mirrored image (the trainer's --flip_p "
                             "draws it), except for images whose caption names a side (left/right)")
    parser.add_argument("--caption_suffix", default=CAPTION_EXTENSION,
                        help=f"with --flip: the caption of x.jpg is x<caption_suffix> (default {CAPTION_EXTENSION})")
    parser.add_argument("--mask", action="store_true",
                        help="also store each image's loss mask at latent resolution: x.mask.png beside x.jpg "
                             "(white = trained), else the image's alpha channel (the trainer's --masked_loss)")
    add_common_cache_flags(parser, default_batch=8, encoder_dtype_help=(
        "VAE precision: float32 by default, as the original scripts (bfloat16 encodes faster on CUDA but moves "
        "latents by up to 5%% of their std, decoded ~49 dB PSNR from float32; docs/BENCHMARKS.md)"))
    add_single_file_config_flag(parser)
    return parser


def sizing_from_args(args: argparse.Namespace) -> Sizing:
    """--resolution (a square), --target_width/--target_height (one size) or --buckets/--aspect_buckets."""
    fixed = (args.target_width, args.target_height)
    chosen = [flag for flag, given in (("--target_width/--target_height", fixed != (None, None)),
                                       ("--buckets", args.buckets is not None),
                                       ("--aspect_buckets", args.aspect_buckets)) if given]
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join(chosen)}: choose one way to size the images")
    if args.resolution <= 0:
        raise ValueError(f"--resolution {args.resolution}: must be positive")
    if fixed != (None, None):
        if None in fixed:
            raise ValueError("--target_width and --target_height go together: give both")
        if min(fixed) <= 0:
            raise ValueError(f"--target_width {fixed[0]} --target_height {fixed[1]}: both must be positive")
        return Sizing([fixed])
    if args.buckets is not None:
        try:
            return Sizing([parse_size(text) for text in args.buckets])
        except ValueError as error:
            raise ValueError(f"--buckets {error}") from None
    if args.aspect_buckets:
        return Sizing(standard_buckets(args.resolution))
    return Sizing.square(args.resolution)


def main(argv: list[str] | None, defaults: ImageScriptDefaults) -> int:
    parser = build_parser(defaults)
    args = parser.parse_args(argv)
    check_cache_flags(parser, args)  # before any model loads
    try:
        device = process_device(requested_device(args))
        dtype = models.parse_dtype(args.dtype) if args.dtype else torch.float32
        save_dtype = models.parse_dtype(args.save_dtype)
        settings = settings_from_args(args, normalize_extensions(args.extensions), args.num_workers)
        sizing = sizing_from_args(args)
        if args.vae and args.custom is not None:
            raise ValueError("--vae and --custom: --vae says --model is a bare VAE, --custom that it is a pipeline")
        subfolder = None if args.vae else defaults.vae_subfolder
        model = custom_model_source(args, (subfolder,) if subfolder else ())
        vae = models.load_vae(model, subfolder=subfolder, dtype=torch.float32,
                              single_file_config=args.single_file_config or defaults.model)
        builder = ImageLatentBuilder(vae=vae, model_name=models.model_name(model), resolution=args.resolution,
                                     device=device, dtype=dtype, save_dtype=save_dtype,
                                     batch_size=args.batch_size, num_workers=args.num_workers,
                                     min_size=args.min_size, sizing=sizing,
                                     write_preview=args.write_preview or args.previewonly, out_suffix=args.out_suffix,
                                     flip=args.flip, caption_suffix=args.caption_suffix, masks=args.mask)
    except (ValueError, OSError) as error:  # bad flags, or no VAE where --model / --custom points
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.previewonly:
        previews = write_previews(builder, settings.data_roots, settings.extensions, settings.out_suffix,
                                  overwrite=args.overwrite)
        print(previews.render(), file=sys.stderr)
        return 1 if previews.failed else 0
    summary = run_cache_build(builder, settings)
    print(summary.render(), file=sys.stderr)
    return agree_on_exit_status(summary.exit_status())
