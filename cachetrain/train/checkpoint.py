"""Save, find, load and prune checkpoints.

A checkpoint ``output_dir/checkpoint-NNNNN/`` is a complete diffusers pipeline folder (loadable by
the pipeline's from_pretrained) plus ``training_state.pt`` (a TrainingState: optimizer, LR schedule,
RNG and EMA states, counters) for an exact resume, and the samples drawn at that step. It is written under a temporary
name, flushed to disk, and renamed when complete, so a crash, a full disk or a power loss never
leaves a half checkpoint where the last good one was.

The parts that do not train (VAE, text encoder, tokenizer, scheduler) are saved once into
``output_dir/.frozen-components`` and hard-linked into each checkpoint: no copy per checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from ..atomic import write_atomically
from ..reflink import reflink
from ..checkpoint_layout import (CHECKPOINT_PATTERN, EMA_COMPONENT, FROZEN_DIR_NAME, TRAINED_COMPONENT,  # noqa: F401
                                 TRAINING_STATE_FILE, checkpoint_dir, checkpoint_folders, latest_checkpoint,
                                 list_checkpoints)
from .training_state import TrainingState

def prune_checkpoints(output_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (keep <= 0 keeps all)."""
    if keep <= 0:
        return []
    doomed = [path for _, path in list_checkpoints(output_dir)[:-keep]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


FROZEN_SOURCE_FILE = "cachetrain_source.json"


def _fsync(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        descriptor = os.open(path, flags)
    except OSError:
        if directory:  # some systems cannot open a folder; its entries are then as durable as they get
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError:
        if not directory:  # a folder that cannot be synced is the file system's limit, not a failed save
            raise
    finally:
        os.close(descriptor)


def flush_to_disk(path: Path) -> None:
    """fsync a file, or every file and folder under a folder, and the folder that holds it.

    A rename makes new data visible before it is on disk; flushing first means a power loss right
    after a save finds the complete new checkpoint or the old one, never one of empty files.
    """
    path = Path(path)
    if path.is_dir():
        for folder, _subfolders, files in os.walk(path):
            for name in files:
                _fsync(Path(folder) / name)
            _fsync(Path(folder), directory=True)
    else:
        _fsync(path)
    _fsync(path.parent, directory=True)


def frozen_parts_identity(pipeline, source: str) -> dict[str, str]:
    """The model the parts that do not train came from, and a hash of their configs: the scales and
    the token length a run stores in them (which a resume may change) are part of it."""
    configs = {}
    for name, component in sorted(pipeline.components.items()):
        config = getattr(component, "config", None)
        if name == TRAINED_COMPONENT or config is None:
            continue
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # transformers' or diffusers'
        configs[name] = {key: value for key, value in config.items() if not key.startswith("_")}  # not paths
    blob = json.dumps(configs, sort_keys=True, default=str).encode("utf-8")
    return {"source": source, "configs_sha256": hashlib.sha256(blob).hexdigest()}


def _read_marker(marker: Path) -> dict | None:
    """The identity a template records; None for a damaged one (it is then rebuilt)."""
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def save_frozen_components(pipeline, frozen_dir: Path, source: str) -> None:
    """Save the pipeline once (atomically) without its trained part: the template of every checkpoint.

    ``source`` names the model the parts came from; a template made from another model, or with
    other configs (another --vae_scaling_factor or --force_toklen on a resume), is replaced.
    """
    identity = frozen_parts_identity(pipeline, source)
    marker = frozen_dir / FROZEN_SOURCE_FILE
    if marker.exists() and _read_marker(marker) == identity:
        return
    staging = frozen_dir.with_name(frozen_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        pipeline.save_pretrained(staging)
        shutil.rmtree(staging / TRAINED_COMPONENT, ignore_errors=True)
        write_atomically(staging / FROZEN_SOURCE_FILE, json.dumps(identity))
        flush_to_disk(staging)
    except BaseException:  # a full disk: give the space back at once
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(frozen_dir, ignore_errors=True)
    os.replace(staging, frozen_dir)
    _fsync(frozen_dir.parent, directory=True)  # the rename itself


def remove_partial_saves(output_dir: Path) -> list[Path]:
    """Delete what a killed save left behind (``*.partial`` folders); they never hold a usable checkpoint."""
    leftovers = sorted(Path(output_dir).glob("*.partial")) if Path(output_dir).is_dir() else []
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def link_tree(source: Path, destination: Path, own_copies: bool = False) -> set[str]:
    """Hard-link every file of ``source`` into ``destination`` (copy where links are not possible); with
    ``own_copies``, reflink each file first (a copy-on-write clone: a file of its own at no cost), and hard-link
    only where the file system has no reflinks. Returns how the files were made ("reflink", "hard link", "copy").

    Hard links share their data: write new files next to them rather than editing them in place.
    """
    made = set()
    for folder, _subfolders, files in os.walk(source):
        target_folder = destination / Path(folder).relative_to(source)
        target_folder.mkdir(parents=True, exist_ok=True)
        for name in files:
            if name == FROZEN_SOURCE_FILE:
                continue
            if own_copies and reflink(Path(folder) / name, target_folder / name):
                made.add("reflink")
                continue
            try:
                os.link(Path(folder) / name, target_folder / name)
                made.add("hard link")
            except OSError:
                shutil.copy2(Path(folder) / name, target_folder / name)
                made.add("copy")
    return made


def write_model_folder(destination: Path, unet, frozen_dir: Path, write_trained=None) -> None:
    """A loadable pipeline folder: the frozen parts linked in, the trained UNet saved (or, given
    ``write_trained``, whatever it writes into the folder: an adapter run's base UNet and adapter)."""
    link_tree(frozen_dir, destination)
    if write_trained is not None:
        write_trained(destination)
    else:
        unet.save_pretrained(destination / TRAINED_COMPONENT, safe_serialization=True)


def save_checkpoint(destination: Path, unet, frozen_dir: Path, training_state: TrainingState,
                    ema_weights=None, write_trained=None) -> Path:
    """Write a complete checkpoint atomically; on failure the previous checkpoints are untouched.

    ``ema_weights``, if given, is called with the checkpoint's folder (it writes ``unet_ema/`` or
    ``adapter_ema/``); ``write_trained`` as write_model_folder's.
    """
    staging = destination.with_name(destination.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write_model_folder(staging, unet, frozen_dir, write_trained)
        if ema_weights is not None:
            ema_weights(staging)
        torch.save(training_state.to_dict(), staging / TRAINING_STATE_FILE)
        flush_to_disk(staging)
        replaced = destination.with_name(destination.name + ".replaced.partial")
        if destination.exists():  # moved aside, not deleted first: a crash here keeps a checkpoint
            os.replace(destination, replaced)
        os.replace(staging, destination)
        _fsync(destination.parent, directory=True)  # the rename itself
        shutil.rmtree(replaced, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination


def publish_final(final_checkpoint: Path, output_dir: Path) -> set[str]:
    """The final model at the top of output_dir, as a pipeline folder: its files reflinks of the last
    checkpoint's where the file system has them (files of their own), hard links where not. Returns how
    its files were made (link_tree's words). model_index.json is taken away first and written last: a folder
    that has one is whole, even after a SIGKILL in the middle (``--resume auto`` publishes again without it)."""
    made = set()
    (Path(output_dir) / "model_index.json").unlink(missing_ok=True)
    for entry in sorted(final_checkpoint.iterdir(), key=lambda entry: entry.name == "model_index.json"):
        if entry.name == TRAINING_STATE_FILE or entry.suffix == ".png":
            continue
        target = Path(output_dir) / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        if entry.is_dir():
            made |= link_tree(entry, target, own_copies=True)
        else:  # small files (model_index.json): never half-written
            write_atomically(target, entry.read_bytes())
        flush_to_disk(target)
    return made


def load_training_state(checkpoint: Path) -> TrainingState:
    """The resume state of a checkpoint; loaded without unpickling arbitrary objects. Raises
    TrainingStateError for a state of a newer format."""
    path = Path(checkpoint) / TRAINING_STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{checkpoint} is not a resumable checkpoint (no {TRAINING_STATE_FILE})")
    return TrainingState.from_dict(torch.load(path, map_location="cpu", weights_only=True), checkpoint)
