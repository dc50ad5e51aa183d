"""The synthetic dataset: coloured shapes on coloured backgrounds, captioned with what they show.

``make_shapes_dataset(root, n)`` writes JPEGs with captions ("a red circle on a blue background"):
enough structure for a tiny model to learn from, made offline in a second. The tiny models
(cachetrain.tiny) are built for these images' size, and its tokenizers know every caption's words.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from ..sidecar import caption_path

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40),
    "white": (245, 245, 245), "black": (20, 20, 20), "purple": (140, 50, 170), "orange": (240, 140, 30),
}
# pixels: the images' default size and the tiny models' resolution (their VAE downsamples 4x, so latents
# are 16x16 like tiny.TINY_UNET's sample_size)
TINY_RESOLUTION = 64


def shape_caption(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def shape_captions() -> list[str]:
    """Every caption make_shapes_dataset can write (the tiny T5 tokenizer is trained on them)."""
    colours = sorted(COLOURS)
    return [shape_caption(shape, colour, background)
            for shape in SHAPES for colour in colours for background in colours if background != colour]


def _draw_shape(draw, shape: str, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)
    else:  # cross
        w = (x1 - x0) // 3
        draw.rectangle((x0 + w, y0, x1 - w, y1), fill=colour)
        draw.rectangle((x0, y0 + w, x1, y1 - w), fill=colour)


def shape_images(count: int, size: int, seed: int, colours: tuple[str, ...] | None = None,
                 backgrounds: tuple[str, ...] | None = None, shapes: tuple[str, ...] | None = None,
                 centred: bool = False):
    """Yield PIL images (caption in .info): a random shape and colour on a random background colour,
    of a random size at a random place, or with ``centred`` of one size in the middle."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    colour_names = sorted(colours or COLOURS)
    for _ in range(count):
        shape = rng.choice(shapes or SHAPES)
        if backgrounds:
            colour, background = rng.choice(colour_names), rng.choice(sorted(backgrounds))
        else:
            colour, background = rng.sample(colour_names, 2)
        image = Image.new("RGB", (size, size), COLOURS[background])
        if centred:
            extent = size * 11 // 20
            x0 = y0 = (size - extent) // 2
        else:
            extent = rng.randint(size * 2 // 5, size * 4 // 5)
            x0, y0 = rng.randint(0, size - extent), rng.randint(0, size - extent)
        _draw_shape(ImageDraw.Draw(image), shape, (x0, y0, x0 + extent, y0 + extent), COLOURS[colour])
        image.info["caption"] = shape_caption(shape, colour, background)
        yield image


def make_shapes_dataset(root: os.PathLike | str, count: int = 512, size: int = TINY_RESOLUTION,
                        seed: int = 0, folders: int = 4, colours: tuple[str, ...] | None = None,
                        backgrounds: tuple[str, ...] | None = None,
                        shapes: tuple[str, ...] | None = None, centred: bool = False) -> list[Path]:
    """Write ``count`` JPEG images with captions under ``root`` (spread over ``folders`` subfolders).

    ``colours`` limits the palette (names of COLOURS); ``backgrounds``, if given, is a separate
    palette for the background. Disjoint palettes make the background - most of the image - follow
    from one word of the caption, so a model learns to use its text sooner. ``shapes`` limits the
    shapes (names of SHAPES). ``centred`` draws every shape at one size in the middle, so a caption
    names all there is to learn of its image. Fewer combinations, and centred shapes, are learnt in
    fewer steps (the demo uses both).
    """
    root = Path(root)
    images = []
    for i, image in enumerate(shape_images(count, size, seed, colours, backgrounds, shapes, centred)):
        folder = root / f"part{i % folders}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:05d}.jpg"
        image.save(path, quality=95)
        caption_path(path).write_text(image.info["caption"] + "\n", encoding="utf-8")
        images.append(path)
    return images


def shape_pixels(count: int, size: int, seed: int) -> torch.Tensor:
    """``count`` shape images as one [N, 3, size, size] batch in [-1, 1] (the VAE's input range)."""
    import numpy as np

    images = [np.asarray(image, dtype=np.float32) / 127.5 - 1.0 for image in shape_images(count, size, seed)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
