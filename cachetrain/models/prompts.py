"""Prompt files: one prompt a line, for the trainer's samples and sample_images.py alike."""

from __future__ import annotations

import os


class PromptsFileError(ValueError):
    """A prompts file that cannot be read or holds no prompt; the message names the file."""


def read_prompts_file(path: os.PathLike | str) -> list[str]:
    """The prompts of ``path``, one a line, in order; blank lines and lines starting with ``#`` are skipped.

    Surrounding whitespace is stripped (as the caption cache strips captions), so a prompt here
    conditions like the same caption did in training.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        raise PromptsFileError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise PromptsFileError(f"{path}: not UTF-8 text") from None
    except OSError as error:
        raise PromptsFileError(f"{path}: cannot be read ({error.strerror or error})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise PromptsFileError(f"{path}: holds no prompt (blank lines and # comments are skipped)")
    return prompts
