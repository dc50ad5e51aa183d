"""The training loop: sidecar pairs -> UNet steps, with checkpoints, samples, logs and exact resume.

One optimizer step = ``gradient_accum`` micro-batches (accelerate's accumulate). Per-step metrics
stay on the device and are read back once per ``log_every`` steps; NaN/Inf gradients make the
optimizer skip its step on the device, with no host sync.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from . import models
from .checkpoint_sampler import CheckpointSampler, scale_problem, single_file_problem
from .config import TrainConfig, config_to_dict
from .layers import LayerSelection, apply_layer_selection
from .loader import CachedPairDataset, NoisePlan, RunBatches, make_loader
from .objective import DiffusionObjective
from .optim import build_lr_schedule, build_optimizer
from .resume import Progress, data_identity, optimizer_identity, resume_problem
from .sidecar import TEXT_EMBEDDING_KEY, empty_prompt_path, read_sidecar
from .step import TrainStep, UpdateCheck
from .telemetry import StepHealth, Telemetry, qk_weight_parameters
from .tree import PairIndex, index_training_pairs

TRIGGER_FILE = "trigger.checkpoint"
SUMMARY_FILE = "train_summary.json"
ARGS_FILE = "train_args.json"
VALIDATION_EPOCH = -1  # the noise key of held-out pairs: the same draws at every evaluation
REPEATED_SIGNAL_SECONDS = 2.0  # torchrun forwards a Ctrl-C the terminal already delivered


class TrainingError(RuntimeError):
    """A problem with the run's inputs or setup, stated for the user."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    checkpoints: list[Path] = field(default_factory=list)
    logged: list[dict[str, float]] = field(default_factory=list)
    interrupted: bool = False


class StopSignal:
    """Turns Ctrl-C / SIGTERM into 'save a checkpoint at the next optimizer step and exit'.

    The same signal again within REPEATED_SIGNAL_SECONDS is the launcher forwarding it, not the user;
    a later one means 'out now'.
    """

    def __init__(self):
        self.requested = False
        self._first_at = 0.0
        self._previous = {}

    def _handle(self, signum, _frame):
        now = time.monotonic()
        if self.requested:
            if now - self._first_at < REPEATED_SIGNAL_SECONDS:
                return
            raise KeyboardInterrupt
        self.requested, self._first_at = True, now
        tqdm.write(f"[train] {signal.Signals(signum).name} received: saving a checkpoint at the next step")

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_process_count(launched_world: int, accelerator_world: int) -> None:
    """A launch that asked for N processes must train as N, not as N independent copies."""
    if launched_world > 1 and accelerator_world != launched_world:
        raise TrainingError(f"launched as {launched_world} processes but training sees {accelerator_world}: "
                            "each would train alone on all the data. On CPU, torchrun needs the accelerator "
                            "in CPU mode (this trainer does that when no GPU is visible); check the launcher.")


