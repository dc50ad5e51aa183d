"""The run folder: its settings archive, trigger file, summary, which checkpoint a start resumes, and
the exit status a finished run reports.

Every small file here is written through ``write_atomically``: a full disk or a kill leaves the old
file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .checkpoint_check import checkpoint_damage
from ..atomic import TEMP_MARKER, prove_writable, write_atomically

TRIGGER_FILE = "trigger.checkpoint"
SUMMARY_FILE = "train_summary.json"
ARGS_FILE = "train_args.json"
CORRUPT_SUFFIX = ".corrupt"
RESUME_AUTO = "auto"  # resume from the newest checkpoint if there is one, else start: for requeued jobs


class ExitStatus:
    """What train_from_cached.py's exit status tells a job scheduler (the README's table)."""

    FINISHED = 0  # the final model was written and every save that was due succeeded
    CRASHED = 1  # an unexpected error (Python's own status for an uncaught exception)
    REFUSED = 2  # refused at start: bad flags or inputs; nothing trained
    STOPPED = 3  # stopped by SIGINT/SIGTERM after a resumable checkpoint was saved: requeue with --resume
    SAVE_FAILED = 4  # a save that was due failed (a checkpoint, the stop's checkpoint or the final model)
    HALTED = 5  # stopped during training by a problem its message names (e.g. --max_bad_steps)
    STOPPED_NOW = 6  # stopped at once by a second SIGINT/SIGTERM, without a checkpoint of that step


class RunDirError(RuntimeError):
    """The output folder cannot hold a run (not a folder, not writable, or --resume has nothing to resume)."""


def check_output_dir(output_dir: Path) -> None:
    """Create ``output_dir`` and prove a file can be written in it, before anything is trained."""
    if output_dir.exists() and not output_dir.is_dir():
        raise RunDirError(f"--output_dir {output_dir} is an existing file, not a folder; name a folder")
    try:
        prove_writable(output_dir)
    except OSError as error:
        raise RunDirError(f"--output_dir {output_dir} cannot be written ({error.strerror or error}); "
                          "checkpoints and the final model could not be saved there") from None


class KnownCheckpoints:
    """Which checkpoints this run knows to be whole or damaged, so that a line about a failed save or a stop
    names the newest whole one. Checking every checkpoint again there would read each training state (gigabytes
    on a real model) at every failed save; what the start checked and what this run saved is known already, and
    any other checkpoint (newer than one a ``--resume DIR`` named) is checked once, when it would be named."""

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self._damage: dict[Path, str | None] = {}  # checkpoint -> what is wrong with it (None: whole)

    def damage(self, checkpoint: Path) -> str | None:
        key = Path(checkpoint).resolve()
        if key not in self._damage:
            self._damage[key] = checkpoint_damage(checkpoint)
        return self._damage[key]

    def saved(self, checkpoint: Path) -> None:
        """Written whole by this run (replacing a damaged one of the same step, if there was one)."""
        self._damage[Path(checkpoint).resolve()] = None

    def newest_whole(self) -> Path | None:
        for _step, path in reversed(ckpt.list_checkpoints(self.output_dir)):
            if self.damage(path) is None:
                return path
        return None


def resolve_resume(resume: str | None, output_dir: Path, known: KnownCheckpoints | None = None) -> Path | None:
    """The checkpoint this start continues from, or None for a new run; refuses what cannot be meant.

    Every file the resume will read is checked first (checkpoint_check): ``latest``/``auto`` pass over
    damaged checkpoints to the newest whole one, saying which and why; a damaged one named is refused.
    ``known`` keeps each verdict."""
    known = known or KnownCheckpoints(output_dir)
    folders = ckpt.checkpoint_folders(output_dir)
    existing = folders[-1][1] if folders else None
    if not resume:
        if existing is not None:
            raise RunDirError(f"{output_dir} already holds checkpoints of a run (newest: {existing.name}); "
                              "continue it with --resume, or choose another --output_dir")
        return None
    if resume in ("latest", RESUME_AUTO):
        if existing is None and resume == "latest":
            raise RunDirError(f"--resume: {output_dir} holds no checkpoint to continue from; start without "
                              f"--resume (or pass --resume {RESUME_AUTO}: resume if there is one, else start)")
        if existing is None:
            print(f"[train] --resume {RESUME_AUTO}: no checkpoint in {output_dir} yet, starting a new run",
                  file=sys.stderr)
            return None
        return newest_whole_checkpoint(output_dir, resume, known)
    path = Path(resume)
    if not (path / ckpt.TRAINING_STATE_FILE).exists():
        raise RunDirError(f"--resume {path}: not a resumable checkpoint folder (no {ckpt.TRAINING_STATE_FILE})")
    problem = known.damage(path)
    if problem:
        raise RunDirError(f"--resume {path}: damaged checkpoint: {problem}; name another, or pass "
                          "--resume latest to take the newest whole one")
    return path


def newest_whole_checkpoint(output_dir: Path, resume: str, known: KnownCheckpoints) -> Path:
    """The newest checkpoint of output_dir that is whole; each damaged one passed over is named (a folder
    without its training state too: a copy cut short, a file deleted by hand)."""
    for _step, path in reversed(ckpt.checkpoint_folders(output_dir)):
        problem = known.damage(path)
        if problem is None:
            return path
        print(f"[train] --resume {resume}: skipped {path.name}, damaged: {problem}", file=sys.stderr)
    raise RunDirError(f"--resume {resume}: every checkpoint in {output_dir} is damaged (named above); "
                      "nothing whole to continue from")


def remove_start_leftovers(output_dir: Path) -> None:
    """What a start stopped in set-up may have left half-written: a save's ``*.partial`` folder, an atomic
    write's temporary (``.NAME.partial-XXXXXXXX``), the folder's write probe. Each cleans up after itself
    when stopped; this is for a second signal that stopped the cleaning. Called by the lock's holder only."""
    output_dir = Path(output_dir)
    for path in [*output_dir.glob(f".*{TEMP_MARKER}*"), output_dir / f".write-test-{os.getpid()}"]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    ckpt.remove_partial_saves(output_dir)


