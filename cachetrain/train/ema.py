"""The exponential moving average of the trained weights (--ema_decay): made in one place, swapped in
through one context (``ema_weights``) wherever the EMA weights are shown (samples) or saved (unet_ema/)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def make_ema(parameters: list[torch.nn.Parameter], decay: float, device: torch.device, state: dict | None = None):
    """The EMA of ``parameters`` (None without ``decay``), from their current - possibly resumed - values or
    from a checkpoint's ``state``. Its shadow is fp32 even for bf16 weights, whose resolution would
    swallow (1 - decay) * difference."""
    if not decay:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(parameters, decay=decay, foreach=True)
    if state is not None:
        ema.load_state_dict(state)
    ema.to(device=device, dtype=torch.float32)
    return ema


@contextmanager
def ema_weights(ema, parameters: list[torch.nn.Parameter]) -> Iterator[None]:
    """Inside: ``parameters`` hold the EMA weights; after (even on an error): the trained ones again.
    Without an EMA (None) the weights stay as they are."""
    if ema is None:
        yield
        return
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)
