"""The optimizers that come from their maintained packages, by the names the trainer takes.

Each is built with only the betas, weight decay and d0 the user gave: what is not given stays the
optimizer's own default (Lion: betas 0.9 0.99, weight decay 0), as the original scripts did. None of
them can skip a step on the device, so the step reads the NaN/Inf flag back once per step (step.py).

Schedule-free AdamW trains one sequence of weights and evaluates another: its weights must be
switched to the evaluation ones (``optimizer.eval()``) before samples, validation and saves, and back
(``optimizer.train()``) before the next step. ``evaluation_weights`` does both around a block; the
checkpoint holds the evaluation weights and the optimizer state saved in that mode, and
``training_mode`` after a resume switches back exactly as a run that never stopped did after the save.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

import torch

# name -> (module, class, pip package); the first four are the original scripts' choices
PACKAGED_OPTIMIZERS = {
    "adamw8": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "opt_lion": ("optimi", "Lion", "torch-optimi"),
    "py_lion": ("lion_pytorch", "Lion", "lion-pytorch"),
    "d_lion": ("dadaptation", "DAdaptLion", "dadaptation"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "schedulefree": ("schedulefree", "AdamWScheduleFree", "schedulefree"),
}
LR_FREE = ("d_lion", "prodigy")  # they estimate the step size; the LR is a multiplier, ~1.0


class OptimizerUnavailable(RuntimeError):
    """The optimizer's package is not installed; the message says which to install."""


def build_packaged_optimizer(name: str, parameters: list[torch.Tensor], learning_rate: float,
                             betas: tuple[float, float] | None, weight_decay: float | None,
                             initial_d: float | None = None) -> torch.optim.Optimizer:
    module_name, class_name, package = PACKAGED_OPTIMIZERS[name]
    try:
        optimizer_class = getattr(importlib.import_module(module_name), class_name)
    except ImportError:
        raise OptimizerUnavailable(f"--optimizer {name} needs {package}: .venv/bin/pip install {package}") from None
    given = {"betas": tuple(betas) if betas is not None else None, "weight_decay": weight_decay, "d0": initial_d}
    if name in LR_FREE and learning_rate < 0.1:
        print(f"[train] WARNING: --optimizer {name} estimates its own step size; its --learning_rate is a "
              f"multiplier, usually 1.0 (given {learning_rate})", file=sys.stderr)
    optimizer = optimizer_class(parameters, lr=learning_rate,
                                **{key: value for key, value in given.items() if value is not None})
    training_mode(optimizer)
    return optimizer


def _inner(optimizer):
    """The optimizer itself, under accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def has_evaluation_weights(optimizer) -> bool:
    """Whether the optimizer keeps separate weights for evaluation (schedule-free)."""
    inner = _inner(optimizer)
    return bool(inner.param_groups) and "train_mode" in inner.param_groups[0] and hasattr(inner, "eval")


def training_mode(optimizer) -> None:
    """The weights to step (schedule-free: after a build, a resume, or evaluation_weights)."""
    inner = _inner(optimizer)
    if has_evaluation_weights(inner) and not inner.param_groups[0]["train_mode"]:
        inner.train()


@contextlib.contextmanager
def evaluation_weights(optimizer):
    """Within the block the model holds the weights to sample, validate and save (schedule-free's
    averaged ones); other optimizers' weights are those already. Nested blocks switch once."""
    inner = _inner(optimizer)
    switch = has_evaluation_weights(inner) and inner.param_groups[0]["train_mode"]
    if switch:
        inner.eval()
    try:
        yield
    finally:
        if switch:
            inner.train()
