"""What a checkpoint records so a resumed run continues exactly, and what the resume must share with it.

A checkpoint's training state holds where the run was (``Progress``) and what its data order and its
optimizer state depend on (the identities below). A resume whose identities differ cannot continue
the same run: ``resume_problem`` names what changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Progress:
    """Where the run is, as of the last optimizer step: restored exactly on resume."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    skipped_samples: int = 0  # bad pairs passed over (and replaced), by all processes
    skipped_steps: int = 0  # optimizer steps skipped for NaN/Inf gradients

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def data_identity(pairs: int, processes: int, batch_size: int, seed: int, pairs_sha256: str | None = None,
                  **order: int | str | bool) -> dict[str, int | str | bool]:
    """What the data order depends on: a resume with other values would not continue the same order.

    ``pairs_sha256`` is the pair list's fingerprint (names, in order: PairIndex.fingerprint), so data
    that changed but kept its count is told apart; ``order`` holds the settings that shape the order
    (aspect buckets, data balance)."""
    identity = {"pairs": pairs, "processes": processes, "batch_size": batch_size, "seed": seed}
    if pairs_sha256 is not None:
        identity["pairs_sha256"] = pairs_sha256
    return {**identity, **order}


def optimizer_identity(optimizer: str, unet: torch.nn.Module, trainable: list[torch.Tensor]) -> dict[str, int | str]:
    """What the saved optimizer state belongs to: another optimizer, or another set of trainable
    tensors, cannot continue it (switching to --bf16_weights can: the state converts)."""
    names = "\n".join(name for name, p in unet.named_parameters() if p.requires_grad)
    return {"optimizer": optimizer, "trainable_tensors": len(trainable),
            "trainable_parameters": sum(p.numel() for p in trainable),
            "trainable_names_sha256": hashlib.sha256(names.encode("utf-8")).hexdigest()[:16]}


def describe_changes(saved: dict, now: dict) -> str:
    """'key was A, now B' for each value a checkpoint saved that differs now ('' when none do; keys
    a checkpoint did not save are not compared)."""
    return ", ".join(f"{key} was {saved[key]}, now {value}" for key, value in now.items()
                     if key in saved and saved[key] != value)


def resume_problem(state: dict, data: dict, optimizer: dict, checkpoint: Path) -> str | None:
    """Why the training state of ``checkpoint`` cannot continue a run with these identities, if it cannot."""
    saved_data = state.get("data", {})
    if saved_data.get("pairs_sha256", data.get("pairs_sha256")) != data.get("pairs_sha256"):
        return (f"--resume {checkpoint}: the training data changed (pairs were {saved_data.get('pairs')}, now "
                f"{data.get('pairs')}; their names or order differ: pairs_sha256 was {saved_data['pairs_sha256']}, "
                f"now {data.get('pairs_sha256')}); the data order would not continue where it stopped. Resume on "
                f"the same data, or start a new run from its weights with --pretrained_model {checkpoint}.")
    changed = describe_changes(saved_data, data)
    if changed:
        return (f"--resume {checkpoint}: {changed}; the data order would not continue where it stopped. "
                f"Resume with the same settings and data.")
    saved_optimizer = state.get("optimizer_identity")
    if saved_optimizer is None and "config" in state:  # a checkpoint from before it was recorded
        saved_optimizer = {"optimizer": json.loads(state["config"]).get("optimizer", "adamw")}
    changed = describe_changes(saved_optimizer or {}, optimizer)
    if changed:
        return (f"--resume {checkpoint}: {changed}; its optimizer state cannot continue. Resume with the same "
                f"--optimizer and layer selection, or start a new run from its weights with --pretrained_model "
                f"{checkpoint} (fresh optimizer and schedule).")
    return None
