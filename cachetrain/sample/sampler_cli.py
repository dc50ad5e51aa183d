"""sample_images.py: draw samples from a checkpoint or pipeline folder, or from every checkpoint of a
running training as it writes them (``--watch``), away from the training GPU.

Samples are drawn by the trainer's own ``draw_samples`` with the trainer's file names and PNG text
chunks, conditioned as training conditioned the UNet: the scales are in the checkpoint's configs,
the token length (``--force_toklen``) in its T5 projection or the run's train_args.json. Drawing from
one folder is folder_sampler's; this module adds ``--watch`` and the command line.

    sample_images.py MODEL_OR_CHECKPOINT --prompt P [P2 ...] [--prompts_file F] [--out DIR]
    sample_images.py --model MODEL --prompt P [P2 ...]      (the original imgsamplesd.py's form)
    sample_images.py --watch RUN_DIR --prompts_file F --device cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..train import checkpoint as ckpt
from ..cli import ArgumentParser, first_line, print_error
from ..models.schedulers import SAMPLE_SCHEDULERS
from ..train.config import TRUST_HELP
from .folder_sampler import (SamplerInputError, SampleSettings, check_model, check_out_folder, plan_for, sample_model,
                             step_of)
from ..models.prompts import PromptsFileError, SamplePrompt, read_prompts_file
from ..models.sampling import SampleMetadata, read_sample_metadata
from ..train.run_dir import ARGS_FILE, SUMMARY_FILE  # the run's settings (one entry per start), its end-of-start summary
from ..train.run_lock import LOCK_FILE  # held by a training while it runs

STAGING_SUFFIX = ".sampling"  # hidden folders beside the checkpoints, where a checkpoint's samples are drawn


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
    print(f"[sample] {checkpoint.name}: failed ({type(error).__name__}: {first_line(error)}); skipped",
          file=sys.stderr)
    return "failed"


def watch_problem(run_dir: Path) -> str | None:
    """Why ``run_dir`` cannot be a training run's folder, or None. An empty folder may be one the training
    has yet to start in; a folder of other things (a model, a checkpoint, data) would be watched forever."""
    if run_dir.exists() and not run_dir.is_dir():
        return "a file, not a folder (name the training's --output_dir)"
    if not run_dir.is_dir():
        return "no such folder (start the training first)"
    # a checkpoint, or a model folder that is no finished run's (a run's final model sits beside its train_args)
    if ((run_dir / ckpt.TRAINING_STATE_FILE).exists() or
            ((run_dir / "model_index.json").exists() and not (run_dir / ARGS_FILE).exists())):
        return "a model folder, not a training run's (sample it as MODEL, without --watch)"
    run_marks = (ARGS_FILE, LOCK_FILE, SUMMARY_FILE)
    if (any(run_dir.iterdir()) and not any((run_dir / name).exists() for name in run_marks)
            and not ckpt.list_checkpoints(run_dir)):
        return f"not a training run's folder (no {ARGS_FILE}, no checkpoint-*): name the training's --output_dir"
    return None


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
    parser.add_argument("--model", dest="model_flag", metavar="MODEL", default=None,
                        help="the same as the positional MODEL (the original imgsamplesd.py's form)")
    parser.add_argument("--watch", metavar="RUN_DIR", default=None,
                        help="sample every complete checkpoint of this training run (its --output_dir) as it is "
                             "written, until the run ends; already sampled checkpoints are skipped")
    parser.add_argument("--once", action="store_true", help="with --watch: sample the checkpoints there now and exit")
    parser.add_argument("--poll", type=float, default=10.0, help="with --watch: seconds between looks for a new checkpoint (default 10)")
    parser.add_argument("--out", default=None,
                        help="where the PNGs go (default: the model's folder, or the current folder for a hub id, "
                             "as the original imgsamplesd.py; with --watch, into each checkpoint folder as the "
                             "trainer does, else OUT/checkpoint-NNNNN/)")
    parser.add_argument("--output_directory", dest="out", help="the original imgsamplesd.py's name for --out")
    parser.add_argument("--custom", "--is_custom", action="store_true",
                        help=TRUST_HELP + "; a folder with a pipeline.py at its root is taken as custom without "
                                          "this flag (as the original imgsamplesd.py), and says so")
    parser.add_argument("--prompt", nargs="+", action="extend", default=[],
                        help="one or more prompts (--prompt 'a cat' 'a dog'); repeatable")
    parser.add_argument("--prompts_file", default=None,
                        help="prompts, one a line (blank lines and # comments skipped); a line may end with its own "
                             "--n negative --d seed --l guidance --s steps --w width --h height")
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
    parser.add_argument("--offload", action="store_true",
                        help="on CUDA, keep the weights in CPU memory and move each module to the GPU only while it "
                             "runs (slow, for small GPUs; the original imgsamplesd.py always does); nothing on the CPU")
    parser.add_argument("--vae_scaling", type=float, default=None,
                        help="decode with this VAE scaling factor instead of the one in the model's vae/ config")
    parser.add_argument("--seed_device", choices=("cpu", "cuda"), default=None,
                        help="where each image's noise is drawn from its seed (default: the sampling device); the "
                             "original imgsamplesd.py draws on cuda, so --seed_device cuda reproduces its noise")
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
    if args.seed_device == "cuda" and not torch.cuda.is_available():
        raise SamplerInputError("--seed_device cuda: no CUDA device is visible")
    if args.vae_scaling is not None and not args.vae_scaling > 0:
        raise SamplerInputError(f"--vae_scaling {args.vae_scaling}: must be > 0")
    weights = {"auto": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    autocast = torch.bfloat16 if args.dtype == "auto" and device.type == "cuda" else None
    # a line's own seed gives its copies seed, seed + 1, ... as --seed does with --inc_seed
    copies = [p if copy == 0 or not isinstance(p, SamplePrompt) or p.seed is None
              else dataclasses.replace(p, seed=p.seed + copy) for p in prompts for copy in range(args.num_images)]
    return SampleSettings(
        prompts=copies, negative_prompt=args.negative_prompt,
        seed=args.seed, increment_seed=args.inc_seed, scheduler=args.scheduler, steps=args.steps,
        guidance=args.guidance, width=args.width, height=args.height, device=device, weight_dtype=weights,
        autocast_dtype=autocast, token_length=args.force_toklen, use_ema=not args.no_ema, custom=args.custom,
        offload=args.offload, vae_scaling=args.vae_scaling,
        seed_device=torch.device(args.seed_device) if args.seed_device else None)


def default_out(model: str) -> Path:
    """Where the original imgsamplesd.py writes: the model's folder, or the current folder for a hub id."""
    return Path(model) if os.path.isdir(model) else Path(".")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model is not None and args.model_flag is not None:
        parser.error("give the model once: as MODEL or as --model MODEL")
    args.model = args.model if args.model is not None else args.model_flag
    if (args.model is None) == (args.watch is None):
        parser.error("give a model folder or --watch RUN_DIR (one of them)")
    if args.once and not args.watch:
        parser.error("--once goes with --watch")
    try:
        settings = settings_from_args(args)
        if args.watch:
            run_dir = Path(args.watch)
            problem = watch_problem(run_dir)
            if problem:
                raise SamplerInputError(f"--watch {run_dir}: {problem}")
            if args.out:
                check_out_folder(Path(args.out))
            result = watch(run_dir, settings, Path(args.out) if args.out else None, args.poll, args.once)
            print(result.summary(), file=sys.stderr)
            return 1 if result.failed else 0
        check_model(args.model)
        out = Path(args.out) if args.out else default_out(args.model)
        check_out_folder(out, "--out" if args.out else "--out (default)")  # before any weights load
        if not settings.custom and os.path.isfile(os.path.join(args.model, "pipeline.py")):
            print(f"[sample] {os.path.join(args.model, 'pipeline.py')} found: a custom pipeline; its code will run "
                  "(as with --custom)", file=sys.stderr)
            settings = dataclasses.replace(settings, custom=True)
        if settings.offload and settings.device.type != "cuda":
            print("[sample] --offload: sampling on the CPU, where the weights already are; nothing to offload",
                  file=sys.stderr)
        paths = sample_model(args.model, out, settings)
    except SamplerInputError as error:
        print_error(str(error))
        return 2
    except KeyboardInterrupt:
        print("[sample] stopped (Ctrl-C); a restart with --watch skips the checkpoints already sampled",
              file=sys.stderr)
        return 130
    except Exception as error:  # the hub, a damaged folder, out of memory: said in one line
        print_error(f"{args.model or args.watch}: cannot be sampled ({type(error).__name__}: {first_line(error)})")
        return 1
    for path in paths:
        print(path)
    return 0
