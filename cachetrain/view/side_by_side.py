"""Side-by-side PNGs: one labelled grid per step that every run has (compare_imgdirs.py --png).

One column per run, named on top; one row per prompt, named above it; a missing or unreadable image
is a marked gap. Small samples are enlarged by a whole factor so the labels fit beside them.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .sample_runs import Comparison, Run, Step

PNG_PADDING = 8
PNG_TITLE_HEIGHT = 24
PNG_LABEL_HEIGHT = 20
PNG_MIN_TILE = 256  # small samples are enlarged by a whole factor (nearest) so the labels fit beside them
PNG_BACKGROUND = (255, 255, 255)
PNG_TEXT = (20, 20, 20)
PNG_GAP = (235, 235, 235)
PNG_GAP_MARK = (210, 40, 40)
TOP_FOLDER_PNG = "side-by-side.png"  # for the images directly in the folders given (sample_images.py --out)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1 has one fixed-size default font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text``, shortened with an ellipsis until it fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def side_by_side_image(runs: list[Run], step: Step) -> Image.Image:
    """The step's samples in a grid: one column per run (named on top), one row per prompt (named above it)."""
    decoded = [{name: Image.open(io.BytesIO(image.png)).convert("RGB")
                for name, image in images.items() if image.readable} for images in step.images]
    sizes = [image.size for images in decoded for image in images.values()] or [(PNG_MIN_TILE, PNG_MIN_TILE)]
    native_width, native_height = max(w for w, _ in sizes), max(h for _, h in sizes)
    scale = max(1, PNG_MIN_TILE // max(native_width, native_height))
    tile_width, tile_height = native_width * scale, native_height * scale

    width = PNG_PADDING + len(runs) * (tile_width + PNG_PADDING)
    height = (PNG_PADDING + PNG_TITLE_HEIGHT + PNG_LABEL_HEIGHT
              + len(step.names) * (PNG_LABEL_HEIGHT + tile_height + PNG_PADDING))
    canvas = Image.new("RGB", (width, height), PNG_BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    title_font, label_font = _font(16), _font(13)
    text_width = width - 2 * PNG_PADDING

    def column_left(r: int) -> int:
        return PNG_PADDING + r * (tile_width + PNG_PADDING)

    title = f"step {step.step} ({step.folder})" if step.step is not None else step.folder
    draw.text((PNG_PADDING, PNG_PADDING), _fit(draw, title, title_font, text_width), fill=PNG_TEXT, font=title_font)
    y = PNG_PADDING + PNG_TITLE_HEIGHT
    for r, run in enumerate(runs):
        draw.text((column_left(r), y), _fit(draw, run.name, label_font, tile_width), fill=PNG_TEXT, font=label_font)
    y += PNG_LABEL_HEIGHT
    for name in step.names:
        draw.text((PNG_PADDING, y), _fit(draw, step.prompt(name), label_font, text_width), fill=PNG_TEXT,
                  font=label_font)
        y += PNG_LABEL_HEIGHT
        for r, images in enumerate(decoded):
            left = column_left(r)
            image = images.get(name)
            if image is None:
                _draw_gap(draw, (left, y, left + tile_width - 1, y + tile_height - 1),
                          "unreadable" if name in step.images[r] else "missing", label_font)
                continue
            if scale > 1:
                image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
            canvas.paste(image, (left + (tile_width - image.width) // 2, y + (tile_height - image.height) // 2))
        y += tile_height + PNG_PADDING
    return canvas


def _draw_gap(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], label: str, font) -> None:
    left, top, right, bottom = box
    draw.rectangle(box, fill=PNG_GAP, outline=PNG_GAP_MARK, width=3)
    draw.line((left, top, right, bottom), fill=PNG_GAP_MARK, width=3)
    draw.line((left, bottom, right, top), fill=PNG_GAP_MARK, width=3)
    text_width = draw.textlength(label, font=font)
    draw.rectangle((left + (right - left - text_width) / 2 - 4, (top + bottom) / 2 - 10,
                    left + (right - left + text_width) / 2 + 4, (top + bottom) / 2 + 10), fill=PNG_GAP)
    draw.text(((left + right) / 2, (top + bottom) / 2), label, fill=PNG_GAP_MARK, font=font, anchor="mm")


def side_by_side_png_name(folder: str) -> str:
    """``checkpoint-00100`` -> ``checkpoint-00100.png``, ``sub/dir`` -> ``sub_dir.png``; the folders' own
    images (folder ``.``) -> side-by-side.png."""
    return TOP_FOLDER_PNG if folder == "." else folder.replace("/", "_") + ".png"


def write_side_by_side_pngs(comparison: Comparison, out_dir: Path) -> list[Path]:
    """One labelled PNG per step that every run has, named after the step's folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for step in comparison.steps:
        if not step.in_every_run:
            continue
        path = out_dir / side_by_side_png_name(step.folder)
        side_by_side_image(comparison.runs, step).save(path)
        written.append(path)
    return written
