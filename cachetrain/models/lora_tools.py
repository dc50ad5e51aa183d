"""Merging a LoRA into a model, and extracting a LoRA from two models (``cachetrain-lora merge|extract``).

    cachetrain-lora merge --model BASE --lora LORA --out OUT [--scale 1.0]
    cachetrain-lora extract --base BASE --tuned TUNED --rank 16 --out OUT [--targets attention feedforward conv]

BASE / TUNED are pipeline folders (a checkpoint, a run's final model) or SD1.5 single files; LORA is
a LoRA in either layout (a folder holding pytorch_lora_weights.safetensors, or a kohya/A1111 file), a
LoHa/LoKr run's checkpoint (PEFT's folder ``unet_adapter/`` in it, or that folder itself), or a LoHa/LoKr
file in LyCORIS' layout.

merge adds ``scale`` times each adapted layer's change (a LoRA's ``alpha / rank * up @ down``; a LoHa's or
LoKr's as PEFT's own layers compute it) to its weight, the text encoder's too where a LoRA has a part for it
(``lora_te_*`` / ``text_encoder.*`` keys), and writes OUT: a pipeline
folder, or with OUT ending in .safetensors a single file in the original SD layout. The result is a
model like any other (``--pretrained_model OUT``).

extract takes the difference of each targeted layer's weight, keeps its ``rank`` largest singular
directions (SVD; up = U S, down = V^T, alpha = rank) and reports what the rank leaves: the relative
error ||D - up @ down|| / ||D|| over all layers and the worst layer. OUT ending in .safetensors is
the kohya/A1111 layout, else a diffusers folder.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import writable_problem
from ..checkpoint_layout import TRAINING_STATE_FILE, latest_checkpoint
from ..cli import ArgumentParser, print_error
from . import ldm_layout
from .lycoris_files import is_lycoris_file, lycoris_changes
from .adapter_folders import (adapter_to_merge, holds_adapter, peft_adapter_folder, peft_load_problem,
                              read_peft_adapter_config, state_load_problem)
from .lora_files import (LAYER_GROUPS, LoraFileError, LowRankPair, adaptable_layers, has_text_encoder_part,
                         kohya_metadata, read_lora, read_lora_parts, write_diffusers_lora, write_kohya_lora)


SINGLE_FILE_CONFIG_HELP = ("for a .safetensors model: the folder or hub id its configs and tokenizer come from "
                           "(default: the SD1.5 hub id)")


class LoraToolError(ValueError):
    """A merge or extract that cannot be done; one line naming the file or flag."""


def pair_changes(pairs: dict[str, LowRankPair]) -> dict[str, torch.Tensor]:
    """Each LoRA pair's change to its layer's weight, at scale 1."""
    return {name: pair.delta() for name, pair in pairs.items()}


def merge_changes(unet: torch.nn.Module, changes: dict[str, torch.Tensor], scale: float = 1.0) -> None:
    """Add ``scale`` times each layer's change (in the weight's shape) to its weight, in place."""
    layers = adaptable_layers(unet)
    with torch.no_grad():
        for name, change in changes.items():
            weight = layers[name].weight
            weight.copy_((weight.float() + scale * change.float().to(weight.device)).to(weight.dtype))


def peft_adapter_changes(unet: torch.nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    """Each adapted layer's weight change (fp32) as PEFT's own LoHa/LoKr layers compute it: they are attached
    to ``unet``, loaded from ``folder``, asked for their change and taken off again, so the UNet is left as it
    was whatever happens. LoraFileError for a folder that is not a LoHa/LoKr of this UNet."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    config = read_peft_adapter_config(folder)
    name = "merged_adapter"
    try:
        try:
            unet.add_adapter(config, adapter_name=name)
            result = set_peft_model_state_dict(unet, load_file(folder / "adapter_model.safetensors"), adapter_name=name)
        except Exception as error:  # a shape of another base, a damaged file
            raise LoraFileError(f"{folder}: not an adapter for this UNet ({state_load_problem(error)})") from None
        problem = peft_load_problem(result, name)
        if problem:
            raise LoraFileError(f"{folder}: {problem}")
        changes = {}
        with torch.no_grad():
            for module_name, module in unet.named_modules():
                if isinstance(module, BaseTunerLayer):
                    for parameter_name, parameter in module.named_parameters():
                        if not parameter_name.startswith("base_layer."):  # in fp32 beside a half-precision base
                            parameter.data = parameter.data.float()
                    changes[module_name] = module.get_delta_weight(name).detach().float()
        return changes
    finally:
        _take_off_peft_layers(unet, name)


