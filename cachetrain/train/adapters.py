"""Adapters (--lora_type lora|loha|lokr): PEFT layers attached to the frozen UNet, the only part that trains.

LoRA (and LoCon: LoRA on the convolutions too) is PEFT's LoraConfig, LoHa and LoKr its LoHaConfig and
LoKrConfig; no adapter layer is written here. Which layers get one is chosen by group
(``--lora_targets attention feedforward conv``) or by name (``--lora_modules``), resolved here to the
UNet's module names before PEFT sees them, so a name that matches nothing, or a rank larger than a
layer, is refused before step 1 with one line.

A LoRA checkpoint holds the adapter in diffusers' layout (``pytorch_lora_weights.safetensors``, and
with --save_kohya_lora the kohya/A1111 file); LoHa and LoKr in PEFT's own folder (``unet_adapter/``:
adapter_config.json + adapter_model.safetensors), and with --save_kohya_lora in LyCORIS' kohya-layout file. The base UNet beside it is the frozen one, written
once per start and hard-linked into every checkpoint.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint_layout import PEFT_ADAPTER_COMPONENT
from ..models.adapter_folders import peft_adapter_folder, peft_load_problem, read_peft_adapter_config, state_load_problem
from ..models.lora_files import (DIFFUSERS_LORA_FILE, LAYER_GROUPS, KOHYA_LORA_FILE, LoraFileError, LowRankPair,
                                 adaptable_layers, first_non_finite, has_text_encoder_part, kohya_metadata, read_lora,
                                 read_lora_parts, write_diffusers_lora, write_kohya_lora)
from ..models.lycoris_files import (is_lycoris_file, lycoris_metadata, lycoris_tensors, read_lycoris_start,
                                    write_lycoris_file)

ADAPTER_TYPES = ("lora", "loha", "lokr")


class AdapterError(ValueError):
    """Adapter flags or files that cannot train on this UNet; one line naming the flag or file."""


@dataclass
class AdapterSpec:
    kind: str  # lora | loha | lokr
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attention"])
    modules: list[str] = field(default_factory=list)  # names (a suffix or a full-match regex) beside the groups
    start_weights: str | None = None  # --lora_weights

    @classmethod
    def of(cls, config) -> AdapterSpec | None:
        if not config.lora_type:
            return None
        return cls(kind=config.lora_type, rank=config.lora_rank, alpha=config.lora_alpha or config.lora_rank,
                   dropout=config.lora_dropout, targets=list(config.lora_targets), modules=list(config.lora_modules),
                   start_weights=config.lora_weights)


def target_layers(unet: torch.nn.Module, spec: AdapterSpec) -> dict[str, torch.nn.Module]:
    """The Linear/Conv2d layers the spec names, by module name; AdapterError for a name matching nothing."""
    layers = adaptable_layers(unet)
    chosen = {name for name in layers for group in spec.targets if LAYER_GROUPS[group].search(name)}
    for wanted in spec.modules:
        try:
            pattern = re.compile(wanted)
        except re.error:
            pattern = None
        matched = {name for name in layers if name == wanted or name.endswith("." + wanted)
                   or (pattern is not None and pattern.fullmatch(name))}
        if not matched:
            raise AdapterError(f"--lora_modules {wanted}: matches no Linear or Conv2d layer of this UNet "
                               f"(names look like {next(iter(sorted(layers)))})")
        chosen |= matched
    if not chosen:
        raise AdapterError(f"--lora_targets {' '.join(spec.targets)}: this UNet has no such layers")
    return {name: layers[name] for name in sorted(chosen)}


def _rank_limit(layer: torch.nn.Module) -> int:
    """The largest rank a change of this layer's weight can have."""
    out_features, *rest = layer.weight.shape
    inputs = 1
    for size in rest:
        inputs *= size
    return min(out_features, inputs)


def check_rank(layers: dict[str, torch.nn.Module], rank: int) -> None:
    too_small = [(name, _rank_limit(layer)) for name, layer in layers.items() if _rank_limit(layer) < rank]
    if too_small:
        name, limit = too_small[0]
        raise AdapterError(f"--lora_rank {rank} is larger than {len(too_small)} targeted layer(s) allow, e.g. "
                           f"{name} (at most {limit}); lower the rank or leave those layers out")


def _peft_config(spec: AdapterSpec, names: list[str], rank_pattern: dict | None = None,
                 alpha_pattern: dict | None = None, **lycoris_options):
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if spec.kind == "lora":
        return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=names,
                          init_lora_weights=True, rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {})
    kind = LoHaConfig if spec.kind == "loha" else LoKrConfig
    return kind(r=spec.rank, alpha=spec.alpha, module_dropout=spec.dropout, target_modules=names, init_weights=True,
                rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {}, **lycoris_options)