def _make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    use_cuda = torch.cuda.is_available()
    # bf16 autocast on CUDA; on CPU bf16 has no fast kernels (6-7x slower), so fp32 there
    mixed_precision = "bf16" if use_cuda and not config.fp32 and not config.bf16_weights else "no"
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=config.gradient_accum,
                              cpu=not use_cuda)
    check_process_count(int(os.environ.get("WORLD_SIZE", "1")), accelerator.num_processes)
    # the same seed on every process: stochastic rounding must draw alike so weights stay identical
    set_seed(config.seed)
    if use_cuda and config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def _archive_settings(config: TrainConfig, output_dir: Path) -> None:
    """Append this start's arguments to train_args.json and keep the settings file (every version)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    args_file = output_dir / ARGS_FILE
    starts = json.loads(args_file.read_text(encoding="utf-8")) if args_file.exists() else []
    starts.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv, "config": config_to_dict(config)})
    args_file.write_text(json.dumps(starts, indent=2), encoding="utf-8")
    if config.copy_config:
        source = Path(config.copy_config)
        target = output_dir / source.name
        number = 1
        while target.exists() and target.read_bytes() != source.read_bytes():
            target = output_dir / f"{source.stem}.{number}{source.suffix}"
            number += 1
        if not target.exists():
            shutil.copy2(source, target)


def _resolve_resume(config: TrainConfig, output_dir: Path) -> Path | None:
    existing = ckpt.latest_checkpoint(output_dir)
    if not config.resume:
        if existing is not None:
            raise TrainingError(f"{output_dir} already holds checkpoints of a run (newest: {existing.name}); "
                                "continue it with --resume, or choose another --output_dir")
        return None
    if config.resume == "latest":
        if existing is None:
            print(f"[train] --resume: no checkpoint in {output_dir} yet, starting fresh", file=sys.stderr)
        return existing
    path = Path(config.resume)
    if not (path / ckpt.TRAINING_STATE_FILE).exists():
        raise TrainingError(f"--resume {path}: not a resumable checkpoint folder (no {ckpt.TRAINING_STATE_FILE})")
    return path


def _split_validation(index: PairIndex, fraction: float, seed: int) -> tuple[PairIndex, PairIndex | None]:
    """Hold out a seeded, fixed fraction of the pairs (the same pairs on every run with this seed)."""
    if not fraction:
        return index, None
    order = torch.randperm(len(index), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    held_out = max(1, round(fraction * len(index)))
    return index.subset(sorted(order[held_out:])), index.subset(sorted(order[:held_out]))


def _empty_prompt_embeddings(config: TrainConfig) -> list[torch.Tensor]:
    embeddings = []
    for root in config.train_data_dir:
        path = empty_prompt_path(root, config.txtcache_suffix)
        if not path.exists():
            raise TrainingError(f"--caption_dropout needs the empty prompt's embedding {path}; "
                                "run the text cache script on that data root again to write it")
        embeddings.append(read_sidecar(path, TEXT_EMBEDDING_KEY, ndim=2))
    return embeddings


def _layer_selection(config: TrainConfig) -> LayerSelection:
    return LayerSelection(**{f.name: getattr(config, f.name) for f in dataclasses.fields(LayerSelection)})


def _weights_checksum(unet: torch.nn.Module) -> torch.Tensor:
    """One float64 number per process that differs if the processes' weights differ."""
    with torch.no_grad():
        tensors = [p.detach().double() for p in unet.parameters()]
        norms = torch.stack(torch._foreach_norm(tensors))
        weights = torch.arange(1, len(tensors) + 1, dtype=torch.float64, device=norms.device)
        return (norms * weights).sum()