def stopped_before_start_line(signal_name: str) -> str:
    return (f"[train] {signal_name} received before step 1: stopped during set-up; nothing was trained or saved, "
            "so the same command starts it again")


def _set_aside(path: Path) -> Path:
    """Rename a damaged file to ``NAME.corrupt`` (``NAME.corrupt.1``, ... if taken), keeping its bytes."""
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    number = 1
    while target.exists():
        target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}.{number}")
        number += 1
    os.replace(path, target)
    return target


def read_starts(args_file: Path) -> list[dict[str, Any]]:
    """The starts recorded in train_args.json; a damaged file (e.g. truncated by an older version on a
    full disk) is set aside, said in one line, and the record begins again."""
    if not args_file.exists():
        return []
    try:
        starts = json.loads(args_file.read_text(encoding="utf-8"))
        if isinstance(starts, list):
            return starts
        problem = "not a list of starts"
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        problem = str(error)
    kept = _set_aside(args_file)
    print(f"[train] {args_file} was damaged ({problem}); kept it as {kept.name} and began a new record",
          file=sys.stderr)
    return []


def archive_settings(output_dir: Path, config: dict[str, Any], copy_config: str | None) -> None:
    """Append this start's arguments to train_args.json and keep the settings file (every version)."""
    args_file = output_dir / ARGS_FILE
    starts = read_starts(args_file)
    starts.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv, "config": config})
    write_atomically(args_file, json.dumps(starts, indent=2))
    if copy_config:
        source = Path(copy_config)
        target = output_dir / source.name
        number = 1
        while target.exists() and target.read_bytes() != source.read_bytes():
            target = output_dir / f"{source.stem}.{number}{source.suffix}"
            number += 1
        if not target.exists():
            write_atomically(target, source.read_bytes())
            shutil.copystat(source, target)


