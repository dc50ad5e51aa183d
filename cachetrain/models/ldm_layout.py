"""The original Stable Diffusion (LDM) single-file layout, as A1111, Forge and ComfyUI read it.

One ``.safetensors`` file holds the UNet under ``model.diffusion_model.``, the VAE under
``first_stage_model.`` and the CLIP text encoder under ``cond_stage_model.transformer.``. The key
names follow the original code's module tree, which this module derives from a diffusers model's
config (``unet_key_map`` / ``vae_key_map``): the names of a diffusers block and of its original
counterpart differ by a fixed rule per block kind, and the block numbering follows from the number
of levels and of layers per level. Only SD1.5's UNet structure has an original counterpart that
these tools know (``unet_layout_problem`` says why another does not export).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only for the annotations: the flag parser imports this module before torch loads
    import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
# The original files name the CLIP text encoder's weights as transformers 4 did (text_model.embeddings...);
# transformers 5's CLIPTextModel has no text_model level, older ones have.
CLIP_TEXT_MODEL_LEVEL = "text_model."
# Keys whose presence (an empty tensor) tells ComfyUI the model predicts v, and that its schedule
# was rescaled to zero terminal SNR; the UNet's weights alone cannot say either.
V_PREDICTION_MARKER = "v_pred"
ZERO_TERMINAL_SNR_MARKER = "ztsnr"

SD15_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD15_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
EXPORTABLE_UNET_LAYOUTS = ("SD1.5's UNet structure: 4 levels, layers_per_block=2, down blocks "
                           + "/".join(SD15_DOWN_BLOCKS) + ", up blocks " + "/".join(SD15_UP_BLOCKS)
                           + ", a cross-attention mid block, one transformer layer per attention, "
                           "convolutional attention projections, no class or added embeddings "
                           "(any channel widths, head sizes and cross-attention width)")

# diffusers ResnetBlock2D -> the original UNet's ResBlock
UNET_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# diffusers ResnetBlock2D -> the original VAE's ResnetBlock (the same names, but for the shortcut)
VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
# diffusers Attention -> the original VAE's AttnBlock, whose projections are 1x1 convolutions
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _config_value(config: Any, name: str, default: Any = None) -> Any:
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def unet_layout_problem(config: Any) -> str | None:
    """Why a UNet config has no original-layout counterpart, or None if it has (SD1.5's structure)."""
    def value(name, default=None):
        found = _config_value(config, name, default)
        return tuple(found) if isinstance(found, list) else found

    checks = [
        ("down_block_types", SD15_DOWN_BLOCKS, None), ("up_block_types", SD15_UP_BLOCKS, None),
        ("layers_per_block", 2, None), ("mid_block_type", "UNetMidBlock2DCrossAttn", "UNetMidBlock2DCrossAttn"),
        ("transformer_layers_per_block", 1, 1), ("use_linear_projection", False, False),
        ("class_embed_type", None, None), ("addition_embed_type", None, None), ("num_class_embeds", None, None),
        ("time_cond_proj_dim", None, None), ("encoder_hid_dim", None, None),
    ]
    for name, wanted, default in checks:
        found = value(name, default)
        if found != wanted:
            return f"{name} is {found!r}, SD1.5's is {wanted!r}"
    return None


def _rename(key: str, names: dict[str, str]) -> str:
    for old, new in names.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    return key


def unet_key_map(config: Any, keys) -> dict[str, str]:
    """diffusers UNet key -> original key (without UNET_PREFIX), for every key given.

    The original numbers its input blocks 0 (conv_in), then per level ``layers`` blocks of
    (resnet, attention) and one downsampler; its output blocks per level ``layers + 1`` blocks of
    (resnet, attention, upsampler). Raises KeyError naming a key it cannot place.
    """
    layers = _config_value(config, "layers_per_block")
    levels = len(_config_value(config, "down_block_types"))
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
             "mid_block.resnets.1": "middle_block.2"}
    resnets = {"mid_block.resnets.0", "mid_block.resnets.1"}
    for level in range(levels):
        for layer in range(layers):
            block = 1 + level * (layers + 1) + layer
            fixed[f"down_blocks.{level}.resnets.{layer}"] = f"input_blocks.{block}.0"
            fixed[f"down_blocks.{level}.attentions.{layer}"] = f"input_blocks.{block}.1"
            resnets.add(f"down_blocks.{level}.resnets.{layer}")
        fixed[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{(level + 1) * (layers + 1)}.0.op"
        up_has_attention = "CrossAttn" in _config_value(config, "up_block_types")[level]
        for layer in range(layers + 1):
            block = level * (layers + 1) + layer
            fixed[f"up_blocks.{level}.resnets.{layer}"] = f"output_blocks.{block}.0"
            fixed[f"up_blocks.{level}.attentions.{layer}"] = f"output_blocks.{block}.1"
            resnets.add(f"up_blocks.{level}.resnets.{layer}")
        upsampler_slot = 2 if up_has_attention else 1
        fixed[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{level * (layers + 1) + layers}.{upsampler_slot}.conv"
    mapping = {}
    for key in keys:
        module, _, leaf = key.rpartition(".")
        parent = _longest_prefix(module, fixed)
        if parent is None:
            raise KeyError(f"no place in the original UNet layout for {key}")
        rest = module[len(parent) + 1:] if module != parent else ""
        if parent in resnets:
            rest = _rename(rest + ".", UNET_RESNET_NAMES).rstrip(".") if rest else rest
        mapping[key] = ".".join(part for part in (fixed[parent], rest, leaf) if part)
    return mapping


def _longest_prefix(module: str, table: dict[str, str]) -> str | None:
    """The longest entry of ``table`` that is ``module`` or a dotted ancestor of it."""
    parts = module.split(".")
    for cut in range(len(parts), 0, -1):
        candidate = ".".join(parts[:cut])
        if candidate in table:
            return candidate
    return None


def vae_key_map(config: Any, keys) -> dict[str, str]:
    """diffusers VAE key -> original key (without VAE_PREFIX). The decoder's levels are numbered
    from the lowest resolution in diffusers and from the highest in the original, so they reverse."""
    levels = len(_config_value(config, "block_out_channels"))
    fixed = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    resnets, attentions = set(), set()
    for side in ("encoder", "decoder"):
        fixed[f"{side}.mid_block.resnets.0"] = f"{side}.mid.block_1"
        fixed[f"{side}.mid_block.resnets.1"] = f"{side}.mid.block_2"
        fixed[f"{side}.mid_block.attentions.0"] = f"{side}.mid.attn_1"
        resnets |= {f"{side}.mid_block.resnets.0", f"{side}.mid_block.resnets.1"}
        attentions.add(f"{side}.mid_block.attentions.0")
        for level in range(levels):
            if side == "encoder":
                diffusers_block, original_block, sampler = f"encoder.down_blocks.{level}", f"encoder.down.{level}", "downsample"
                fixed[f"{diffusers_block}.downsamplers.0.conv"] = f"{original_block}.{sampler}.conv"
            else:
                diffusers_block, original_block = f"decoder.up_blocks.{level}", f"decoder.up.{levels - 1 - level}"
                fixed[f"{diffusers_block}.upsamplers.0.conv"] = f"{original_block}.upsample.conv"
            fixed[f"{diffusers_block}.resnets"] = f"{original_block}.block"
            resnets.add(f"{diffusers_block}.resnets")
    mapping = {}
    for key in keys:
        module, _, leaf = key.rpartition(".")
        parent = _longest_prefix(module, fixed) if module else None
        if parent is None:  # quant_conv, post_quant_conv, encoder.conv_in, ...: the same names
            mapping[key] = key
            continue
        rest = module[len(parent) + 1:] if module != parent else ""
        if parent in attentions:
            rest = _rename(rest + ".", VAE_ATTENTION_NAMES).rstrip(".") if rest else rest
        elif parent in resnets:
            # "resnets" entries keep the layer number: block.J.<name>
            head, _, tail = rest.partition(".") if parent.endswith(".resnets") else ("", "", rest)
            tail = _rename(tail + ".", VAE_RESNET_NAMES).rstrip(".") if tail else tail
            rest = ".".join(part for part in (head, tail) if part)
        mapping[key] = ".".join(part for part in (fixed[parent], rest, leaf) if part)
    return mapping


def vae_tensor_for_original(original_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The original VAE's attention projections are 1x1 convolutions: [C, C] becomes [C, C, 1, 1]."""
    if ".mid.attn_1." in original_key and original_key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) \
            and tensor.ndim == 2:
        return tensor[:, :, None, None]
    return tensor


def text_encoder_key_for_original(key: str) -> str:
    """A CLIPTextModel state-dict key as the original layout names it (after TEXT_ENCODER_PREFIX)."""
    return key if key.startswith(CLIP_TEXT_MODEL_LEVEL) else CLIP_TEXT_MODEL_LEVEL + key


def text_encoder_weights_for_model(weights: dict, model_keys) -> dict:
    """A file's text-encoder weights (TEXT_ENCODER_PREFIX taken off) keyed as a CLIPTextModel names
    them, with or without the text_model level, whichever the installed transformers uses."""
    with_level = any(key.startswith(CLIP_TEXT_MODEL_LEVEL) for key in model_keys)
    renamed = {}
    for key, value in weights.items():
        bare = key[len(CLIP_TEXT_MODEL_LEVEL):] if key.startswith(CLIP_TEXT_MODEL_LEVEL) else key
        renamed[CLIP_TEXT_MODEL_LEVEL + bare if with_level else bare] = value
    return renamed


def is_single_file(model: os.PathLike | str) -> bool:
    """A model argument naming one .safetensors file (not a diffusers folder or hub id)."""
    return os.fspath(model).lower().endswith(".safetensors")


def read_part(path: os.PathLike | str, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of a single file under ``prefix``, with the prefix taken off."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as handle:
        return {key[len(prefix):]: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}


def read_markers(path: os.PathLike | str) -> set[str]:
    """Which of the v-prediction / zero-terminal-SNR marker keys a single file carries."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as handle:
        return {key for key in handle.keys() if key in (V_PREDICTION_MARKER, ZERO_TERMINAL_SNR_MARKER)}