def _take_off_peft_layers(unet: torch.nn.Module, name: str) -> None:
    """Put each PEFT-wrapped layer's own base layer back in its place and forget the adapter's config."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module_name, module in list(unet.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = module_name.rpartition(".")
            setattr(unet.get_submodule(parent), child, module.get_base_layer())
    getattr(unet, "peft_config", {}).pop(name, None)
    if not getattr(unet, "peft_config", None):
        unet._hf_peft_config_loaded = False


def adapter_changes(unet: torch.nn.Module, source: Path | str) -> dict[str, torch.Tensor]:
    """The per-layer weight changes (at scale 1) of the adapter in ``source``: a LoRA in either layout, or a
    LoHa/LoKr checkpoint's PEFT folder."""
    folder = peft_adapter_folder(Path(source))
    if folder is not None:
        return peft_adapter_changes(unet, folder)
    return pair_changes(read_lora(source, adaptable_layers(unet)))


def _load_unet(model: str, single_file_config: str | None = None):
    from .loading import SingleFileConfigError, load_unet

    try:
        return load_unet(model, single_file_config=single_file_config)
    except SingleFileConfigError as error:  # one line already: the file, the part, the flag
        raise LoraToolError(str(error)) from None
    except Exception as error:
        raise LoraToolError(f"{model}: no UNet loads from it ({type(error).__name__})") from None


def _load_text_encoder(model: str, single_file_config: str | None = None):
    """The model's CLIP text encoder, for a LoRA's text-encoder part (LoraToolError for a model whose text
    encoder is another kind, as the T5 model's)."""
    from .loading import NotClipTextEncoderError, load_clip_text_encoder

    try:
        return load_clip_text_encoder(model, single_file_config=single_file_config)[1]
    except NotClipTextEncoderError as error:
        raise LoraToolError(f"{model}: the LoRA has a part for SD1.5's CLIP text encoder, and this model's is "
                            f"{error.model_type}; --unet_only merges the UNet's part alone") from None
    except Exception as error:
        raise LoraToolError(f"{model}: the LoRA has a text-encoder part, and no CLIP text encoder loads from "
                            f"this model ({type(error).__name__}); --unet_only merges the UNet's part alone") from None


def check_out(out: str, sources: dict[str, str], replaces_folder: bool) -> Path:
    """``--out``, checked before anything loads: it is not an input, nor inside one or around one; a
    .safetensors is not a folder and a folder not a file; a folder the output replaces holds a model and
    nothing else of a run's; and a file can be written where the output goes (the missing folders on the
    way are made when it is written, not here)."""
    out_path = Path(out)
    resolved = out_path.resolve()
    for flag, source in sources.items():
        source_path = Path(source).resolve()
        if resolved == source_path or resolved.is_relative_to(source_path) or source_path.is_relative_to(resolved):
            raise LoraToolError(f"--out {out}: is, lies inside or holds {flag} {source}; write the result elsewhere")
    if out_path.suffix == ".safetensors":
        if out_path.is_dir():
            raise LoraToolError(f"--out {out}: an existing folder; a .safetensors output is one file")
    elif out_path.exists() and not out_path.is_dir():
        raise LoraToolError(f"--out {out}: an existing file; name a folder, or a .safetensors file")
    elif replaces_folder and out_path.is_dir() and any(out_path.iterdir()):
        problem = _not_replaceable(out_path)
        if problem:
            raise LoraToolError(f"--out {out}: {problem}, and the merged model would replace the whole folder; "
                                "choose another --out")
    problem = writable_problem(out_path if (out_path.is_dir() and not replaces_folder) else out_path.parent)
    if problem:
        raise LoraToolError(f"--out {out}: {problem}")
    return out_path