def write_summary(output_dir: Path, summary: dict[str, Any]) -> None:
    write_atomically(output_dir / SUMMARY_FILE, json.dumps(summary, indent=2))


def write_end_summary(output_dir: Path, *, steps: int, interrupted: bool, processes: int, checksums: list[float],
                      shares: list[list[float]], skipped_before: int, left_out, checkpoints: list[Path],
                      failed_saves: list[int], failed_samples, final_saved: bool, exit_status: int,
                      bad_files: dict[str, str] | None = None) -> None:
    """train_summary.json of a run that reached its end or a stop; ``shares`` per process: (sample id sum,
    sample count, bad pairs skipped); ``bad_files``: path -> reason of those the main process passed over. A full disk is said in one line: the status and the log still tell."""
    summary = {"steps": steps, "interrupted": interrupted, "processes": processes,
               "process_weight_checksums": checksums,
               "process_sample_id_sums": [share[0] for share in shares],
               "process_sample_counts": [share[1] for share in shares],
               "skipped_samples": skipped_before + int(sum(share[2] for share in shares)),
               "bad_files": dict(bad_files or {}),
               "left_out_at_start": left_out, "checkpoints": [str(path) for path in checkpoints],
               "failed_saves": failed_saves, "failed_samples": failed_samples, "final_model_saved": final_saved,
               "exit_status": exit_status}
    try:
        write_summary(output_dir, summary)
    except OSError as error:
        print(f"[train] could not write {SUMMARY_FILE} ({error.strerror or error})", file=sys.stderr)


def write_halted_summary(output_dir: Path, steps: int, reason: str, checkpoints: list[Path],
                         failed_saves: list[int]) -> None:
    """The summary of a run halted in training (status 5), written if the disk lets it: the error
    itself, printed by the caller, is what the user must read."""
    summary = {"steps": steps, "halted": reason, "checkpoints": [str(path) for path in checkpoints],
               "failed_saves": failed_saves, "exit_status": ExitStatus.HALTED}
    try:
        write_summary(output_dir, summary)
    except OSError:
        pass


def finish_finished_run(output_dir: Path, checkpoint: Path, step: int) -> None:
    """A resume of a run that reached its end (``--resume auto`` of a requeued job that had finished):
    nothing is trained or saved again and the summary is kept; the final model is published if missing."""
    if not (Path(output_dir) / "model_index.json").exists():  # never written, or taken back when cut short
        publish_whole(checkpoint, output_dir)
        summary = output_dir / SUMMARY_FILE  # a stop during the first publishing left it saying so
        try:
            recorded = json.loads(summary.read_text(encoding="utf-8")) if summary.exists() else {"steps": step}
            recorded = recorded if isinstance(recorded, dict) else {"steps": step}
            recorded.pop("stopped_now_by", None)
            write_summary(output_dir, {**recorded, "interrupted": False, "final_model_saved": True,
                                       "exit_status": ExitStatus.FINISHED})
        except (OSError, ValueError) as error:
            print(f"[train] could not update {SUMMARY_FILE} ({error})", file=sys.stderr)
    print(f"[train] {checkpoint.name} is at step {step}, the end of this run: nothing to train; the final "
          f"model is in {output_dir}", file=sys.stderr)


