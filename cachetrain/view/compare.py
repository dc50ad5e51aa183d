"""compare_imgdirs.py: runs side by side, in one HTML page and, with --png, labelled PNGs.

    compare_imgdirs.py RUN_A RUN_B [RUN_C ...] [--skip N] [--out compare.html] [--png DIR] [--link] [--view]

The pairing of the runs' images is sample_runs.py's, the page compare_page.py's, the PNGs
side_by_side.py's; this is the command line: check the outputs first, pair, report what does not
match, write.
"""

from __future__ import annotations

import argparse
import sys
import webbrowser
from pathlib import Path

from ..atomic import writable_problem
from ..cli import ArgumentParser, print_error
from .compare_page import LARGE_PAGE_BYTES, write_page
from .sample_runs import Comparison, compare_runs, skip_matches
from .side_by_side import write_side_by_side_pngs

DEFAULT_OUT = "compare.html"


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
    if args.skip < 0:
        parser.error(f"--skip {args.skip}: must be >= 0")
    problem = output_path_problem(Path(args.out), Path(args.png) if args.png else None)
    if problem:
        print_error(problem)
        return 2
    try:
        comparison = compare_runs([Path(run) for run in args.runs], args.names)
    except FileNotFoundError as error:
        print_error(str(error))
        return 2
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
