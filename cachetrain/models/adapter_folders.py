"""Which adapter a model folder holds: an adapter run's checkpoint or final model keeps a LoRA file
(``pytorch_lora_weights.safetensors``) or, for LoHa/LoKr, PEFT's folder ``unet_adapter/`` beside a ``unet/``
that is the frozen base; its EMA in ``adapter_ema/``. The LoRA files themselves: lora_files.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..checkpoint_layout import ADAPTER_EMA_COMPONENT, PEFT_ADAPTER_COMPONENT
from .lora_files import DIFFUSERS_LORA_FILE, PEFT_CONFIG_FILE, LoraFileError, peft_folder_config


def peft_adapter_folder(source: Path) -> Path | None:
    """The PEFT folder (adapter_config.json + adapter_model.safetensors) of a LoHa/LoKr checkpoint given as
    the checkpoint or as the folder itself; None for anything else: a LoRA, also one in PEFT's own folder
    (``PeftModel.save_pretrained``), which read_lora reads."""
    for folder in (source / PEFT_ADAPTER_COMPONENT, source):
        if (folder / PEFT_CONFIG_FILE).is_file():
            return None if peft_folder_config(folder).get("peft_type") == "LORA" else folder
    return None


def state_load_problem(error: Exception) -> str:
    """The line of a failed load_state_dict (or file read) that says what is wrong: torch's first
    'size mismatch for KEY: ...' line when there is one, else the error's first line, for a one-line message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return next((line for line in lines if line.startswith("size mismatch")), lines[0])[:300]


def read_peft_adapter_config(folder: Path):
    """The PeftConfig of a LoHa/LoKr folder as the trainer writes it (LoraFileError for an unreadable one, or
    one of another PEFT type: a LoRA lies in pytorch_lora_weights.safetensors, DoRA and others are not read)."""
    from peft import PeftConfig

    try:
        config = PeftConfig.from_pretrained(str(folder))
    except Exception as error:
        raise LoraFileError(f"{folder}: not a readable PEFT adapter folder ({state_load_problem(error)})") from None
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    if kind not in ("LOHA", "LOKR"):
        raise LoraFileError(f"{folder}: a PEFT {kind} adapter; the adapter folders read here are LoHa and LoKr")
    return config


def peft_load_problem(result, adapter_name: str) -> str | None:
    """What set_peft_model_state_dict's result says is wrong with a LoHa/LoKr folder's weights, if anything:
    tensors of layers the UNet lacks (a model with fewer blocks), or layers left without their tensors."""
    unread = [key for key in result.unexpected_keys if re.search(r"(hada|lokr)_", key)]
    if unread:
        return f"{len(unread)} key(s) this UNet has no place for, e.g. {unread[0]}"
    missing = [key for key in result.missing_keys if re.search(rf"(hada|lokr)_\w+\.{re.escape(adapter_name)}$", key)]
    if missing:
        return f"no weights for {len(missing)} of its layers' tensors, e.g. {missing[0]}"
    return None


def holds_adapter(folder: Path | str) -> bool:
    """Whether a model folder is an adapter run's (a checkpoint or final model): a LoRA file, or a LoHa/LoKr
    PEFT folder, beside a unet/ that is the frozen base."""
    folder = Path(folder)
    return folder.is_dir() and ((folder / DIFFUSERS_LORA_FILE).is_file() or peft_adapter_folder(folder) is not None)


def adapter_to_merge(folder: Path | str) -> Path:
    """What of an adapter run's folder to merge for the model its samples show: the adapter's EMA
    (``adapter_ema/``) when the run kept one, else the adapter itself."""
    ema = Path(folder) / ADAPTER_EMA_COMPONENT
    return ema if holds_adapter(ema) else Path(folder)