def _not_replaceable(folder: Path) -> str | None:
    """Why a folder must not be replaced by a merged model: it holds no model, or a training run."""
    if not (folder / "model_index.json").is_file():
        return "a folder that holds no model (no model_index.json)"
    if (folder / TRAINING_STATE_FILE).exists() or latest_checkpoint(folder) is not None:
        return "a training run's folder (checkpoints, resume state)"
    return None


@dataclass
class MergeReport:
    unet_layers: int
    text_encoder_layers: int


def merge(model: str, lora: str, out: str, scale: float = 1.0, unet_only: bool = False,
          single_file_config: str | None = None) -> MergeReport:
    """Merge ``lora`` into ``model`` (its UNet, and its text encoder where the LoRA has a part for it, as
    kohya files from sd-scripts often do, unless ``unet_only``) and write ``out``."""
    if not math.isfinite(scale):
        raise LoraToolError(f"--scale {scale}: must be a finite number")
    out_path = check_out(out, {"--model": model, "--lora": lora}, replaces_folder=True)
    unet_config = Path(model) / "unet" / "config.json"
    if out_path.suffix == ".safetensors" and unet_config.is_file():
        problem = ldm_layout.unet_layout_problem(json.loads(unet_config.read_text(encoding="utf-8")))
        if problem:
            raise LoraToolError(f"--out {out}: {model}'s UNet has no single-file layout ({problem}); write a "
                                "folder instead")
    if holds_adapter(model) and not Path(lora).resolve().is_relative_to(Path(model).resolve()):
        # its unet/ is the untrained base: the result would hold the other LoRA and not this run's adapter
        raise LoraToolError(f"{model}: an adapter run's model, whose unet/ is the untrained base; merge its own "
                            f"adapter first (--lora {adapter_to_merge(model)}), then {lora} into the result")
    unet = _load_unet(model, single_file_config)
    text_encoder, text_changes = None, {}
    if is_lycoris_file(lora):  # a LoHa/LoKr in LyCORIS' layout: ours (--save_kohya_lora) or another tool's
        changes = lycoris_changes(lora, adaptable_layers(unet), drop_text_encoder=unet_only)
    elif has_text_encoder_part(lora) and not unet_only:
        text_encoder = _load_text_encoder(model, single_file_config)
        pairs, text_pairs = read_lora_parts(lora, adaptable_layers(unet), adaptable_layers(text_encoder))
        changes, text_changes = pair_changes(pairs), pair_changes(text_pairs)
        merge_changes(text_encoder, text_changes, scale)
    elif unet_only and peft_adapter_folder(Path(lora)) is None:
        pairs, _ = read_lora_parts(lora, adaptable_layers(unet), drop_text_encoder=True)
        changes = pair_changes(pairs)
    else:
        changes = adapter_changes(unet, lora)
    for changed in (changes, text_changes):
        _check_finite(changed, lora)
    merge_changes(unet, changes, scale)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.suffix == ".safetensors":
        with tempfile.TemporaryDirectory(dir=out_path.parent) as staging:
            folder = Path(staging) / "model"
            _write_pipeline(model, unet, folder, text_encoder, single_file_config)
            from .export import export_single_file

            export_single_file(folder, out_path, dtype="fp32")
    else:
        _write_pipeline(model, unet, out_path, text_encoder, single_file_config)
    return MergeReport(unet_layers=len(changes), text_encoder_layers=len(text_changes))


def _check_finite(changes: dict[str, torch.Tensor], source: str) -> None:
    """A NaN or infinite change would make every image the merged model draws black or noise."""
    for name, change in changes.items():
        if not torch.isfinite(change).all():
            raise LoraToolError(f"--lora {source}: its change to layer {name} holds NaN or infinite values")


