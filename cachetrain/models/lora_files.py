"""The files a LoRA lives in: the diffusers/PEFT layout and the kohya/A1111 single file.

Both hold, per adapted UNet layer, a down matrix (rank x in[, k, k]), an up matrix (out x rank[, 1, 1])
and an alpha; the layer's change is ``alpha / rank * up @ down``. In memory a LoRA is a dict of
``LowRankPair`` keyed by the layer's module name in diffusers' UNet2DConditionModel
(``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``).

- diffusers/PEFT: ``FOLDER/pytorch_lora_weights.safetensors`` with keys ``unet.NAME.lora_A.weight`` (down)
  and ``unet.NAME.lora_B.weight`` (up), and the LoraConfig (rank, alpha, targets) in the header's
  ``lora_adapter_metadata``: ``pipeline.load_lora_weights(FOLDER)`` loads it with its alpha.
- kohya/A1111 (ComfyUI, A1111, Forge, sd-scripts): one ``.safetensors`` with keys
  ``lora_unet_NAME_WITH_UNDERSCORES.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` and the
  ``ss_*`` (kohya) and ``modelspec.*`` metadata keys those tools show.

LoRAs saved by PEFT itself (``PeftModel.save_pretrained``) or by diffusers for the UNet alone
(``unet.save_lora_adapter``) are read as the first. Which adapter a run's folder holds: adapter_folders.

Reading either checks every key against the UNet the LoRA is for: a key we do not know, a layer the
UNet lacks or a shape it does not have raise LoraFileError naming the file and the first such key.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..atomic import write_atomically
from .ldm_layout import CLIP_TEXT_MODEL_LEVEL

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_LORA_FILE = "lora_kohya.safetensors"  # the kohya-layout copy a checkpoint holds with --save_kohya_lora
KOHYA_PREFIX = "lora_unet_"
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
KOHYA_TEXT_ENCODER_PREFIX = "lora_te_"  # SD1's CLIP text encoder, as sd-scripts names its layers
DIFFUSERS_PREFIX = "unet."
DIFFUSERS_TEXT_ENCODER_PREFIX = "text_encoder."
UNET_PART, TEXT_ENCODER_PART = "unet", "text_encoder"
TEXT_ENCODER_KEY_STARTS = (KOHYA_TEXT_ENCODER_PREFIX, DIFFUSERS_TEXT_ENCODER_PREFIX)
TEXT_ENCODER_NOTE = (" (a text-encoder LoRA: only its UNet part is read here, the captions being cached; "
                     "cachetrain-lora merge applies both)")
# diffusers' current (PEFT) names and its older ones
DIFFUSERS_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
                      ".lora.up.weight": "up"}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key of the LoraConfig
PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"  # PEFT's folder
PEFT_MODEL_PREFIX = "base_model.model."  # PeftModel.save_pretrained's keys of the wrapped model's layers
SD1_LORA_ARCHITECTURE = "stable-diffusion-v1/lora"
# the layer groups an adapter may cover (the trainer's --lora_targets, cachetrain-lora extract --targets)
LAYER_GROUPS = {
    "attention": re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"),
    "feedforward": re.compile(r"(\.ff\.net\.(0\.proj|2)|\.attentions\.\d+\.proj_(in|out))$"),
    "conv": re.compile(r"(\.resnets\.\d+\.(conv1|conv2|conv_shortcut)|\.(down|up)samplers\.0\.conv)$"),
}


class LoraFileError(ValueError):
    """A LoRA file that cannot be read for this UNet; the message names the file and the key."""


@dataclass
class LowRankPair:
    down: torch.Tensor  # [rank, in] or [rank, in, k, k]
    up: torch.Tensor  # [out, rank] or [out, rank, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        """The change to the layer's weight, ``scale * alpha / rank * up @ down``, in the weight's shape."""
        down, up = self.down.float(), self.up.float()
        product = up.flatten(1) @ down.flatten(1)
        shape = (up.shape[0], *down.shape[1:])
        return (scale * self.alpha / self.rank) * product.reshape(shape)


def kohya_name(module_name: str, prefix: str = KOHYA_PREFIX) -> str:
    """``down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    return prefix + module_name.replace(".", "_")


def adaptable_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The UNet's Linear and Conv2d layers by module name (a PEFT-wrapped layer by its own name)."""
    layers = {}
    for name, module in unet.named_modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
            layers[name] = base
        elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not name.endswith("base_layer") \
                and ".lora_" not in name:
            layers[name] = module
    return layers


