"""Selections of UNet parameters: which to re-initialise, and which train under --targetted_training.

Names follow diffusers' UNet2DConditionModel: attention layers are ``...attentions.N.transformer_blocks.M.
attn1`` (self-attention) and ``attn2`` (cross-attention, the text's way in), each with to_q, to_k,
to_v and to_out.0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

import torch
from torch import nn

SELF_OR_CROSS_ATTENTION = re.compile(r"\.attn[12]\.")
CROSS_ATTENTION = re.compile(r"\.attn2\.")
QUERY_OR_KEY = re.compile(r"\.attn[12]\.to_[qk]\.")
CROSS_ATTENTION_OUTPUT = re.compile(r"\.attn2\.to_out\.")
# GroupNorm/LayerNorm parameters: resnets' norm1/norm2, transformers' norm and norm1-3, conv_norm_out
NORMALISATION = re.compile(r"(^|\.)(norm\w*|conv_norm_out)\.(weight|bias)$")
INPUT_CONV = re.compile(r"^conv_in\.")
OUTPUT_CONV = re.compile(r"^conv_out\.")
TIME_EMBEDDING = re.compile(r"^time_embedding\.")


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
    unfreeze_attn2: bool = False
    unfreeze_norms: bool = False
    unfreeze_in: bool = False
    unfreeze_out: bool = False
    unfreeze_time: bool = False
    reinit_in: bool = False
    reinit_out: bool = False
    reinit_time: bool = False
    reinit_crossattnout: bool = False

    @classmethod
    def of(cls, settings) -> LayerSelection:
        """The selection that ``settings`` (a TrainConfig, or anything with these fields) names."""
        return cls(**{item.name: getattr(settings, item.name) for item in fields(cls)})

    def problems(self) -> list[str]:
        """What makes the selection meaningless, one line each; checked with the flags, before any model loads.
        (Blocks the UNet lacks are found once it is loaded: check_selection_matches.)"""
        problems = []
        if self.unfreezes_some() and not self.targetted_training:
            problems.append("--unfreeze_* selects layers for --targetted_training; add it (without it everything trains)")
        if self.targetted_training and not (self.unfreezes_some() or self.reinitialises_some()):
            problems.append("--targetted_training needs a selection: --unfreeze_* or --reinit_*")
        if self.targetted_training and self.reinit_unet:
            problems.append("--reinit_unet re-initialises everything; --targetted_training would then train everything")
        for name in ("unfreeze_up_blocks", "unfreeze_down_blocks"):
            if any(block < 0 for block in getattr(self, name)):
                problems.append(f"--{name} takes block numbers >= 0")
        return problems

    def unfreezes_some(self) -> bool:
        return bool(self.unfreeze_attention or self.unfreeze_up_blocks or self.unfreeze_down_blocks
                    or self.unfreeze_mid_block or self.unfreeze_attn2 or self.unfreeze_norms or self.unfreeze_in
                    or self.unfreeze_out or self.unfreeze_time)

    def _reinit_patterns(self) -> list[re.Pattern]:
        chosen = ((self.reinit_attention, SELF_OR_CROSS_ATTENTION), (self.reinit_crossattn, CROSS_ATTENTION),
                  (self.reinit_qk, QUERY_OR_KEY), (self.reinit_in, INPUT_CONV), (self.reinit_out, OUTPUT_CONV),
                  (self.reinit_time, TIME_EMBEDDING), (self.reinit_crossattnout, CROSS_ATTENTION_OUTPUT))
        return [pattern for wanted, pattern in chosen if wanted]

    def reinitialises_some(self) -> bool:
        return self.reinit_unet or bool(self._reinit_patterns())

    def reinitialised(self, name: str) -> bool:
        """Whether parameter ``name`` is re-initialised (the whole UNet counts as every name)."""
        return self.reinit_unet or any(pattern.search(name) for pattern in self._reinit_patterns())

    def unfrozen(self, name: str) -> bool:
        """Whether parameter ``name`` is selected to train when --targetted_training is on."""
        chosen = ((self.unfreeze_attention, SELF_OR_CROSS_ATTENTION), (self.unfreeze_attn2, CROSS_ATTENTION),
                  (self.unfreeze_norms, NORMALISATION), (self.unfreeze_in, INPUT_CONV),
                  (self.unfreeze_out, OUTPUT_CONV), (self.unfreeze_time, TIME_EMBEDDING))
        if any(wanted and pattern.search(name) for wanted, pattern in chosen):
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
    elif selection.reinitialises_some():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _reinit_modules(unet, selection)
    trainable = []
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(selection.trains(name))
        if parameter.requires_grad:
            trainable.append(parameter)
    return trainable

