"""Several runs' sample images, found and paired: what the compare page and the side-by-side PNGs show.

A run folder holds its samples at ``checkpoint-NNNNN/sample-II-<slug>.png`` (and ``samples-NNNNN/``
for samples drawn between checkpoints). Every PNG, JPEG and BMP image under the folders given is taken
(as the original compare_imgdirs.py does, so its sampler's ``sample0_s90.png`` pair too), and images of
different folders are paired by their path relative to their folder; each subfolder is one step of the
comparison. A missing or unreadable image is kept as a gap with its reason, never an error.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..models.sampling import SampleMetadata
from ..tree import walk_files

# The original compare_imgdirs.py's list; a cache's previews (.webp) are not samples
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp"}


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
