"""Selections of UNet parameters: which to re-initialise, and which train under --targetted_training.

Names follow diffusers' UNet2DConditionModel: attention layers are ``...attentions.N.transformer_blocks.M.
attn1`` (self-attention) and ``attn2`` (cross-attention, the text's way in), each with to_q, to_k,
to_v and to_out.0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

SELF_OR_CROSS_ATTENTION = re.compile(r"\.attn[12]\.")
CROSS_ATTENTION = re.compile(r"\.attn2\.")
QUERY_OR_KEY = re.compile(r"\.attn[12]\.to_[qk]\.")


@dataclass
class LayerSelection:
    reinit_unet: bool = False
    reinit_qk: bool = False
    reinit_crossattn: bool = False
    reinit_attention: bool = False
    unfreeze_attention: bool = False
    unfreeze_up_blocks: list[int] = field(default_factory=list)
    unfreeze_down_blocks: list[int] = field(default_factory=list)
    unfreeze_mid_block: bool = False
    targetted_training: bool = False

    def reinitialised(self, name: str) -> bool:
        """Whether parameter ``name`` is re-initialised (the whole UNet counts as every name)."""
        return (self.reinit_unet
                or (self.reinit_attention and SELF_OR_CROSS_ATTENTION.search(name) is not None)
                or (self.reinit_crossattn and CROSS_ATTENTION.search(name) is not None)
                or (self.reinit_qk and QUERY_OR_KEY.search(name) is not None))

    def unfrozen(self, name: str) -> bool:
        """Whether parameter ``name`` is selected to train when --targetted_training is on."""
        if self.unfreeze_attention and SELF_OR_CROSS_ATTENTION.search(name):
            return True
        if self.unfreeze_mid_block and name.startswith("mid_block."):
            return True
        for prefix, blocks in (("up_blocks", self.unfreeze_up_blocks), ("down_blocks", self.unfreeze_down_blocks)):
            match = re.match(rf"{prefix}\.(\d+)\.", name)
            if match and int(match.group(1)) in blocks:
                return True
        return self.reinitialised(name)  # layers started afresh always train

    def trains(self, name: str) -> bool:
        return self.unfrozen(name) if self.targetted_training else True


def _reinit_modules(unet: nn.Module, selection: LayerSelection) -> int:
    """Reset every Linear/Conv whose weight is selected, with the layer's own default init."""
    count = 0
    for name, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and selection.reinitialised(name + ".weight"):
            module.reset_parameters()
            count += 1
    return count


def check_selection_matches(unet: nn.Module, selection: LayerSelection) -> None:
    """Every block a --unfreeze_* flag names must exist in this UNet."""
    names = [name for name, _ in unet.named_parameters()]
    for prefix, blocks in (("up_blocks", selection.unfreeze_up_blocks), ("down_blocks", selection.unfreeze_down_blocks)):
        present = sorted({int(m.group(1)) for n in names if (m := re.match(rf"{prefix}\.(\d+)\.", n))})
        missing = [b for b in blocks if b not in present]
        if missing:
            raise ValueError(f"--unfreeze_{prefix} {' '.join(map(str, missing))}: this UNet has {prefix} "
                             f"{present[0]}-{present[-1]}")


def apply_layer_selection(unet: nn.Module, selection: LayerSelection, seed: int) -> list[nn.Parameter]:
    """Re-initialise and freeze as selected (seeded, so reproducible); returns the trainable parameters."""
    check_selection_matches(unet, selection)
    if selection.reinit_unet:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = type(unet).from_config(unet.config)
        unet.load_state_dict(fresh.state_dict())
    elif selection.reinit_qk or selection.reinit_crossattn or selection.reinit_attention:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _reinit_modules(unet, selection)
    trainable = []
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(selection.trains(name))
        if parameter.requires_grad:
            trainable.append(parameter)
    return trainable
