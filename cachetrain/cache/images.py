"""Decoding and preparing images for the VAE: deterministic, and explicit about every conversion.

Every image becomes 8-bit RGB the same way on every run:
  - palette images are expanded (to RGBA when they carry transparency);
  - alpha (RGBA, LA, PA, palette transparency) is composited on ALPHA_BACKGROUND (white), never dropped;
  - 16/32-bit grey is scaled to 8 bits (not clipped), then grey is repeated into R, G and B;
  - CMYK and every other mode use Pillow's own conversion to RGB.
Then the image is scaled (bicubic) to cover its target size and the centre is cropped to exactly that
size (the offset is half the excess, rounded as torchvision's center_crop rounds it): a square of
``--resolution``, one fixed ``--target_width`` x ``--target_height``, or the aspect bucket nearest the
image's shape (``Sizing``).
Each conversion is named in ``PreparedImage.notes`` so the cache builders can count it.

Files that cannot become a training image raise ``ImageRejected`` with a ``kind`` (one of
REJECTION_KINDS) and a reason: the builders report and count them and carry on.
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..bounded_read import ReadTimedOut, read_file_bytes

# Alpha is composited on this colour rather than dropped (dropping turns transparent areas into
# whatever colour the encoder left in them, often black).
ALPHA_BACKGROUND = (255, 255, 255)

# What each conversion note means, for reports.
CONVERSION_REASONS = {
    "palette": "palette image expanded to RGB",
    "alpha": f"alpha composited on RGB {ALPHA_BACKGROUND}",
    "16bit": "16/32-bit grey scaled to 8 bits",
    "cmyk": "CMYK converted to RGB",
    "grey": "grey repeated into R, G and B",
    "upscaled": "short side under the resolution: upscaled",
}

REJECTION_KINDS = ("empty file", "too large", "not an image", "truncated", "decompression bomb", "unreadable",
                   "too small")
# Pillow refuses more than ~179M pixels as a bomb; no image file we could use comes near this size
MAX_IMAGE_FILE_BYTES = 1 << 30


class ImageRejected(ValueError):
    """An image file that gets no latent; ``kind`` groups it in summaries, the message says why."""

    def __init__(self, kind: str, reason: str):
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


@dataclass
class PreparedImage:
    pixels: torch.Tensor  # [3, H, W] uint8 (image_cache.pixels_to_vae_input maps it to [-1, 1])
    original_size: tuple[int, int]  # (width, height) after EXIF orientation
    notes: tuple[str, ...] = ()  # conversions worth counting: "upscaled", "alpha", "cmyk", ...


def to_rgb(image: Image.Image) -> tuple[Image.Image, list[str]]:
    """Convert any Pillow mode to 8-bit RGB, compositing alpha on ALPHA_BACKGROUND."""
    notes = []
    mode = image.mode
    if mode == "P":
        notes.append("palette")
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        notes.append("alpha")
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB"), notes
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grey: scale to 8 bits rather than clip (Pillow's convert("L") clips at 255).
        notes.append("16bit")
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, "L").convert("RGB"), notes
    if mode == "CMYK":
        notes.append("cmyk")
    elif mode in ("L", "1"):
        notes.append("grey")
    elif mode != "RGB":
        notes.append(mode.lower())
    return image.convert("RGB"), notes


def _open_checked(path: os.PathLike | str | BinaryIO) -> Image.Image:
    """Image.open with every way a file can fail to be an image turned into ImageRejected."""
    if isinstance(path, (str, os.PathLike)) and os.stat(path).st_size == 0:
        raise ImageRejected("empty file", "the file has zero bytes")
    try:
        # Pillow only warns between 1x and 2x its pixel limit; a file that large is treated as a
        # bomb too, so the limit means one thing (and a warning never escapes into the log).
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRejected("decompression bomb", f"{error}") from None
    except UnidentifiedImageError:
        raise ImageRejected("not an image", "Pillow does not recognise the file's content") from None


def _decode(image: Image.Image, stored_target: tuple[int, int], jpeg_draft: bool) -> Image.Image:
    # JPEG can decode at 1/2, 1/4 or 1/8 scale for nearly free; ask for the smallest scale that still
    # covers the target size (turned as the stored pixels are), so large photos are never decoded at full size.
    width, height = image.size
    scale = cover_scale((width, height), stored_target)
    if jpeg_draft and image.format == "JPEG" and scale < 0.5:
        image.draft(None, (int(width * scale) + 1, int(height * scale) + 1))
    try:
        image.load()
    except OSError as error:
        if "truncated" in str(error) or "broken data stream" in str(error):
            raise ImageRejected("truncated", f"{error}") from None
        raise ImageRejected("unreadable", f"{type(error).__name__}: {error}") from None
    except (ValueError, SyntaxError, EOFError, MemoryError) as error:
        raise ImageRejected("unreadable", f"{type(error).__name__}: {error}") from None
    return ImageOps.exif_transpose(image)


ORIENTATION_TAG = 0x0112  # EXIF orientation; values 5-8 turn the image by 90 degrees


def cover_scale(image_size: tuple[int, int], target: tuple[int, int]) -> float:
    """The scale at which an image of ``image_size`` (w, h) just covers ``target`` (w, h)."""
    return max(target[0] / image_size[0], target[1] / image_size[1])


class Sizing:
    """The size each image is cropped to: one size for every image, or the aspect bucket nearest its shape.

    Sizes are (width, height). An image goes to the bucket whose aspect ratio is nearest its own in
    log-ratio distance, |log(w/h) - log(W/H)|, so 2:1 and 1:2 are equally far from square; on a tie the
    bucket listed first wins. The sizes are part of every sidecar's metadata (``metadata``): a change
    makes the sidecars stale.
    """

    def __init__(self, sizes: list[tuple[int, int]]):
        if not sizes:
            raise ValueError("no target size")
        self.sizes = tuple(dict.fromkeys(sizes))  # in the order given, each once
        self._log_ratios = [math.log(w / h) for w, h in self.sizes]

    @classmethod
    def square(cls, resolution: int) -> Sizing:
        return cls([(resolution, resolution)])

    @property
    def bucketed(self) -> bool:
        return len(self.sizes) > 1

    def size_for(self, width: int, height: int) -> tuple[int, int]:
        """The target (width, height) of an image of ``width`` x ``height`` (after EXIF orientation)."""
        if len(self.sizes) == 1:
            return self.sizes[0]
        ratio = math.log(width / height)
        distances = [abs(ratio - r) for r in self._log_ratios]
        return self.sizes[distances.index(min(distances))]  # index(): the first of equals

    def metadata(self) -> dict[str, str]:
        """{"resolution": "512"} for a square (as sidecars have always said), "512x768" for one fixed
        size, the comma-separated list of sizes for buckets."""
        if self.sizes == ((self.sizes[0][0],) * 2,):
            return {"resolution": str(self.sizes[0][0])}
        return {"resolution": ",".join(size_text(size) for size in self.sizes)}


def size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def parse_size(text: str) -> tuple[int, int]:
    """'448x576' -> (448, 576); ValueError naming the text otherwise."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{text!r} is not WIDTHxHEIGHT such as 448x576") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"{text!r}: both sides must be positive")
    return width, height


