"""What the image cache stores beside a latent when asked: the mirrored image's latent (--flip) and a
loss mask at latent resolution (--mask).

Flips: the mirrored latent is encoded from the mirrored pixels (a latent flipped after encoding is not
the latent of the flipped image: the VAE is not mirror-symmetric). A caption that names a side ("left",
"right") opts its image out: mirroring would make the caption false, so no mirrored latent is stored
and the trainer never flips that image. Whether an image opted out is part of its sidecar's expected
metadata, so a caption edited to name (or stop naming) a side makes the sidecar stale.

Masks: ``x.mask.png`` beside ``x.jpg`` (grey levels, white = full weight), else the image's own alpha
channel, else none (the trainer then weights the whole image fully). The mask is scaled and cropped
exactly as the image is, then averaged over each latent cell (area pooling), so a cell half covered
weighs 0.5.
"""

from __future__ import annotations

import io
import os
import re

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..bounded_read import read_file_bytes
from .images import ORIENTATION_TAG, Sizing, cover_scale
from ..sidecar import CAPTION_EXTENSION, CaptionRejected, mask_path, read_caption

# Words that name a side of the picture; a caption holding one as a word is not mirrored.
SIDE_WORDS = re.compile(r"\b(left|right)\b", re.IGNORECASE)

FLIP_STORED = "stored"
FLIP_OPTED_OUT = "caption names a side"


def names_a_side(caption: str) -> bool:
    return SIDE_WORDS.search(caption) is not None


def flip_state(source: str, caption_suffix: str = CAPTION_EXTENSION) -> str:
    """FLIP_OPTED_OUT when the image's caption names a side, else FLIP_STORED (no caption: stored)."""
    try:
        caption = read_caption(source, caption_suffix)
    except CaptionRejected:
        return FLIP_STORED
    return FLIP_OPTED_OUT if names_a_side(caption) else FLIP_STORED


def mask_identity(source: str) -> dict[str, str]:
    """What a fresh sidecar's metadata says of its mask: the mask file's size and time, or that the image's
    own alpha (if any) is the mask. Adding, changing or removing x.mask.png makes the sidecar stale."""
    path = mask_path(source)
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return {"mask_source": "alpha channel"}
    return {"mask_source": path.name, "mask_size": str(stat.st_size), "mask_mtime_ns": str(stat.st_mtime_ns)}


def _cover_and_crop(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Scale to cover ``target`` (w, h) and crop its centre: the arithmetic images.load_image applies."""
    width, height = image.size
    scale = cover_scale((width, height), target)
    new_size = (max(target[0], round(width * scale)), max(target[1], round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BILINEAR)
    left, top = (new_size[0] - target[0]) // 2, (new_size[1] - target[1]) // 2
    return image.crop((left, top, left + target[0], top + target[1]))


def _alpha_of(image: Image.Image) -> Image.Image | None:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return image.convert("RGBA").getchannel("A")
    return None


def load_mask_pixels(source: str, image_bytes: bytes, sizing: Sizing) -> torch.Tensor | None:
    """The image's mask as uint8 [1, H, W] at its target size (as load_image crops it), or None without one.

    Raises OSError / ValueError (Pillow's) for a mask file that cannot be read."""
    with Image.open(io.BytesIO(image_bytes)) as image:
        stored = image.size
        turned = image.getexif().get(ORIENTATION_TAG, 1) >= 5
        oriented_size = stored[::-1] if turned else stored
        path = mask_path(source)
        if os.path.exists(path):
            alpha = None
        else:
            image.load()
            alpha = _alpha_of(ImageOps.exif_transpose(image))
            if alpha is None:
                return None
    if alpha is None:
        with Image.open(io.BytesIO(read_file_bytes(path))) as mask_file:  # within the read bound
            mask_file.load()
            alpha = ImageOps.exif_transpose(mask_file).convert("L")
        if alpha.size != oriented_size:  # a mask drawn at another size covers the same picture
            alpha = alpha.resize(oriented_size, Image.Resampling.BILINEAR)
    mask = _cover_and_crop(alpha, sizing.size_for(*oriented_size))
    return torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).view(1, mask.size[1], mask.size[0])


def latent_mask(mask_pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """uint8 [1, H, W] -> float [1, H/f, W/f] in [0, 1]: the mean over each latent cell's pixels."""
    return F.avg_pool2d(mask_pixels.float().unsqueeze(0) / 255.0, factor).squeeze(0)
