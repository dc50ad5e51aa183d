"""LoHa and LoKr in the LyCORIS single-file layout that A1111, Forge, ComfyUI and sd-scripts load.

Written here for the trainer's checkpoints (``--save_kohya_lora``), and read here for ``cachetrain-lora merge``
(``lycoris_changes``: each layer's change by the formulas below, as LyCORIS' own modules compute it) and for a
run's start (``read_lycoris_start``: PEFT's config values and tensors that make PEFT's layers compute the same).

The trainer's LoHa/LoKr layers are PEFT's (``LoHaConfig``, ``LoKrConfig``); their tensors carry the same
names and shapes as LyCORIS' own modules, so the file is PEFT's tensors under kohya's layer names
(``lora_unet_<module with _ for .>.<part>``) plus one ``.alpha`` scalar per layer:

- LoHa: ``hada_w1_a`` [out, r], ``hada_w1_b`` [r, in(*k*k)], ``hada_w2_a``, ``hada_w2_b``; the change is
  ``alpha / r * (w1_a @ w1_b) * (w2_a @ w2_b)``, in PEFT and in LyCORIS alike.
- LoKr: ``lokr_w1`` (or ``lokr_w1_a``/``lokr_w1_b``) and ``lokr_w2`` (or ``lokr_w2_a``/``lokr_w2_b``); the change
  is ``scale * kron(w1, w2)``. LyCORIS' loader and diffusers' LoKr conversion take the scale as
  ``alpha / r`` when a factor is low-rank, and as 1 when both factors are full matrices; PEFT
  scales by ``alpha / r`` always. A layer with two full factors is therefore written with PEFT's scale
  multiplied into ``lokr_w1`` and ``alpha = r`` (what LyCORIS itself writes for such a layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import write_atomically
from .lora_files import (KOHYA_PREFIX, LoraFileError, first_non_finite, kohya_name, lora_file_in, network_metadata,
                         read_safetensors)

LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
TUCKER_PARTS = ("hada_t1", "hada_t2", "lokr_t2")  # LyCORIS' use_tucker, PEFT's use_effective_conv2d
LORA_PARTS = ("lora_down.weight", "lora_up.weight")  # LoCon layers a LyCORIS file may hold beside LoHa/LoKr ones
LYCORIS_NETWORK_MODULE = "lycoris.kohya"  # what sd-scripts records for a LyCORIS network


def _layers(peft_state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT's adapter state (``NAME.hada_w1_a`` ...) grouped by layer: {NAME: {part: tensor}}."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in peft_state.items():
        name, part = key.rsplit(".", 1)
        if part not in LOHA_PARTS + LOKR_PARTS:
            raise ValueError(f"{key}: not a LoHa or LoKr tensor")
        layers.setdefault(name, {})[part] = tensor
    return layers


def lycoris_tensors(peft_state: dict[str, torch.Tensor], rank_of, alpha_of,
                    dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The file's tensors for a PEFT LoHa/LoKr state; ``rank_of(name)``/``alpha_of(name)`` give PEFT's r and alpha."""
    tensors = {}
    for name, parts in _layers(peft_state).items():
        rank, alpha = rank_of(name), float(alpha_of(name))
        parts = {part: tensor.detach().float() for part, tensor in parts.items()}
        if "lokr_w1" in parts and "lokr_w2" in parts:  # two full factors: readers apply no scale, so bake PEFT's in
            parts["lokr_w1"] = parts["lokr_w1"] * (alpha / rank)
            alpha = float(rank)
        key = kohya_name(name)
        for part, tensor in parts.items():
            tensors[f"{key}.{part}"] = tensor.to(dtype).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return tensors


def lycoris_metadata(kind: str, rank: int, alpha: float, conv_rank: int | None, *, title: str,
                     resolution: int | None = None, steps: int | None = None,
                     prediction_type: str = "epsilon") -> dict[str, str]:
    """sd-scripts' keys for a LyCORIS network (``ss_network_args`` names the algorithm) and the ModelSpec keys."""
    network_args = {"algo": kind}
    if kind == "lokr":
        network_args["factor"] = "-1"
    if conv_rank is not None:
        network_args.update(conv_dim=str(conv_rank), conv_alpha=str(alpha))
    return network_metadata(LYCORIS_NETWORK_MODULE, rank, alpha, network_args, title=title, resolution=resolution,
                            steps=steps, prediction_type=prediction_type)


