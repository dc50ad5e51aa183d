"""Resuming a run on another number of processes (elastic resume): the same global batch, the same epoch.

The run's rows are one stream (epoch_order.RunBatches); a checkpoint records where in its epoch the run
stands as rows consumed by all processes together, and how many rows each epoch holds. A start with P
processes takes the stream on from there, process r the r-th of each P rows, so every row of the epoch
is trained once, whatever P was before. The global batch (P x --gradient_accum micro-batches of
--batch_size) stays the run's: --gradient_accum is set to what keeps it, or the start is refused.

Checkpoints written before this was recorded hold each process's micro-batches of the epoch and cut
epochs to a multiple of their process count: both are read that way.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .bad_data import TrainingError
from .training_state import Progress, TrainingState


@dataclass(frozen=True)
class SavedLayout:
    """How a checkpoint's run cut its data: its processes, accumulation and rows per epoch."""

    processes: int
    gradient_accum: int
    epoch_rows: int | None  # None: a checkpoint written before it was recorded

    @classmethod
    def of(cls, state: TrainingState) -> SavedLayout:
        flags = json.loads(state.config or "{}")
        rows = state.data.get("epoch_rows")
        return cls(int(state.data.get("processes", 1)), int(flags.get("gradient_accum", 1)),
                   None if rows is None else int(rows))

    @property
    def step_micro_batches(self) -> int:
        """Micro-batches (of all processes) per optimizer step: the global batch, in batches."""
        return self.processes * self.gradient_accum

    def epoch_rows_for(self, whole_rows: int) -> int:
        """The rows each epoch of the run holds (before they were recorded: whole rows, rounded down to a
        multiple of the process count, as the run cut them)."""
        if self.epoch_rows is not None:
            return self.epoch_rows
        return whole_rows // self.processes * self.processes

    def rows_done(self, progress: Progress) -> int:
        """Rows of the current epoch the run consumed, all processes together."""
        if self.epoch_rows is None:  # each process's micro-batches of the epoch
            return progress.batch_in_epoch * self.processes
        return progress.batch_in_epoch


def launched_processes() -> int:
    """The processes this launch (torchrun, accelerate launch) starts: WORLD_SIZE, 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resumed_accumulation(layout: SavedLayout, processes: int, gradient_accum: int, scale_loss_with_accum: bool,
                         checkpoint: Path) -> tuple[int, str | None]:
    """(--gradient_accum for this start, a line saying why it differs from the flag, or None).

    With the checkpoint's process count nothing changes. With another, the accumulation that keeps the
    run's global batch; TrainingError (one line) when none does, naming the counts that would."""
    if processes == layout.processes:
        return gradient_accum, None
    step = layout.step_micro_batches
    had = (f"the run's optimizer step is {step} micro-batches ({layout.processes} process(es) x "
           f"--gradient_accum {layout.gradient_accum})")
    if step % processes:
        counts = [str(n) for n in range(1, step + 1) if step % n == 0]
        raise TrainingError(f"--resume {checkpoint}: {had}; {processes} processes cannot share it evenly. "
                            f"Launch {', '.join(counts)} process(es), or start a new run from its weights "
                            f"with --pretrained_model {checkpoint}")
    wanted = step // processes
    if gradient_accum not in (wanted, layout.gradient_accum):
        raise TrainingError(f"--resume {checkpoint}: {had}; {processes} process(es) x --gradient_accum "
                            f"{gradient_accum} would be {processes * gradient_accum}. Pass --gradient_accum "
                            f"{wanted} (or the run's {layout.gradient_accum}: it is then set to {wanted})")
    if scale_loss_with_accum and wanted != layout.gradient_accum:
        raise TrainingError(f"--resume {checkpoint}: --scale_loss_with_accum divides the loss by --gradient_accum, "
                            f"so {processes} process(es) x --gradient_accum {wanted} would train with gradients "
                            f"{layout.gradient_accum / wanted:g} times those of the run; resume on "
                            f"{layout.processes} process(es)")
    note = (f"[train] --resume on {processes} process(es), the run had {layout.processes}: --gradient_accum "
            f"{wanted} keeps its optimizer step of {step} micro-batches; the epoch goes on where it stopped")
    return wanted, note


def speak(note: str | None, is_main: bool) -> None:
    if note and is_main:
        print(note, file=sys.stderr)


class TrainedSampleLog:
    """--log_sample_ids: one JSON line per micro-batch, (step, rank, epoch, row, sample ids), in
    ``trained_samples.rank<R>.jsonl`` of the run folder; appended to by every start of the run. Off by
    default; when on, a line written per micro-batch (buffered: no sync with the device)."""

    def __init__(self, output_dir: Path, rank: int, enabled: bool):
        self.rank = rank
        self.file = open(output_dir / f"trained_samples.rank{rank}.jsonl", "a", encoding="utf-8") if enabled else None

    def record(self, step: int, epoch: int, row: int, sample_ids: list[int]) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "rank": self.rank, "epoch": epoch, "row": row,
                                         "samples": sample_ids}) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
