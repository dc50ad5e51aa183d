"""The training loop: sidecar pairs -> UNet steps, with checkpoints, samples, logs and exact resume.

One optimizer step = ``gradient_accum`` micro-batches (accelerate's accumulate), then one update
(clip, NaN/Inf skip, step) on the micro-batch where the gradients synced. Per-step metrics stay on the
device and are read back once per ``log_every`` steps; NaN/Inf gradients make the optimizer skip its
step on the device, with no host sync.

Set-up and the loop live here; what they use has its own home: the run's data (run_data), the model and
what trains it (run_model), where a resume starts and what it puts back (resume), validation, when to save
(save_policy), writing checkpoints (checkpoint_writer) and their training state (training_state), samples
(sample_drawer), the checks before step 1 (start_checks), the run folder (run_dir), the processes and what
they agree on (processes), the LR schedule's length (optim). What is left is the order of things: set-up,
the micro-batch loop, what follows an optimizer step and an epoch, the save sequence, and the end of a run
that every process must reach together.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .adapters import adapter_identity
from . import run_dir
from .bad_data import BadPairLedger, TrainingError
from .checkpoint_writer import CheckpointWriter
from ..cli import print_error
from .config import TrainConfig, config_to_dict
from .elastic import TrainedSampleLog, speak
from .ema import ema_weights, make_ema
from .frozen_parts import FrozenParts
from .epoch_order import RunBatches, order_identity
from .loader import CachedPairDataset, RefillingBatchReader, make_training_loader
from .packaged_optimizers import evaluation_weights
from .processes import any_process, end_processes, gather_shares, make_accelerator, sum_over_processes
from .run_data import load_run_data, trained_latent_shape
from .run_dir import TRIGGER_FILE, ExitStatus, RunDirError, newest_checkpoint_note
from ..bounded_read import set_read_timeout
from .run_lock import RunLock, RunLockedError, is_main_launch_process
from .resume import find_resume_point, restore
from .run_model import RunModel, load_run_model
from .sample_drawer import SampleDrawer
from .save_policy import SavePolicy, StopNow, StoppedBeforeStart, StopSignal, agreed_requests
from .shard_data import ShardStoreUnreachable, unreachable_stop_message
from .start_checks import SetupError, start_problem
from .step import UpdateCheck
from .telemetry import StepHealth, Telemetry
from .training_state import Progress, TrainingState, data_identity, optimizer_identity
from .validation import validation_loss


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    checkpoints: list[Path] = field(default_factory=list)
    logged: list[dict[str, float]] = field(default_factory=list)
    interrupted: bool = False
    failed_saves: list[int] = field(default_factory=list)  # steps whose due checkpoint could not be saved
    stop_saved: bool = False  # interrupted, and the stop's checkpoint was saved (resumable)
    final_saved: bool = False  # the final model was written
    gave_up_saving: bool = False  # --max_failed_saves saves failed in a row: stopped
    exit_status: int = ExitStatus.FINISHED


class TrainingRun:
    """The state of one run and the loop over it; ``train()`` is the entry point."""

    def __init__(self, config: TrainConfig, interrupt_after_batches: int | None = None):
        self.config = config
        self.interrupt_after_batches = interrupt_after_batches
        self.output_dir = Path(config.output_dir)
        # caught from here until run() ends (restored there, as the lock is released); during set-up a signal
        # ends the start at once: nothing is trained yet, and loading a real model takes minutes
        self.stop = StopSignal(setting_up=True).__enter__()
        self.lock = None
        try:
            # refused before anything heavy loads, by every process, so that all of them stop together
            run_dir.check_output_dir(self.output_dir)
            # held until the run ends (the OS drops it if the process dies): a second run here is refused
            self.lock = RunLock.take(self.output_dir) if is_main_launch_process() else RunLock(None)
            self._set_up()
        except BaseException:
            if self.lock is not None:  # this start's folder: the main process clears what a stop cut short
                if is_main_launch_process():
                    run_dir.remove_start_leftovers(self.output_dir)
                self.lock.release()
            self.stop.__exit__(None, None, None)
            raise
        self.stop.setting_up = False  # from step 1 on, a first signal asks for a checkpoint

    def _set_up(self) -> None:
        self.known = run_dir.KnownCheckpoints(self.output_dir)  # the verdicts of the checks, for later lines
        # read first: the checkpoint's layout decides the accumulation and the epochs
        resume_point, self.config, elastic_note = find_resume_point(self.config, self.output_dir, self.known)
        self.resume_from = resume_point.checkpoint if resume_point is not None else None
        config = self.config
        problem = start_problem(config)
        if problem:
            raise TrainingError(problem)
        set_read_timeout(config.read_timeout)  # every sidecar read of this process and its loader workers
        # before each rendezvous of the processes: one whose stop an import swallowed would wait there alone
        self.stop.stop_if_set_up_was_stopped()
        self.accelerator = make_accelerator(config)
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        speak(elastic_note, self.is_main)
        if self.is_main:
            ckpt.remove_partial_saves(self.output_dir)
        self.stop.stop_if_set_up_was_stopped()
        self.data = load_run_data(config, self.rank, self.world, self.is_main,
                                   self.accelerator.wait_for_everyone if self.world > 1 else None,
                                   resume_point.layout if resume_point is not None else None)
        self.total_steps = self.data.total_steps
        model = self._load_model()
        self.progress, ema_state = (restore(resume_point, self._identities(), model, self.is_main)
                                    if resume_point is not None else (Progress(), None))
        # from the resumed weights (or the checkpoint's EMA state), after the restore
        self.ema = make_ema(self.trainable, config.ema_decay, self.device, ema_state)
        self.health = StepHealth(self.device, self.progress.skipped_steps)
        # the main process alone saves and samples, at the size trained (with buckets: the commonest)
        parts = FrozenParts(config, trained_latent_shape(self.data, config)) if self.is_main else None
        self.drawer = SampleDrawer(config, self.device, parts=parts) if self.is_main else None
        self.writer = CheckpointWriter(config, parts, self.adapter, self.known) if self.is_main else None
        self.stop.stop_if_set_up_was_stopped()
        self._prepare_saves()
        if self.is_main:  # a start refused above is no start of the run's record
            run_dir.archive_settings(self.output_dir, config_to_dict(config), config.copy_config)
        self.telemetry = Telemetry(self.output_dir / "tensorboard" if self.is_main else None, self.device)
        if self.drawer is not None:
            self.drawer.telemetry = self.telemetry
        self.saves = SavePolicy(config, self.total_steps, self.output_dir, speaks=self.is_main, known=self.known)
        self.result = TrainResult(output_dir=self.output_dir, steps=self.progress.step,
                                  failed_saves=self.saves.failed_steps)
        self.stopping = False
        self.sample_id_sum = 0  # of the pairs this process trained on: proves the processes' shares differ
        self.sample_count = 0
        self.skipped_before = self.progress.skipped_samples  # bad pairs passed over by earlier starts
        self.bad_pairs = BadPairLedger(config.max_bad_fraction, config.aspect_buckets)  # ... and by this start
        self.sample_log = TrainedSampleLog(self.output_dir, self.rank, config.log_sample_ids)
        self.stop.stop_if_set_up_was_stopped()

    # -- set-up -----------------------------------------------------------------------------

    def _load_model(self) -> RunModel:
        model = load_run_model(self.config, self.accelerator, self.data, self.resume_from,
                               before_processes_meet=self.stop.stop_if_set_up_was_stopped)
        self.adapter, self.trainable, self.plan = model.adapter, model.trainable, model.plan
        self.optimizer, self.lr_schedule = model.optimizer, model.lr_schedule
        self.unet, self.bare_unet, self.step = model.unet, model.bare_unet, model.step
        return model

    def _prepare_saves(self) -> None:
        """Refuse now what would make a save or a sample fail later (the main process checks: it alone
        saves); the other processes stop with it rather than wait for it at the first step."""
        refusal = None
        if self.writer is not None:
            try:
                self.drawer.check_sampler_steps(self.writer.parts.prepare(self.bare_unet))
                self.writer.prepare(self.bare_unet)
            except SetupError as error:
                refusal = error
        if any_process(self.accelerator, refusal is not None) and refusal is None:
            raise TrainingError("the main process refused the start (its message says why)")
        if refusal is not None:
            raise refusal

    def _identities(self) -> tuple[dict, dict]:
        """(data, optimizer) identities of this run, as a checkpoint records them (see training_state.py)."""
        return (data_identity(len(self.data.train_index), self.world, self.config.batch_size, self.config.seed,
                              self.data.pairs_fingerprint, aspect_buckets=self.config.aspect_buckets,
                              data_balance=self.config.data_balance, epoch_rows=self.data.rows_per_epoch,
                              **order_identity(self.data.order)),
                {**optimizer_identity(self.config.optimizer, self.bare_unet, self.trainable),
                 **adapter_identity(self.bare_unet)})

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> TrainResult:
        try:
            return self._run_and_report()
        except StopNow as stop:  # a second signal: out at once, the summary says so
            self.result.interrupted, self.result.exit_status = True, ExitStatus.STOPPED_NOW
            if self.is_main:
                self.telemetry.close()
                # a mid-run step's checkpoint (both signals came while it was sampled) is not the final one
                final_checkpoint_saved = self.stop.ending and self.saves.is_saved(self.progress.step)
                run_dir.stop_now(self.output_dir, stop.signal_name, self.progress.step, self.result.checkpoints,
                                 self.result.failed_saves, self.known, final_saved=self.result.final_saved,
                                 final_checkpoint_saved=final_checkpoint_saved)
            return self.result
        finally:
            self.stop.__exit__(None, None, None)
            self.lock.release()

    def _run_and_report(self) -> TrainResult:
        try:
            return self._run()
        except TrainingError as error:  # halted by a problem met in training: keep what it logged
            if self.is_main:
                self.telemetry.close()
                run_dir.write_halted_summary(self.output_dir, self.progress.step, str(error),
                                             self.result.checkpoints, self.result.failed_saves)
            raise

    def _run(self) -> TrainResult:
        if self.resume_from is not None and self.progress.step >= self.total_steps:  # finished already
            self.stop.ending = True  # it may publish the final model
            if self.is_main:
                run_dir.finish_finished_run(self.output_dir, self.resume_from, self.progress.step)
            self.result.final_saved = True
            end_processes(self.accelerator, ExitStatus.FINISHED, release=self._drop_wrapped_unet)
            return self.result
        bar = tqdm(total=self.total_steps, initial=self.progress.step, unit="step",
                   disable=not self.is_main or self.config.no_progress, dynamic_ncols=True)
        stop = self.stop
        if self.data.validation_index is not None and self.progress.step == 0:
            self._validate(0)
        if self.progress.step < self.total_steps:
            self._train(stop, bar)
        self.result.interrupted = self.stopping and self.progress.step < self.total_steps
        if self.saves.gave_up:
            pass  # said when it happened; a final save would fail like the others
        elif self.result.interrupted:
            self.result.stop_saved = self._save("interrupted")
            if self.is_main and self.result.stop_saved:
                print(f"[train] stopped at step {self.progress.step}; continue with --resume", file=sys.stderr)
            elif self.is_main:
                print(f"[train] stopped at step {self.progress.step}, but its checkpoint could not be saved; "
                      f"{newest_checkpoint_note(self.known)}", file=sys.stderr)
        else:
            # the first signal from here lets the final model be finished: once written it is status 0, and a
            # requeue (status 3) would have nothing to do
            self.stop.ending = True
            self._save("final")
        self._finish(bar)
        return self.result

    def _train(self, stop: StopSignal, bar) -> None:
        """Micro-batches until --max_steps optimizer steps are done or every process agreed to stop.

        Stops and saves happen only right after an optimizer step, so the saved data position never
        counts micro-batches whose gradients were not applied.
        """
        config, progress, data = self.config, self.progress, self.data
        dataset = CachedPairDataset(data.train_index, self.plan, checks=data.checks)
        reader = RefillingBatchReader(dataset, data.order, token_length=config.force_toklen)
        batches = RunBatches(data.order, progress.epoch, progress.batch_in_epoch)
        loader = make_training_loader(reader, batches, config.num_workers, pin_memory=self.device.type == "cuda")
        micro_batches = 0
        try:
            for batch in loader:
                if self.sample_log.file is not None:
                    row = progress.batch_in_epoch + self.rank  # this process's row of the stream
                    self.sample_log.record(progress.step + 1, progress.epoch + row // data.rows_per_epoch,
                                           row % data.rows_per_epoch, batch.sample_ids)
                progress.batch_in_epoch += self.world  # the processes took the next rows, one each
                micro_batches += 1
                if self.interrupt_after_batches is not None and micro_batches >= self.interrupt_after_batches:
                    stop.requested = True
                self.bad_pairs.record(batch)
                stepped = self._train_on(batch, bar)
                if progress.batch_in_epoch >= data.rows_per_epoch:  # may end inside a micro-step (elastic)
                    progress.epoch += 1
                    progress.batch_in_epoch -= data.rows_per_epoch
                    self._after_epoch()
                if stepped and (self._after_step(stop) or progress.step >= self.total_steps):
                    break
        except ShardStoreUnreachable as error:  # shard storage gone: stop resumably, naming it
            raise TrainingError(unreachable_stop_message(error, progress.step)) from None
        del loader  # stops the workers

    def _train_on(self, batch, bar) -> bool:
        """One micro-batch; True when it completed an optimizer step."""
        accelerator = self.accelerator
        self.sample_id_sum += sum(batch.sample_ids)
        self.sample_count += len(batch.sample_ids)
        with accelerator.accumulate(self.unet):
            loss, raw_loss = self.step.forward_backward(batch)  # accumulate
            stepping = accelerator.sync_gradients  # this micro-batch completes the optimizer step
            logging_now = stepping and (self.progress.step + 1) % self.config.log_every == 0
            check = self.step.optimizer_step(want_qk_grads=logging_now) if stepping else None  # clip, step
        self.telemetry.add_micro_step(loss, raw_loss, batch.latents.shape[0] * self.world)
        if check is not None:
            self._after_optimizer_step(check, logging_now, bar)
        return check is not None

    def _after_optimizer_step(self, check: UpdateCheck, logging_now: bool, bar) -> None:
        if not self.config.scheduler_at_epoch:
            self.lr_schedule.step()
        if self.ema is not None:
            self.ema.step(self.trainable)
        self.progress.step += 1
        bar.update(1)
        self.health.record(check.found_inf, check.grad_norm)
        if logging_now:
            self._log(check, bar)

    def _skipped_samples(self) -> torch.Tensor:
        """Bad pairs passed over by the whole run so far, as a device scalar (an all-reduce with
        several processes, so every process must call it at the same point)."""
        return sum_over_processes(self.accelerator, self.bad_pairs.skipped) + self.skipped_before

    def _log(self, check: UpdateCheck, bar) -> None:
        """Read the window's metrics back (one transfer), log them, and stop on a run of bad steps."""
        progress, config = self.progress, self.config
        values = self.telemetry.flush(progress.step, self.lr_schedule.get_last_lr()[0], {
            "train/qk_grads_av": check.qk_grads,
            "unet/L2_norm": check.weight_norm,
            **self.health.window_scalars(),
            "train/skipped_samples": self._skipped_samples(),
            "train/epoch": torch.tensor(progress.epoch + progress.batch_in_epoch / self.data.rows_per_epoch),
        })
        progress.skipped_steps = int(values["train/skipped_steps"])
        progress.skipped_samples = int(values["train/skipped_samples"])
        self.result.logged.append({"step": progress.step, **values})
        bar.set_postfix(loss=f"{values['train/loss']:.4f}", img_s=f"{values['train/images_per_sec']:.1f}")
        worst_run = int(values["_worst_bad_run"])
        if worst_run >= config.max_bad_steps:
            raise TrainingError(
                f"{worst_run} optimizer steps in a row had NaN/Inf gradients (limit --max_bad_steps "
                f"{config.max_bad_steps}); stopping at step {progress.step}. Lower the learning rate or check "
                "the cached data (python -m cachetrain.inspect).")

    def _after_step(self, stop: StopSignal) -> bool:
        """Saves, samples and validation due after this optimizer step; True when the run must stop."""
        config, step = self.config, self.progress.step
        # with several processes they agree at logging steps only (a host sync), so no other step waits
        if self.world == 1 or step % config.log_every == 0:
            stop_now, save_now = agreed_requests(stop, self.output_dir / TRIGGER_FILE, self.accelerator)
            self.stopping = self.stopping or stop_now
        else:
            stop_now, save_now = False, False
        reason = None if stop_now else self.saves.take_due(step, save_now)  # a stop saves at the loop's end
        if reason is not None:
            self._save(reason)
        elif config.sample_steps and step % config.sample_steps == 0 and self.is_main:
            self._sample(self.output_dir / f"samples-{step:05d}")
        if self.data.validation_index is not None and config.validation_steps and step % config.validation_steps == 0:
            self._validate(step)
        return stop_now or self.saves.gave_up

    def _after_epoch(self) -> None:
        config = self.config
        if config.learning_rate_decay:
            self.lr_schedule.base_lrs = [max(0.0, lr - config.learning_rate_decay) for lr in self.lr_schedule.base_lrs]
        if config.scheduler_at_epoch:  # after the decay, so the next epoch's LR includes it
            self.lr_schedule.step()
        self.saves.epoch_ended(self.progress.step)

    # -- checkpoints, samples, validation ---------------------------------------------------

    def _training_state(self) -> TrainingState:
        self.progress.skipped_steps = int(self.health.bad_total.item())  # saves are rare: one read is fine
        data, optimizer = self._identities()
        return TrainingState.capture(progress=self.progress, optimizer=self.optimizer, lr_schedule=self.lr_schedule,
                                     data=data, optimizer_identity=optimizer, config=config_to_dict(self.config),
                                     ema=self.ema)

    def _save(self, reason: str) -> bool:
        """Save a checkpoint of this step; True when it is on disk (on every process alike)."""
        with evaluation_weights(self.optimizer):  # schedule-free: save, sample and validate its averaged weights
            return self._save_now(reason)

    def _save_now(self, reason: str) -> bool:
        step = self.progress.step
        if self.saves.is_saved(step):
            return True  # this step is saved already
        self.progress.skipped_samples = int(self._skipped_samples().item())  # saves are rare: one read is fine
        self.accelerator.wait_for_everyone()
        failed = False
        if self.is_main:
            path = self.writer.save(self.bare_unet, step, self._training_state(), self.ema, self.trainable)
            failed = path is None
            if path is not None:
                self.result.checkpoints.append(path)
                if reason != "interrupted":
                    self._sample(path)
                ckpt.prune_checkpoints(self.output_dir, self.config.keep_checkpoints)
                tqdm.write(f"[train] saved {path} ({reason})")
        failed = any_process(self.accelerator, failed)  # saves are rare: every process learns how the main one's went
        self.saves.record(step, reason, failed)
        if self.data.validation_index is not None and not self.config.validation_steps and reason != "interrupted":
            self._validate(step)
        self.accelerator.wait_for_everyone()
        return not failed

    def _sample(self, out_dir: Path) -> None:
        with evaluation_weights(self.optimizer), ema_weights(self.ema, self.trainable):  # samples show the EMA weights
            self.drawer.sample(self.bare_unet, self.progress.step, out_dir)

    def _validate(self, step: int) -> None:
        """val/loss of the held-out pairs (main process)."""
        with evaluation_weights(self.optimizer):
            self._validate_now(step)

    def _validate_now(self, step: int) -> None:
        if self.is_main:
            value = validation_loss(self.data.validation_index, self.plan, self.data.checks, self.config,
                                    self.step.held_out_errors, self.device)
            self.telemetry.add_scalar("val/loss", value, step)
            self.result.logged.append({"step": step, "val/loss": value})
        self.accelerator.wait_for_everyone()

    def _finish(self, bar) -> None:
        self.result.gave_up_saving = self.saves.gave_up
        if self.is_main and not (self.result.interrupted or self.saves.gave_up):  # reached its end
            self.result.final_saved = run_dir.publish_final_model(self.output_dir, self.progress.step,
                                                                  self.saves.is_saved(self.progress.step), self.known)
        self.result.final_saved = any_process(self.accelerator, self.result.final_saved)  # one exit status
        checksums, shares = gather_shares(self.accelerator, self.bare_unet, self.sample_id_sum, self.sample_count,
                                          self.bad_pairs.skipped)
        if self.is_main:
            if len(set(checksums)) > 1:
                print(f"[train] WARNING: the processes' weights differ at the end: {checksums}", file=sys.stderr)
            run_dir.write_end_summary(self.output_dir, steps=self.progress.step, interrupted=self.result.interrupted,
                                      processes=self.world, checksums=checksums, shares=shares.tolist(),
                                      skipped_before=self.skipped_before, left_out=self.data.left_out_at_start,
                                      checkpoints=self.result.checkpoints, failed_saves=self.result.failed_saves,
                                      failed_samples=self.drawer.failed_samples, final_saved=self.result.final_saved,
                                      exit_status=self._exit_status(), bad_files=self.bad_pairs.named)
        self.result.exit_status = self._exit_status()
        bar.close()
        self.telemetry.close()
        self.sample_log.close()
        # the main process may still be writing the final model: tearing the process group down
        # under it aborted another process now and then (~1 run in 10 with two CPU processes)
        end_processes(self.accelerator, self.result.exit_status, release=self._drop_wrapped_unet)
        self.result.steps = self.progress.step

    def _drop_wrapped_unet(self) -> None:
        """The run's holders of the DDP-wrapped UNet, dropped at its end (processes.end_processes says why);
        the trained weights stay in bare_unet."""
        self.unet = self.step = None

    def _exit_status(self) -> int:
        return run_dir.exit_status(stopped=self.result.interrupted, failed_saves=len(self.result.failed_saves),
                                   final_saved=self.result.final_saved, stop_saved=self.result.stop_saved)


def train(config: TrainConfig, interrupt_after_batches: int | None = None) -> TrainResult:
    """Train as ``config`` says. ``interrupt_after_batches`` acts like a SIGTERM arriving after that
    many micro-batches of this start (tests use it to stop a run at an exact point)."""
    return TrainingRun(config, interrupt_after_batches).run()


def main(argv: list[str] | None = None) -> int:
    """The script's entry point; its exit status is run_dir.ExitStatus (the README's table)."""
    from .config import ConfigError, parse_train_args

    try:
        config = parse_train_args(argv)
        run = TrainingRun(config)
    except StoppedBeforeStart as stop:
        print(run_dir.stopped_before_start_line(stop.signal_name), file=sys.stderr)
        return ExitStatus.STOPPED
    except (ConfigError, TrainingError, SetupError, RunDirError, RunLockedError, FileNotFoundError) as error:
        print_error(str(error))
        return ExitStatus.REFUSED
    try:
        return run.run().exit_status
    except TrainingError as error:  # a problem met during training, named in its message
        print_error(str(error))
        return ExitStatus.HALTED
