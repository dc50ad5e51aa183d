"""The training loop: sidecar pairs -> UNet steps, with checkpoints, samples, logs and exact resume.

One optimizer step = ``gradient_accum`` micro-batches (accelerate's accumulate). Per-step metrics
stay on the device and are read back once per ``log_every`` steps; NaN/Inf gradients make the
optimizer skip its step on the device, with no host sync.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from . import models
from . import run_dir
from .bad_data import BadPairLedger, TrainingError, examples, reference_shapes
from .checkpoint_sampler import CheckpointSampler, SetupError, model_problem, scale_problem, single_file_problem
from .cli import print_error
from .config import TrainConfig, config_to_dict
from .layers import LayerSelection, apply_layer_selection
from .loader import (CachedPairDataset, EpochOrder, NoisePlan, RefillingBatchReader, RunBatches,
                     make_loader, make_training_loader)
from .objective import DiffusionObjective, FlowMatchingObjective, flow_shift_for, objective_kind
from .optim import build_lr_schedule, build_optimizer
from .resume import Progress, data_identity, optimizer_identity, resume_problem
from .run_dir import ARGS_FILE, SUMMARY_FILE, TRIGGER_FILE, ExitStatus, RunDirError  # noqa: F401  (their old home)
from .sidecar import IMAGE_LATENT_KEY, TEXT_EMBEDDING_KEY, SidecarError, empty_prompt_path, read_sidecar
from .step import TrainStep, UpdateCheck
from .text_encoding import pad_text_embeddings
from .telemetry import StepHealth, Telemetry, qk_weight_parameters
from .tree import UNREADABLE_SHAPE, PairIndex, index_training_pairs, record_latent_shapes

VALIDATION_EPOCH = -1  # the noise key of held-out pairs: the same draws at every evaluation
REPEATED_SIGNAL_SECONDS = 2.0  # torchrun forwards a Ctrl-C the terminal already delivered
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


def _build_objective(config: TrainConfig):
    """The objective the model's scheduler config (or --objective) names, with the run's options."""
    try:
        scheduler = models.load_training_scheduler(config.pretrained_model, config.prediction_type,
                                                   config.zero_terminal_snr, config.single_file_config)
        kind = objective_kind(scheduler, config.objective)
        common = dict(snr_gamma=config.noise_gamma if config.use_snr else None, loss_type=config.loss_type,
                      huber_c=config.huber_c, min_timestep=config.min_timestep, max_timestep=config.max_timestep)
        if kind == "flow":
            return FlowMatchingObjective(int(scheduler.config.num_train_timesteps), min_sigma=config.min_sigma,
                                         timestep_sampling=config.timestep_sampling, logit_mean=config.logit_mean,
                                         logit_std=config.logit_std, shift=flow_shift_for(scheduler, config.flow_shift),
                                         **common)
        if config.timestep_sampling != "uniform" or config.flow_shift is not None:
            raise ValueError("--timestep_sampling/--flow_shift are flow-matching options; this model trains DDPM "
                             "(add --objective flow to train it as a flow model)")
        return DiffusionObjective(scheduler, **common)
    except ValueError as error:
        raise TrainingError(str(error)) from None


def _forced_embedding(config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """--force_txtcache's embedding as a batch of one, padded by the pad rule as the collate pads."""
    if config.force_txtcache is None:
        return None
    try:
        embedding = read_sidecar(config.force_txtcache, TEXT_EMBEDDING_KEY, ndim=2)
    except (SidecarError, OSError) as error:
        raise TrainingError(f"--force_txtcache: {error}") from None
    return pad_text_embeddings([embedding], config.force_toklen)


def _layer_selection(config: TrainConfig) -> LayerSelection:
    return LayerSelection(**{f.name: getattr(config, f.name) for f in dataclasses.fields(LayerSelection)})


def _weights_checksum(unet: torch.nn.Module) -> torch.Tensor:
    """One float64 number per process that differs if the processes' weights differ."""
    with torch.no_grad():
        tensors = [p.detach().double() for p in unet.parameters()]
        norms = torch.stack(torch._foreach_norm(tensors))
        weights = torch.arange(1, len(tensors) + 1, dtype=torch.float64, device=norms.device)
        return (norms * weights).sum()


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


