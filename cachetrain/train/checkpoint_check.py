"""Is a checkpoint whole? Every file a resume will read is checked before the resume picks it.

A bad copy, a partial rsync or bit rot leaves a checkpoint folder that looks complete but whose
``training_state.pt`` or weights are cut short. A resume reads: ``training_state.pt`` (a zip archive:
every member is read and its CRC checked), the UNet's (and its EMA's) ``config.json`` and weights
(``*.safetensors``: the header read and the file's length checked against it; the config must build a UNet
whose weights have the names and shapes the header lists), and an adapter run's adapter and its EMA (a LoRA
file, or a LoHa/LoKr PEFT folder). The cost is one read of the training state, which the resume reads anyway:
the UNet the config describes is built on the meta device (no memory, a fraction of a second).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch

from ..checkpoint_layout import (ADAPTER_EMA_COMPONENT, EMA_COMPONENT, PEFT_ADAPTER_COMPONENT, TRAINED_COMPONENT,
                                 TRAINING_STATE_FILE)
from ..cli import first_line
from ..models.lora_files import DIFFUSERS_LORA_FILE
from ..sidecar import SidecarError, read_header


def _state_damage(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        return f"{path.name} is damaged ({error})"
    return f"{path.name} is damaged (member {bad_member} fails its CRC)" if bad_member else None


def _weights_damage(folder: Path) -> str | None:
    config = folder / "config.json"
    try:
        unet_config = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{folder.name}/config.json is missing"
    except (OSError, ValueError) as error:
        return f"{folder.name}/config.json is damaged ({error})"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return f"{folder.name}/ holds no .safetensors weights"
    shapes = {}
    for path in weights:
        header = {}
        problem = _file_damage(path, f"{folder.name}/{path.name}", header)
        if problem:
            return problem
        shapes.update({name: entry.get("shape") for name, entry in header.items() if name != "__metadata__"})
    return _config_mismatch(folder.name, unet_config, shapes)


def _config_mismatch(folder_name: str, unet_config, shapes: dict[str, list[int]]) -> str | None:
    """Whether ``config.json`` describes the UNet the weights are of: a config that parses but lost a key
    (diffusers then takes its default) or was emptied would make the resume's load fail."""
    from diffusers import UNet2DConditionModel

    name = f"{folder_name}/config.json"
    if not isinstance(unet_config, dict):
        return f"{name} is damaged (not a JSON object)"
    try:
        with torch.device("meta"):  # the shapes alone: no memory, no initialisation
            expected = {key: list(value.shape) for key, value in
                        UNet2DConditionModel.from_config(unet_config).state_dict().items()}
    except Exception as error:  # any value diffusers cannot build a UNet from
        return f"{name} does not describe a UNet ({type(error).__name__}: {first_line(error)})"
    missing = sorted(expected.keys() - shapes.keys())
    if missing:
        return (f"{name} does not match the weights beside it ({len(missing)} weights it describes are not "
                f"there, e.g. {missing[0]})")
    unexpected = sorted(shapes.keys() - expected.keys())
    if unexpected:
        return (f"{name} does not match the weights beside it ({len(unexpected)} weights it does not describe, "
                f"e.g. {unexpected[0]})")
    for key, shape in expected.items():
        if shapes[key] != shape:
            return (f"{name} does not match the weights beside it ({key} is {shapes[key]} in the weights, "
                    f"{shape} by the config)")
    return None


def _file_damage(path: Path, name: str, header: dict | None = None) -> str | None:
    """What is wrong with a safetensors file, or None; ``header``, if given, receives its header."""
    try:
        found = read_header(path)
    except SidecarError as error:
        return f"{name} is damaged ({error.reason})"
    except OSError as error:
        return f"{name} cannot be read ({error.strerror or error})"
    if header is not None:
        header.update(found)
    return None


def _adapter_damage(checkpoint: Path) -> str | None:
    """An adapter run's adapter and its EMA: a LoRA file, or a LoHa/LoKr PEFT folder (its config and weights)."""
    for folder in (checkpoint, checkpoint / ADAPTER_EMA_COMPONENT):
        lora = folder / DIFFUSERS_LORA_FILE
        if lora.exists():
            problem = _file_damage(lora, str(lora.relative_to(checkpoint)))
            if problem:
                return problem
        peft = folder / PEFT_ADAPTER_COMPONENT
        if peft.exists():
            config = peft / "adapter_config.json"
            try:
                json.loads(config.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                return f"{config.relative_to(checkpoint)} is missing or damaged ({error})"
            weights = peft / "adapter_model.safetensors"
            problem = _file_damage(weights, str(weights.relative_to(checkpoint)))
            if problem:
                return problem
    return None


def checkpoint_damage(checkpoint: Path) -> str | None:
    """What is wrong with ``checkpoint`` for a resume, in a few words; None when it is whole."""
    checkpoint = Path(checkpoint)
    state = checkpoint / TRAINING_STATE_FILE
    if not state.is_file():
        return f"no {TRAINING_STATE_FILE}"
    for part in (TRAINED_COMPONENT, EMA_COMPONENT):
        folder = checkpoint / part
        if part == TRAINED_COMPONENT or folder.exists():
            problem = _weights_damage(folder) if folder.is_dir() else f"no {part}/ folder"
            if problem:
                return problem
    return _adapter_damage(checkpoint) or _state_damage(state)
