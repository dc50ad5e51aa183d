"""LoHa and LoKr in the LyCORIS single-file layout that A1111, Forge, ComfyUI and sd-scripts load.

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
from .lora_files import kohya_name, network_metadata

LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
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

