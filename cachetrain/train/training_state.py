"""A checkpoint's training state: what a resumed run needs to continue exactly, and what it must share.

``TrainingState`` is the one home of ``training_state.pt``: built from the run in one place
(``capture``), written and read as a versioned dict, checked against the resuming run
(``resume_problem``) and applied to it (``apply``). It holds where the run was (``Progress``), the
optimizer, LR schedule, RNG and EMA states, and what the data order and the optimizer state depend on
(the identities below). A resume whose identities differ cannot continue the same run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# 1: the dict written before the format was recorded (no "format" key): the same keys, read alike
TRAINING_STATE_FORMAT = 2


class TrainingStateError(ValueError):
    """A training state this version cannot read (written by a newer cachetrain)."""


@dataclass
class Progress:
    """Where the run is, as of the last optimizer step: restored exactly on resume."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    # rows (micro-batches) of this epoch already consumed, by all processes together; checkpoints
    # without data "epoch_rows" counted each process's (elastic.SavedLayout reads both)
    batch_in_epoch: int = 0
    skipped_samples: int = 0  # bad pairs passed over (and replaced), by all processes
    skipped_steps: int = 0  # optimizer steps skipped for NaN/Inf gradients

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass
class TrainingState:
    """The resume half of a checkpoint (the weights are the other half, in its unet/ folder)."""

    progress: Progress
    optimizer: dict  # the optimizer's state_dict
    lr_schedule: dict  # the LR schedule's state_dict
    rng: dict[str, Any]  # the global RNGs (rng_states)
    data: dict  # data_identity: what the data order depends on
    optimizer_identity: dict  # what the optimizer state belongs to
    config: str  # the run's flags as JSON
    ema: dict | None = None  # the EMA's state_dict, with --ema_decay

    @classmethod
    def capture(cls, *, progress: Progress, optimizer, lr_schedule, data: dict, optimizer_identity: dict,
                config: dict, ema=None) -> TrainingState:
        """The state of a run right now (the RNGs read here). It holds the optimizer's own tensors, not
        copies: write it before the next optimizer step."""
        return cls(progress=Progress(**progress.as_dict()), optimizer=optimizer.state_dict(),
                   lr_schedule=lr_schedule.state_dict(), rng=rng_states(), data=data,
                   optimizer_identity=optimizer_identity, config=json.dumps(config),
                   ema=None if ema is None else ema.state_dict())

    def to_dict(self) -> dict[str, Any]:
        """What training_state.pt holds: plain types only, so it loads with torch.load(weights_only=True)."""
        state = {"format": TRAINING_STATE_FORMAT, "optimizer": self.optimizer, "lr_schedule": self.lr_schedule,
                 "rng": self.rng, "progress": self.progress.as_dict(), "data": self.data,
                 "optimizer_identity": self.optimizer_identity, "config": self.config}
        if self.ema is not None:
            state["ema"] = self.ema
        return state

    @classmethod
    def from_dict(cls, state: dict[str, Any], source: Path | str) -> TrainingState:
        """A saved state, of this format or an older one; a newer one is refused naming ``source``."""
        version = state.get("format", 1)
        if not isinstance(version, int) or version > TRAINING_STATE_FORMAT:
            raise TrainingStateError(f"--resume {source}: its training state is format {version}, newer than this "
                                     f"cachetrain reads (up to {TRAINING_STATE_FORMAT}); resume it with the version "
                                     "that wrote it, or start a new run from its weights with --pretrained_model")
        identity = state.get("optimizer_identity")
        if identity is None:  # written before it was recorded: its saved flags name the optimizer
            identity = {"optimizer": json.loads(state["config"]).get("optimizer", "adamw")} if "config" in state else {}
        return cls(progress=Progress(**state["progress"]), optimizer=state["optimizer"],
                   lr_schedule=state["lr_schedule"], rng=state["rng"], data=state.get("data", {}),
                   optimizer_identity=identity, config=state.get("config", "{}"), ema=state.get("ema"))

    def resume_problem(self, data: dict, optimizer: dict, checkpoint: Path) -> str | None:
        """Why this state cannot continue a run with these identities, if it cannot."""
        saved_data = self.data
        if saved_data.get("pairs_sha256", data.get("pairs_sha256")) != data.get("pairs_sha256"):
            return (f"--resume {checkpoint}: the training data changed (pairs were {saved_data.get('pairs')}, now "
                    f"{data.get('pairs')}; their names or order differ: pairs_sha256 was {saved_data['pairs_sha256']}, "
                    f"now {data.get('pairs_sha256')}); the data order would not continue where it stopped. Resume on "
                    f"the same data, or start a new run from its weights with --pretrained_model {checkpoint}.")
        # another process count continues the same order (elastic.py decides how)
        changed = describe_changes({key: value for key, value in saved_data.items() if key != "processes"}, data)
        if changed:
            return (f"--resume {checkpoint}: {changed}; the data order would not continue where it stopped. "
                    f"Resume with the same settings and data.")
        changed = describe_changes(self.optimizer_identity, optimizer)
        if changed:
            adapter = saved_adapter_flags(self.config)
            if adapter:  # its unet/ is the untrained base: --pretrained_model of it would drop the adapter
                return (f"--resume {checkpoint}: {changed}; this run's adapter is not the one it saved. It was saved "
                        f"by an adapter run ({adapter}): resume with those flags, or start a new adapter from its "
                        f"weights with --lora_weights {checkpoint} (fresh optimizer and schedule).")
            return (f"--resume {checkpoint}: {changed}; its optimizer state cannot continue. Resume with the same "
                    f"--optimizer and layer selection, or start a new run from its weights with --pretrained_model "
                    f"{checkpoint} (fresh optimizer and schedule).")
        return None

    def apply(self, optimizer, lr_schedule) -> Progress:
        """Put the optimizer, the LR schedule and the RNGs back as they were; the run's progress.
        (The EMA is made from ``ema`` where the run makes its EMA: ema.make_ema.)"""
        optimizer.load_state_dict(self.optimizer)
        lr_schedule.load_state_dict(self.lr_schedule)
        restore_rng_states(self.rng)
        return Progress(**self.progress.as_dict())


