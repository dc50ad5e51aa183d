"""Drawing a flow-matching model with a Stable Diffusion-shaped pipeline: the one home for what it needs.

diffusers' ``StableDiffusionPipeline`` (and our T5 pipeline) drive any scheduler the DDPM way: they
scale the first latents by ``scheduler.init_noise_sigma``, pass each input through
``scheduler.scale_model_input`` and give the UNet ``scheduler.timesteps``. FlowMatchEulerDiscreteScheduler
has no ``init_noise_sigma`` (diffusers 0.42 raises AttributeError), and its timesteps are
s x num_train_timesteps, where flow training (``objective.FlowMatchingObjective``) tells the UNet
s x (num_train_timesteps - 1). ``drawable`` wraps such a scheduler so a pipeline draws what training
taught: noise unscaled, inputs unscaled, UNet timestep s x (T - 1); the Euler step itself is the scheduler's.

Checkpoints of a flow run are saved as ``StableDiffusionFlowPipeline``: a ``StableDiffusionPipeline`` that
draws through ``drawable``. The scheduler it saves is a plain FlowMatchEulerDiscreteScheduler. Importing
this module names the class on diffusers, so after ``import cachetrain.flow``
``DiffusionPipeline.from_pretrained(checkpoint)`` loads and draws such a folder.
"""

from __future__ import annotations

import contextlib
import importlib

from diffusers import StableDiffusionPipeline

from .schedulers import is_flow_scheduler


class FlowDrawingScheduler:
    """A flow-matching scheduler as a DDPM-shaped pipeline asks for it; everything else is the scheduler's own."""

    init_noise_sigma = 1.0  # flow sampling starts from the noise itself (s = 1)

    def __init__(self, scheduler):
        object.__setattr__(self, "scheduler", scheduler)

    def __getattr__(self, name: str):
        return getattr(self.scheduler, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.scheduler, name, value)

    def scale_model_input(self, sample, timestep=None):
        return sample  # x_s is what the UNet trained on

    def set_timesteps(self, *args, **kwargs) -> None:
        """The scheduler's sigmas; the timesteps the UNet is given are s x (T - 1), as in training.
        ``step`` finds its place among these same timesteps, so step and UNet agree."""
        self.scheduler.set_timesteps(*args, **kwargs)
        last = int(self.scheduler.config.num_train_timesteps) - 1
        self.scheduler.timesteps = self.scheduler.sigmas[:-1] * last


def drawable(scheduler):
    """``scheduler`` ready for a Stable Diffusion-shaped pipeline: a flow one wrapped, any other as it is."""
    if isinstance(scheduler, FlowDrawingScheduler) or not is_flow_scheduler(scheduler):
        return scheduler
    return FlowDrawingScheduler(scheduler)


@contextlib.contextmanager
def drawing_scheduler(pipeline, scheduler=None):
    """``pipeline`` draws with ``scheduler`` (default its own), made drawable, inside the block; its own
    scheduler (the one checkpoints save) is back after it."""
    own = pipeline.scheduler
    pipeline.scheduler = drawable(scheduler if scheduler is not None else own)
    try:
        yield pipeline
    finally:
        pipeline.scheduler = own


class StableDiffusionFlowPipeline(StableDiffusionPipeline):
    """diffusers' Stable Diffusion pipeline for a UNet trained with flow matching (rectified flow)."""

    def __call__(self, *args, **kwargs):
        with drawing_scheduler(self):
            return super().__call__(*args, **kwargs)


def flow_pipeline(pipeline):
    """A flow model's pipeline as it is saved and drawn: a plain StableDiffusionPipeline becomes a
    StableDiffusionFlowPipeline sharing its parts; another class (the T5 pipeline, which draws through
    ``drawable`` itself, or a folder's own code) stays as it is."""
    if type(pipeline) is not StableDiffusionPipeline:
        return pipeline
    flow = StableDiffusionFlowPipeline(**pipeline.components,
                                       requires_safety_checker=pipeline.config.requires_safety_checker)
    flow.register_to_config(_name_or_path=pipeline.config.get("_name_or_path"))
    return flow


def _register_with_diffusers() -> None:
    # diffusers resolves a folder's _class_name on its own module: naming the class there lets
    # DiffusionPipeline.from_pretrained (and every loader in cachetrain) open a flow checkpoint
    import diffusers

    if getattr(diffusers, StableDiffusionFlowPipeline.__name__, None) is not StableDiffusionFlowPipeline:
        setattr(diffusers, StableDiffusionFlowPipeline.__name__, StableDiffusionFlowPipeline)


_register_with_diffusers()

# The kept path: saved folders name this module "cachetrain.flow" and diffusers looks that name up among
# imported modules, so loading this code imports it too (cachetrain/flow.py, this module by that name).
importlib.import_module("cachetrain.flow")