def layer_weight_shape(layer: torch.nn.Module) -> tuple[int, ...]:
    return tuple(layer.weight.shape)


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The key of the first floating-point tensor holding a NaN or an infinity (None when there is none): such a
    start trains on loss=nan from step 1, such a merge draws black."""
    return next((key for key, tensor in tensors.items() if tensor.is_floating_point() and not tensor.isfinite().all()),
                None)


def check_fits(pairs: dict[str, LowRankPair], layers: dict[str, torch.nn.Module], source: str,
               model: str = "UNet") -> None:
    """Every pair names a layer of this model and fits its shape, else LoraFileError (another base)."""
    for name, pair in pairs.items():
        if name not in layers:
            raise LoraFileError(f"{source}: layer {name} is not in this {model} (an adapter of another model?)")
        weight = layer_weight_shape(layers[name])
        if pair.up.dim() < 2 or pair.down.dim() < 2 or pair.up.shape[1] != pair.down.shape[0]:
            raise LoraFileError(f"{source}: {name}'s up and down weights do not make a pair (shapes "
                                f"{list(pair.up.shape)} and {list(pair.down.shape)}: their ranks differ)")
        if not (torch.isfinite(pair.up).all() and torch.isfinite(pair.down).all() and math.isfinite(pair.alpha)):
            raise LoraFileError(f"{source}: {name} holds NaN or infinite values")
        delta = (pair.up.shape[0], *pair.down.shape[1:])
        if tuple(delta) != weight:
            raise LoraFileError(f"{source}: {name} changes a weight of shape {list(delta)}, this {model}'s is "
                                f"{list(weight)} (an adapter of another base model)")


# -- reading ----------------------------------------------------------------------------------

def peft_folder_config(folder: Path) -> dict:
    """adapter_config.json of a PEFT folder as a dict ({} when it does not parse: read_peft_adapter_config
    says why, where it is read)."""
    try:
        config = json.loads((folder / PEFT_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def lora_file_in(path: Path | str) -> Path:
    """The safetensors file of a LoRA given as a file or as a folder holding pytorch_lora_weights.safetensors."""
    path = Path(path)
    if path.is_dir():  # a run's checkpoint or diffusers' save_lora_weights; else a PEFT LoRA folder
        folder, path = path, path / DIFFUSERS_LORA_FILE
        if not path.exists() and (folder / PEFT_WEIGHTS_FILE).exists():
            path = folder / PEFT_WEIGHTS_FILE
    if not path.is_file():
        raise LoraFileError(f"{path}: no such LoRA file")
    return path


def read_lora(path: Path | str, layers: dict[str, torch.nn.Module]) -> dict[str, LowRankPair]:
    """The UNet LoRA in ``path`` (either layout, told apart by its keys), checked against ``layers``; a file
    with a text-encoder part is refused (read_lora_parts reads both)."""
    pairs, _ = read_lora_parts(path, layers)
    return pairs


def read_lora_parts(path: Path | str, layers: dict[str, torch.nn.Module],
                    text_encoder_layers: dict[str, torch.nn.Module] | None = None, drop_text_encoder: bool = False
                    ) -> tuple[dict[str, LowRankPair], dict[str, LowRankPair]]:
    """(the UNet's pairs, the text encoder's pairs) of the LoRA in ``path``, each checked against its model's
    layers; without ``text_encoder_layers`` a text-encoder part is refused, naming it, unless dropped."""
    file = lora_file_in(path)
    tensors, metadata = _in_diffusers_layout(*read_safetensors(file), file)
    if drop_text_encoder:
        tensors = {key: value for key, value in tensors.items() if not key.startswith(TEXT_ENCODER_KEY_STARTS)}
    models = {UNET_PART: layers}
    if text_encoder_layers is not None:
        models[TEXT_ENCODER_PART] = text_encoder_layers
    if any(key.startswith((KOHYA_PREFIX, "lora_te")) for key in tensors):
        parts = _pairs_from_kohya(tensors, models, file)
    else:
        parts = _pairs_from_diffusers(tensors, metadata, models, file)
    if not parts[UNET_PART] and not parts.get(TEXT_ENCODER_PART):
        raise LoraFileError(f"{file}: holds no UNet LoRA layers")
    for part, pairs in parts.items():
        check_fits(pairs, models[part], str(file), "UNet" if part == UNET_PART else "text encoder")
    return parts[UNET_PART], parts.get(TEXT_ENCODER_PART, {})


def has_text_encoder_part(path: Path | str) -> bool:
    """Whether a LoRA file (a PEFT folder is not one) holds layers of the text encoder as well."""
    from safetensors import safe_open

    try:
        with safe_open(str(lora_file_in(path)), framework="pt") as handle:
            return any(key.startswith(TEXT_ENCODER_KEY_STARTS) for key in handle.keys())
    except Exception:  # read_lora_parts says what is wrong with it
        return False


def read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}
    except Exception as error:
        raise LoraFileError(f"{file}: not a readable safetensors file ({type(error).__name__})") from None


def _in_diffusers_layout(tensors: dict[str, torch.Tensor], metadata: dict[str, str], file: Path
                         ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A UNet LoRA saved by PEFT itself (``PeftModel.save_pretrained``: keys ``base_model.model.<module>``, its
    LoraConfig in adapter_config.json) or by diffusers for the UNet alone (``unet.save_lora_adapter``: keys
    ``<module>``, the config unprefixed in the header), as diffusers' pipeline layout names it: keys and config
    under ``unet.``. Any other file is returned as it is."""
    config_file = file.parent / PEFT_CONFIG_FILE
    if file.name == PEFT_WEIGHTS_FILE and config_file.is_file():
        config = peft_folder_config(file.parent)
        keys = {key: DIFFUSERS_PREFIX + key.removeprefix(PEFT_MODEL_PREFIX) for key in tensors}
    elif tensors and all(key.endswith(tuple(DIFFUSERS_SUFFIXES)) and not key.startswith(
            (DIFFUSERS_PREFIX, DIFFUSERS_TEXT_ENCODER_PREFIX, "text_encoder_2.", "lora_")) for key in tensors):
        try:
            config = json.loads(metadata.get(METADATA_KEY, "{}"))
        except ValueError:
            config = {}
        keys = {key: DIFFUSERS_PREFIX + key for key in tensors}
    else:
        return tensors, metadata
    packed = {DIFFUSERS_PREFIX + key: value for key, value in (config if isinstance(config, dict) else {}).items()}
    return {keys[key]: tensor for key, tensor in tensors.items()}, {**metadata, METADATA_KEY: json.dumps(packed)}