def _write_pipeline(model: str, unet, folder: Path, text_encoder=None, single_file_config: str | None = None) -> None:
    """The model's pipeline folder with ``unet`` (and ``text_encoder`` when given) in it (written to a staging
    name, then renamed)."""
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if ldm_layout.is_single_file(model):
            from .loading import load_single_file_pipeline_around

            pipeline = load_single_file_pipeline_around(model, unet, single_file_config=single_file_config)
            if text_encoder is not None:
                pipeline.text_encoder = text_encoder
            pipeline.save_pretrained(staging)
        else:
            _copy_pipeline_parts(Path(model), staging, replaced={"unet"} | ({"text_encoder"} if text_encoder else set()))
            unet.save_pretrained(staging / "unet", safe_serialization=True)
            if text_encoder is not None:
                text_encoder.save_pretrained(staging / "text_encoder", safe_serialization=True)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _copy_pipeline_parts(model: Path, staging: Path, replaced: set[str]) -> None:
    """The pipeline of ``model`` alone: model_index.json, the parts it names (but ``replaced``) and its own
    code (a hub-style folder's pipeline.py); a run folder's checkpoints, logs, lock, resume state, adapter
    and samples stay behind."""
    staging.mkdir(parents=True)
    shutil.copy2(model / "model_index.json", staging / "model_index.json")
    index = json.loads((model / "model_index.json").read_text(encoding="utf-8"))
    for part, value in index.items():
        if part.startswith("_") or part in replaced or not isinstance(value, list) or not (model / part).is_dir():
            continue
        shutil.copytree(model / part, staging / part, ignore=shutil.ignore_patterns("__pycache__"))
    for code in model.glob("*.py"):
        shutil.copy2(code, staging / code.name)


@dataclass
class Extraction:
    pairs: dict[str, LowRankPair]
    relative_error: float  # ||D - up @ down|| / ||D|| over all extracted layers
    worst_layer: str
    worst_error: float
    unchanged: int  # targeted layers whose weight did not change (left out)
    whole: int  # layers whose own rank is below --rank: their pair holds the whole difference


def extract_pairs(base: torch.nn.Module, tuned: torch.nn.Module, rank: int, targets: list[str]) -> Extraction:
    """A LoRA of at most ``rank`` per layer approximating tuned - base on the targeted layers."""
    base_layers, tuned_layers = adaptable_layers(base), adaptable_layers(tuned)
    pairs, residual_sq, total_sq, worst, unchanged, whole = {}, 0.0, 0.0, ("", 0.0), 0, 0
    for name, layer in base_layers.items():
        if not any(LAYER_GROUPS[group].search(name) for group in targets):
            continue
        if name not in tuned_layers or tuned_layers[name].weight.shape != layer.weight.shape:
            raise LoraToolError(f"--tuned: layer {name} differs in shape from --base's (another architecture)")
        difference = tuned_layers[name].weight.detach().float() - layer.weight.detach().float()
        matrix = difference.flatten(1)
        norm_sq = float(matrix.square().sum())
        if norm_sq == 0.0:
            unchanged += 1
            continue
        left, singular, right = torch.linalg.svd(matrix, full_matrices=False)
        kept = min(rank, singular.shape[0])
        whole += kept < rank
        up, down = left[:, :kept] * singular[:kept], right[:kept]
        layer_residual = float((matrix - up @ down).square().sum())
        residual_sq, total_sq = residual_sq + layer_residual, total_sq + norm_sq
        error = (layer_residual / norm_sq) ** 0.5
        if error >= worst[1]:
            worst = (name, error)
        if difference.dim() == 4:  # a convolution: down keeps the kernel, up is 1x1
            down = down.reshape(kept, *difference.shape[1:])
            up = up.reshape(*up.shape, 1, 1)
        pairs[name] = LowRankPair(down=down.contiguous(), up=up.contiguous(), alpha=float(kept))
    if not pairs:
        raise LoraToolError(f"--base and --tuned do not differ in any layer of {' '.join(targets)}")
    return Extraction(pairs=pairs, relative_error=(residual_sq / total_sq) ** 0.5, worst_layer=worst[0],
                      worst_error=worst[1], unchanged=unchanged, whole=whole)