# The standard bucket list: sides multiples of this, and no bucket longer than this times its width
BUCKET_STEP = 64
MAX_BUCKET_RATIO = 2.0


def standard_buckets(resolution: int) -> list[tuple[int, int]]:
    """Buckets for ``--aspect_buckets``: for each width a multiple of 64, the tallest height (a multiple of 64)
    whose area is at most resolution^2, keeping aspect ratios up to 2:1 either way. 512 gives 384x640,
    448x576, 512x512, 576x448 and 640x384."""
    buckets = []
    for width in range(BUCKET_STEP, 2 * resolution + 1, BUCKET_STEP):
        height = resolution * resolution // width // BUCKET_STEP * BUCKET_STEP
        if height >= BUCKET_STEP and max(width, height) / min(width, height) <= MAX_BUCKET_RATIO:
            buckets.append((width, height))
    if not buckets:
        raise ValueError(f"--resolution {resolution}: too small for buckets with sides multiples of {BUCKET_STEP}")
    return buckets


def center_crop_offset(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(left, top) of a centred ``target`` (w, h) in ``size`` (w, h): half the excess, rounded half to even
    as Python's round() does (an excess of 11 gives 6, not 5). The original scripts crop with
    torchvision's center_crop, which rounds so; taking the same pixels keeps caches made by either tool
    interchangeable."""
    return round((size[0] - target[0]) / 2), round((size[1] - target[1]) / 2)


def read_image_file(path: os.PathLike | str) -> bytes:
    """An image file's bytes, read once (to decode and to hash the same bytes); refuses an empty file
    and one too large to be an image before reading it."""
    status = os.stat(path)  # follows links; a loop raises OSError, named by the caller
    if not stat.S_ISREG(status.st_mode):  # a FIFO would block the read forever
        raise ImageRejected("not a regular file", "a named pipe, socket or device; never read")
    size = status.st_size
    if size == 0:
        raise ImageRejected("empty file", "the file has zero bytes")
    if size > MAX_IMAGE_FILE_BYTES:
        raise ImageRejected("too large", f"{size} bytes, over the {MAX_IMAGE_FILE_BYTES} an image file may have")
    try:
        return read_file_bytes(path)  # within the read bound (--read_timeout): a hung mount's file is named
    except ReadTimedOut as error:
        raise ImageRejected("no answer", error.strerror) from None


def load_image(path: os.PathLike | str | BinaryIO, resolution: int | Sizing, min_size: int = 0,
               jpeg_draft: bool = True) -> PreparedImage:
    """Open, EXIF-orient, convert to RGB, scale to cover the target size and center-crop to exactly it.

    ``resolution`` is a square's side or a ``Sizing`` (one fixed size, or buckets: the one nearest the
    image's aspect ratio is taken). ``jpeg_draft`` lets a large JPEG decode at a reduced scale that
    still covers the target (DCT-domain downscaling, then bicubic as usual); False decodes every pixel.

    Images whose short side is under ``min_size`` are rejected ("too small"); images smaller than the
    target are upscaled and noted. Raises ImageRejected for every file that cannot be used (and
    OSError if the file vanished).
    """
    sizing = resolution if isinstance(resolution, Sizing) else Sizing.square(resolution)
    with _open_checked(path) as image:
        stored_size = image.size
        if min(stored_size) < min_size:
            raise ImageRejected("too small", f"{stored_size[0]}x{stored_size[1]} is under --min_size {min_size}")
        turned_by_exif = image.getexif().get(ORIENTATION_TAG, 1) >= 5
        oriented_size = stored_size[::-1] if turned_by_exif else stored_size
        target = sizing.size_for(*oriented_size)
        oriented = _decode(image, target[::-1] if turned_by_exif else target, jpeg_draft)
        decoded_size = image.size  # smaller than stored_size when JPEG draft decoding kicked in
        try:
            rgb, notes = to_rgb(oriented)
        except (OSError, ValueError) as error:
            raise ImageRejected("unreadable", f"cannot convert mode {oriented.mode}: {error}") from None
    turned = oriented.size != decoded_size
    original_size = stored_size[::-1] if turned else stored_size
    width, height = rgb.size
    scale = cover_scale((width, height), target)
    if cover_scale(original_size, target) > 1:
        notes.append("upscaled")
    new_size = (max(target[0], round(width * scale)), max(target[1], round(height * scale)))
    if new_size != rgb.size:
        rgb = rgb.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = center_crop_offset(new_size, target)
    rgb = rgb.crop((left, top, left + target[0], top + target[1]))
    array = np.asarray(rgb, dtype=np.uint8)
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    return PreparedImage(pixels=pixels, original_size=original_size, notes=tuple(notes))