def _pairs_from_kohya(tensors: dict[str, torch.Tensor], models: dict[str, dict[str, torch.nn.Module]],
                      file: Path) -> dict[str, dict[str, LowRankPair]]:
    prefixes = {UNET_PART: KOHYA_PREFIX, TEXT_ENCODER_PART: KOHYA_TEXT_ENCODER_PREFIX}
    by_kohya_name = {kohya_name(alias, prefixes[part]): (part, name)
                     for part, layers in models.items() for alias, name in _layer_aliases(part, layers).items()}
    found_parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    stems: dict[tuple[str, str], str] = {}  # the file's own name of each layer, for messages
    unknown = []
    for key, tensor in tensors.items():
        suffix = next((s for s in KOHYA_SUFFIXES if key.endswith(s)), None)
        module = by_kohya_name.get(key[: -len(suffix)]) if suffix else None
        if module is None:
            unknown.append(key)
            continue
        stem = stems.setdefault(module, key[: -len(suffix)])
        if stem != key[: -len(suffix)]:
            raise LoraFileError(f"{file}: {stem} and {key[: -len(suffix)]} name the same layer")
        found_parts.setdefault(module, {})[suffix] = tensor
    if unknown:
        example = next((key for key in unknown if _unread_kind(key, models)), unknown[0])
        raise LoraFileError(f"{file}: {len(unknown)} key(s) this UNet has no place for, e.g. {example}"
                            f"{_unread_kind(example, models)}")
    parts: dict[str, dict[str, LowRankPair]] = {part: {} for part in models}
    for (part, module), found in found_parts.items():
        if ".lora_down.weight" not in found or ".lora_up.weight" not in found:
            raise LoraFileError(f"{file}: {stems[(part, module)]} lacks its lora_down or lora_up weight")
        down, up = found[".lora_down.weight"], found[".lora_up.weight"]
        if ".alpha" in found and found[".alpha"].numel() != 1:
            raise LoraFileError(f"{file}: {stems[(part, module)]}.alpha holds {found['.alpha'].numel()} values; "
                                "an alpha is one number")
        alpha = float(found.get(".alpha", 0)) or float(down.shape[0])  # none or 0: alpha = rank, as sd-scripts reads it
        parts[part][module] = LowRankPair(down=down, up=up, alpha=alpha)
    return parts


