"""sample_images.py: draw samples from a checkpoint or pipeline folder, or from every checkpoint of a
running training as it writes them (``--watch``), away from the training GPU.

Samples are drawn by the trainer's own ``draw_samples`` with the trainer's file names and PNG text
chunks, conditioned as training conditioned the UNet: the scales are in the checkpoint's configs,
the token length (``--force_toklen``) in its T5 projection or the run's train_args.json.

    sample_images.py MODEL_OR_CHECKPOINT --prompt P [--prompt P2] [--prompts_file F] [--out DIR]
    sample_images.py --watch RUN_DIR --prompts_file F --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .cli import ArgumentParser, print_error
from .config import SAMPLE_SCHEDULERS
from .prompts import PromptsFileError, read_prompts_file
from .sampling import SampleMetadata, draw_samples, read_sample_metadata, sample_plan, scheduler_choice_problem
from .run_dir import ARGS_FILE, SUMMARY_FILE  # the run's settings (one entry per start), its end-of-start summary

DEFAULT_OUT = "samples"
STAGING_SUFFIX = ".sampling"  # hidden folders beside the checkpoints, where a checkpoint's samples are drawn
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class SamplerInputError(ValueError):
    """A flag or input refused at start (exit status 2); the message names it."""


@dataclass(frozen=True)
class SampleSettings:
    """How to draw: one value per flag, the same for every folder sampled."""

    prompts: list[str]
    negative_prompt: str = ""
    seed: int = 1234
    increment_seed: bool = True
    scheduler: str | None = None  # None: the model's own scheduler
    steps: int = 30
    guidance: float = 7.5
    width: int | None = None
    height: int | None = None
    device: torch.device = torch.device("cpu")
    weight_dtype: torch.dtype = torch.float32
    autocast_dtype: torch.dtype | None = None
    token_length: int | None = None  # None: as the model was trained (its projection, or its run's settings)
    use_ema: bool = True
    custom: bool = False


# ---------------------------------------------------------------------------------------------
# What a folder says about itself, read from its config files without loading any weights


def _is_local(model: str) -> bool:
    return os.path.exists(model) or not HUB_ID.match(model) or model.startswith((".", "/", "~"))


def check_model(model: str) -> None:
    """SamplerInputError unless ``model`` is a pipeline folder (or a hub id, which loading will check)."""
    if not _is_local(model):
        return
    path = Path(model)
    if not path.exists():
        raise SamplerInputError(f"{model}: no such folder")
    if not path.is_dir() or not (path / "model_index.json").is_file():
        hint = ""
        if path.is_dir() and ckpt.list_checkpoints(path):
            hint = " (a training run's folder: sample its checkpoints with --watch, or name one checkpoint)"
        raise SamplerInputError(f"{model}: not a pipeline folder (no model_index.json){hint}")


def _read_config(model: str, file_name: str, subfolder: str = "") -> dict:
    """A JSON config of a folder (a watcher reads a few per checkpoint, and refusing a flag needs no
    import of diffusers) or of a hub id (fetched, or read from the hub cache)."""
    if _is_local(model):
        path = Path(model, subfolder, file_name)
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(model, file_name, subfolder=subfolder or None))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{path}: not a JSON config ({error})") from None


def model_index(model: str) -> dict:
    return _read_config(model, "model_index.json")


def scheduler_config(model: str) -> dict:
    return _read_config(model, "scheduler_config.json", "scheduler")


def own_scheduler_name(model: str) -> str:
    """The class of the model's own scheduler, as draw_samples records it when no sampler is chosen."""
    entry = model_index(model).get("scheduler")
    return entry[1] if isinstance(entry, list) and len(entry) == 2 else "unknown"


def recorded_token_length(model: str) -> int | None:
    """The token length the model was trained to (--force_toklen): its T5 projection keeps it; for an
    SD1.5 model, the settings of the run that wrote it (train_args.json beside or above the folder)."""
    if "t5_projection" in model_index(model):
        value = _read_config(model, "config.json", "t5_projection").get("token_length")
        return int(value) if value is not None else None
    if not _is_local(model):
        return None
    folder = Path(model)
    for run_dir in (folder, folder.parent):
        if (run_dir / ARGS_FILE).is_file():
            config = _start_that_wrote(run_dir / ARGS_FILE, folder)
            value = config.get("force_toklen")
            return int(value) if value is not None else None
    return None


