"""Resuming a run: which checkpoint it continues from, and putting that checkpoint back.

The checkpoint's training state is read first, before the data and the model: the processes and
accumulation it was saved with decide this start's accumulation and how its epochs are counted
(elastic.py). Once the model is built, the checkpoint's weights (or its adapter), optimizer, LR schedule
and RNGs are put back, after its identities (data, optimizer, adapter) were compared with this run's.
Every refusal is a TrainingError of one line naming the checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from ..cli import first_line
from ..models import loading as models
from . import checkpoint as ckpt
from . import run_dir
from .adapters import load_adapter
from .bad_data import TrainingError
from .config import TrainConfig
from .elastic import SavedLayout, launched_processes, resumed_accumulation
from .packaged_optimizers import training_mode
from .run_model import RunModel
from .training_state import Progress, TrainingState, TrainingStateError


@dataclass
class ResumePoint:
    checkpoint: Path
    layout: SavedLayout  # the processes and accumulation it was saved with
    state: TrainingState | None  # held until restored, no longer


def find_resume_point(config: TrainConfig, output_dir: Path, known: run_dir.KnownCheckpoints
                      ) -> tuple[ResumePoint | None, TrainConfig, str | None]:
    """(the checkpoint --resume names with its training state, or None for a fresh start; the config with
    the accumulation this start uses; a line on a change of processes, or None)."""
    checkpoint = run_dir.resolve_resume(config.resume, output_dir, known)
    if checkpoint is None:
        return None, config, None
    try:
        state = ckpt.load_training_state(checkpoint)
    except TrainingStateError as error:
        raise TrainingError(str(error)) from None
    layout = SavedLayout.of(state)
    accumulation, elastic_note = resumed_accumulation(layout, launched_processes(), config.gradient_accum,
                                                      config.scale_loss_with_accum, checkpoint)
    return (ResumePoint(checkpoint, layout, state), dataclasses.replace(config, gradient_accum=accumulation),
            elastic_note)


def restore(point: ResumePoint, identities: tuple[dict, dict], model: RunModel,
            speaks: bool) -> tuple[Progress, dict | None]:
    """The checkpoint's weights, optimizer, schedule and RNGs put back into ``model``, once its recorded
    (data, optimizer) ``identities`` match this run's; (its progress, its EMA state)."""
    state, point.state = point.state, None  # held no longer than needed
    problem = state.resume_problem(*identities, point.checkpoint)
    if problem:
        raise TrainingError(problem)
    if model.adapter is not None:  # the base is the --pretrained_model's; the adapter is the checkpoint's
        try:
            load_adapter(model.bare_unet, model.adapter, point.checkpoint)
        except (ValueError, OSError) as error:
            raise TrainingError(f"--resume {point.checkpoint}: its adapter does not load ({error})") from None
    else:
        try:  # checked before it was picked (checkpoint_check); this is the net for what a check cannot see
            trained = models.load_unet(str(point.checkpoint), dtype=model.bare_unet.dtype)
            model.bare_unet.load_state_dict(trained.state_dict())
        except Exception as error:  # diffusers' ValueError, safetensors' own error, a shape mismatch
            raise TrainingError(f"--resume {point.checkpoint}: its UNet does not load ({type(error).__name__}: "
                                f"{first_line(error)}); name another checkpoint") from None
        del trained
    restored = state.apply(model.optimizer, model.lr_schedule)
    restored.batch_in_epoch = point.layout.rows_done(restored)  # rows of all processes, as now counted
    training_mode(model.optimizer)  # schedule-free: the saved evaluation weights back to the stepped ones
    if speaks:
        print(f"[train] resumed from {point.checkpoint} at step {restored.step}", file=sys.stderr)
    return restored, state.ema
