"""Decoding and preparing images for the VAE: deterministic, and explicit about every conversion."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

# Alpha is composited on this colour rather than dropped (dropping turns transparent areas into
# whatever colour the encoder left in them, often black).
ALPHA_BACKGROUND = (255, 255, 255)


@dataclass
class PreparedImage:
    pixels: torch.Tensor  # [3, R, R], float32 in [-1, 1]
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


def load_image(path: os.PathLike | str, resolution: int) -> PreparedImage:
    """Open, EXIF-orient, convert to RGB, resize the short side to ``resolution``, center-crop.

    Raises OSError / ValueError (from Pillow) for unreadable files; callers report those.
    """
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        rgb, notes = to_rgb(image)
    width, height = rgb.size
    if min(width, height) < resolution:
        notes.append("upscaled")
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size != rgb.size:
        rgb = rgb.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left = (new_size[0] - resolution) // 2
    top = (new_size[1] - resolution) // 2
    rgb = rgb.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(rgb, dtype=np.uint8)
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    return PreparedImage(pixels=pixels, original_size=(width, height), notes=tuple(notes))