def _layer_aliases(part: str, layers: dict[str, torch.nn.Module]) -> dict[str, str]:
    """The names a file may give each layer -> the layer's own name. The CLIP text encoder's layers are
    ``text_model.encoder.layers.N...`` in transformers 4 (and in every sd-scripts file) and
    ``encoder.layers.N...`` in transformers 5: either name finds the layer."""
    if part != TEXT_ENCODER_PART:
        return {name: name for name in layers}
    aliases = {}
    for name in layers:
        short = name.removeprefix(CLIP_TEXT_MODEL_LEVEL)
        aliases[short] = aliases[CLIP_TEXT_MODEL_LEVEL + short] = name
    return aliases


def _unread_kind(key: str, models: dict) -> str:
    """What a key we do not read belongs to, for the message ('' when nothing known)."""
    if key.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")):
        return " (an SDXL LoRA: its two text encoders are not SD1.5's)"
    if key.startswith(("lora_te_", DIFFUSERS_TEXT_ENCODER_PREFIX)):
        return "" if TEXT_ENCODER_PART in models else TEXT_ENCODER_NOTE
    if ".hada_" in key or ".lokr_" in key:
        return " (a LyCORIS LoHa/LoKr: cachetrain-lora merge and a --lora_type loha|lokr run read these)"
    if key.endswith(".lora_mid.weight"):
        return " (a LoCon with Tucker factors, lora_mid: not read here; save it without use_tucker)"
    if key.endswith(".dora_scale") or "lora_magnitude_vector" in key:
        return " (DoRA: its magnitude vectors are not read, only LoRA and LoCon)"
    return ""


def _pairs_from_diffusers(tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                          models: dict[str, dict[str, torch.nn.Module]], file: Path) -> dict[str, dict[str, LowRankPair]]:
    prefixes = {UNET_PART: DIFFUSERS_PREFIX, TEXT_ENCODER_PART: DIFFUSERS_TEXT_ENCODER_PREFIX}
    aliases = {part: _layer_aliases(part, layers) for part, layers in models.items()}
    found_parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    names_in_file: dict[tuple[str, str], str] = {}  # the file's own name of each layer: its config's keys
    for key, tensor in tensors.items():
        suffix = next((s for s in DIFFUSERS_SUFFIXES if key.endswith(s)), None)
        part = next((part for part in models if key.startswith(prefixes[part])), None)
        if part is None or suffix is None:
            raise LoraFileError(f"{file}: key {key} is not a UNet LoRA weight we know{_unread_kind(key, models)}")
        in_file = key[len(prefixes[part]): -len(suffix)]
        module = (part, aliases[part].get(in_file, in_file))
        if names_in_file.setdefault(module, in_file) != in_file:
            raise LoraFileError(f"{file}: {names_in_file[module]} and {in_file} name the same layer")
        found_parts.setdefault(module, {})[DIFFUSERS_SUFFIXES[suffix]] = tensor
    configs = {part: _part_config(metadata, prefixes[part]) for part in models}
    parts: dict[str, dict[str, LowRankPair]] = {part: {} for part in models}
    for (part, module), found in found_parts.items():
        in_file = names_in_file[(part, module)]
        if set(found) != {"down", "up"}:
            raise LoraFileError(f"{file}: {in_file} lacks its down (lora_A) or up (lora_B) weight")
        rank, config = found["down"].shape[0], configs[part]
        parts[part][module] = LowRankPair(down=found["down"], up=found["up"], alpha=_file_alpha(config, in_file, rank))
    return parts


def _file_alpha(config: dict, name: str, rank: int) -> float:
    """The alpha of layer ``name`` (of rank ``rank``) as PEFT applies a LoraConfig: alpha_pattern's keys match a
    name's ending or as a regex, and rank-stabilized LoRA (use_rslora) scales by alpha / sqrt(rank), which is
    alpha * sqrt(rank) over the rank."""
    from peft.utils.other import get_pattern_key

    patterns = config.get("alpha_pattern") or {}
    alpha = float(patterns.get(get_pattern_key(list(patterns), name), config.get("lora_alpha", rank)))
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def _part_config(metadata: dict[str, str], prefix: str) -> dict:
    """One model's LoraConfig values of a diffusers file's header ({} when it has none: alpha = rank)."""
    try:
        packed = json.loads(metadata.get(METADATA_KEY, "{}"))
    except ValueError:
        return {}
    return {key[len(prefix):]: value for key, value in packed.items() if key.startswith(prefix)}


# -- writing ----------------------------------------------------------------------------------