def stop_now(output_dir: Path, signal_name: str, steps: int, checkpoints: list[Path], failed_saves: list[int],
             known: KnownCheckpoints, final_saved: bool = False, final_checkpoint_saved: bool = False) -> None:
    """A second signal: say so in one line and write the summary (if the disk lets it), nothing else.
    ``final_checkpoint_saved``: the signal came while the final model was written from the last step's
    checkpoint, which is whole."""
    newest = known.newest_whole()
    if final_checkpoint_saved and not final_saved:
        print(f"[train] {signal_name} again: stopping now without the final model; its checkpoint is {newest} "
              "(--resume auto writes the final model from it)", file=sys.stderr)
    else:
        print(f"[train] {signal_name} again: stopping now without a checkpoint; the newest is "
              f"{newest if newest is not None else 'none (no checkpoint of this run was saved)'}"
              f"{' (continue with --resume)' if newest is not None else ''}", file=sys.stderr)
    summary = {"steps": steps, "interrupted": True, "stopped_now_by": signal_name,
               "checkpoints": [str(path) for path in checkpoints], "failed_saves": failed_saves,
               "final_model_saved": final_saved, "exit_status": ExitStatus.STOPPED_NOW}
    try:
        write_summary(output_dir, summary)
    except OSError:
        pass


def exit_status(*, stopped: bool, failed_saves: int, final_saved: bool, stop_saved: bool) -> int:
    """The status of a run that reached its end or a stop. A failed save outranks a stop: the run's
    disk needs a look before a requeue."""
    if failed_saves:
        return ExitStatus.SAVE_FAILED
    if stopped:
        return ExitStatus.STOPPED if stop_saved else ExitStatus.SAVE_FAILED
    return ExitStatus.FINISHED if final_saved else ExitStatus.SAVE_FAILED


def newest_checkpoint_note(known: KnownCheckpoints) -> str:
    """A sentence naming the newest whole checkpoint on disk, for messages about saves that failed."""
    newest = known.newest_whole()
    return (f"The newest checkpoint on disk is {newest} (continue with --resume once there is room)."
            if newest is not None else "No checkpoint of this run was saved.")


def publish_final_model(output_dir: Path, step: int, saved: bool, known: KnownCheckpoints) -> bool:
    """The final model at the top of ``output_dir``, from the checkpoint of ``step``; False when that
    checkpoint was not ``saved`` or the model could not be written (each said in one line)."""
    if not saved:
        print(f"[train] the final checkpoint could not be saved (see above). {newest_checkpoint_note(known)}",
              file=sys.stderr)
        return False
    final = ckpt.checkpoint_dir(output_dir, step)
    try:
        made = publish_whole(final, output_dir)
    except OSError as error:
        print(f"[train] could not write the final model into {output_dir} ({error.strerror or error}); "
              f"its checkpoint {final.name} is whole", file=sys.stderr)
        return False
    print(f"[train] final model in {output_dir} ({final_model_files_note(made, final.name)})", file=sys.stderr)
    return True


def publish_whole(checkpoint: Path, output_dir: Path) -> set[str]:
    """``ckpt.publish_final``, or when it is cut short (a second signal, a full disk) no final model at all: a
    half one (a vae/ without its unet/) would look finished. Its files are links or copies of the checkpoint's,
    so nothing is lost, and ``--resume auto`` publishes it again (it looks for model_index.json, removed first)."""
    try:
        return ckpt.publish_final(checkpoint, output_dir)
    except BaseException:
        parts = sorted((entry.name for entry in checkpoint.iterdir()), key=lambda name: name != "model_index.json")
        for name in parts:
            target = Path(output_dir) / name
            if name == ckpt.TRAINING_STATE_FILE or name.endswith(".png"):
                continue  # never published
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
        raise


def final_model_files_note(made: set[str], checkpoint: str) -> str:
    """How the final model's files were made, for its line: own copies, or hard links shared with the checkpoint."""
    if "hard link" in made:
        return (f"its weights are hard links to {checkpoint}'s files: this file system has no reflinks, so "
                "damage to one is damage to both; copy it elsewhere before editing it in place")
    if "reflink" in made:
        return f"its files are reflinks of {checkpoint}'s: copies of their own that share blocks until written"
    return f"its files are copies of {checkpoint}'s"
