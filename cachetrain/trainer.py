"""The training loop: sidecar pairs -> UNet steps, with checkpoints, samples, logs and exact resume."""

from __future__ import annotations

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
from .config import TrainConfig, config_to_dict
from .loader import CachedPairDataset, epoch_batches, make_loader
from .objective import DiffusionObjective
from .optim import build_lr_schedule, build_optimizer
from .sampling import draw_samples
from .telemetry import Telemetry, mean_abs_grad, qk_weight_parameters
from .tree import index_training_pairs

TRIGGER_FILE = "trigger.checkpoint"


class TrainingError(RuntimeError):
    """A problem with the run's inputs or setup, stated for the user."""


@dataclass
class Progress:
    """Where the run is: restored exactly on resume."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    skipped_samples: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(step=self.step, epoch=self.epoch, batch_in_epoch=self.batch_in_epoch,
                    skipped_samples=self.skipped_samples)


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
        if self.requested:  # second signal: the user really wants out
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"[train] {signal.Signals(signum).name} received: saving a checkpoint after this step")

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test runner thread)
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _make_accelerator(config: TrainConfig):
    from accelerate import Accelerator

    use_cuda = torch.cuda.is_available()
    mixed_precision = "bf16" if use_cuda and not config.fp32 else "no"  # bf16 on CPU is 6-7x slower
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=config.gradient_accum,
                              cpu=not use_cuda)
    launched_world = int(os.environ.get("WORLD_SIZE", "1"))
    if launched_world > 1 and accelerator.num_processes != launched_world:
        raise TrainingError(f"launched as {launched_world} processes but the accelerator sees "
                            f"{accelerator.num_processes}: each would train alone on all the data")
    if use_cuda and config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def _archive_settings(config: TrainConfig, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    args = {"argv": sys.argv, "config": config_to_dict(config)}
    (output_dir / "train_args.json").write_text(json.dumps(args, indent=2), encoding="utf-8")
    if config.copy_config:
        shutil.copy2(config.copy_config, output_dir / Path(config.copy_config).name)


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
        raise TrainingError(f"--resume {path}: not a resumable checkpoint folder")
    return path


def train(config: TrainConfig) -> TrainResult:
    accelerator = _make_accelerator(config)
    device = accelerator.device
    is_main = accelerator.is_main_process
    output_dir = Path(config.output_dir)
    if is_main:
        _archive_settings(config, output_dir)

    index, unpaired = index_training_pairs(config.train_data_dir, config.imgcache_suffix, config.txtcache_suffix)
    if len(index) == 0:
        raise TrainingError(f"no sample has both a {config.imgcache_suffix} and a {config.txtcache_suffix} "
                            f"sidecar under {config.train_data_dir}; run the cache scripts first")
    if is_main and (unpaired["image_only"] or unpaired["text_only"]):
        print(f"[train] left out {unpaired['image_only']} latents without text and "
              f"{unpaired['text_only']} texts without latents", file=sys.stderr)
    world, rank = accelerator.num_processes, accelerator.process_index
    batches_per_epoch = len(index) // world // config.batch_size
    if batches_per_epoch == 0:
        raise TrainingError(f"{len(index)} samples are fewer than one batch of {config.batch_size} per process")
    total_steps = config.max_optimizer_steps(batches_per_epoch)

    unet = models.load_unet(config.pretrained_model)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    if is_main:
        print(f"[train] {len(index)} samples, {batches_per_epoch} batches/epoch/process, {total_steps} steps, "
              f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trainable parameters", file=sys.stderr)
    objective = DiffusionObjective(models.load_training_scheduler(config.pretrained_model),
                                   snr_gamma=config.noise_gamma if config.use_snr else None,
                                   noise_offset=config.noise_offset).to(device)
    vae_scale = config.vae_scaling_factor or models.read_vae_scaling_factor(config.pretrained_model)
    optimizer = build_optimizer(config.optimizer, trainable, config.learning_rate, tuple(config.betas),
                                config.weight_decay, device)
    # The schedule is stepped by hand once per optimizer step (accelerate would step it per process).
    lr_schedule = build_lr_schedule(config.scheduler, optimizer, config.warmup_steps, total_steps,
                                    config.min_learning_rate)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    qk_params = qk_weight_parameters(accelerator.unwrap_model(unet))
    noise_generator = torch.Generator(device=device).manual_seed(config.seed * 1000 + rank)

    progress = Progress()
    resume_from = _resolve_resume(config, output_dir)
    if resume_from is not None:
        state = ckpt.load_training_state(resume_from)
        from diffusers import UNet2DConditionModel

        trained = UNet2DConditionModel.from_pretrained(resume_from, subfolder=ckpt.TRAINED_COMPONENT)
        accelerator.unwrap_model(unet).load_state_dict(trained.state_dict())
        del trained
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        ckpt.restore_rng_states(state["rng"][min(rank, len(state["rng"]) - 1)] if isinstance(state["rng"], list)
                                else state["rng"], noise_generator)
        progress = Progress(**state["progress"])
        if is_main:
            print(f"[train] resumed from {resume_from} at step {progress.step}", file=sys.stderr)

    telemetry = Telemetry(output_dir / "tensorboard" if is_main else None, device)
    dataset = CachedPairDataset(index)
    sampler = CheckpointSampler(config, device, accelerator) if is_main else None
    result = TrainResult(output_dir=output_dir, steps=progress.step)
    bar = tqdm(total=total_steps, initial=progress.step, unit="step", disable=not is_main or config.no_progress,
               dynamic_ncols=True)

    def save(reason: str) -> None:
        accelerator.wait_for_everyone()
        if is_main:
            state = {"optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(),
                     "rng": ckpt.rng_states(noise_generator), "progress": progress.as_dict(),
                     "config": json.dumps(config_to_dict(config))}
            path = sampler.save(accelerator.unwrap_model(unet), progress.step, state, reason)
            if path is not None:
                result.checkpoints.append(path)
                ckpt.prune_checkpoints(output_dir, config.keep_checkpoints)
        accelerator.wait_for_everyone()

    with StopSignal() as stop:
        while progress.step < total_steps and not stop.requested:
            batches = epoch_batches(len(index), config.batch_size, config.seed, progress.epoch, rank, world)
            loader = make_loader(dataset, batches[progress.batch_in_epoch:], config.num_workers,
                                 pin_memory=device.type == "cuda", token_length=config.force_toklen)
            for batch in loader:
                progress.batch_in_epoch += 1
                if batch is None:
                    continue
                progress.skipped_samples += batch.skipped
                with accelerator.accumulate(unet):
                    latents = batch.latents.to(device, non_blocking=True).float() * vae_scale
                    context = batch.embeddings.to(device, non_blocking=True).float() * config.text_scaling_factor
                    noise, timesteps = objective.draw_noise_and_timesteps(latents, noise_generator)
                    noisy = objective.add_noise(latents, noise, timesteps)
                    mask = batch.attention_mask  # None unless some captions were padded (T5)
                    if mask is not None:
                        mask = mask.to(device, non_blocking=True)
                    with accelerator.autocast():
                        prediction = unet(noisy, timesteps, context, encoder_attention_mask=mask).sample
                    loss, raw_loss = objective.losses(prediction, objective.target(latents, noise, timesteps),
                                                      timesteps)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.gradient_clip > 0:
                        accelerator.clip_grad_norm_(trainable, config.gradient_clip)
                    logging_now = accelerator.sync_gradients and (progress.step + 1) % config.log_every == 0
                    qk_grads = mean_abs_grad(qk_params) if logging_now else None
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                telemetry.add_micro_step(loss, raw_loss, latents.shape[0] * world)
                if not accelerator.sync_gradients:
                    continue
                lr_schedule.step()
                progress.step += 1
                bar.update(1)
                if logging_now:
                    values = telemetry.flush(progress.step, lr_schedule.get_last_lr()[0],
                                             {"train/qk_grads_av": qk_grads})
                    result.logged.append({"step": progress.step, **values})
                    bar.set_postfix(loss=f"{values['train/loss']:.4f}", img_s=f"{values['train/images_per_sec']:.1f}")
                if _periodic_save_due(config, progress.step, total_steps) or _trigger_pulled(output_dir):
                    save("periodic")
                elif config.sample_steps and progress.step % config.sample_steps == 0 and is_main:
                    sampler.sample(accelerator.unwrap_model(unet), progress.step, output_dir / f"samples-{progress.step:05d}")
                if progress.step >= total_steps or stop.requested:
                    break
            else:
                progress.epoch += 1
                progress.batch_in_epoch = 0
                if config.save_on_epoch and progress.step < total_steps:
                    save("epoch")
        result.interrupted = stop.requested and progress.step < total_steps
        if result.interrupted:
            save("interrupted")
            if is_main:
                print(f"[train] stopped at step {progress.step}; continue with --resume", file=sys.stderr)
        elif not any(p.name == ckpt.checkpoint_dir(output_dir, progress.step).name for p in result.checkpoints):
            save("final")
    if is_main and not result.interrupted:
        final = ckpt.checkpoint_dir(output_dir, progress.step)
        sampler.publish_final(final, output_dir)
        print(f"[train] final model in {output_dir}", file=sys.stderr)
    bar.close()
    telemetry.close()
    accelerator.end_training()
    result.steps = progress.step
    return result


def _periodic_save_due(config: TrainConfig, step: int, total_steps: int) -> bool:
    return bool(config.save_steps) and step % config.save_steps == 0 and step >= config.save_start and step < total_steps


def _trigger_pulled(output_dir: Path) -> bool:
    trigger = output_dir / TRIGGER_FILE
    if trigger.exists():
        trigger.unlink(missing_ok=True)
        return True
    return False


class CheckpointSampler:
    """Owns the parts that do not train: saves checkpoints around the UNet and draws samples."""

    def __init__(self, config: TrainConfig, device: torch.device, accelerator):
        self.config = config
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
        return paths

    def save(self, unet, step: int, training_state: dict, reason: str) -> Path | None:
        destination = ckpt.checkpoint_dir(Path(self.config.output_dir), step)
        try:
            ckpt.save_frozen_components(self._pipeline_for(unet), self.frozen_dir)
            ckpt.save_checkpoint(destination, unet, self.frozen_dir, training_state)
        except OSError as error:
            previous = ckpt.latest_checkpoint(Path(self.config.output_dir))
            tqdm.write(f"[train] could not save checkpoint at step {step} ({error}); "
                       f"the previous checkpoint {previous} is intact. Training goes on.")
            return None
        if reason != "interrupted":
            self.sample(unet, step, destination)
        tqdm.write(f"[train] saved {destination} ({reason})")
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


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError, parse_train_args

    try:
        config = parse_train_args(argv)
        train(config)
    except (ConfigError, TrainingError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