def write_lycoris_file(path: Path | str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    from safetensors.torch import save

    path = Path(path)
    write_atomically(path, save(tensors, metadata=metadata))
    return path



def is_lycoris_file(path: Path | str) -> bool:
    """Whether a file (not a folder) holds LyCORIS LoHa/LoKr tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return any(key.rsplit(".", 1)[-1] in LOHA_PARTS + LOKR_PARTS for key in handle.keys())
    except Exception:  # not a safetensors file: the LoRA reader says so
        return False


def _layer_parts(path: Path | str, layers: dict[str, torch.nn.Module], text_encoder_hint: str,
                 drop_text_encoder: bool = False) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """(the file, {UNet layer name: {part: fp32 tensor}}) of a file in LyCORIS' layout; LoraFileError naming the
    file and key for a text-encoder part unless dropped, a layer this UNet lacks or a tensor no algorithm here has."""
    file = lora_file_in(path)
    tensors, _ = read_safetensors(file)
    by_kohya_name = {kohya_name(name): name for name in layers}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stem, _, part = key.partition(".")  # lora_unet_<layer>.<part>, the part itself may hold dots (lora_down.weight)
        if stem.startswith("lora_te"):
            if drop_text_encoder:
                continue
            raise LoraFileError(f"{file}: {key} belongs to a text-encoder part, {text_encoder_hint}")
        if not stem.startswith(KOHYA_PREFIX) or stem not in by_kohya_name:
            raise LoraFileError(f"{file}: key {key} names no layer of this UNet (an adapter of another model?)")
        if part not in LOHA_PARTS + LOKR_PARTS + LORA_PARTS + ("alpha",):
            raise LoraFileError(f"{file}: key {key} is not a LoRA, LoHa or LoKr tensor read here")
        if part == "alpha" and tensor.numel() != 1:  # float() of it would fail later, naming no file
            raise LoraFileError(f"{file}: {key} holds {tensor.numel()} values, not one (an alpha is one number)")
        grouped.setdefault(by_kohya_name[stem], {})[part] = tensor.float()
    return file, grouped


def lycoris_changes(path: Path | str, layers: dict[str, torch.nn.Module],
                    drop_text_encoder: bool = False) -> dict[str, torch.Tensor]:
    """Each UNet layer's change (fp32, in its weight's shape) of a LoHa/LoKr file in LyCORIS' layout, as
    LyCORIS' modules compute it; LoraFileError naming the file and key for what is not read here (a
    text-encoder part unless dropped, a layer this UNet lacks or a shape it does not have)."""
    file, grouped = _layer_parts(path, layers, "which is not merged from a LyCORIS file; --unet_only merges the "
                                               "UNet's part", drop_text_encoder)
    changes = {}
    for name, parts in grouped.items():
        stem, shape = kohya_name(name), tuple(layers[name].weight.shape)
        change = _layer_change(file, stem, _kind_of(parts), parts)  # a file may mix LoRA (LoCon) layers in
        if change.shape[0] != shape[0] or change.numel() != layers[name].weight.numel():
            raise LoraFileError(f"{file}: {stem} changes a weight of shape {list(change.shape)}, this UNet's is "
                                f"{list(shape)} (an adapter of another base model)")
        changes[name] = change.reshape(shape)
    return changes


def _layer_change(file: Path, stem: str, kind: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """A layer's change as [out, in * k * k]; LoraFileError naming the file and layer where its factors do not
    multiply (their ranks differ, a factor lacks a dimension) or a part is missing."""
    try:
        return _loha_change(parts) if kind == "loha" else _lokr_change(parts) if kind == "lokr" else \
            _lora_change(parts)
    except (KeyError, RuntimeError, IndexError) as error:
        problem = str(error).strip().splitlines()[0] if str(error).strip() else ""  # torch's may run to lines
        raise LoraFileError(f"{file}: {stem} is not a LoHa/LoKr read here ({type(error).__name__}: {problem})") \
            from None


def _kind_of(parts: dict[str, torch.Tensor]) -> str:
    """loha, lokr or lora (a LoCon layer) by a layer's tensors' names."""
    if any(part.startswith("hada_") for part in parts):
        return "loha"
    return "lokr" if any(part.startswith("lokr_") for part in parts) else "lora"


@dataclass
class LycorisStart:
    """A LoHa/LoKr file in LyCORIS' layout as PEFT's adapter: the values of PEFT's config that give its layers
    the file's shapes and scales, and the file's tensors under PEFT's names (``NAME.hada_w1_a`` ...)."""
    kind: str  # loha | lokr
    state: dict[str, torch.Tensor]
    ranks: dict[str, int]  # each layer's PEFT r
    alphas: dict[str, float]  # each layer's PEFT alpha: PEFT scales by alpha / r
    decompose_both: bool = False  # LoKr: a first factor is low-rank too
    decompose_factor: int = -1  # LoKr: how each side is split into the two factors' sides
    tucker: bool = False  # k x k convolutions' low-rank factors in Tucker form (PEFT's use_effective_conv2d)


