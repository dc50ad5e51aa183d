"""The compare page: one HTML file showing several runs' samples side by side.

Everything the page needs (images as data URIs, their prompts read from the PNG text chunks) is inside
the one file, so it can be copied off a remote machine and opened anywhere; for long runs, ``link``
refers to the images by relative path instead. The markup, style and script are the template beside
this module; this fills in the data.
"""

from __future__ import annotations

import base64
import html
import json
import os
import urllib.parse
from importlib import resources
from pathlib import Path

from ..models.sampling import SampleMetadata
from .sample_runs import IMAGE_TYPES, Comparison

PAGE_TEMPLATE = "compare_page.html"  # beside this module: the page's markup, style and script


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