def _start_that_wrote(args_file: Path, folder: Path) -> dict:
    """The config of the training start that wrote ``folder``: the last start before the folder was
    written (a resume may change --force_toklen); the last one when times do not tell."""
    try:
        starts = json.loads(args_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(starts, list) or not starts:
        return {}
    written = folder / ckpt.TRAINING_STATE_FILE
    written_at = (written if written.exists() else folder).stat().st_mtime
    chosen = starts[-1]
    for start in starts:
        try:
            started = datetime.strptime(start["started"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
        except (KeyError, TypeError, ValueError):
            continue
        if started <= written_at + 1:  # the start time has whole seconds
            chosen = start
    return chosen.get("config", {}) if isinstance(chosen, dict) else {}


def step_of(folder: str) -> int:
    """A checkpoint's step (``checkpoint-00100`` -> 100), as the trainer records it; 0 for other folders."""
    match = ckpt.CHECKPOINT_PATTERN.match(Path(folder).name)
    return int(match.group(1)) if match else 0


def plan_for(model: str, settings: SampleSettings, step: int) -> tuple[list[tuple[str, SampleMetadata]], int | None]:
    """(the samples to draw for ``model`` and what their PNGs will say, the token length to condition on)."""
    token_length = settings.token_length if settings.token_length is not None else recorded_token_length(model)
    name = settings.scheduler or own_scheduler_name(model)
    plan = sample_plan(settings.prompts, step=step, seed=settings.seed, sampler_steps=settings.steps,
                       guidance_scale=settings.guidance, negative_prompt=settings.negative_prompt,
                       token_length=token_length, scheduler_name=name, increment_seed=settings.increment_seed)
    return plan, token_length


# ---------------------------------------------------------------------------------------------
# Loading and drawing


def load_sampling_pipeline(model: str, settings: SampleSettings):
    """The folder's pipeline on the sampling device: its EMA UNet when it has one (the trainer's
    samples show the EMA weights) unless --no_ema."""
    from diffusers import UNet2DConditionModel

    from . import models

    _quiet_loading()
    subfolder = "unet"
    if settings.use_ema and _is_local(model) and (Path(model) / ckpt.EMA_COMPONENT).is_dir():
        subfolder = ckpt.EMA_COMPONENT
    unet = UNet2DConditionModel.from_pretrained(model, subfolder=subfolder, torch_dtype=settings.weight_dtype)
    pipeline = models.load_pipeline_around(model, unet, settings.custom)
    pipeline.to(device=settings.device, dtype=settings.weight_dtype)
    unet.eval()
    return pipeline


def sample_model(model: str, out_dir: Path, settings: SampleSettings, step: int | None = None) -> list[Path]:
    """Draw every prompt from ``model`` into ``out_dir``. SamplerInputError for a sampler or size the
    model cannot take."""
    from .sampling import build_sampling_scheduler

    problem = scheduler_choice_problem(settings.scheduler, scheduler_config(model)) if settings.scheduler else None
    if problem:
        raise SamplerInputError(f"--scheduler {problem}")
    step = step_of(model) if step is None else step
    plan, token_length = plan_for(model, settings, step)
    pipeline = load_sampling_pipeline(model, settings)
    factor = pipeline.vae_scale_factor
    for flag in ("width", "height"):
        value = getattr(settings, flag)
        if value is not None and value % factor:
            raise SamplerInputError(f"--{flag} {value}: must be a multiple of {factor} (the VAE's factor) for {model}")
    scheduler = build_sampling_scheduler(settings.scheduler, pipeline.scheduler.config) if settings.scheduler else None
    return draw_samples(pipeline, settings.prompts, out_dir, step=step, seed=settings.seed,
                        sampler_steps=settings.steps, guidance_scale=settings.guidance,
                        negative_prompt=settings.negative_prompt, device=settings.device,
                        autocast_dtype=settings.autocast_dtype, token_length=token_length, scheduler=scheduler,
                        scheduler_name=plan[0][1].scheduler, height=settings.height, width=settings.width,
                        increment_seed=settings.increment_seed)


# ---------------------------------------------------------------------------------------------
# --watch: every checkpoint of a run, as it appears


@dataclass
class WatchResult:
    sampled: list[int] = field(default_factory=list)
    already_sampled: list[int] = field(default_factory=list)
    pruned: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    run_ended: bool = False

    def summary(self) -> str:
        ended = "the run ended" if self.run_ended else "stopped before the run ended"
        return (f"[sample] {ended}: {len(self.sampled)} checkpoint(s) sampled, {len(self.already_sampled)} already "
                f"sampled, {len(self.pruned)} pruned before their samples were written, {len(self.failed)} failed")


def run_ended(run_dir: Path) -> bool:
    """The trainer writes its summary when its current start ends (done or interrupted), after its
    last checkpoint; a summary older than the latest start (a resume) is that of an earlier start."""
    summary, args = run_dir / SUMMARY_FILE, run_dir / ARGS_FILE
    if not summary.is_file():
        return False
    return not args.is_file() or summary.stat().st_mtime_ns >= args.stat().st_mtime_ns


def is_sampled(out_dir: Path, plan: list[tuple[str, SampleMetadata]]) -> bool:
    """Every planned PNG is there and says it was drawn as planned (a restart skips it)."""
    for filename, metadata in plan:
        try:
            if read_sample_metadata(out_dir / filename) != metadata:
                return False
        except (OSError, ValueError):
            return False
    return True


def sample_checkpoint(run_dir: Path, checkpoint: Path, out_root: Path, settings: SampleSettings) -> str:
    """Sample one checkpoint; 'sampled', 'already sampled', 'pruned' or 'failed' (reported, never raised).

    The PNGs are drawn in a hidden folder and moved into place at the end, so a checkpoint deleted
    meanwhile (--keep_checkpoints) is not brought back as a folder of PNGs.
    """
    name = checkpoint.name
    target = out_root / name
    in_place = out_root.resolve() == run_dir.resolve()
    try:
        plan, _ = plan_for(str(checkpoint), settings, step_of(name))
    except (OSError, ValueError) as error:
        return _gone_or_failed(checkpoint, error)
    if is_sampled(target, plan):
        return "already sampled"
    staging = out_root / f".{name}{STAGING_SUFFIX}"
    shutil.rmtree(staging, ignore_errors=True)
    started = time.monotonic()
    try:
        paths = sample_model(str(checkpoint), staging, settings, step_of(name))
        if not in_place:
            target.mkdir(parents=True, exist_ok=True)
        for path in paths:
            os.replace(path, target / path.name)  # fails if the checkpoint folder is gone
    except SamplerInputError:
        raise
    except Exception as error:  # a checkpoint being deleted fails in many ways; each one is reported
        return _gone_or_failed(checkpoint, error)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"[sample] {name}: {len(paths)} image(s) in {target} ({time.monotonic() - started:.1f} s)", file=sys.stderr)
    return "sampled"


def _gone_or_failed(checkpoint: Path, error: Exception) -> str:
    if not (checkpoint / ckpt.TRAINING_STATE_FILE).exists():
        print(f"[sample] {checkpoint.name}: removed (--keep_checkpoints) before its samples were written; "
              "skipped", file=sys.stderr)
        return "pruned"
    print(f"[sample] {checkpoint.name}: failed ({type(error).__name__}: {_first_line(error)}); skipped",
          file=sys.stderr)
    return "failed"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"


def watch(run_dir: Path, settings: SampleSettings, out_root: Path | None = None, poll_seconds: float = 10.0,
          once: bool = False) -> WatchResult:
    """Sample each complete checkpoint of ``run_dir`` (oldest first) until the run ends (or once).

    SamplerInputError when a flag cannot apply to the run's model (the same for every checkpoint).
    """
    out_root = out_root or run_dir
    result = WatchResult()
    outcomes = {"sampled": result.sampled, "already sampled": result.already_sampled, "pruned": result.pruned,
                "failed": result.failed}
    handled: set[int] = set()
    for leftover in out_root.glob(f".checkpoint-*{STAGING_SUFFIX}") if out_root.is_dir() else []:
        shutil.rmtree(leftover, ignore_errors=True)  # from a watcher stopped mid-checkpoint
    waiting_said = False
    while True:
        ended = run_ended(run_dir)  # before listing: the trainer writes its last checkpoint first
        for step, checkpoint in ckpt.list_checkpoints(run_dir):
            if step in handled:
                continue
            handled.add(step)
            outcome = sample_checkpoint(run_dir, checkpoint, out_root, settings)
            outcomes[outcome].append(step)
            if outcome == "already sampled":
                print(f"[sample] {checkpoint.name}: already sampled", file=sys.stderr)
            waiting_said = False
        if ended or once:
            result.run_ended = ended
            return result
        if not waiting_said:
            print(f"[sample] waiting for the next checkpoint of {run_dir} (Ctrl-C stops)", file=sys.stderr)
            waiting_said = True
        time.sleep(poll_seconds)


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Draw sample images from a checkpoint or pipeline folder (SD1.5 or SD1.5 + T5), or from each "
                    "checkpoint of a running training as it appears (--watch), with the trainer's file names and "
                    "PNG metadata and conditioned as training was.")
    parser.add_argument("model", nargs="?", default=None,
                        help="a checkpoint folder, pipeline folder or hub id (not with --watch)")
    parser.add_argument("--watch", metavar="RUN_DIR", default=None,
                        help="sample every complete checkpoint of this training run (its --output_dir) as it is "
                             "written, until the run ends; already sampled checkpoints are skipped")
    parser.add_argument("--once", action="store_true", help="with --watch: sample the checkpoints there now and exit")
    parser.add_argument("--poll", type=float, default=10.0, help="with --watch: seconds between looks for a new checkpoint (default 10)")
    parser.add_argument("--out", default=None,
                        help=f"where the PNGs go (default: {DEFAULT_OUT}/; with --watch, into each checkpoint "
                             "folder as the trainer does, else OUT/checkpoint-NNNNN/)")
    parser.add_argument("--custom", action="store_true", help="the folder carries its own pipeline code (trust it)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeatable")
    parser.add_argument("--prompts_file", default=None, help="prompts, one a line (blank lines and # comments skipped)")
    parser.add_argument("--negative_prompt", default="", help="the negative prompt of every image")
    parser.add_argument("--num_images", type=int, default=1, help="images per prompt, each with its own seed (default 1)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the first image, as the trainer's --sample_seed (default 1234)")
    parser.add_argument("--inc_seed", action=argparse.BooleanOptionalAction, default=True,
                        help="image i gets seed + i, as the trainer's samples do (default); --no-inc_seed: every "
                             "image gets --seed")
    parser.add_argument("--scheduler", choices=SAMPLE_SCHEDULERS, default=None,
                        help="sampler, built from the model's scheduler config (betas, prediction type, zero-SNR, "
                             "timestep spacing); default: the model's own scheduler. flow_euler for flow-matching "
                             "models only, the others for DDPM models only")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps, as the trainer's --sampler_steps (default 30)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance, <= 1: off (default 7.5)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: the training size)")
    parser.add_argument("--height", type=int, default=None, help="image height (default: the training size)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when there is one")
    parser.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                        help="weights' dtype; auto (default): fp32, with bf16 autocast on CUDA, as the trainer samples")
    parser.add_argument("--force_toklen", type=int, default=None,
                        help="condition on N tokens (default: the length the model was trained to, if any)")
    parser.add_argument("--no_ema", action="store_true", help="draw with unet/, not the checkpoint's unet_ema/")
    return parser