def _rank_and_alpha_patterns(ranks: dict[str, int], alphas: dict[str, float]) -> tuple[int, float, dict, dict]:
    """A start's per-layer ranks and alphas as PEFT's config holds them: the most common rank (and its layers'
    most common alpha) as r and alpha, the layers that differ in rank_pattern and alpha_pattern."""
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas[name] for name in ranks if ranks[name] == rank).most_common(1)[0][0]
    return (rank, alpha, {name: value for name, value in ranks.items() if value != rank},
            {name: value for name, value in alphas.items() if value != alpha})


def attach_adapter(unet: torch.nn.Module, spec: AdapterSpec, seed: int) -> list[torch.nn.Parameter]:
    """Freeze the UNet, attach the adapter (seeded, or from --lora_weights), return its parameters."""
    start = None
    if spec.start_weights:
        folder = peft_adapter_folder(Path(spec.start_weights))
        if folder is not None:
            return _attach_from_peft_folder(unet, spec, folder)
        if is_lycoris_file(spec.start_weights):
            return _attach_from_lycoris_file(unet, spec, Path(spec.start_weights))
        try:
            start = _read_lora_start(spec.start_weights, adaptable_layers(unet))
        except LoraFileError as error:
            raise AdapterError(f"--lora_weights {error}") from None
        if spec.kind != "lora":
            raise AdapterError(f"--lora_weights {spec.start_weights}: a LoRA; it starts a --lora_type lora run")
    layers = target_layers(unet, spec)
    if start is not None:
        every_layer = adaptable_layers(unet)
        layers = {name: every_layer[name] for name in start}  # the file's layers, whatever the flags name
    if start is None:  # a file's ranks are what it holds: above a layer's limit (conv_out's 4 outputs in a
        check_rank(layers, spec.rank)  # LyCORIS LoCon) the pair is only larger than it needs to be
    unet.requires_grad_(False)
    rank_pattern = alpha_pattern = None
    if start is not None:  # the file decides rank and alpha of each layer
        spec.rank, spec.alpha, rank_pattern, alpha_pattern = _rank_and_alpha_patterns(
            {name: pair.rank for name, pair in start.items()}, {name: pair.alpha for name, pair in start.items()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(_peft_config(spec, list(layers), rank_pattern, alpha_pattern))
    trainable = [parameter for parameter in unet.parameters() if parameter.requires_grad]
    for parameter in trainable:  # fp32 beside a bf16 base (--bf16_weights): small updates must not round away
        parameter.data = parameter.data.float()
    if start is not None:
        load_lora_pairs(unet, start)
    return trainable


def _read_lora_start(path: str, layers: dict[str, torch.nn.Module]) -> dict[str, LowRankPair]:
    """The UNet part of a LoRA file to start from; a text-encoder part is left out, said in one line: the
    captions are cached, so nothing here would train or use it."""
    dropped = has_text_encoder_part(path)
    pairs, _ = read_lora_parts(path, layers, drop_text_encoder=dropped)
    if dropped:
        print(f"[train] --lora_weights {path}: its text-encoder layers are left out (the captions are cached); "
              f"its {len(pairs)} UNet layers start the adapter", file=sys.stderr)
    return pairs


def _attach_from_peft_folder(unet: torch.nn.Module, spec: AdapterSpec, folder: Path) -> list[torch.nn.Parameter]:
    """--lora_weights of a LoHa/LoKr run's checkpoint: its own PEFT config (layers, rank, alpha; the dropout
    of this run's flags) attached and its weights loaded, as a resume of that run would."""
    from safetensors.torch import load_file

    try:
        config = read_peft_adapter_config(folder)
    except LoraFileError as error:
        raise AdapterError(f"--lora_weights {error}") from None
    kind = config.peft_type.value.lower()
    if kind != spec.kind:
        raise AdapterError(f"--lora_weights {folder}: a {kind} adapter; it starts a --lora_type {kind} run")
    every_layer = adaptable_layers(unet)
    targets = [] if isinstance(config.target_modules, str) else config.target_modules  # a regex is PEFT's to match
    absent = sorted(target for target in targets  # names or, as PEFT shortens a long list, name endings
                    if not any(name == target or name.endswith("." + target) for name in every_layer))
    if absent:
        raise AdapterError(f"--lora_weights {folder}: layer {absent[0]} is not in this UNet (an adapter of another model?)")
    config.module_dropout, config.inference_mode = spec.dropout, False  # this run's dropout; it trains
    try:
        state = load_file(folder / "adapter_model.safetensors")
    except Exception as error:  # a damaged file
        raise AdapterError(f"--lora_weights {folder}: not an adapter for this UNet "
                           f"({state_load_problem(error)})") from None
    broken = first_non_finite(state)  # a LyCORIS file's reader checks its own
    if broken is not None:
        raise AdapterError(f"--lora_weights {folder}: {broken} holds NaN or infinite values")
    spec.rank, spec.alpha = config.r, config.alpha
    return _attach_and_load(unet, config, state, folder)


def _attach_from_lycoris_file(unet: torch.nn.Module, spec: AdapterSpec, file: Path) -> list[torch.nn.Parameter]:
    """--lora_weights of a LoHa/LoKr file in LyCORIS' layout (--save_kohya_lora's, or another tool's): PEFT's
    layers of the file's kind on the file's layers, with the ranks, alphas, LoKr split and Tucker form that give
    them the file's tensors and the change LyCORIS computes from them; the weights loaded."""
    try:
        start = read_lycoris_start(file, adaptable_layers(unet))
    except LoraFileError as error:
        raise AdapterError(f"--lora_weights {error}") from None
    if start.kind != spec.kind:
        raise AdapterError(f"--lora_weights {file}: a {start.kind} adapter; it starts a --lora_type {start.kind} run")
    spec.rank, spec.alpha, rank_pattern, alpha_pattern = _rank_and_alpha_patterns(start.ranks, start.alphas)
    options = {"use_effective_conv2d": start.tucker}  # the k x k convolutions' factors in Tucker form
    if start.kind == "lokr":
        options.update(decompose_both=start.decompose_both, decompose_factor=start.decompose_factor)
    config = _peft_config(spec, sorted(start.ranks), rank_pattern, alpha_pattern, **options)
    return _attach_and_load(unet, config, start.state, file)


def _attach_and_load(unet: torch.nn.Module, config, state: dict[str, torch.Tensor],
                     source: Path) -> list[torch.nn.Parameter]:
    """The frozen UNet with a LoHa/LoKr of ``config`` attached and ``state`` (PEFT's names) loaded into it."""
    from peft.utils import set_peft_model_state_dict

    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # the start values are overwritten: the run's random stream is left alone
        unet.add_adapter(config)
    trainable = [parameter for parameter in unet.parameters() if parameter.requires_grad]
    for parameter in trainable:  # fp32 beside a bf16 base, before the start is loaded: nothing rounds to bf16
        parameter.data = parameter.data.float()
    try:
        result = set_peft_model_state_dict(unet, state)
    except Exception as error:  # a shape of another base
        raise AdapterError(f"--lora_weights {source}: not an adapter for this UNet "
                           f"({state_load_problem(error)})") from None
    problem = peft_load_problem(result, "default")
    if problem:
        raise AdapterError(f"--lora_weights {source}: {problem}")
    return trainable


def adapter_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors in PEFT's names (without the adapter's name)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def lora_pairs(unet: torch.nn.Module) -> dict[str, LowRankPair]:
    """A LoRA adapter's layers as (down, up, alpha), as the files hold them."""
    config = unet.peft_config["default"]
    state = adapter_state(unet)
    pairs = {}
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            alpha = config.alpha_pattern.get(name, config.lora_alpha)
            pairs[name] = LowRankPair(down=down.detach().float().clone(), up=state[name + ".lora_B.weight"].detach().float().clone(),
                                      alpha=float(alpha))
    return pairs


def load_lora_pairs(unet: torch.nn.Module, pairs: dict[str, LowRankPair]) -> None:
    """Put a LoRA's (down, up) into the attached adapter (its alpha is the adapter's config)."""
    from peft.utils import set_peft_model_state_dict

    state = {}
    for name, pair in pairs.items():
        state[f"{name}.lora_A.weight"] = pair.down
        state[f"{name}.lora_B.weight"] = pair.up
    result = set_peft_model_state_dict(unet, state)
    unexpected = [key for key in result.unexpected_keys if "lora_" in key]
    if unexpected:
        raise AdapterError(f"the adapter has no place for {unexpected[0]}")


def base_unet_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base weights of an adapted UNet, under the plain UNet's names."""
    state = {}
    for key, value in unet.state_dict().items():
        if re.search(r"\.(lora_|hada_|lokr_)", key):
            continue
        state[key.replace(".base_layer.", ".")] = value
    return state


def write_base_unet(unet: torch.nn.Module, folder: Path) -> None:
    """The base UNet as a diffusers UNet folder (config + weights): what every checkpoint links as unet/."""
    from ..atomic import write_tensors_atomically

    folder.mkdir(parents=True, exist_ok=True)
    unet.save_config(folder)
    tensors = {key: value.detach().contiguous() for key, value in base_unet_state(unet).items()}
    write_tensors_atomically(folder / "diffusion_pytorch_model.safetensors", tensors)


def write_adapter(unet: torch.nn.Module, spec: AdapterSpec, folder: Path, kohya: bool = False,
                  title: str = "", steps: int | None = None, prediction_type: str = "epsilon") -> None:
    """The adapter's files into ``folder``: diffusers' LoRA file (+ the kohya file), or PEFT's folder."""
    if spec.kind == "lora":
        pairs = lora_pairs(unet)
        write_diffusers_lora(folder, pairs)
        if kohya:
            size = unet.config.sample_size * 8
            write_kohya_lora(folder / KOHYA_LORA_FILE, pairs, kohya_metadata(
                pairs, title=title, resolution=size, steps=steps, prediction_type=prediction_type))
        return
    from safetensors.torch import save

    from ..atomic import write_atomically

    target = folder / PEFT_ADAPTER_COMPONENT
    target.mkdir(parents=True, exist_ok=True)
    config = unet.peft_config["default"]
    config.save_pretrained(target)
    state = adapter_state(unet)
    tensors = {key: value.detach().contiguous() for key, value in state.items()}
    write_atomically(target / "adapter_model.safetensors", save(tensors))
    if kohya:
        from peft.utils.other import get_pattern_key

        def rank_of(name: str) -> int:  # the patterns' keys match as PEFT matches them (a name's ending, a regex)
            return config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)

        def alpha_of(name: str) -> float:
            return config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.alpha)

        layers = adaptable_layers(unet)
        convolutions = sorted(name for name in {key.rsplit(".", 1)[0] for key in state}
                              if isinstance(layers[name], torch.nn.Conv2d) and layers[name].kernel_size != (1, 1))
        write_lycoris_file(folder / KOHYA_LORA_FILE, lycoris_tensors(state, rank_of, alpha_of), lycoris_metadata(
            spec.kind, config.r, config.alpha, rank_of(convolutions[0]) if convolutions else None, title=title,
            resolution=unet.config.sample_size * 8, steps=steps, prediction_type=prediction_type))


