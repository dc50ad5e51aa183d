"""Prompt files: one prompt a line, for the trainer's samples and sample_images.py alike.

A line may carry its own settings after the prompt, in kohya's syntax: ``--n`` negative prompt,
``--d`` seed, ``--l`` guidance scale, ``--s`` denoising steps, ``--w`` width, ``--h`` height, e.g.

    a red circle on blue --n blurry, text --d 42 --l 5.5 --s 20 --w 64 --h 48

A setting a line leaves out is the run's (the trainer's --sample_seed + the prompt's position,
--guidance_scale, --sampler_steps; sample_images.py's --seed, --guidance, --steps, ...).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


class PromptsFileError(ValueError):
    """A prompts file that cannot be read or holds no prompt; the message names the file."""


@dataclass(frozen=True)
class SamplePrompt:
    """One prompt and the settings its line gave (None: the run's)."""

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    steps: int | None = None
    width: int | None = None
    height: int | None = None


# option letter -> (field, type, what the value must be)
OPTIONS = {"n": ("negative_prompt", str, None), "d": ("seed", int, "a whole number"),
           "l": ("guidance_scale", float, "a number"), "s": ("steps", int, "a whole number >= 1"),
           "w": ("width", int, "a whole number >= 1"), "h": ("height", int, "a whole number >= 1")}
OPTION = re.compile(r"(?:^|\s)--([A-Za-z]\w*)(?=\s|$)")


def as_sample_prompt(prompt: str | SamplePrompt) -> SamplePrompt:
    """A plain prompt (from --sample_prompt or --prompt, taken as written) as a SamplePrompt."""
    return prompt if isinstance(prompt, SamplePrompt) else SamplePrompt(prompt)


def parse_prompt_line(line: str, where: str = "") -> SamplePrompt:
    """The prompt and settings of one line; PromptsFileError (prefixed with ``where``) for a bad option."""
    matches = list(OPTION.finditer(line))
    prompt = line[: matches[0].start()] if matches else line
    settings: dict[str, object] = {}
    for number, match in enumerate(matches):
        letter = match.group(1)
        end = matches[number + 1].start() if number + 1 < len(matches) else len(line)
        value = line[match.end():end].strip()
        if letter not in OPTIONS:
            raise PromptsFileError(f"{where}unknown option --{letter} (known: "
                                   f"{', '.join('--' + key for key in OPTIONS)})")
        name, kind, wanted = OPTIONS[letter]
        if name in settings:
            raise PromptsFileError(f"{where}--{letter} given twice")
        try:
            parsed = kind(value)
        except ValueError:
            parsed = None
        if wanted is not None and (parsed is None or (wanted.endswith(">= 1") and parsed < 1)):
            raise PromptsFileError(f"{where}--{letter} wants {wanted}, got {value!r}")
        settings[name] = parsed
    if not prompt.strip():
        raise PromptsFileError(f"{where}no prompt before the options")
    return SamplePrompt(prompt.strip(), **settings)


def read_prompts_file(path: os.PathLike | str) -> list[SamplePrompt]:
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
    prompts = [parse_prompt_line(line.strip(), f"{path}:{number}: ") for number, line in enumerate(lines, start=1)
               if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise PromptsFileError(f"{path}: holds no prompt (blank lines and # comments are skipped)")
    return prompts
