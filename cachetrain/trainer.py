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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from . import models
from .config import TrainConfig, config_to_dict
from .layers import LayerSelection, apply_layer_selection
from .loader import CachedPairDataset, NoisePlan, RunBatches, make_loader
from .objective import DiffusionObjective
from .optim import build_lr_schedule, build_optimizer
from .sampling import draw_samples
from .sidecar import TEXT_EMBEDDING_KEY, read_sidecar
from .step import TrainStep
from .telemetry import Telemetry, qk_weight_parameters
from .text_cache import empty_prompt_path
from .tree import PairIndex, index_training_pairs

TRIGGER_FILE = "trigger.checkpoint"
SUMMARY_FILE = "train_summary.json"
VALIDATION_EPOCH = -1  # the noise key of held-out pairs: the same draws at every evaluation


class TrainingError(RuntimeError):
    """A problem with the run's inputs or setup, stated for the user."""


@dataclass
class Progress:
    """Where the run is: restored exactly on resume."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    skipped_samples: int = 0  # unreadable pairs left out

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    checkpoints: list[Path] = field(default_factory=list)
    logged: list[dict[str, float]] = field(default_factory=list)
    interrupted: bool = False


class StopSignal:
    """Turns Ctrl-C / SIGTERM into 'save a checkpoint after this step and exit'."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, _frame):
        if self.requested:  # a second signal: the user really wants out
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"[train] {signal.Signals(signum).name} received: saving a checkpoint after this step")

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

    use_cuda = torch.cuda.is_available()
    # bf16 autocast on CUDA; on CPU bf16 has no fast kernels (6-7x slower), so fp32 there
    mixed_precision = "bf16" if use_cuda and not config.fp32 and not config.bf16_weights else "no"
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=config.gradient_accum,
                              cpu=not use_cuda)
    check_process_count(int(os.environ.get("WORLD_SIZE", "1")), accelerator.num_processes)
    if use_cuda and config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def _archive_settings(config: TrainConfig, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    args = {"argv": sys.argv, "config": config_to_dict(config)}
    (output_dir / "train_args.json").write_text(json.dumps(args, indent=2), encoding="utf-8")
    if config.copy_config:
        target = output_dir / Path(config.copy_config).name
        if Path(config.copy_config).resolve() != target.resolve():
            shutil.copy2(config.copy_config, target)


def _resolve_resume(config: TrainConfig, output_dir: Path) -> Path | None:
    if not config.resume:
        return None
    if config.resume == "latest":
        found = ckpt.latest_checkpoint(output_dir)
        if found is None:
            print(f"[train] --resume: no checkpoint in {output_dir} yet, starting fresh", file=sys.stderr)
        return found
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
        if not os.path.exists(path):
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


class StepHealth:
    """Device-side counters of gradient health, read back only when logging."""

    def __init__(self, device: torch.device):
        zero = torch.zeros((), device=device)
        self.bad_in_a_row, self.bad_total, self.grad_norm_sum = zero.clone(), zero.clone(), zero.clone()
        self.steps_in_window = 0

    def record(self, check) -> None:
        self.bad_in_a_row = (self.bad_in_a_row + 1) * check.found_inf  # resets to 0 on a good step
        self.bad_total += check.found_inf
        self.grad_norm_sum += torch.nan_to_num(check.grad_norm, nan=0.0, posinf=0.0, neginf=0.0)
        self.steps_in_window += 1

    def window_scalars(self) -> dict[str, torch.Tensor]:
        scalars = {"train/grad_norm": self.grad_norm_sum / max(self.steps_in_window, 1),
                   "train/skipped_steps": self.bad_total.clone(), "_bad_in_a_row": self.bad_in_a_row.clone()}
        self.grad_norm_sum.zero_()
        self.steps_in_window = 0
        return scalars


class TrainingRun:
    """The state of one run and the loop over it; ``train()`` is the entry point."""

    def __init__(self, config: TrainConfig, interrupt_at_step: int | None = None):
        self.config = config
        self.interrupt_at_step = interrupt_at_step
        self.accelerator = _make_accelerator(config)
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.output_dir = Path(config.output_dir)
        if self.is_main:
            _archive_settings(config, self.output_dir)
        self.resume_from = _resolve_resume(config, self.output_dir)
        self._load_data()
        self._load_model()

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
        self.batches_per_epoch = len(self.train_index) // self.world // config.batch_size
        if self.batches_per_epoch == 0:
            raise TrainingError(f"{len(self.train_index)} samples are fewer than one batch of "
                                f"{config.batch_size} per process")
        self.total_steps = config.max_optimizer_steps(self.batches_per_epoch)

    def _load_model(self) -> None:
        config, accelerator = self.config, self.accelerator
        weight_dtype = torch.bfloat16 if config.bf16_weights else torch.float32
        unet = models.load_unet(config.pretrained_model, dtype=weight_dtype)
        self.trainable = apply_layer_selection(unet, _layer_selection(config), config.seed)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if config.channels_last:
            unet.to(memory_format=torch.channels_last)
        unet.train()
        scheduler = models.load_training_scheduler(config.pretrained_model)
        self.objective = DiffusionObjective(scheduler, snr_gamma=config.noise_gamma if config.use_snr else None)
        self.objective.to(self.device)
        self.plan = NoisePlan(seed=config.seed, num_train_timesteps=self.objective.num_train_timesteps,
                              noise_offset=config.noise_offset, caption_dropout=config.caption_dropout,
                              empty_embeddings=_empty_prompt_embeddings(config) if config.caption_dropout else [])
        self.vae_scale = config.vae_scaling_factor or models.read_vae_scaling_factor(config.pretrained_model)
        self.optimizer = build_optimizer(config.optimizer, self.trainable, config.learning_rate, tuple(config.betas),
                                         config.weight_decay, self.device, bf16_weights=config.bf16_weights)
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
        if config.ema_decay:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.trainable, decay=config.ema_decay, foreach=True)
        if self.is_main:
            total = sum(p.numel() for p in self.bare_unet.parameters())
            print(f"[train] {len(self.train_index)} training pairs"
                  f"{f', {len(self.validation_index)} held out' if self.validation_index else ''}; "
                  f"{self.batches_per_epoch} batches/epoch/process x {self.world} process(es); {self.total_steps} "
                  f"optimizer steps; trainable parameters: {sum(p.numel() for p in self.trainable):,} "
                  f"of {total:,}", file=sys.stderr)

    def _restore(self, progress: Progress) -> Progress:
        state = ckpt.load_training_state(self.resume_from)
        from diffusers import UNet2DConditionModel

        trained = UNet2DConditionModel.from_pretrained(self.resume_from, subfolder=ckpt.TRAINED_COMPONENT)
        self.bare_unet.load_state_dict(trained.state_dict())
        del trained
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        ckpt.restore_rng_states(state["rng"])
        restored = Progress(**state["progress"])
        if self.is_main:
            print(f"[train] resumed from {self.resume_from} at step {restored.step}", file=sys.stderr)
        return restored

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> TrainResult:
        config = self.config
        self.progress = self._restore(Progress()) if self.resume_from is not None else Progress()
        self.telemetry = Telemetry(self.output_dir / "tensorboard" if self.is_main else None, self.device)
        self.sampler = CheckpointSampler(config, self.device, self.telemetry) if self.is_main else None
        self.result = TrainResult(output_dir=self.output_dir, steps=self.progress.step)
        bar = tqdm(total=self.total_steps, initial=self.progress.step, unit="step",
                   disable=not self.is_main or config.no_progress, dynamic_ncols=True)
        with StopSignal() as stop:
            if self.validation_index is not None and self.progress.step == 0:
                self._validate(0)
            if self.progress.step < self.total_steps:
                self._train(stop, bar)
            self.result.interrupted = stop.requested and self.progress.step < self.total_steps
            if self.result.interrupted:
                self._save("interrupted")
                if self.is_main:
                    print(f"[train] stopped at step {self.progress.step}; continue with --resume", file=sys.stderr)
            elif not any(p.name == ckpt.checkpoint_dir(self.output_dir, self.progress.step).name
                         for p in self.result.checkpoints):
                self._save("final")
        self._finish(bar)
        return self.result

    def _train(self, stop: StopSignal, bar) -> None:
        """Micro-batches until --max_steps optimizer steps are done or a stop is requested."""
        config, accelerator, progress = self.config, self.accelerator, self.progress
        dataset = CachedPairDataset(self.train_index, self.plan)
        batches = RunBatches(len(self.train_index), config.batch_size, config.seed, self.rank, self.world,
                             progress.epoch, progress.batch_in_epoch)
        loader = make_loader(dataset, batches, config.num_workers, pin_memory=self.device.type == "cuda",
                             token_length=config.force_toklen)
        health = StepHealth(self.device)
        for batch in loader:
            progress.batch_in_epoch += 1
            if batch is not None:
                progress.skipped_samples += batch.skipped
                with accelerator.accumulate(self.unet):
                    loss, raw_loss = self.step.forward_backward(batch)
                    if accelerator.sync_gradients:
                        logging_now = (progress.step + 1) % config.log_every == 0
                        check = self.step.prepare_update(want_qk_grads=logging_now)
                    self.step.update()
                self.telemetry.add_micro_step(loss, raw_loss, batch.latents.shape[0] * self.world)
                if accelerator.sync_gradients:
                    self.lr_schedule.step()
                    if self.ema is not None:
                        self.ema.step(self.trainable)
                    progress.step += 1
                    bar.update(1)
                    health.record(check)
                    if logging_now:
                        self._log(health, check, bar)
                    if self.interrupt_at_step is not None and progress.step >= self.interrupt_at_step:
                        stop.requested = True
                    self._after_step()
            if progress.batch_in_epoch == self.batches_per_epoch:
                progress.epoch += 1
                progress.batch_in_epoch = 0
                self._after_epoch()
            if progress.step >= self.total_steps or stop.requested:
                break
        del loader  # stops the workers

    def _log(self, health: StepHealth, check, bar) -> None:
        """Read the window's metrics back (one transfer), log them, and stop on a run of bad steps."""
        progress, config = self.progress, self.config
        values = self.telemetry.flush(progress.step, self.lr_schedule.get_last_lr()[0], {
            "train/qk_grads_av": check.qk_grads,
            **health.window_scalars(),
            "train/epoch": torch.tensor(progress.epoch + progress.batch_in_epoch / self.batches_per_epoch),
        })
        self.result.logged.append({"step": progress.step, **values})
        bar.set_postfix(loss=f"{values['train/loss']:.4f}", img_s=f"{values['train/images_per_sec']:.1f}")
        bad_in_a_row = int(values["_bad_in_a_row"])
        if bad_in_a_row >= config.max_bad_steps:
            raise TrainingError(
                f"{bad_in_a_row} optimizer steps in a row had NaN/Inf gradients (limit --max_bad_steps "
                f"{config.max_bad_steps}); stopping at step {progress.step}. Lower the learning rate or check "
                "the cached data (python -m cachetrain.inspect).")

    def _after_step(self) -> None:
        config, step = self.config, self.progress.step
        periodic = bool(config.save_steps) and step % config.save_steps == 0 and config.save_start <= step < self.total_steps
        if periodic or self._trigger_pulled():
            self._save("periodic" if periodic else "requested")
        elif config.sample_steps and step % config.sample_steps == 0 and self.is_main:
            self._sample(self.output_dir / f"samples-{step:05d}")
        if self.validation_index is not None and config.validation_steps and step % config.validation_steps == 0:
            self._validate(step)

    def _after_epoch(self) -> None:
        config = self.config
        if config.learning_rate_decay:
            self.lr_schedule.base_lrs = [max(0.0, lr - config.learning_rate_decay) for lr in self.lr_schedule.base_lrs]
        if config.save_on_epoch and self.progress.step < self.total_steps:
            self._save("epoch")

    def _trigger_pulled(self) -> bool:
        """``touch output_dir/trigger.checkpoint`` asks for a checkpoint; every process must agree."""
        pulled = torch.zeros((), device=self.device)
        if self.is_main and (self.output_dir / TRIGGER_FILE).exists():
            (self.output_dir / TRIGGER_FILE).unlink(missing_ok=True)
            pulled += 1
        if self.world > 1:
            pulled = self.accelerator.reduce(pulled, reduction="sum")
        return bool(pulled.item()) if self.world > 1 or self.is_main else False

    # -- checkpoints, samples, validation ---------------------------------------------------

    def _training_state(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict(),
                 "rng": ckpt.rng_states(), "progress": self.progress.as_dict(),
                 "config": json.dumps(config_to_dict(self.config))}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def _save(self, reason: str) -> None:
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
        if self.ema is not None:
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
            unet = self.bare_unet
            was_training = unet.training
            unet.eval()
            with torch.no_grad():
                for batch in make_loader(dataset, batches, 0, pin_memory=False, token_length=self.config.force_toklen):
                    if batch is None:
                        continue
                    latents = batch.latents.to(self.device).float() * self.vae_scale
                    noise, timesteps = batch.noise.to(self.device), batch.timesteps.to(self.device)
                    context = batch.embeddings.to(self.device).float() * self.config.text_scaling_factor
                    dtype = unet.dtype
                    mask = None if batch.attention_mask is None else batch.attention_mask.to(self.device)
                    with self.accelerator.autocast():
                        prediction = unet(self.objective.add_noise(latents, noise, timesteps).to(dtype), timesteps,
                                          context.to(dtype), encoder_attention_mask=mask).sample
                    target = self.objective.target(latents, noise, timesteps)
                    per_sample = (prediction.float() - target).square().flatten(1).mean(1)
                    total += per_sample.sum()
                    count += per_sample.numel()
            unet.train(was_training)
            value = (total / max(count, 1)).item()
            self.telemetry.add_scalar("val/loss", value, step)
            self.result.logged.append({"step": step, "val/loss": value})
        self.accelerator.wait_for_everyone()

    def _finish(self, bar) -> None:
        checksums = self.accelerator.gather(_weights_checksum(self.bare_unet).reshape(1).to(self.device))
        if self.is_main:
            checksums = checksums.cpu().tolist()
            if len(set(checksums)) > 1:
                print(f"[train] WARNING: the processes' weights differ at the end: {checksums}", file=sys.stderr)
            summary = {"steps": self.progress.step, "interrupted": self.result.interrupted,
                       "processes": self.world, "process_weight_checksums": checksums,
                       "skipped_samples": self.progress.skipped_samples,
                       "checkpoints": [str(p) for p in self.result.checkpoints]}
            (self.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
            if not self.result.interrupted:
                self.sampler.publish_final(ckpt.checkpoint_dir(self.output_dir, self.progress.step), self.output_dir)
                print(f"[train] final model in {self.output_dir}", file=sys.stderr)
        bar.close()
        self.telemetry.close()
        self.accelerator.end_training()
        self.result.steps = self.progress.step


def train(config: TrainConfig, interrupt_at_step: int | None = None) -> TrainResult:
    """Train as ``config`` says. ``interrupt_at_step`` behaves like a SIGTERM after that step (for tests)."""
    return TrainingRun(config, interrupt_at_step).run()


class CheckpointSampler:
    """Owns the parts that do not train: saves checkpoints around the UNet and draws samples."""

    def __init__(self, config: TrainConfig, device: torch.device, telemetry: Telemetry | None = None):
        self.config = config
        self.telemetry = telemetry
        self.device = device
        self.frozen_dir = Path(config.output_dir) / ckpt.FROZEN_DIR_NAME
        self.autocast_dtype = torch.bfloat16 if device.type == "cuda" and not config.fp32 else None
        self._pipeline = None

    def _pipeline_for(self, unet):
        if self._pipeline is None:
            self._pipeline = models.load_pipeline_around(self.config.pretrained_model, unet, self.config.is_custom)
        self._pipeline.unet = unet
        return self._pipeline

    def sample(self, unet, step: int, out_dir: Path) -> list[Path]:
        if not self.config.sample_prompt:
            return []
        pipeline = self._pipeline_for(unet)
        was_training = unet.training
        unet.eval()
        others = [m for name, m in pipeline.components.items() if isinstance(m, torch.nn.Module) and name != "unet"]
        for module in others:
            module.to(self.device)
        try:
            paths = draw_samples(pipeline, self.config.sample_prompt, out_dir, step=step, seed=self.config.sample_seed,
                                 sampler_steps=self.config.sampler_steps, guidance_scale=self.config.guidance_scale,
                                 device=self.device, autocast_dtype=self.autocast_dtype)
        finally:
            if self.config.cpu_offload or self.device.type == "cuda":
                for module in others:  # give the memory back to training
                    module.to("cpu")
            unet.train(was_training)
        if self.telemetry is not None:
            self.telemetry.add_images(step, dict(zip(self.config.sample_prompt, paths)))
        return paths

    def save(self, unet, step: int, training_state: dict, ema=None, trainable=None) -> Path | None:
        destination = ckpt.checkpoint_dir(Path(self.config.output_dir), step)
        try:
            ckpt.save_frozen_components(self._pipeline_for(unet), self.frozen_dir)
            ckpt.save_checkpoint(destination, unet, self.frozen_dir, training_state,
                                 ema_weights=_ema_writer(ema, trainable, unet))
        except OSError as error:
            previous = ckpt.latest_checkpoint(Path(self.config.output_dir))
            tqdm.write(f"[train] could not save checkpoint at step {step} ({error}); "
                       f"the previous checkpoint {previous} is intact. Training goes on.")
            return None
        return destination

    def publish_final(self, final_checkpoint: Path, output_dir: Path) -> None:
        """The final model at the top of output_dir, as a pipeline folder (hard links to the last checkpoint)."""
        for entry in final_checkpoint.iterdir():
            if entry.name == ckpt.TRAINING_STATE_FILE or entry.suffix == ".png":
                continue
            target = output_dir / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            if entry.is_dir():
                ckpt.link_tree(entry, target)
            else:
                shutil.copy2(entry, target)


def _ema_writer(ema, trainable, unet):
    """A function that saves the EMA weights as a UNet folder, or None without EMA."""
    if ema is None:
        return None

    def write(folder: Path) -> None:
        ema.store(trainable)
        ema.copy_to(trainable)
        try:
            unet.save_pretrained(folder, safe_serialization=True)
        finally:
            ema.restore(trainable)

    return write


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError, parse_train_args

    try:
        config = parse_train_args(argv)
        train(config)
    except (ConfigError, TrainingError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