def read_lycoris_start(path: Path | str, layers: dict[str, torch.nn.Module]) -> LycorisStart:
    """A LoHa/LoKr file in LyCORIS' layout (ours or another tool's) as the start of a PEFT adapter on ``layers``;
    LoraFileError naming the file and layer for what PEFT's LoHa/LoKr cannot hold as the file computes it: LoCon
    layers or both kinds in one file, a LoKr split PEFT does not make, a layer without all its factors or with
    factors that do not multiply, NaN or infinite values, an alpha of more than one value, a text-encoder part."""
    file, grouped = _layer_parts(path, layers, "which a run does not start from (the captions' embeddings are "
                                               "cached without it)")
    kinds = {name: _kind_of(parts) for name, parts in grouped.items()}
    if not kinds:
        raise LoraFileError(f"{file}: holds no UNet adapter layers")
    kind = "loha" if "loha" in kinds.values() else "lokr" if "lokr" in kinds.values() else "lora"
    if kind == "lora":
        raise LoraFileError(f"{file}: holds LoRA layers, no LoHa/LoKr ones (--lora_type lora starts from it)")
    if len(set(kinds.values())) > 1:
        other = next(name for name, found in kinds.items() if found != kind)
        raise LoraFileError(f"{file}: {kohya_name(other)} is a {kinds[other]} layer beside {kind} layers; a run starts "
                            f"from a file of one kind (cachetrain-lora merge reads such a file)")
    start = LycorisStart(kind=kind, state={}, ranks={}, alphas={})
    for name, parts in grouped.items():
        stem, weight = kohya_name(name), layers[name].weight
        needed = _missing_factor(kind, parts)
        if needed:
            raise LoraFileError(f"{file}: {stem} lacks {needed}")
        broken = first_non_finite(parts)
        if broken is not None:  # the run would train on loss=nan; the alpha is no tensor of PEFT's state
            raise LoraFileError(f"{file}: {stem}.{broken} holds NaN or infinite values")
        change = _layer_change(file, stem, kind, parts)
        if change.shape[0] != weight.shape[0] or change.numel() != weight.numel():
            raise LoraFileError(f"{file}: {stem} changes a weight of shape {list(change.shape)}, this UNet's is "
                                f"{list(weight.shape)} (an adapter of another base model)")
        start.ranks[name], start.alphas[name] = _peft_rank_and_alpha(kind, parts)
        start.state.update({f"{name}.{part}": tensor for part, tensor in parts.items() if part != "alpha"})
    start.tucker = any(part in parts for parts in grouped.values() for part in TUCKER_PARTS)
    if kind == "lokr":
        start.decompose_both = any("lokr_w1_a" in parts for parts in grouped.values())
        start.decompose_factor = _decompose_factor(file, grouped, layers)
    return start


def _missing_factor(kind: str, parts: dict[str, torch.Tensor]) -> str | None:
    if kind == "loha":
        tucker = ("hada_t1", "hada_t2") if "hada_t1" in parts or "hada_t2" in parts else ()
        absent = [part for part in LOHA_PARTS[:4] + tucker if part not in parts]
        return ", ".join(absent) or None
    if "lokr_t2" in parts and not ("lokr_w2_a" in parts and "lokr_w2_b" in parts):
        return "lokr_w2_a and lokr_w2_b beside its lokr_t2"
    for side in ("lokr_w1", "lokr_w2"):
        if side not in parts and not (f"{side}_a" in parts and f"{side}_b" in parts):
            return f"{side} (or {side}_a and {side}_b)"
    return None


def _peft_rank_and_alpha(kind: str, parts: dict[str, torch.Tensor]) -> tuple[int, float]:
    """The r and alpha a PEFT layer needs to have the file's factors and apply the file's scale. LoKr with two
    full factors: r large enough that PEFT makes both full, and alpha = r, since LyCORIS applies no scale there."""
    if kind == "loha":
        rank = parts["hada_w1_b"].shape[0]
        return rank, float(parts.get("alpha", 0)) or float(rank)
    low_rank = next((parts[key].shape[0] for key in ("lokr_w1_b", "lokr_w2_b") if key in parts), None)
    if low_rank is not None:
        return low_rank, float(parts.get("alpha", 0)) or float(low_rank)
    full = max(max(parts["lokr_w1"].shape), max(parts["lokr_w2"].shape[:2]), 1)
    return full, float(full)


