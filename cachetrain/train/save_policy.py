"""When a run saves: periodic (--save_steps from --save_start), requested (the trigger file), at an
epoch's end (--save_on_epoch), final, and on a stop (SIGINT/SIGTERM); and what failed saves mean: each
is recorded, training goes on, and after --max_failed_saves failures in a row the run stops rather than
train on with nothing to show.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..stop_signals import SignalCatcher
from .config import TrainConfig
from .run_dir import KnownCheckpoints, newest_checkpoint_note

REPEATED_SIGNAL_SECONDS = 2.0  # a launcher (torchrun) forwards a Ctrl-C the terminal already delivered
ENDING_SAVES = ("final", "interrupted")  # the run ends after them whatever happens
LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")  # set in the processes torchrun / accelerate start


class StopNow(BaseException):
    """A second SIGINT/SIGTERM: leave at once, without the stop's checkpoint. A BaseException, so that no
    ``except Exception`` on the way (a failing sample is caught and training goes on) swallows it."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class StoppedBeforeStart(BaseException):
    """A SIGINT/SIGTERM during set-up, before step 1: the start ends at once, as nothing is trained yet to
    save (set-up of a real model takes minutes: a scheduler's stop lands there). A BaseException, as StopNow."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class StopSignal(SignalCatcher):
    """Turns Ctrl-C / SIGTERM into 'save a checkpoint at the next optimizer step and exit'; a second
    one into 'out now' (StopNow, raised where the main thread is). While ``setting_up`` any one ends
    the start at once (StoppedBeforeStart); while ``ending`` (the final model written) the first lets it finish.

    Under a launcher, the same signal again within REPEATED_SIGNAL_SECONDS is the launcher forwarding
    the first (said in one line), not the user asking twice.
    """

    def __init__(self, launched: bool | None = None, setting_up: bool = False):
        super().__init__()
        self.requested = False
        self.setting_up = setting_up
        self.ending = False  # the final checkpoint and model are being written: a first signal lets them finish
        self._first_at = 0.0
        self.set_up_stopped_by: str | None = None
        self.launched = any(name in os.environ for name in LAUNCHER_ENV) if launched is None else launched

    def stop_if_set_up_was_stopped(self) -> None:
        """Raise StoppedBeforeStart again for a signal whose exception something in set-up swallowed: raised
        inside an import (diffusers imports its modules as they are first used), Python only prints it, and
        the process went on alone into its peers' next rendezvous, where it waited until it was killed."""
        if self.set_up_stopped_by is not None:
            raise StoppedBeforeStart(self.set_up_stopped_by)

    def on_signal(self, signum: int) -> None:
        now = time.monotonic()
        name = signal.Signals(signum).name
        if self.setting_up:
            self.set_up_stopped_by = name  # kept, should an import swallow the exception
            raise StoppedBeforeStart(name)
        if self.requested:
            if self.launched and now - self._first_at < REPEATED_SIGNAL_SECONDS:
                tqdm.write(f"[train] {name} again within {REPEATED_SIGNAL_SECONDS:g} s: taken as the launcher "
                           "forwarding the first; send it again to stop now without a checkpoint")
                return
            raise StopNow(name)
        self.requested, self._first_at = True, now
        if self.ending:
            tqdm.write(f"[train] {name} received while the final model is written: finishing it, then the run "
                       "ends (send it again to stop now, without the final model)")
            return
        tqdm.write(f"[train] {name} received: saving a checkpoint at the next step "
                   "(send it again to stop now without one)")


def agreed_requests(stop: StopSignal, trigger: Path, accelerator) -> tuple[bool, bool]:
    """(stop, save now) as every process agrees: one process may get a signal, and only the main one
    looks for the trigger file (a stat: on network storage, a round trip), which it removes when seen.
    With several processes, one all-reduce (a host sync): call it on every process at the same steps."""
    wants_save = accelerator.is_main_process and trigger.exists()
    if accelerator.num_processes > 1:
        flags = torch.tensor([float(stop.requested), float(wants_save)], device=accelerator.device)
        stop_now, save_now = (accelerator.reduce(flags, reduction="sum") > 0).tolist()
    else:
        stop_now, save_now = stop.requested, wants_save
    if save_now and accelerator.is_main_process:
        trigger.unlink(missing_ok=True)
    return stop_now, save_now


class SavePolicy:
    """Which save is due after an optimizer step, and the record of the saves made and failed."""

    def __init__(self, config: TrainConfig, total_steps: int, output_dir: Path, speaks: bool = True,
                 known: KnownCheckpoints | None = None):
        self.save_steps, self.save_start = config.save_steps, config.save_start
        self.save_on_epoch, self.max_failed_saves = config.save_on_epoch, config.max_failed_saves
        self.total_steps = total_steps
        self.output_dir = output_dir
        self.known = known or KnownCheckpoints(output_dir)
        self.speaks = speaks  # the main process says what happened; the others keep the same record
        self.saved_step: int | None = None  # the step of the last checkpoint this start saved
        self.failed_steps: list[int] = []  # steps whose due checkpoint could not be saved
        self.failed_in_a_row = 0
        self.gave_up = False  # --max_failed_saves saves failed in a row: the run stops
        self.epoch_pending = False  # an epoch ended: save at the next optimizer step

    def take_due(self, step: int, requested: bool) -> str | None:
        """The save due after optimizer step ``step`` ('periodic', 'requested' or 'epoch'), or None.
        A save taken here covers a pending epoch save."""
        periodic = bool(self.save_steps) and step % self.save_steps == 0 and self.save_start <= step < self.total_steps
        reason = "periodic" if periodic else "requested" if requested else "epoch" if self.epoch_pending else None
        if reason is not None:
            self.epoch_pending = False
        return reason

    def epoch_ended(self, step: int) -> None:
        """At the next optimizer step (an epoch may end inside an accumulation), unless the run ends there."""
        self.epoch_pending = self.save_on_epoch and step < self.total_steps

    def is_saved(self, step: int) -> bool:
        return self.saved_step == step

    def record(self, step: int, reason: str, failed: bool) -> None:
        """Keep the record of a save; give up after --max_failed_saves failed saves in a row."""
        if not failed:
            self.saved_step = step
            self.failed_in_a_row = 0
            return
        self.failed_steps.append(step)
        if reason in ENDING_SAVES:
            return  # the run ends here anyway; the exit status says the save failed
        self.failed_in_a_row += 1
        limit = self.max_failed_saves
        if self.failed_in_a_row >= limit:
            self.gave_up = True
            if self.speaks:
                print(f"[train] {self.failed_in_a_row} checkpoint saves in a row failed (limit "
                      f"--max_failed_saves {limit}); stopping at step {step} rather than training on with "
                      f"nothing to show. {newest_checkpoint_note(self.known)}", file=sys.stderr)
        elif self.speaks:
            tqdm.write(f"[train] training goes on ({self.failed_in_a_row} of --max_failed_saves {limit} "
                       "failed saves in a row)")
