"""What kind of schedule a model has, and the names of the samplers samples are drawn with.

Light on purpose (no torch, no diffusers): the flag parser reads the sampler names before torch loads,
and every stage asks whether a scheduler is a flow-matching one.
"""

from __future__ import annotations

# the samplers that draw samples, in the trainer and in sample_images.py alike (built in sampling.py)
SAMPLE_SCHEDULERS = ("ddim", "euler", "euler_a", "dpmpp_2m", "pndm", "flow_euler")


def is_flow_config(scheduler_config) -> bool:
    """Whether a scheduler config (as saved in a model's scheduler/) names a flow-matching class."""
    return str(dict(scheduler_config).get("_class_name", "")).startswith("FlowMatch")


def is_flow_scheduler(scheduler) -> bool:
    """A flow-matching schedule has no cumulative alphas (and no add_noise) to diffuse with."""
    return not hasattr(scheduler, "alphas_cumprod")