class TrainingRun:
    """The state of one run and the loop over it; ``train()`` is the entry point."""

    def __init__(self, config: TrainConfig, interrupt_after_batches: int | None = None):
        self.config = config
        self.interrupt_after_batches = interrupt_after_batches
        self.output_dir = Path(config.output_dir)
        # refused before anything heavy loads, by every process, so that all of them stop together
        run_dir.check_output_dir(self.output_dir)
        self.resume_from = run_dir.resolve_resume(config.resume, self.output_dir)
        problem = (model_problem(config.pretrained_model) or scale_problem(config)
                   or single_file_problem(config)
                   or models.folder_code_problem(config.pretrained_model, config.is_custom))
        if problem:
            raise TrainingError(problem)
        self.accelerator = _make_accelerator(config)
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        if self.is_main:
            run_dir.archive_settings(self.output_dir, config_to_dict(config), config.copy_config)
            ckpt.remove_partial_saves(self.output_dir)
        self._load_data()
        self._load_model()
        self.progress = self._restore() if self.resume_from is not None else Progress()
        self.health = StepHealth(self.device, self.progress.skipped_steps)
        self.sampler = CheckpointSampler(config, self.device) if self.is_main else None
        self._prepare_saves()
        self.telemetry = Telemetry(self.output_dir / "tensorboard" if self.is_main else None, self.device)
        if self.sampler is not None:
            self.sampler.telemetry = self.telemetry
        self.result = TrainResult(output_dir=self.output_dir, steps=self.progress.step)
        self.failed_saves_in_a_row = 0
        self.saved_step: int | None = None  # the step of the last checkpoint this start saved
        self.stopping = False
        self.epoch_save_pending = False
        self.sample_id_sum = 0  # of the pairs this process trained on: proves the processes' shares differ
        self.sample_count = 0
        self.skipped_before = self.progress.skipped_samples  # bad pairs passed over by earlier starts
        self.bad_pairs = BadPairLedger(config.max_bad_fraction, config.aspect_buckets)  # ... and by this start

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
        self.left_out_at_start = 0
        if config.aspect_buckets:
            index = self._index_buckets(index)
        self.checks = reference_shapes(index, with_latent=not config.aspect_buckets)
        self.train_index, self.validation_index = _split_validation(index, config.validation_split, config.seed)
        if config.validation_dir:
            self.validation_index, _ = index_training_pairs(config.validation_dir, config.imgcache_suffix,
                                                            config.txtcache_suffix)
            if len(self.validation_index) == 0:
                raise TrainingError(f"--validation_dir {config.validation_dir}: no sample has both sidecars there")
            if config.aspect_buckets:
                record_latent_shapes(self.validation_index, IMAGE_LATENT_KEY)  # unreadable ones: named at val/loss
        self.pairs_fingerprint = self.train_index.fingerprint()
        self.order = EpochOrder(len(self.train_index), config.batch_size, config.seed, self.rank, self.world,
                                buckets=self.train_index.shape_ids if config.aspect_buckets else None,
                                groups=self.train_index.root_ids() if config.data_balance == "equal" else None,
                                balance=config.data_balance)
        if self.is_main and config.aspect_buckets:
            self._print_buckets()
        if self.is_main and config.data_balance == "equal":
            sizes = [len(members) for members in self.order.group_members]
            print(f"[train] --data_balance equal: {len(config.train_data_dir)} folder(s) holding "
                  f"{', '.join(map(str, sizes))} pairs; each gives {max(sizes)} draws to every epoch"
                  f"{'' if len(sizes) == len(config.train_data_dir) else ' (folders without pairs give none)'}",
                  file=sys.stderr)
        self.batches_per_epoch = self.order.batches_per_epoch()
        if self.batches_per_epoch == 0:
            raise TrainingError(f"{len(self.train_index)} samples are fewer than one batch of "
                                f"{config.batch_size} per process")
        self.total_steps = config.max_optimizer_steps(self.batches_per_epoch)

    def _index_buckets(self, index: PairIndex) -> PairIndex:
        """Record every latent's shape from its header (a thread pool); the unreadable are named and left out."""
        started = time.perf_counter()
        unreadable = record_latent_shapes(index, IMAGE_LATENT_KEY)
        if self.is_main:
            for path, reason in unreadable:
                print(f"[train] left out {path}: {reason}", file=sys.stderr)
            print(f"[train] --aspect_buckets: read {len(index)} latent headers in "
                  f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
        if len(unreadable) == len(index) or len(unreadable) > self.config.max_bad_fraction * len(index):
            raise TrainingError(f"{len(unreadable)} of {len(index)} latents could not be read (more than "
                                f"--max_bad_fraction {self.config.max_bad_fraction}), e.g. {examples(unreadable)}")
        if not unreadable:
            return index
        self.left_out_at_start = len(unreadable)
        return index.subset(i for i in range(len(index)) if index.shape_ids[i] != UNREADABLE_SHAPE)

    def _print_buckets(self) -> None:
        counts = self.order.bucket_sizes.tolist()
        described = []
        for number in sorted(range(len(counts)), key=lambda n: -counts[n]):
            shape, count = self.train_index.shapes[number], counts[number]
            if count:
                note = "" if count >= self.config.batch_size else " (fewer than a batch: not trained)"
                described.append(f"{_shape_text(shape)}: {count}{note}")
        print(f"[train] {len(described)} aspect buckets (latent shape: pairs): " + ", ".join(described),
              file=sys.stderr)

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
        self.objective = _build_objective(config).to(self.device)
        self.plan = NoisePlan(seed=config.seed, noise_offset=config.noise_offset, caption_dropout=config.caption_dropout,
                              empty_embeddings=_empty_prompt_embeddings(config) if config.caption_dropout else [])
        self.vae_scale = config.vae_scaling_factor or models.read_vae_scaling_factor(config.pretrained_model,
                                                                                     config.single_file_config)
        self.optimizer = build_optimizer(config.optimizer, self.trainable, config.learning_rate, tuple(config.betas),
                                         config.weight_decay, bf16_weights=config.bf16_weights)
        # stepped by hand once per optimizer step (accelerate would step it once per process), or once
        # per epoch with --scheduler_at_epoch, when its length and warm-up count epochs
        warmup, length = config.warmup_optimizer_steps(self.batches_per_epoch), self.total_steps
        if config.scheduler_at_epoch:
            steps_per_epoch = self.batches_per_epoch / config.gradient_accum
            warmup, length = round(warmup / steps_per_epoch), math.ceil(length / steps_per_epoch)
        self.lr_schedule = build_lr_schedule(config.scheduler, self.optimizer, warmup, length, config.min_learning_rate,
                                             config.num_cycles, config.rex_start_factor, config.rex_end_factor)
        self.unet, self.optimizer = accelerator.prepare(unet, self.optimizer)
        self.bare_unet = accelerator.unwrap_model(self.unet)
        self.step = TrainStep(accelerator, self.unet, self.optimizer, self.objective, self.trainable,
                              qk_weight_parameters(self.bare_unet), vae_scale=self.vae_scale,
                              text_scale=config.text_scaling_factor, gradient_clip=config.gradient_clip,
                              channels_last=config.channels_last, compile_unet=config.compile,
                              gradient_topk=config.gradient_topk, forced_embedding=_forced_embedding(config))
        self.ema = None
        if self.is_main:
            total = sum(p.numel() for p in self.bare_unet.parameters())
            print(f"[train] {len(self.train_index)} training pairs"
                  f"{f', {len(self.validation_index)} held out' if self.validation_index else ''}; "
                  f"{self.batches_per_epoch} batches/epoch/process x {self.world} process(es); {self.total_steps} "
                  f"optimizer steps; trainable parameters: {sum(p.numel() for p in self.trainable):,} "
                  f"of {total:,}", file=sys.stderr)

    def _prepare_saves(self) -> None:
        """Refuse now what would make a save or a sample fail later (the main process checks: it alone
        saves); the other processes stop with it rather than wait for it at the first step."""
        refusal = None
        if self.sampler is not None:
            try:
                self.sampler.prepare(self.bare_unet)
            except SetupError as error:
                refusal = error
        if self.world > 1:
            flag = torch.tensor([float(refusal is not None)], device=self.device)
            if self.accelerator.reduce(flag, reduction="sum").item() and refusal is None:
                raise TrainingError("the main process refused the start (its message says why)")
        if refusal is not None:
            raise refusal

    def _identities(self) -> tuple[dict, dict]:
        """(data, optimizer) identities of this run, as a checkpoint records them (see resume.py)."""
        return (data_identity(len(self.train_index), self.world, self.config.batch_size, self.config.seed,
                              self.pairs_fingerprint, aspect_buckets=self.config.aspect_buckets,
                              data_balance=self.config.data_balance),
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
        try:
            return self._run()
        except TrainingError as error:  # halted by a problem met in training: keep what it logged
            if self.is_main:
                self.telemetry.close()
                summary = {"steps": self.progress.step, "halted": str(error), "checkpoints":
                           [str(p) for p in self.result.checkpoints], "failed_saves": self.result.failed_saves,
                           "exit_status": ExitStatus.HALTED}
                try:
                    run_dir.write_summary(self.output_dir, summary)
                except OSError:
                    pass  # the error itself is what the user must read
            raise

    def _run(self) -> TrainResult:
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
            if self.result.gave_up_saving:
                pass  # said when it happened; a final save would fail like the others
            elif self.result.interrupted:
                self.result.stop_saved = self._save("interrupted")
                if self.is_main and self.result.stop_saved:
                    print(f"[train] stopped at step {self.progress.step}; continue with --resume", file=sys.stderr)
                elif self.is_main:
                    print(f"[train] stopped at step {self.progress.step}, but its checkpoint could not be saved; "
                          f"{self._newest_saved()}", file=sys.stderr)
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
        dataset = CachedPairDataset(self.train_index, self.plan, checks=self.checks)
        reader = RefillingBatchReader(dataset, self.order, token_length=config.force_toklen)
        batches = RunBatches(self.order, progress.epoch, progress.batch_in_epoch)
        loader = make_training_loader(reader, batches, config.num_workers, pin_memory=self.device.type == "cuda")
        micro_batches = 0
        for batch in loader:
            progress.batch_in_epoch += 1
            micro_batches += 1
            if self.interrupt_after_batches is not None and micro_batches >= self.interrupt_after_batches:
                stop.requested = True
            self.bad_pairs.record(batch)
            stepped = self._train_on(batch, bar)
            if progress.batch_in_epoch == self.batches_per_epoch:
                progress.epoch += 1
                progress.batch_in_epoch = 0
                self._after_epoch()
            if stepped and (self._after_step(stop) or progress.step >= self.total_steps):
                break
        del loader  # stops the workers

    def _skipped_samples(self) -> torch.Tensor:
        """Bad pairs passed over by the whole run so far, as a device scalar (an all-reduce with
        several processes, so every process must call it at the same point)."""
        here = torch.tensor(float(self.bad_pairs.skipped), device=self.device)
        if self.world > 1:
            here = self.accelerator.reduce(here, reduction="sum")
        return here + self.skipped_before

    def _train_on(self, batch, bar) -> bool:
        """One micro-batch; True when it completed an optimizer step."""
        config, accelerator, progress = self.config, self.accelerator, self.progress
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
        if not config.scheduler_at_epoch:
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
            "unet/L2_norm": check.weight_norm,
            **self.health.window_scalars(),
            "train/skipped_samples": self._skipped_samples(),
            "train/epoch": torch.tensor(progress.epoch + progress.batch_in_epoch / self.batches_per_epoch),
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
        return stop_now or self.result.gave_up_saving

    def _after_epoch(self) -> None:
        config = self.config
        if config.learning_rate_decay:
            self.lr_schedule.base_lrs = [max(0.0, lr - config.learning_rate_decay) for lr in self.lr_schedule.base_lrs]
        if config.scheduler_at_epoch:  # after the decay, so the next epoch's LR includes it
            self.lr_schedule.step()
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

    def _save(self, reason: str) -> bool:
        """Save a checkpoint of this step; True when it is on disk (on every process alike)."""
        step = self.progress.step
        if self.saved_step == step:
            return True  # this step is saved already
        self.progress.skipped_samples = int(self._skipped_samples().item())  # saves are rare: one read is fine
        self.accelerator.wait_for_everyone()
        failed = False
        if self.is_main:
            path = self.sampler.save(self.bare_unet, step, self._training_state(), self.ema, self.trainable)
            failed = path is None
            if path is not None:
                self.result.checkpoints.append(path)
                if reason != "interrupted":
                    self._sample(path)
                ckpt.prune_checkpoints(self.output_dir, self.config.keep_checkpoints)
                tqdm.write(f"[train] saved {path} ({reason})")
        if self.world > 1:  # saves are rare: one all-reduce tells every process how the main one's went
            flag = torch.tensor([float(failed)], device=self.device)
            failed = bool(self.accelerator.reduce(flag, reduction="sum").item())
        self._count_save(step, reason, failed)
        if self.validation_index is not None and not self.config.validation_steps and reason != "interrupted":
            self._validate(step)
        self.accelerator.wait_for_everyone()
        return not failed

    def _count_save(self, step: int, reason: str, failed: bool) -> None:
        """Keep the record of failed saves, and give up after --max_failed_saves of them in a row."""
        if not failed:
            self.saved_step = step
            self.failed_saves_in_a_row = 0
            return
        self.result.failed_saves.append(step)
        if reason in ("final", "interrupted"):
            return  # the run ends here anyway; the exit status says the save failed
        self.failed_saves_in_a_row += 1
        limit = self.config.max_failed_saves
        if self.failed_saves_in_a_row >= limit:
            self.result.gave_up_saving = True
            if self.is_main:
                print(f"[train] {self.failed_saves_in_a_row} checkpoint saves in a row failed (limit "
                      f"--max_failed_saves {limit}); stopping at step {step} rather than training on with "
                      f"nothing to show. {self._newest_saved()}", file=sys.stderr)
        elif self.is_main:
            tqdm.write(f"[train] training goes on ({self.failed_saves_in_a_row} of --max_failed_saves {limit} "
                       "failed saves in a row)")

    def _newest_saved(self) -> str:
        newest = ckpt.latest_checkpoint(self.output_dir)
        return (f"The newest checkpoint on disk is {newest} (continue with --resume once there is room)."
                if newest is not None else "No checkpoint of this run was saved.")

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
                                        epoch=VALIDATION_EPOCH,
                                        checks=dataclasses.replace(self.checks, latent_shape=None)
                                        if self.config.aspect_buckets else self.checks)
            shape_ids = self.validation_index.shape_ids
            by_shape: dict[int, list[int]] = {}  # each batch one shape (one group without buckets)
            for i in range(len(dataset)):
                if shape_ids is None or shape_ids[i] != UNREADABLE_SHAPE:
                    by_shape.setdefault(0 if shape_ids is None else shape_ids[i], []).append(i)
            batches = [order[i:i + self.config.batch_size] for _, order in sorted(by_shape.items())
                       for i in range(0, len(order), self.config.batch_size)]
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
        if self.is_main:
            self._publish_final()
        if self.world > 1:  # every process exits with the same status
            flag = torch.tensor([float(self.result.final_saved)], device=self.device)
            self.result.final_saved = bool(self.accelerator.reduce(flag, reduction="sum").item())
        checksum = _weights_checksum(self.bare_unet).reshape(1).to(self.device)
        shares = torch.tensor([float(self.sample_id_sum), float(self.sample_count), float(self.bad_pairs.skipped)],
                              dtype=torch.float64, device=self.device).reshape(1, 3)
        checksums = self.accelerator.gather(checksum)
        shares = self.accelerator.gather(shares)
        if self.is_main:
            checksums = checksums.cpu().tolist()
            if len(set(checksums)) > 1:
                print(f"[train] WARNING: the processes' weights differ at the end: {checksums}", file=sys.stderr)
            summary = {"steps": self.progress.step, "interrupted": self.result.interrupted,
                       "processes": self.world, "process_weight_checksums": checksums,
                       "process_sample_id_sums": shares[:, 0].cpu().tolist(),
                       "process_sample_counts": shares[:, 1].cpu().tolist(),
                       "skipped_samples": self.skipped_before + int(shares[:, 2].sum().item()),
                       "left_out_at_start": self.left_out_at_start,
                       "checkpoints": [str(p) for p in self.result.checkpoints],
                       "failed_saves": self.result.failed_saves, "failed_samples": self.sampler.failed_samples,
                       "final_model_saved": self.result.final_saved,
                       "exit_status": self._exit_status()}
            try:
                run_dir.write_summary(self.output_dir, summary)
            except OSError as error:  # a full disk: the status and the log still say what happened
                print(f"[train] could not write {SUMMARY_FILE} ({error.strerror or error})", file=sys.stderr)
        self.result.exit_status = self._exit_status()
        bar.close()
        self.telemetry.close()
        # the main process may still be writing the final model: tearing the process group down
        # under it aborted another process now and then (~1 run in 10 with two CPU processes)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        self.result.steps = self.progress.step


    def _publish_final(self) -> None:
        """The final model at the top of output_dir, when the run reached its end and saved it."""
        if self.result.interrupted or self.result.gave_up_saving:
            return
        if self.saved_step != self.progress.step:
            print(f"[train] the final checkpoint could not be saved (see above). {self._newest_saved()}",
                  file=sys.stderr)
            return
        try:
            ckpt.publish_final(ckpt.checkpoint_dir(self.output_dir, self.progress.step), self.output_dir)
        except OSError as error:
            print(f"[train] could not write the final model into {self.output_dir} ({error.strerror or error}); "
                  f"its checkpoint {ckpt.checkpoint_dir(self.output_dir, self.progress.step).name} is whole",
                  file=sys.stderr)
            return
        self.result.final_saved = True
        print(f"[train] final model in {self.output_dir}", file=sys.stderr)

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
    except (ConfigError, TrainingError, SetupError, RunDirError, FileNotFoundError) as error:
        print_error(str(error))
        return ExitStatus.REFUSED
    try:
        return run.run().exit_status
    except TrainingError as error:  # a problem met during training, named in its message
        print_error(str(error))
        return ExitStatus.HALTED