def lora_config_values(pairs: dict[str, LowRankPair]) -> dict:
    """The LoraConfig a file's pairs make (its most common rank and alpha, patterns for the others)."""
    ranks = [pair.rank for pair in pairs.values()]
    rank = max(set(ranks), key=ranks.count)
    alphas = [pair.alpha for pair in pairs.values() if pair.rank == rank]
    alpha = max(set(alphas), key=alphas.count)
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(pairs),
            "rank_pattern": {name: pair.rank for name, pair in pairs.items() if pair.rank != rank},
            "alpha_pattern": {name: pair.alpha for name, pair in pairs.items() if pair.alpha != alpha},
            "use_dora": False, "lora_dropout": 0.0, "init_lora_weights": True}


def _serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({key: value.detach().contiguous().cpu() for key, value in tensors.items()}, metadata=metadata)


def write_diffusers_lora(folder: Path | str, pairs: dict[str, LowRankPair], dtype: torch.dtype = torch.float32) -> Path:
    """``folder/pytorch_lora_weights.safetensors`` in diffusers' layout, its alpha in the header."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, pair in pairs.items():
        tensors[f"{DIFFUSERS_PREFIX}{name}.lora_A.weight"] = pair.down.to(dtype)
        tensors[f"{DIFFUSERS_PREFIX}{name}.lora_B.weight"] = pair.up.to(dtype)
    config = {DIFFUSERS_PREFIX + key: value for key, value in lora_config_values(pairs).items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(config, sort_keys=True)}
    path = folder / DIFFUSERS_LORA_FILE
    write_atomically(path, _serialize(tensors, metadata))
    return path


def with_one_alpha(pairs: dict[str, LowRankPair]) -> dict[str, LowRankPair]:
    """The same changes with every layer at the most common alpha, each other layer's alpha baked into its
    up matrix. diffusers' conversion of the kohya layout applies one alpha to every attention layer (the
    per-layer alphas it makes name no PEFT module), so layers of other alphas would load changed."""
    alphas = [pair.alpha for pair in pairs.values()]
    alpha = max(set(alphas), key=alphas.count) if alphas else 0.0
    return {name: pair if pair.alpha == alpha else LowRankPair(pair.down, pair.up * (pair.alpha / alpha), alpha)
            for name, pair in pairs.items()}


def kohya_metadata(pairs: dict[str, LowRankPair], *, title: str, resolution: int | None = None,
                   steps: int | None = None, prediction_type: str = "epsilon") -> dict[str, str]:
    """The ss_* keys kohya's tools and A1111 show, and the ModelSpec keys ComfyUI and A1111 read."""
    pairs = with_one_alpha(pairs)  # as write_kohya_lora writes them
    values = lora_config_values(pairs)
    convolutions = [pair for pair in pairs.values() if pair.down.dim() == 4 and pair.down.shape[-1] > 1]
    network_args = {"conv_dim": str(convolutions[0].rank), "conv_alpha": str(convolutions[0].alpha)} if convolutions else {}
    return network_metadata("networks.lora", values["r"], values["lora_alpha"], network_args, title=title,
                            resolution=resolution, steps=steps, prediction_type=prediction_type)


def network_metadata(network_module: str, rank: int, alpha: float, network_args: dict[str, str], *, title: str,
                     resolution: int | None = None, steps: int | None = None,
                     prediction_type: str = "epsilon") -> dict[str, str]:
    """The header of a kohya-layout adapter file: sd-scripts' ss_* keys and the ModelSpec keys."""
    metadata = {
        "ss_network_module": network_module,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_output_name": title,
        "ss_training_comment": f"cachetrain {__version__}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": SD1_LORA_ARCHITECTURE,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
    }
    if network_args:
        metadata["ss_network_args"] = json.dumps(network_args)
    if resolution:
        metadata["modelspec.resolution"] = f"{resolution}x{resolution}"
        metadata["ss_resolution"] = f"({resolution}, {resolution})"
    if steps is not None:
        metadata["ss_steps"] = str(steps)
    return metadata


def write_kohya_lora(path: Path | str, pairs: dict[str, LowRankPair], metadata: dict[str, str],
                     dtype: torch.dtype = torch.float16) -> Path:
    """One ``.safetensors`` in the kohya/A1111 layout (alpha per layer as a scalar tensor, one value in all)."""
    tensors = {}
    for name, pair in with_one_alpha(pairs).items():
        key = kohya_name(name)
        tensors[f"{key}.lora_down.weight"] = pair.down.to(dtype)
        tensors[f"{key}.lora_up.weight"] = pair.up.to(dtype)
        tensors[f"{key}.alpha"] = torch.tensor(pair.alpha, dtype=dtype)
    path = Path(path)
    write_atomically(path, _serialize(tensors, metadata))
    return path
