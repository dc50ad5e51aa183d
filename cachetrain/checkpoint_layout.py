"""The names inside a run's output folder: what the trainer writes and every later stage reads.

``output_dir/checkpoint-NNNNN/`` is a diffusers pipeline folder with the trained UNet in ``unet/``
(its EMA in ``unet_ema/``), or for an adapter run the frozen base UNet in ``unet/`` and the adapter
beside it (``pytorch_lora_weights.safetensors`` or ``unet_adapter/``, its EMA in ``adapter_ema/``), and the resume state in ``training_state.pt``; the parts that do not
train are saved once in ``output_dir/.frozen-components``. Paths only: no torch.
"""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_FILE = "training_state.pt"
FROZEN_DIR_NAME = ".frozen-components"
TRAINED_COMPONENT = "unet"
EMA_COMPONENT = "unet_ema"  # not part of the pipeline: load with UNet2DConditionModel(..., subfolder="unet_ema")
# adapter runs (--lora_type): unet/ is the frozen base, the adapter lies beside it
BASE_UNET_DIR_NAME = ".frozen-base-unet"  # the base UNet, written once per start, linked into each checkpoint
PEFT_ADAPTER_COMPONENT = "unet_adapter"  # LoHa/LoKr: PEFT's folder (adapter_config.json, adapter_model.safetensors)
ADAPTER_EMA_COMPONENT = "adapter_ema"  # the EMA of the adapter, in the adapter's own layout


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step:05d}"


def checkpoint_folders(output_dir: Path) -> list[tuple[int, Path]]:
    """Every checkpoint-NNNNN folder of output_dir, oldest first, whatever it holds (a resume names the ones
    it passes over)."""
    found = []
    if Path(output_dir).is_dir():
        for entry in Path(output_dir).iterdir():
            match = CHECKPOINT_PATTERN.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
    return sorted(found)


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoints of output_dir that hold a training state, oldest first."""
    return [(step, path) for step, path in checkpoint_folders(output_dir) if (path / TRAINING_STATE_FILE).exists()]


def latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None
