"""Tensorboard scalars, sample images and the progress bar.

Per-step metrics stay on the device as running sums; they are read back to the host once per
logging interval, in one transfer, so the training step never waits for the GPU.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image
from torch import nn

from .layers import QUERY_OR_KEY


def qk_weight_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The attention query and key projection weights (self- and cross-attention) that train."""
    return [p for name, p in unet.named_parameters()
            if p.requires_grad and QUERY_OR_KEY.search(name) and name.endswith(".weight")]


def mean_abs_grad(parameters: list[nn.Parameter]) -> torch.Tensor:
    """Mean |grad| over all elements of ``parameters``, as a device scalar (batched, no host sync)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.stack(torch._foreach_norm(grads, ord=1)).sum()
    return total / sum(g.numel() for g in grads)


def weight_norm(parameters: list[nn.Parameter]) -> torch.Tensor:
    """L2 norm of all ``parameters`` together, as a device scalar (batched, no host sync)."""
    norms = torch._foreach_norm([p.detach() for p in parameters])
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


class Telemetry:
    def __init__(self, log_dir: str | None, device: torch.device):
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=os.fspath(log_dir))
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.raw_loss_sum = torch.zeros((), device=self.device)
        self.micro_steps = 0
        self.images = 0
        self.window_start = time.perf_counter()

    def add_micro_step(self, loss: torch.Tensor, raw_loss: torch.Tensor, images: int) -> None:
        self.loss_sum += loss.detach().float()
        self.raw_loss_sum += raw_loss.detach().float()
        self.micro_steps += 1
        self.images += images

    def flush(self, step: int, learning_rate: float, device_scalars: dict[str, torch.Tensor]) -> dict[str, float]:
        """Read the window's metrics back (one transfer), write them, start a new window."""
        names = ["train/loss", "train/loss_raw", *device_scalars]
        count = max(self.micro_steps, 1)
        stacked = torch.stack([self.loss_sum / count, self.raw_loss_sum / count,
                               *[v.detach().float().to(self.device) for v in device_scalars.values()]])
        values = dict(zip(names, stacked.cpu().tolist()))
        elapsed = time.perf_counter() - self.window_start
        values["train/learning_rate"] = learning_rate
        values["train/images_per_sec"] = self.images / elapsed if elapsed > 0 else 0.0
        if self.writer is not None:
            for name, value in values.items():
                if not name.startswith("_"):  # "_name": read back for the loop's own use, not logged
                    self.writer.add_scalar(name, value, step)
        self._reset()
        return values

    def add_scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def add_images(self, step: int, images_by_prompt: Mapping[str, Image.Image | os.PathLike | str]) -> None:
        """Log sample images under ``samples/<prompt>``, so tensorboard shows each prompt's series over steps."""
        if self.writer is None:
            return
        for prompt, image in images_by_prompt.items():
            if isinstance(image, Image.Image):
                pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
            else:
                with Image.open(image) as opened:
                    pixels = np.asarray(opened.convert("RGB"), dtype=np.uint8)
            self.writer.add_image(f"samples/{prompt}", pixels, step, dataformats="HWC")
        self.writer.flush()  # samples are rare and worth seeing at once, not at the next periodic flush

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


class StepHealth:
    """Device-side counters of gradient health, read back only when logging."""

    def __init__(self, device: torch.device, skipped_before: int = 0):
        zero = torch.zeros((), device=device)
        self.bad_in_a_row, self.worst_run, self.grad_norm_sum = zero.clone(), zero.clone(), zero.clone()
        self.bad_total = zero + skipped_before
        self.steps_in_window = 0

    def record(self, found_inf: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """One optimizer step: found_inf is 1.0 when it was skipped for NaN/Inf gradients."""
        self.bad_in_a_row = (self.bad_in_a_row + 1) * found_inf  # back to 0 on a good step
        self.worst_run = torch.maximum(self.worst_run, self.bad_in_a_row)  # a run that ended still counts
        self.bad_total += found_inf
        self.grad_norm_sum += torch.nan_to_num(grad_norm, nan=0.0, posinf=0.0, neginf=0.0)
        self.steps_in_window += 1

    def window_scalars(self) -> dict[str, torch.Tensor]:
        scalars = {"train/grad_norm": self.grad_norm_sum / max(self.steps_in_window, 1),
                   "train/skipped_steps": self.bad_total.clone(), "_worst_bad_run": self.worst_run.clone()}
        self.grad_norm_sum.zero_()
        self.worst_run = self.bad_in_a_row.clone()
        self.steps_in_window = 0
        return scalars