def load_adapter(unet: torch.nn.Module, spec: AdapterSpec, folder: Path) -> None:
    """Put a checkpoint's adapter (as write_adapter wrote it) back into the attached adapter."""
    if spec.kind == "lora":
        load_lora_pairs(unet, read_lora(folder / DIFFUSERS_LORA_FILE, adaptable_layers(unet)))
        return
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = folder / PEFT_ADAPTER_COMPONENT / "adapter_model.safetensors"
    try:  # safetensors' own error for a cut file is neither a ValueError nor an OSError
        set_peft_model_state_dict(unet, load_file(weights))
    except Exception as error:
        raise LoraFileError(f"{weights}: {state_load_problem(error)}") from None


def adapter_identity(unet: torch.nn.Module) -> dict[str, float | str]:
    """The attached adapter's alpha, which a resume must keep: the same weights under another alpha are
    another adapter. One number, or a fingerprint where the layers' alphas differ ({} without one)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    alphas = {}
    for name, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer):  # LoRA keeps lora_alpha, LoHa/LoKr alpha: per adapter name
            for alpha in (getattr(module, "lora_alpha", None) or getattr(module, "alpha", {})).values():
                alphas[name] = float(alpha)
    if not alphas:
        return {}
    if len(set(alphas.values())) == 1:
        return {"adapter_alpha": next(iter(alphas.values()))}
    listed = "\n".join(f"{name} {alpha!r}" for name, alpha in sorted(alphas.items()))
    return {"adapter_alpha": f"per layer, sha256 {hashlib.sha256(listed.encode()).hexdigest()[:16]}"}


def describe(unet: torch.nn.Module, spec: AdapterSpec | None) -> str:
    """What trains, for the line a run prints at its start ('' without an adapter)."""
    if spec is None:
        return ""
    layers = {re.split(r"\.(lora_|hada_|lokr_)", name)[0] for name, p in unet.named_parameters() if p.requires_grad}
    chosen = "from --lora_weights" if spec.start_weights else " ".join(spec.targets + spec.modules)
    return (f" (adapter: {spec.kind} rank {spec.rank} alpha {spec.alpha:g} on {len(layers)} layers, {chosen}; "
            f"the UNet's own weights are frozen)")
