"""Runs side by side: pair their sample images, write one self-contained HTML page and labelled PNGs.

A run folder holds its samples at ``checkpoint-NNNNN/sample-II-<slug>.png`` (and ``samples-NNNNN/``
for samples drawn between checkpoints). Every PNG, JPEG and BMP image under the folders given is taken
(as the original compare_imgdirs.py does, so its sampler's ``sample0_s90.png`` pair too), and images of
different folders are paired by their path relative to their folder; each subfolder is one step of
the comparison. Everything the page needs (images as data
URIs, their prompts read from the PNG text chunks) is inside the one HTML file, so it can be copied
off a remote machine and opened anywhere; for long runs, ``--link`` refers to the images by relative
path instead. Runs that do not have the same images are reported, and a missing or unreadable image
is shown as a marked gap rather than stopping the comparison.

    compare_imgdirs.py RUN_A RUN_B [RUN_C ...] [--skip N] [--out compare.html] [--png DIR] [--link] [--view]

One module for one command, though over 400 lines: the pairing, its two renderings (the page, the PNGs)
and the command line all work on the data classes at the top, and are marked as sections below.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import re
import sys
import urllib.parse
import webbrowser
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..atomic import writable_problem
from ..cli import ArgumentParser, print_error
from ..models.sampling import SampleMetadata
from ..tree import walk_files

# The original compare_imgdirs.py's list; a cache's previews (.webp) are not samples
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp"}
DEFAULT_OUT = "compare.html"
PAGE_TEMPLATE = "compare_page.html"  # beside this module: the page's markup, style and script


@dataclass
class Run:
    name: str
    root: Path


@dataclass
class SampleImage:
    """One run's image at one relative path: its bytes and facts, or why it cannot be shown."""

    relative_path: str
    png: bytes | None = None
    size: tuple[int, int] | None = None
    metadata: SampleMetadata | None = None
    problem: str = ""  # "" when the image is usable

    @property
    def readable(self) -> bool:
        return self.png is not None


@dataclass
class Step:
    """One sample folder (``checkpoint-00100``) across all runs."""

    folder: str
    step: int | None
    names: list[str]  # the sample file names found in this folder in any run, sorted
    images: list[dict[str, SampleImage]]  # per run: file name -> image; an absent name is a missing image
    present: list[bool]  # per run: whether the run has this folder at all

    @property
    def in_every_run(self) -> bool:
        return all(self.present)

    def prompt(self, name: str) -> str:
        """The prompt of a row, from the first run whose image says it (the file name otherwise)."""
        for images in self.images:
            image = images.get(name)
            if image is not None and image.metadata is not None:
                return image.metadata.prompt
        return name


@dataclass
class Comparison:
    runs: list[Run]
    steps: list[Step]
    mismatches: list[str] = field(default_factory=list)  # what exists in some runs and not others

    @property
    def unreadable(self) -> list[tuple[str, str, str]]:
        """(run name, relative path, problem) of every image that could not be read."""
        found = []
        for step in self.steps:
            for run, images in zip(self.runs, step.images):
                found += [(run.name, image.relative_path, image.problem)
                          for image in images.values() if not image.readable]
        return found


# ---------------------------------------------------------------------------------------------
# Finding and pairing the images