def data_identity(pairs: int, processes: int, batch_size: int, seed: int, pairs_sha256: str | None = None,
                  **order: int | str | bool) -> dict[str, int | str | bool]:
    """What the data order depends on: a resume with other values would not continue the same order.

    ``pairs_sha256`` is the pair list's fingerprint (names, in order: PairIndex.fingerprint), so data
    that changed but kept its count is told apart; ``order`` holds the settings that shape the order
    (aspect buckets, data balance, rows per epoch). ``processes`` is recorded, not compared: a resume
    on another count goes on with the same order (elastic.py)."""
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


def saved_adapter_flags(config_json: str) -> str:
    """The adapter flags of the run that saved a state ('' for a run without an adapter), as a user types them."""
    try:
        saved = json.loads(config_json or "{}")
    except ValueError:
        return ""
    if not isinstance(saved, dict) or not saved.get("lora_type"):
        return ""
    flags = [f"--lora_type {saved['lora_type']}"]
    if saved.get("lora_weights"):  # its layers, rank and alpha came from that file
        flags.append(f"--lora_weights {saved['lora_weights']}")
    else:
        flags.append(f"--lora_rank {saved.get('lora_rank')}")
        if saved.get("lora_alpha") is not None:
            flags.append(f"--lora_alpha {saved['lora_alpha']:g}")
        flags.append(f"--lora_targets {' '.join(saved.get('lora_targets') or [])}")
        if saved.get("lora_modules"):
            flags.append(f"--lora_modules {' '.join(saved['lora_modules'])}")
    return " ".join(flags)


def describe_changes(saved: dict, now: dict) -> str:
    """'key was A, now B' for each value a checkpoint saved that differs now ('' when none do; keys
    a checkpoint did not save are not compared)."""
    return ", ".join(f"{key} was {saved[key]}, now {value}" for key, value in now.items()
                     if key in saved and saved[key] != value)


def rng_states() -> dict[str, Any]:
    """The global RNGs, in a form torch.load(weights_only=True) accepts.

    The training noise itself is drawn per sample from (seed, epoch, sample) and needs no state;
    these cover anything else that draws (dropout layers, user hooks).
    """
    numpy_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate((states["python_version"], tuple(states["python"]), None))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
