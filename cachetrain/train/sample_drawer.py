"""Drawing a run's samples (--sample_prompt, --sample_prompts_file) with the pipeline around the
training UNet: at each checkpoint and every --sample_steps. A prompts-file line may carry its own
seed, guidance, steps, size and negative prompt (models/prompts.py).

A prompt that cannot be drawn is reported with its reason and counted (train/failed_samples); training
goes on. What would make every sample fail is refused before step 1 (``check_sampler_steps`` and the
--sample_scheduler check at construction).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from ..cli import first_line
from .config import ConfigError, TrainConfig
from .frozen_parts import FrozenParts
from ..models.prompts import SamplePrompt, read_prompts_file
from ..models.sampling import build_sampling_scheduler, draw_samples
from .start_checks import SetupError, sample_scheduler_problem, sampler_steps_problem
from .step import bf16_autocast
from .telemetry import Telemetry


class SampleDrawer:
    def __init__(self, config: TrainConfig, device: torch.device, telemetry: Telemetry | None = None,
                 parts: FrozenParts | None = None):
        self.config = config
        self.telemetry = telemetry
        self.device = device
        self.parts = parts if parts is not None else FrozenParts(config)
        self.autocast_dtype = torch.bfloat16 if bf16_autocast(config, device.type, training=False) else None
        self.prompts = sample_prompts(config)
        problem = sample_scheduler_problem(config) if self.prompts else None
        if problem:  # refused before step 1, not at the first sample
            raise ConfigError(problem)
        self.failed_samples = 0  # prompts that could not be drawn, over the whole start

    def check_sampler_steps(self, pipeline) -> None:
        """Before step 1: --sampler_steps (and each prompt line's --s) tried on the scheduler that will
        draw, and each line's --w/--h against the VAE's factor; SetupError if one cannot work."""
        if not self.prompts:
            return
        drawing = self._drawing_scheduler(pipeline) or pipeline.scheduler
        for steps in sorted({self.config.sampler_steps} | {p.steps for p in self.prompts if p.steps is not None}):
            problem = sampler_steps_problem(drawing, steps)
            if problem:
                raise SetupError(problem if steps == self.config.sampler_steps
                                 else f"--sample_prompts_file: --s {steps}: {problem}")
        factor = getattr(pipeline, "vae_scale_factor", 1)
        for prompt in self.prompts:
            for letter, value in (("w", prompt.width), ("h", prompt.height)):
                if value is not None and value % factor:
                    raise SetupError(f"--sample_prompts_file: {prompt.prompt!r} --{letter} {value}: must be a "
                                     f"multiple of {factor} (the VAE's factor)")

    def _drawing_scheduler(self, pipeline):
        """The --sample_scheduler built from the pipeline's own config, or None for the pipeline's own."""
        name = self.config.sample_scheduler
        return build_sampling_scheduler(name, pipeline.scheduler.config) if name else None

    def sample(self, unet, step: int, out_dir: Path) -> list[Path]:
        """The samples of ``step``. A prompt that cannot be drawn (any error, CUDA out of memory
        included) is reported with its reason and counted (train/failed_samples); training goes on."""
        prompts = self.prompts
        if not prompts:
            return []
        failed: list[int] = []

        def report(index: int, prompt: str, error: Exception) -> None:
            failed.append(index)
            tqdm.write(f"[train] sample {index} at step {step} failed for prompt {prompt!r} "
                       f"({type(error).__name__}: {first_line(error)}); training goes on")

        was_training = unet.training
        paths: list[Path] = []
        try:
            pipeline = self.parts.around(unet)
            scheduler = self._drawing_scheduler(pipeline)
            unet.eval()
            others = [m for name, m in pipeline.components.items()
                      if isinstance(m, torch.nn.Module) and name != "unet"]
            try:
                for module in others:
                    module.to(self.device)
                paths = draw_samples(pipeline, prompts, out_dir, step=step, seed=self.config.sample_seed,
                                     sampler_steps=self.config.sampler_steps,
                                     guidance_scale=self.config.guidance_scale, device=self.device,
                                     autocast_dtype=self.autocast_dtype, token_length=self.config.force_toklen,
                                     scheduler=scheduler, scheduler_name=self.config.sample_scheduler,
                                     on_failure=report)
            finally:
                if self.config.cpu_offload:  # give the memory back to training until the next samples
                    for module in others:
                        module.to("cpu")
        except Exception as error:  # outside one prompt: loading the parts, moving them to the device
            failed = list(range(len(prompts)))
            tqdm.write(f"[train] samples at step {step} failed ({type(error).__name__}: {first_line(error)}); "
                       "training goes on")
        finally:
            unet.train(was_training)
        drawn = [prompt.prompt for index, prompt in enumerate(prompts) if index not in failed]
        if failed:
            self.failed_samples += len(failed)
            if self.device.type == "cuda":  # what a failed (out-of-memory) sample held goes back to training
                torch.cuda.empty_cache()
        if self.telemetry is not None:
            if failed:
                self.telemetry.add_scalar("train/failed_samples", self.failed_samples, step)
            if drawn:
                try:
                    self.telemetry.add_images(step, dict(zip(drawn, paths)))
                except Exception as error:  # the PNGs are on disk; only their copy in the logs is missing
                    tqdm.write(f"[train] samples of step {step} not logged to tensorboard "
                               f"({type(error).__name__}: {first_line(error)})")
        return paths


def sample_prompts(config: TrainConfig) -> list[SamplePrompt]:
    """--sample_prompt's prompts (as written), then --sample_prompts_file's lines (validated when the
    flags were parsed)."""
    return [SamplePrompt(prompt) for prompt in config.sample_prompt] + (
        read_prompts_file(config.sample_prompts_file) if config.sample_prompts_file else [])
