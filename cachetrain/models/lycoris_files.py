"""LoHa and LoKr in the LyCORIS single-file layout that A1111, Forge, ComfyUI and sd-scripts load.

Written here for the trainer's checkpoints (``--save_kohya_lora``), and read here for ``cachetrain-lora merge``
(``lycoris_changes``: each layer's change by the formulas below, as LyCORIS' own modules compute it).

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

from pathlib import Path

import torch

from ..atomic import write_atomically
from .lora_files import KOHYA_PREFIX, LoraFileError, kohya_name, lora_file_in, network_metadata, read_safetensors

LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
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


def lycoris_changes(path: Path | str, layers: dict[str, torch.nn.Module],
                    drop_text_encoder: bool = False) -> dict[str, torch.Tensor]:
    """Each UNet layer's change (fp32, in its weight's shape) of a LoHa/LoKr file in LyCORIS' layout, as
    LyCORIS' modules compute it; LoraFileError naming the file and key for what is not read here (Tucker
    factors, a text-encoder part unless dropped, a layer this UNet lacks or a shape it does not have)."""
    file = lora_file_in(path)
    tensors, _ = read_safetensors(file)
    by_kohya_name = {kohya_name(name): name for name in layers}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stem, _, part = key.partition(".")  # lora_unet_<layer>.<part>, the part itself may hold dots (lora_down.weight)
        if stem.startswith("lora_te"):
            if drop_text_encoder:
                continue
            raise LoraFileError(f"{file}: {key} belongs to a text-encoder part, which is not merged from a LyCORIS "
                                f"file; --unet_only merges the UNet's part")
        if not stem.startswith(KOHYA_PREFIX) or stem not in by_kohya_name:
            raise LoraFileError(f"{file}: key {key} names no layer of this UNet (an adapter of another model?)")
        if part not in LOHA_PARTS + LOKR_PARTS + LORA_PARTS + ("alpha",):
            raise LoraFileError(f"{file}: key {key} is not a LoRA, LoHa or LoKr tensor read here")
        grouped.setdefault(stem, {})[part] = tensor.float()
    changes = {}
    for stem, parts in grouped.items():
        name = by_kohya_name[stem]
        shape = tuple(layers[name].weight.shape)
        try:  # the change as [out, in * k * k]; a file may mix LoRA (LoCon) layers in
            change = _loha_change(parts) if "hada_w1_a" in parts else \
                _lokr_change(parts) if any(part.startswith("lokr_") for part in parts) else _lora_change(parts)
        except (KeyError, RuntimeError) as error:
            raise LoraFileError(f"{file}: {stem} is not a LoHa/LoKr read here ({type(error).__name__}: {error})") from None
        if change.shape[0] != shape[0] or change.numel() != layers[name].weight.numel():
            raise LoraFileError(f"{file}: {stem} changes a weight of shape {list(change.shape)}, this UNet's is "
                                f"{list(shape)} (an adapter of another base model)")
        changes[name] = change.reshape(shape)
    return changes


def _alpha_over_rank(parts: dict[str, torch.Tensor], rank: int) -> float:
    """A layer's scale: alpha / rank, with no alpha or an alpha of 0 read as alpha = rank (LyCORIS, sd-scripts)."""
    return (float(parts.get("alpha", 0)) or rank) / rank


def _lora_change(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    down, up = parts["lora_down.weight"].flatten(1), parts["lora_up.weight"].flatten(1)
    return _alpha_over_rank(parts, down.shape[0]) * (up @ down)


def _loha_change(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    if "hada_t1" in parts or "hada_t2" in parts:
        raise RuntimeError("Tucker factors (hada_t1/hada_t2) are not read")
    scale = _alpha_over_rank(parts, parts["hada_w1_b"].shape[0])
    return scale * (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])


def _lokr_change(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """kron(w1, w2) with both as matrices: a convolution's [out, in, k, k] second factor flattened to
    [out, in * k * k] gives the same numbers as LyCORIS' 4-d product, flattened the same way."""
    if "lokr_t2" in parts:
        raise RuntimeError("Tucker factors (lokr_t2) are not read")
    w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
    w2 = parts["lokr_w2"].flatten(1) if "lokr_w2" in parts else parts["lokr_w2_a"] @ parts["lokr_w2_b"].flatten(1)
    low_rank = next((parts[key].shape[0] for key in ("lokr_w1_b", "lokr_w2_b") if key in parts), None)
    # LyCORIS scales by alpha / rank where a factor is low-rank, not at all where both are full matrices
    scale = _alpha_over_rank(parts, low_rank) if low_rank is not None else 1.0
    return scale * torch.kron(w1, w2)