def run_names(roots: list[Path]) -> list[str]:
    """Short names that tell the runs apart: the fewest trailing path parts that differ.

    ``demo_a/run`` and ``demo_b/run`` are named so, not both ``run``.
    """
    parts = [Path(os.path.abspath(root)).parts for root in roots]
    longest = max(len(p) for p in parts)
    for depth in range(1, longest + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    # the same folder given twice: number the repeats
    names = ["/".join(p[-1:]) for p in parts]
    return [name if names[:i].count(name) == 0 else f"{name} #{names[:i].count(name) + 1}"
            for i, name in enumerate(names)]


def find_sample_images(root: Path) -> dict[str, Path]:
    """Relative path (with '/') -> file, for every PNG, JPEG and BMP image under a run folder."""
    return {Path(path).relative_to(root).as_posix(): Path(path) for path in walk_files(root, tuple(IMAGE_TYPES))}


def step_of_folder(folder: str) -> int | None:
    """``checkpoint-00100`` -> 100 (the trailing number of the folder's name), else None."""
    match = re.search(r"(\d+)$", folder.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def load_sample_image(path: Path, relative_path: str) -> SampleImage:
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode all of it: a truncated file must show as a gap, not a broken page
            size = image.size
            text = dict(getattr(image, "text", {}))
    except Exception as error:  # Pillow raises many types for damaged files; every one means "a gap"
        return SampleImage(relative_path, problem=f"{type(error).__name__}: {error}")
    try:
        metadata = SampleMetadata.from_png_text(text)
    except ValueError:
        metadata = None  # an image from elsewhere, still worth showing
    return SampleImage(relative_path, png=data, size=size, metadata=metadata)


def compare_runs(roots: list[Path], names: list[str] | None = None) -> Comparison:
    """Read every run's sample images and pair them by relative path. FileNotFoundError for a missing run."""
    roots = [Path(root) for root in roots]
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"run folder not found: {root}")
    runs = [Run(name, root) for name, root in zip(names or run_names(roots), roots)]
    found = [find_sample_images(run.root) for run in runs]

    folders: dict[str, set[str]] = {}
    for paths in found:
        for relative in paths:
            folder, _, name = relative.rpartition("/")
            folders.setdefault(folder, set()).add(name)

    folders_of_run = [{relative.rpartition("/")[0] for relative in paths} for paths in found]
    steps = []
    for folder in sorted(folders, key=lambda f: (step_of_folder(f) is None, step_of_folder(f) or 0, f)):
        prefix = f"{folder}/" if folder else ""
        images = [{name: load_sample_image(paths[prefix + name], prefix + name)
                   for name in sorted(folders[folder]) if prefix + name in paths} for paths in found]
        present = [folder in run_folders for run_folders in folders_of_run]
        steps.append(Step(folder or ".", step_of_folder(folder), sorted(folders[folder]), images, present))
    return Comparison(runs, steps, describe_mismatches(runs, steps))


def skip_matches(comparison: Comparison, count: int) -> Comparison:
    """The comparison less its first ``count`` images in page order (--skip, as the original's: start further in)."""
    steps = []
    for step in comparison.steps:
        names = step.names[count:]
        count = max(0, count - len(step.names))
        if names:
            kept = [{name: image for name, image in images.items() if name in names} for images in step.images]
            steps.append(Step(step.folder, step.step, names, kept, step.present))
    return Comparison(comparison.runs, steps, describe_mismatches(comparison.runs, steps))


def describe_mismatches(runs: list[Run], steps: list[Step]) -> list[str]:
    """One line per step or image that some runs have and others do not."""
    lines = []
    for step in steps:
        if not step.in_every_run:
            have = [run.name for run, present in zip(runs, step.present) if present]
            lack = [run.name for run, present in zip(runs, step.present) if not present]
            lines.append(f"{step.folder}: only in {', '.join(have)} (not in {', '.join(lack)})")
            continue
        for name in step.names:
            lack = [run.name for run, images in zip(runs, step.images) if name not in images]
            if lack:
                lines.append(f"{step.folder}/{name}: not in {', '.join(lack)}")
    return lines


# ---------------------------------------------------------------------------------------------
# The HTML page


def _data_uri(data: bytes, relative_path: str) -> str:
    media_type = IMAGE_TYPES.get(os.path.splitext(relative_path)[1].lower(), "image/png")
    return f"data:{media_type};base64," + base64.b64encode(data).decode("ascii")


def _facts(metadata: SampleMetadata | None) -> str:
    if metadata is None:
        return "no sample metadata in this PNG"
    negative = f" · negative: {metadata.negative_prompt}" if metadata.negative_prompt else ""
    tokens = f" · conditioned on {metadata.token_length} tokens" if metadata.token_length is not None else ""
    return (f"step {metadata.step} · seed {metadata.seed} · {metadata.sampler_steps} sampler steps · "
            f"guidance {metadata.guidance_scale:g}{tokens}{negative}")


def _relative_url(path: Path, page_folder: Path) -> str:
    """The image's URL from the page: relative, as the browser resolves it (so links are not
    resolved first); absolute where no relative path exists (another drive)."""
    try:
        relative = os.path.relpath(os.path.abspath(path), os.path.abspath(page_folder))
    except ValueError:
        return Path(os.path.abspath(path)).as_uri()
    return urllib.parse.quote(Path(relative).as_posix())


def page_data(comparison: Comparison, link_from: Path | None = None) -> dict:
    """What the page's script renders: runs, and per step the rows of cells (image or gap).

    Images are embedded as data URIs, or, with ``link_from`` (the page's folder), referred to by
    their path relative to it."""
    steps = []
    for step in comparison.steps:
        rows = []
        for name in step.names:
            cells = []
            for run, present, images in zip(comparison.runs, step.present, step.images):
                image = images.get(name)
                if image is None:
                    cells.append({"gap": "missing", "reason": "no such step in this run" if not present
                                  else "no such image in this run"})
                elif not image.readable:
                    cells.append({"gap": "unreadable", "reason": image.problem})
                else:
                    source = (_data_uri(image.png, image.relative_path) if link_from is None
                              else _relative_url(run.root / image.relative_path, link_from))
                    cells.append({"src": source, "width": image.size[0], "height": image.size[1],
                                  "prompt": image.metadata.prompt if image.metadata else "",
                                  "facts": _facts(image.metadata), "path": image.relative_path})
            rows.append({"name": name, "prompt": step.prompt(name), "cells": cells})
        steps.append({"folder": step.folder, "step": step.step, "inEveryRun": step.in_every_run, "rows": rows})
    return {"runs": [run.name for run in comparison.runs], "steps": steps, "mismatches": comparison.mismatches}


def render_html(comparison: Comparison, link_from: Path | None = None) -> str:
    # "</script>" or "<!--" in a prompt would change how the page's script element is parsed; JSON
    # allows "<" only inside strings, where the escape \u003c means the same
    data = json.dumps(page_data(comparison, link_from), ensure_ascii=False).replace("<", "\\u003c")
    title = "Comparing " + " vs ".join(run.name for run in comparison.runs)
    template = resources.files(__package__).joinpath(PAGE_TEMPLATE).read_text(encoding="utf-8")
    return template.replace("__TITLE__", html.escape(title)).replace("__DATA__", data)




LARGE_PAGE_BYTES = 200 * 2**20  # past this, browsers open a page with every image inside slowly, if at all


def write_page(comparison: Comparison, out: Path, link: bool = False) -> Path:
    """The page at ``out``: self-contained, or with ``link`` referring to the images where they are."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(comparison, out.parent if link else None), encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------
# Side-by-side PNGs: one per step that every run has

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


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Compare the sample images of training runs side by side in one HTML page (self-contained, "
                    "or with --link referring to the images).")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (the trainer's output_dir)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"the HTML page to write (default {DEFAULT_OUT})")
    parser.add_argument("--png", metavar="DIR", default=None,
                        help="also write one labelled side-by-side PNG per step that every run has into DIR")
    parser.add_argument("--names", nargs="+", default=None, help="names to show for the runs (default: from paths)")
    parser.add_argument("--skip", type=int, default=0,
                        help="leave out the first N paired images (in page order: by step, then by name)")
    parser.add_argument("--link", action="store_true",
                        help="refer to the images by relative path instead of embedding them: a small page for "
                             "long runs, which must stay beside the run folders")
    parser.add_argument("--view", action="store_true", help="open the page in the default browser")
    return parser


def summary_lines(comparison: Comparison) -> list[str]:
    matched = sum(step.in_every_run for step in comparison.steps)
    lines = [f"[compare] {len(comparison.runs)} runs ({', '.join(r.name for r in comparison.runs)}): "
             f"{len(comparison.steps)} steps, {matched} in every run"]
    if comparison.mismatches:
        lines.append("[compare] these runs do not have the same images:")
        lines += [f"  {line}" for line in comparison.mismatches]
    for run, path, problem in comparison.unreadable:
        lines.append(f"[compare] unreadable image {run}: {path} ({problem})")
    return lines


def output_path_problem(out: Path, png: Path | None) -> str | None:
    """Why the page (a file) or the PNGs (a folder) could not be written where the flags say, or None."""
    if out.is_dir():
        return f"--out {out}: an existing folder; name the HTML file to write"
    if png is not None and png.exists() and not png.is_dir():
        return f"--png {png}: an existing file, not a folder; name a folder for the PNGs"
    for flag, path, folder in (("--out", out, out.parent), ("--png", png, png)):
        problem = writable_problem(folder) if path is not None else None
        if problem:
            return f"{flag} {path}: {problem}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.names is not None and len(args.names) != len(args.runs):
        parser.error(f"--names got {len(args.names)} names for {len(args.runs)} runs")
    problem = output_path_problem(Path(args.out), Path(args.png) if args.png else None)
    if problem:
        print_error(problem)
        return 2
    try:
        comparison = compare_runs([Path(run) for run in args.runs], args.names)
    except FileNotFoundError as error:
        print_error(str(error))
        return 2
    if args.skip < 0:
        parser.error(f"--skip {args.skip}: must be >= 0")
    if args.skip:
        comparison = skip_matches(comparison, args.skip)
    for line in summary_lines(comparison):
        print(line, file=sys.stderr)
    if not comparison.steps:
        print_error("no images (.png, .jpg, .jpeg, .bmp) in any of these folders"
                    + (f" after --skip {args.skip}" if args.skip else ""))
        return 1
    page = write_page(comparison, Path(args.out), link=args.link)
    print(f"[compare] wrote {page}", file=sys.stderr)
    size = page.stat().st_size
    if size > LARGE_PAGE_BYTES and not args.link:
        print(f"[compare] the page is {size / 2**20:.0f} MiB with every image inside; browsers may be slow to "
              f"open it: --link writes a small one that refers to the images", file=sys.stderr)
    if args.png:
        written = write_side_by_side_pngs(comparison, Path(args.png))
        print(f"[compare] wrote {len(written)} side-by-side PNGs to {args.png}", file=sys.stderr)
    if args.view:
        webbrowser.open(page.absolute().as_uri())
    return 0