class TrainingRun:
    """The state of one run and the loop over it; ``train()`` is the entry point."""

    def __init__(self, config: TrainConfig, interrupt_after_batches: int | None = None):
        self.config = config
        self.interrupt_after_batches = interrupt_after_batches
        self.accelerator = _make_accelerator(config)
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.output_dir = Path(config.output_dir)
        problem = scale_problem(config) or single_file_problem(config)
        if problem:
            raise TrainingError(problem)
        self.resume_from = _resolve_resume(config, self.output_dir)
        if self.is_main:
            _archive_settings(config, self.output_dir)
            ckpt.remove_partial_saves(self.output_dir)
        self._load_data()
        self._load_model()
        self.progress = self._restore() if self.resume_from is not None else Progress()
        self.health = StepHealth(self.device, self.progress.skipped_steps)
        self.telemetry = Telemetry(self.output_dir / "tensorboard" if self.is_main else None, self.device)
        self.sampler = CheckpointSampler(config, self.device, self.telemetry) if self.is_main else None
        self.result = TrainResult(output_dir=self.output_dir, steps=self.progress.step)
        self.stopping = False
        self.epoch_save_pending = False
        self.sample_id_sum = 0  # of the pairs this process trained on: proves the processes' shares differ
        self.sample_count = 0

    # -- set-up -----------------------------------------------------------------------------

    def _load_data(self) -> None:
        config = self.config
        index, unpaired = index_training_pairs(config.train_data_dir, config.imgcache_suffix, config.txtcache_suffix)
        if len(index) == 0:
            raise TrainingError(f"no sample has both a {config.imgcache_suffix} and a {config.txtcache_suffix} "
                                f"sidecar under {config.train_data_dir}; run the cache scripts first")
        if self.is_main and (unpaired["image_only"] or unpaired["text_only"]):
            print(f"[train] left out {unpaired['image_only']} latents without text and "
                  f"{unpaired['text_only']} texts without latents", file=sys.stderr)
        self.train_index, self.validation_index = _split_validation(index, config.validation_split, config.seed)
        if config.validation_dir:
            self.validation_index, _ = index_training_pairs(config.validation_dir, config.imgcache_suffix,
                                                            config.txtcache_suffix)
            if len(self.validation_index) == 0:
                raise TrainingError(f"--validation_dir {config.validation_dir}: no sample has both sidecars there")
        self.batches_per_epoch = len(self.train_index) // self.world // config.batch_size
        if self.batches_per_epoch == 0:
            raise TrainingError(f"{len(self.train_index)} samples are fewer than one batch of "
                                f"{config.batch_size} per process")
        self.total_steps = config.max_optimizer_steps(self.batches_per_epoch)

    def _load_model(self) -> None:
        config, accelerator = self.config, self.accelerator
        weight_dtype = torch.bfloat16 if config.bf16_weights else torch.float32
        unet = models.load_unet(config.pretrained_model, dtype=weight_dtype,
                                single_file_config=config.single_file_config)
        try:
            self.trainable = apply_layer_selection(unet, _layer_selection(config), config.seed)
        except ValueError as error:
            raise TrainingError(str(error)) from None
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if config.channels_last:
            unet.to(memory_format=torch.channels_last)
        unet.train()
        scheduler = models.load_training_scheduler(config.pretrained_model, config.single_file_config)
        self.objective = DiffusionObjective(scheduler, snr_gamma=config.noise_gamma if config.use_snr else None)
        self.objective.to(self.device)
        self.plan = NoisePlan(seed=config.seed, num_train_timesteps=self.objective.num_train_timesteps,
                              noise_offset=config.noise_offset, caption_dropout=config.caption_dropout,
                              empty_embeddings=_empty_prompt_embeddings(config) if config.caption_dropout else [])
        self.vae_scale = config.vae_scaling_factor or models.read_vae_scaling_factor(config.pretrained_model,
                                                                                     config.single_file_config)
        self.optimizer = build_optimizer(config.optimizer, self.trainable, config.learning_rate, tuple(config.betas),
                                         config.weight_decay, bf16_weights=config.bf16_weights)
        # stepped by hand once per optimizer step (accelerate would step it once per process)
        self.lr_schedule = build_lr_schedule(config.scheduler, self.optimizer, config.warmup_steps, self.total_steps,
                                             config.min_learning_rate)
        self.unet, self.optimizer = accelerator.prepare(unet, self.optimizer)
        self.bare_unet = accelerator.unwrap_model(self.unet)
        self.step = TrainStep(accelerator, self.unet, self.optimizer, self.objective, self.trainable,
                              qk_weight_parameters(self.bare_unet), vae_scale=self.vae_scale,
                              text_scale=config.text_scaling_factor, gradient_clip=config.gradient_clip,
                              channels_last=config.channels_last, compile_unet=config.compile)
        self.ema = None
        if self.is_main:
            total = sum(p.numel() for p in self.bare_unet.parameters())
            print(f"[train] {len(self.train_index)} training pairs"
                  f"{f', {len(self.validation_index)} held out' if self.validation_index else ''}; "
                  f"{self.batches_per_epoch} batches/epoch/process x {self.world} process(es); {self.total_steps} "
                  f"optimizer steps; trainable parameters: {sum(p.numel() for p in self.trainable):,} "
                  f"of {total:,}", file=sys.stderr)

    def _identities(self) -> tuple[dict, dict]:
        """(data, optimizer) identities of this run, as a checkpoint records them (see resume.py)."""
        return (data_identity(len(self.train_index), self.world, self.config.batch_size, self.config.seed),
                optimizer_identity(self.config.optimizer, self.bare_unet, self.trainable))

    def _make_ema(self, state: dict | None = None) -> None:
        """The EMA starts from the current (possibly resumed) weights; its shadow is fp32 even for bf16
        weights, whose resolution would swallow (1 - decay) * difference."""
        if not self.config.ema_decay:
            return
        from diffusers.training_utils import EMAModel

        self.ema = EMAModel(self.trainable, decay=self.config.ema_decay, foreach=True)
        if state is not None:
            self.ema.load_state_dict(state)
        self.ema.to(device=self.device, dtype=torch.float32)

    def _restore(self) -> Progress:
        state = ckpt.load_training_state(self.resume_from)
        problem = resume_problem(state, *self._identities(), self.resume_from)
        if problem:
            raise TrainingError(problem)
        trained = models.load_unet(str(self.resume_from), dtype=self.bare_unet.dtype)
        self.bare_unet.load_state_dict(trained.state_dict())
        del trained
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self._make_ema(state.get("ema"))
        ckpt.restore_rng_states(state["rng"])
        restored = Progress(**state["progress"])
        if self.is_main:
            print(f"[train] resumed from {self.resume_from} at step {restored.step}", file=sys.stderr)
        return restored

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> TrainResult:
        if self.ema is None:
            self._make_ema()
        bar = tqdm(total=self.total_steps, initial=self.progress.step, unit="step",
                   disable=not self.is_main or self.config.no_progress, dynamic_ncols=True)
        with StopSignal() as stop:
            if self.validation_index is not None and self.progress.step == 0:
                self._validate(0)
            if self.progress.step < self.total_steps:
                self._train(stop, bar)
            self.result.interrupted = self.stopping and self.progress.step < self.total_steps
            if self.result.interrupted:
                self._save("interrupted")
                if self.is_main:
                    print(f"[train] stopped at step {self.progress.step}; continue with --resume", file=sys.stderr)
            else:
                self._save("final")
        self._finish(bar)
        return self.result

    def _train(self, stop: StopSignal, bar) -> None:
        """Micro-batches until --max_steps optimizer steps are done or every process agreed to stop.

        Stops and saves happen only right after an optimizer step, so the saved data position never
        counts micro-batches whose gradients were not applied.
        """
        config, progress = self.config, self.progress
        dataset = CachedPairDataset(self.train_index, self.plan)
        batches = RunBatches(len(self.train_index), config.batch_size, config.seed, self.rank, self.world,
                             progress.epoch, progress.batch_in_epoch)
        loader = make_loader(dataset, batches, config.num_workers, pin_memory=self.device.type == "cuda",
                             token_length=config.force_toklen)
        micro_batches = 0
        for batch in loader:
            progress.batch_in_epoch += 1
            micro_batches += 1
            if self.interrupt_after_batches is not None and micro_batches >= self.interrupt_after_batches:
                stop.requested = True
            stepped = batch is not None and self._train_on(batch, bar)
            if batch is None and self.world > 1:
                raise TrainingError("every pair of a batch was unreadable (listed above); with several processes "
                                    "a process without a batch would stall the others. Fix or remove those files.")
            if progress.batch_in_epoch == self.batches_per_epoch:
                progress.epoch += 1
                progress.batch_in_epoch = 0
                self._after_epoch()
            if stepped and (self._after_step(stop) or progress.step >= self.total_steps):
                break
        del loader  # stops the workers

    def _train_on(self, batch, bar) -> bool:
        """One micro-batch; True when it completed an optimizer step."""
        config, accelerator, progress = self.config, self.accelerator, self.progress
        progress.skipped_samples += batch.skipped
        self.sample_id_sum += sum(batch.sample_ids)
        self.sample_count += len(batch.sample_ids)
        with accelerator.accumulate(self.unet):
            loss, raw_loss = self.step.forward_backward(batch)
            if accelerator.sync_gradients:
                logging_now = (progress.step + 1) % config.log_every == 0
                check = self.step.prepare_update(want_qk_grads=logging_now)
            self.step.update()
        self.telemetry.add_micro_step(loss, raw_loss, batch.latents.shape[0] * self.world)
        if not accelerator.sync_gradients:
            return False
        self.lr_schedule.step()
        if self.ema is not None:
            self.ema.step(self.trainable)
        progress.step += 1
        bar.update(1)
        self.health.record(check.found_inf, check.grad_norm)
        if logging_now:
            self._log(check, bar)
        return True

    def _log(self, check: UpdateCheck, bar) -> None:
        """Read the window's metrics back (one transfer), log them, and stop on a run of bad steps."""
        progress, config = self.progress, self.config
        values = self.telemetry.flush(progress.step, self.lr_schedule.get_last_lr()[0], {
            "train/qk_grads_av": check.qk_grads,
            **self.health.window_scalars(),
            "train/epoch": torch.tensor(progress.epoch + progress.batch_in_epoch / self.batches_per_epoch),
        })
        progress.skipped_steps = int(values["train/skipped_steps"])
        self.result.logged.append({"step": progress.step, **values})
        bar.set_postfix(loss=f"{values['train/loss']:.4f}", img_s=f"{values['train/images_per_sec']:.1f}")
        worst_run = int(values["_worst_bad_run"])
        if worst_run >= config.max_bad_steps:
            raise TrainingError(
                f"{worst_run} optimizer steps in a row had NaN/Inf gradients (limit --max_bad_steps "
                f"{config.max_bad_steps}); stopping at step {progress.step}. Lower the learning rate or check "
                "the cached data (python -m cachetrain.inspect).")

    def _agreed_requests(self, stop: StopSignal) -> tuple[bool, bool]:
        """(stop, save now) as every process agrees.

        One process may get a signal, and only the main one looks for the trigger file; with several
        processes they agree through one all-reduce, at logging steps only (a host sync), so that no
        other step waits on the device.
        """
        if self.world > 1 and self.progress.step % self.config.log_every:
            return False, False
        trigger = self.output_dir / TRIGGER_FILE
        wants_save = self.is_main and trigger.exists()  # a stat: on network storage, a round trip
        if self.world > 1:
            flags = torch.tensor([float(stop.requested), float(wants_save)], device=self.device)
            stop_now, save_now = (self.accelerator.reduce(flags, reduction="sum") > 0).tolist()
        else:
            stop_now, save_now = stop.requested, wants_save
        if save_now and self.is_main:
            trigger.unlink(missing_ok=True)
        self.stopping = self.stopping or stop_now
        return stop_now, save_now

    def _after_step(self, stop: StopSignal) -> bool:
        """Saves, samples and validation due after this optimizer step; True when the run must stop."""
        config, step = self.config, self.progress.step
        stop_now, save_now = self._agreed_requests(stop)
        periodic = bool(config.save_steps) and step % config.save_steps == 0 and config.save_start <= step < self.total_steps
        if (periodic or save_now or self.epoch_save_pending) and not stop_now:
            self._save("periodic" if periodic else "requested" if save_now else "epoch")
            self.epoch_save_pending = False
        elif config.sample_steps and step % config.sample_steps == 0 and self.is_main:
            self._sample(self.output_dir / f"samples-{step:05d}")
        if self.validation_index is not None and config.validation_steps and step % config.validation_steps == 0:
            self._validate(step)
        return stop_now

    def _after_epoch(self) -> None:
        config = self.config
        if config.learning_rate_decay:
            self.lr_schedule.base_lrs = [max(0.0, lr - config.learning_rate_decay) for lr in self.lr_schedule.base_lrs]
        # at the next optimizer step: an epoch may end inside an accumulation
        self.epoch_save_pending = config.save_on_epoch and self.progress.step < self.total_steps

    # -- checkpoints, samples, validation ---------------------------------------------------

    def _training_state(self) -> dict:
        self.progress.skipped_steps = int(self.health.bad_total.item())  # saves are rare: one read is fine
        data, optimizer = self._identities()
        state = {"optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict(),
                 "rng": ckpt.rng_states(), "progress": self.progress.as_dict(), "data": data,
                 "optimizer_identity": optimizer, "config": json.dumps(config_to_dict(self.config))}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def _save(self, reason: str) -> None:
        destination = ckpt.checkpoint_dir(self.output_dir, self.progress.step)
        if self.result.checkpoints and self.result.checkpoints[-1] == destination:
            return  # this step is saved already
        self.accelerator.wait_for_everyone()
        if self.is_main:
            path = self.sampler.save(self.bare_unet, self.progress.step, self._training_state(), self.ema,
                                     self.trainable)
            if path is not None:
                self.result.checkpoints.append(path)
                if reason != "interrupted":
                    self._sample(path)
                ckpt.prune_checkpoints(self.output_dir, self.config.keep_checkpoints)
                tqdm.write(f"[train] saved {path} ({reason})")
        if self.validation_index is not None and not self.config.validation_steps and reason != "interrupted":
            self._validate(self.progress.step)
        self.accelerator.wait_for_everyone()

    def _sample(self, out_dir: Path) -> None:
        if self.ema is not None:  # samples show the EMA weights
            self.ema.store(self.trainable)
            self.ema.copy_to(self.trainable)
        try:
            self.sampler.sample(self.bare_unet, self.progress.step, out_dir)
        finally:
            if self.ema is not None:
                self.ema.restore(self.trainable)

    def _validate(self, step: int) -> None:
        """val/loss: mean raw MSE over the held-out pairs at fixed noise and timesteps (main process)."""
        if self.is_main:
            dataset = CachedPairDataset(self.validation_index, dataclasses.replace(self.plan, fixed_timesteps=True,
                                                                                   caption_dropout=0.0),
                                        epoch=VALIDATION_EPOCH)
            order = list(range(len(dataset)))
            batches = [order[i:i + self.config.batch_size] for i in range(0, len(order), self.config.batch_size)]
            total, count = torch.zeros((), device=self.device), 0
            for batch in make_loader(dataset, batches, 0, pin_memory=False, token_length=self.config.force_toklen):
                if batch is not None:
                    errors = self.step.held_out_errors(batch)
                    total += errors.sum()
                    count += errors.numel()
            if count == 0:
                raise TrainingError("no held-out pair could be read for val/loss (see the files listed above)")
            value = (total / count).item()
            self.telemetry.add_scalar("val/loss", value, step)
            self.result.logged.append({"step": step, "val/loss": value})
        self.accelerator.wait_for_everyone()

    def _finish(self, bar) -> None:
        checksum = _weights_checksum(self.bare_unet).reshape(1).to(self.device)
        shares = torch.tensor([float(self.sample_id_sum), float(self.sample_count)], dtype=torch.float64,
                              device=self.device).reshape(1, 2)
        checksums = self.accelerator.gather(checksum)
        shares = self.accelerator.gather(shares)
        if self.is_main:
            checksums = checksums.cpu().tolist()
            if len(set(checksums)) > 1:
                print(f"[train] WARNING: the processes' weights differ at the end: {checksums}", file=sys.stderr)
            final = ckpt.checkpoint_dir(self.output_dir, self.progress.step)
            saved = bool(self.result.checkpoints) and self.result.checkpoints[-1] == final
            summary = {"steps": self.progress.step, "interrupted": self.result.interrupted,
                       "processes": self.world, "process_weight_checksums": checksums,
                       "process_sample_id_sums": shares[:, 0].cpu().tolist(),
                       "process_sample_counts": shares[:, 1].cpu().tolist(),
                       "skipped_samples": self.progress.skipped_samples,
                       "checkpoints": [str(p) for p in self.result.checkpoints]}
            (self.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
            if not self.result.interrupted and saved:
                ckpt.publish_final(final, self.output_dir)
                print(f"[train] final model in {self.output_dir}", file=sys.stderr)
            elif not self.result.interrupted:
                print(f"[train] the final checkpoint could not be saved (see above); the newest saved one is "
                      f"{ckpt.latest_checkpoint(self.output_dir)}", file=sys.stderr)
        bar.close()
        self.telemetry.close()
        # the main process may still be writing the final model: tearing the process group down
        # under it aborted another process now and then (~1 run in 10 with two CPU processes)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        self.result.steps = self.progress.step


def train(config: TrainConfig, interrupt_after_batches: int | None = None) -> TrainResult:
    """Train as ``config`` says. ``interrupt_after_batches`` acts like a SIGTERM arriving after that
    many micro-batches of this start (tests use it to stop a run at an exact point)."""
    return TrainingRun(config, interrupt_after_batches).run()


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError, parse_train_args

    try:
        config = parse_train_args(argv)
        train(config)
    except (ConfigError, TrainingError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