def settings_from_args(args: argparse.Namespace) -> SampleSettings:
    """SampleSettings from the parsed flags; SamplerInputError names a flag that cannot work."""
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            prompts += read_prompts_file(args.prompts_file)
        except PromptsFileError as error:
            raise SamplerInputError(f"--prompts_file {error}") from None
    if not prompts:
        raise SamplerInputError("no prompt: give --prompt or --prompts_file")
    for flag in ("num_images", "steps"):
        if getattr(args, flag) < 1:
            raise SamplerInputError(f"--{flag} must be >= 1")
    for flag in ("width", "height", "force_toklen"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SamplerInputError(f"--{flag} must be >= 1")
    if args.poll <= 0:
        raise SamplerInputError("--poll must be > 0 seconds")
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise SamplerInputError("--device cuda: no CUDA device is visible")
    device = torch.device(device_name)
    weights = {"auto": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    autocast = torch.bfloat16 if args.dtype == "auto" and device.type == "cuda" else None
    return SampleSettings(
        prompts=[p for p in prompts for _ in range(args.num_images)], negative_prompt=args.negative_prompt,
        seed=args.seed, increment_seed=args.inc_seed, scheduler=args.scheduler, steps=args.steps,
        guidance=args.guidance, width=args.width, height=args.height, device=device, weight_dtype=weights,
        autocast_dtype=autocast, token_length=args.force_toklen, use_ema=not args.no_ema, custom=args.custom)


def _quiet_loading() -> None:
    """No progress bar per component loaded: a watcher's log is one line per checkpoint."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.model is None) == (args.watch is None):
        parser.error("give a model folder or --watch RUN_DIR (one of them)")
    if args.once and not args.watch:
        parser.error("--once goes with --watch")
    try:
        settings = settings_from_args(args)
        if args.watch:
            run_dir = Path(args.watch)
            if not run_dir.is_dir():
                raise SamplerInputError(f"--watch {run_dir}: no such folder (start the training first)")
            result = watch(run_dir, settings, Path(args.out) if args.out else None, args.poll, args.once)
            print(result.summary(), file=sys.stderr)
            return 1 if result.failed else 0
        check_model(args.model)
        paths = sample_model(args.model, Path(args.out or DEFAULT_OUT), settings)
    except SamplerInputError as error:
        print_error(str(error))
        return 2
    except KeyboardInterrupt:
        print("[sample] stopped (Ctrl-C); a restart with --watch skips the checkpoints already sampled",
              file=sys.stderr)
        return 130
    except Exception as error:  # the hub, a damaged folder, out of memory: said in one line
        print_error(f"{args.model or args.watch}: cannot be sampled ({type(error).__name__}: {_first_line(error)})")
        return 1
    for path in paths:
        print(path)
    return 0