def _factor_sides(parts: dict[str, torch.Tensor], layer: torch.nn.Module) -> tuple[int, int, int, int]:
    """(w1's rows, w1's columns, w2's rows, w2's columns without the kernel) of a LoKr layer."""
    w1_rows = (parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"]).shape[0]
    w1_columns = (parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_b"]).shape[1]
    if "lokr_t2" in parts:  # Tucker form: w2_a [r, out_k], w2_b [r, in_n]
        return w1_rows, w1_columns, parts["lokr_w2_a"].shape[1], parts["lokr_w2_b"].shape[1]
    w2_rows = (parts["lokr_w2"] if "lokr_w2" in parts else parts["lokr_w2_a"]).shape[0]
    kernel = math.prod(layer.weight.shape[2:])  # k * k of a convolution, 1 of a Linear
    w2_columns = parts["lokr_w2"].shape[1] if "lokr_w2" in parts else parts["lokr_w2_b"].shape[1] // kernel
    return w1_rows, w1_columns, w2_rows, w2_columns


def _decompose_factor(file: Path, grouped: dict[str, dict[str, torch.Tensor]],
                      layers: dict[str, torch.nn.Module]) -> int:
    """PEFT's one decompose_factor that splits every layer's sides as the file's factors do (LyCORIS' factor -1,
    its default, is PEFT's -1); LoraFileError naming a layer when none does."""
    from peft.tuners.lokr.layer import factorization

    sides = {name: _factor_sides(parts, layers[name]) for name, parts in grouped.items()}
    candidates = [-1] + sorted({side for a, b, _, _ in sides.values() for side in (a, b)})

    def splits(factor: int, name: str) -> bool:
        weight = layers[name].weight
        a, b, c, d = sides[name]
        return factorization(weight.shape[0], factor) == (a, c) and factorization(weight.shape[1], factor) == (b, d)

    for factor in candidates:
        if all(splits(factor, name) for name in sides):
            return factor
    name = next(name for name in sides if not splits(-1, name))
    a, b, c, d = sides[name]
    raise LoraFileError(f"{file}: {kohya_name(name)} splits its weight {list(layers[name].weight.shape[:2])} into "
                        f"factors {a}x{b} and {c}x{d}, which no decompose factor of PEFT's LoKr makes for every layer "
                        f"of the file (an adapter of another base model, or LyCORIS' factor larger than a side's root)")


def _alpha_over_rank(parts: dict[str, torch.Tensor], rank: int) -> float:
    """A layer's scale: alpha / rank, with no alpha or an alpha of 0 read as alpha = rank (LyCORIS, sd-scripts)."""
    return (float(parts.get("alpha", 0)) or rank) / rank


def _lora_change(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    down, up = parts["lora_down.weight"].flatten(1), parts["lora_up.weight"].flatten(1)
    return _alpha_over_rank(parts, down.shape[0]) * (up @ down)


def _tucker(core: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A convolution's factor from LyCORIS' Tucker form, flattened to [out, in * k * k]: the core [r, r, k, k]
    with ``up`` [r, out] on its first mode and ``down`` [r, in] on its second (LyCORIS' rebuild_tucker, PEFT's
    make_weight_cp)."""
    return torch.einsum("i j k l, i p, j r -> p r k l", core, up, down).flatten(1)


def _loha_change(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    scale = _alpha_over_rank(parts, parts["hada_w1_b"].shape[0])
    if "hada_t1" in parts or "hada_t2" in parts:  # use_tucker on a k x k convolution
        return scale * _tucker(parts["hada_t1"], parts["hada_w1_a"], parts["hada_w1_b"]) * \
            _tucker(parts["hada_t2"], parts["hada_w2_a"], parts["hada_w2_b"])
    return scale * (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])


def _lokr_second_factor(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """w2 as a matrix [out_k, in_n (* k * k)]: full, low-rank, or low-rank in Tucker form (use_tucker)."""
    if "lokr_w2" in parts:
        return parts["lokr_w2"].flatten(1)
    if "lokr_t2" in parts:
        return _tucker(parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"])
    return parts["lokr_w2_a"] @ parts["lokr_w2_b"].flatten(1)


def _lokr_change(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """kron(w1, w2) with both as matrices: a convolution's [out, in, k, k] second factor flattened to
    [out, in * k * k] gives the same numbers as LyCORIS' 4-d product, flattened the same way."""
    w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
    low_rank = next((parts[key].shape[0] for key in ("lokr_w1_b", "lokr_w2_b") if key in parts), None)
    # LyCORIS scales by alpha / rank where a factor is low-rank, not at all where both are full matrices
    scale = _alpha_over_rank(parts, low_rank) if low_rank is not None else 1.0
    return scale * torch.kron(w1, _lokr_second_factor(parts))
