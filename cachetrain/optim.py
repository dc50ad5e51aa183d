"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import torch


def build_optimizer(name: str, parameters, learning_rate: float, betas: tuple[float, float],
                    weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    parameters = [p for p in parameters if p.requires_grad]
    if name == "adamw":
        # fused on CUDA: one kernel for all parameters instead of a launch per tensor
        return torch.optim.AdamW(parameters, lr=learning_rate, betas=betas, weight_decay=weight_decay,
                                 fused=device.type == "cuda")
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(parameters, lr=learning_rate, betas=betas, weight_decay=weight_decay)
    if name == "adamw8":
        if device.type != "cuda":
            raise RuntimeError("--optimizer adamw8 needs CUDA (bitsandbytes 8-bit optimizers); use adamw on CPU")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise RuntimeError("--optimizer adamw8 needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(parameters, lr=learning_rate, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def build_lr_schedule(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                      min_lr_ratio: float = 0.0):
    """A transformers LR schedule; 'constant' with warm-up becomes constant_with_warmup."""
    from transformers import get_scheduler

    if name == "constant" and warmup_steps > 0:
        name = "constant_with_warmup"
    specific = {}
    if name == "cosine_with_min_lr":
        specific = {"min_lr_rate": min_lr_ratio}
    elif name == "warmup_stable_decay":
        specific = {"num_decay_steps": max(1, total_steps // 10)}
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         scheduler_specific_kwargs=specific)