def extract(base: str, tuned: str, rank: int, out: str, targets: list[str],
            single_file_config: str | None = None) -> Extraction:
    check_out(out, {"--base": base, "--tuned": tuned}, replaces_folder=False)
    for flag, model in (("--base", base), ("--tuned", tuned)):
        if holds_adapter(model):  # its unet/ is the untrained base: the difference would miss what it learned
            raise LoraToolError(f"{flag} {model}: an adapter run's model, whose unet/ is the untrained base; take "
                                f"its adapter as it is, or merge it first (cachetrain-lora merge --model {model} "
                                f"--lora {adapter_to_merge(model)} --out MERGED) and extract from MERGED")
    base_unet, tuned_unet = _load_unet(base, single_file_config), _load_unet(tuned, single_file_config)
    result = extract_pairs(base_unet, tuned_unet, rank, targets)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.suffix == ".safetensors":
        write_kohya_lora(out_path, result.pairs, kohya_metadata(result.pairs, title=out_path.stem,
                                                                resolution=base_unet.config.sample_size * 8),
                         dtype=torch.float32)
    else:
        write_diffusers_lora(out_path, result.pairs)
    return result


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="cachetrain-lora", description="Merge a LoRA into a model, or extract one from two models.")
    commands = parser.add_subparsers(dest="command", required=True)
    merging = commands.add_parser("merge", help="merge a LoRA (or a LoHa/LoKr checkpoint) into a model folder or single file")
    merging.add_argument("--model", required=True, help="pipeline folder or SD1.5 .safetensors to merge into")
    merging.add_argument("--lora", required=True, help="LoRA folder (pytorch_lora_weights.safetensors) or kohya file, "
                         "a LoHa/LoKr checkpoint (its unet_adapter/ folder) or a LyCORIS LoHa/LoKr file")
    merging.add_argument("--out", required=True, help="pipeline folder to write, or a .safetensors single file")
    merging.add_argument("--scale", type=float, default=1.0, help="strength of the adapter")
    merging.add_argument("--unet_only", action="store_true",
                         help="merge the UNet's part alone, leaving out a text-encoder part the LoRA has")
    merging.add_argument("--single_file_config", default=None, help=SINGLE_FILE_CONFIG_HELP)
    extracting = commands.add_parser("extract", help="extract a LoRA from the difference of two models (SVD)")
    extracting.add_argument("--base", required=True, help="the model before training (folder or single file)")
    extracting.add_argument("--tuned", required=True, help="the model after training")
    extracting.add_argument("--rank", type=int, required=True, help="rank kept per layer")
    extracting.add_argument("--out", required=True, help="a .safetensors (kohya/A1111 layout) or a folder (diffusers)")
    extracting.add_argument("--targets", nargs="+", default=["attention", "feedforward"], choices=tuple(LAYER_GROUPS),
                            help="layer groups to extract")
    extracting.add_argument("--single_file_config", default=None, help=SINGLE_FILE_CONFIG_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .loading import quiet_loading

    quiet_loading()
    try:
        if args.command == "merge":
            report = merge(args.model, args.lora, args.out, args.scale, args.unet_only, args.single_file_config)
            text = f" and {report.text_encoder_layers} of the text encoder" if report.text_encoder_layers else ""
            print(f"[lora] merged {report.unet_layers} UNet layer(s){text} of {args.lora} (scale {args.scale:g}) "
                  f"into {args.out}")
            return 0
        if args.rank < 1:
            raise LoraToolError("--rank must be >= 1")
        result = extract(args.base, args.tuned, args.rank, args.out, args.targets, args.single_file_config)
    except (LoraToolError, LoraFileError) as error:
        print_error(str(error))
        return 2
    print(f"[lora] extracted {len(result.pairs)} layer(s) at rank <= {args.rank} into {args.out}; relative error "
          f"left by the rank {result.relative_error:.4g} (worst {result.worst_layer}: {result.worst_error:.4g}); "
          f"{result.unchanged} targeted layer(s) unchanged"
          + (f"; {result.whole} layer(s) of a rank below {args.rank} kept whole at their own" if result.whole else ""),
          file=sys.stderr)
    return 0
