"""Export a trained model as one single-file checkpoint in the original SD layout (A1111, Forge, ComfyUI).

    python -m cachetrain.export SOURCE OUT.safetensors [--dtype fp16|bf16|fp32] [--ema] [--unet_only]

SOURCE is a checkpoint folder, a run's output folder (its final model) or any SD1.5 pipeline
folder. The file holds the UNet, the VAE and the CLIP text encoder under the prefixes those tools
read (see ldm_layout), and ModelSpec metadata in its header: what it is, when it was made, its
resolution and prediction type, and how it was trained. A T5 model exports its UNet alone: no
single-file standard holds SD1.5 with a T5 encoder.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from .. import __version__
from . import ldm_layout
from ..atomic import writable_problem, write_tensors_atomically
from ..checkpoint_layout import CHECKPOINT_PATTERN, EMA_COMPONENT, TRAINED_COMPONENT, TRAINING_STATE_FILE
from ..cli import ArgumentParser, print_error
from .loading import parse_dtype
from .adapter_folders import adapter_to_merge, holds_adapter
from .schedulers import is_flow_config

EXPORT_DTYPES = ("fp16", "bf16", "fp32")
SINGLE_FILE_NAME = "model.safetensors"
SUMMARY_FILE_NAME = "train_summary.json"  # the trainer's run summary (its "steps"), at the top of a run's folder
MODELSPEC_VERSION = "1.0.0"
SD1_ARCHITECTURE = "stable-diffusion-v1"
SD1_IMPLEMENTATION = "https://github.com/CompVis/stable-diffusion"


class ExportError(Exception):
    """A source that cannot be exported; the message says which folder or flag and why."""


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _check_source(source: Path, ema: bool, unet_only: bool) -> dict:
    """The source's model_index.json, after checking the folder holds what an export reads."""
    if not (source / "model_index.json").is_file():
        hint = ""
        if source.is_dir() and any(CHECKPOINT_PATTERN.match(entry.name) for entry in source.iterdir()):
            hint = " (a run that has not finished: export one of its checkpoint-NNNNN folders)"
        raise ExportError(f"{source}: not a diffusers pipeline folder (no model_index.json){hint}")
    index = _read_json(source / "model_index.json")
    for part in () if unet_only else ("vae", "text_encoder"):  # named, not diffusers' "no file named config.json"
        if part in index and not (source / part / "config.json").is_file():
            state = "has no config.json" if (source / part).is_dir() else "is missing"
            raise ExportError(f"{source}: its model_index.json names the part '{part}', but {source / part}/ "
                              f"{state} (copy the whole folder, or pass --unet_only)")
    if holds_adapter(source):
        # its unet/ is the frozen base: an export would hold none of what the run trained
        raise ExportError(f"{source}: an adapter run's model, whose unet/ is the untrained base; merge the adapter "
                          f"into a single file with `cachetrain-lora merge --model {source} --lora "
                          f"{adapter_to_merge(source)} --out OUT.safetensors`, or take its LoRA file as it is")
    unet_folder = source / (EMA_COMPONENT if ema else TRAINED_COMPONENT)
    if not (unet_folder / "config.json").is_file():
        what = "--ema: no EMA weights (unet_ema/; train with --ema_decay)" if ema else "no unet/ folder"
        raise ExportError(f"{source}: {what}")
    problem = ldm_layout.unet_layout_problem(_read_json(unet_folder / "config.json"))
    if problem:
        raise ExportError(f"{unet_folder}: this UNet has no single-file layout ({problem}); "
                          f"what exports: {ldm_layout.EXPORTABLE_UNET_LAYOUTS}")
    return _read_json(source / "model_index.json")


def steps_trained(source: Path) -> int | None:
    """Optimizer steps the model was trained for, where the folder says: a checkpoint's resume state,
    a run's summary, or a checkpoint folder's name."""
    state_path = source / TRAINING_STATE_FILE
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        return int(state["progress"]["step"])
    summary = source / SUMMARY_FILE_NAME
    if summary.is_file():
        steps = _read_json(summary).get("steps")
        return int(steps) if steps is not None else None
    match = CHECKPOINT_PATTERN.match(source.name)
    return int(match.group(1)) if match else None


def schedule_facts(source: Path) -> tuple[str, bool]:
    """(prediction type, zero terminal SNR) from the scheduler config (epsilon, False if none).

    A flow-matching model is refused: the single-file format has no marker for it, so A1111 and
    ComfyUI would sample it as an epsilon model and draw noise."""
    path = source / "scheduler" / "scheduler_config.json"
    config = _read_json(path) if path.is_file() else {}
    if is_flow_config(config):
        raise ExportError(f"{path}: a flow-matching model ({config['_class_name']}); the single-file format has no "
                          "marker for flow models, so A1111/ComfyUI would sample it as an epsilon model. Use the "
                          "diffusers folder (see the README's flow matching paragraph)")
    return config.get("prediction_type", "epsilon"), bool(config.get("rescale_betas_zero_snr", False))


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {key: tensor.detach().to(dtype).contiguous() for key, tensor in tensors.items()}


def unet_tensors(unet) -> dict[str, torch.Tensor]:
    state = unet.state_dict()
    mapping = ldm_layout.unet_key_map(unet.config, state)
    return {ldm_layout.UNET_PREFIX + mapping[key]: tensor for key, tensor in state.items()}


def vae_tensors(vae) -> dict[str, torch.Tensor]:
    state = vae.state_dict()
    mapping = ldm_layout.vae_key_map(vae.config, state)
    return {ldm_layout.VAE_PREFIX + mapping[key]: ldm_layout.vae_tensor_for_original(mapping[key], tensor)
            for key, tensor in state.items()}


def text_encoder_tensors(text_encoder) -> dict[str, torch.Tensor]:
    return {ldm_layout.TEXT_ENCODER_PREFIX + ldm_layout.text_encoder_key_for_original(key): tensor
            for key, tensor in text_encoder.state_dict().items()}


def export_single_file(source: Path | str, out: Path | str, dtype: str = "fp16", ema: bool = False,
                       unet_only: bool = False, title: str | None = None, steps: int | None = None) -> dict:
    """Write ``out``; return what went in: {"parts", "metadata", "tensors", "note"}.

    ``steps`` overrides what the folder says about its training (steps_trained).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    source, out = Path(source), Path(out)
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    index = _check_source(source, ema, unet_only)
    target_dtype = parse_dtype(dtype)
    note = None
    if "t5_projection" in index:
        unet_only = True
        note = ("a T5 model: the file holds the UNet alone (no single-file standard holds SD1.5 with a T5 "
                "text encoder); load its VAE, T5 encoder and projection from the folder")
    elif not unet_only and not all(part in index for part in ("vae", "text_encoder")):
        raise ExportError(f"{source}: the pipeline has no vae or text_encoder to export (use --unet_only)")

    unet = UNet2DConditionModel.from_pretrained(source, subfolder=EMA_COMPONENT if ema else TRAINED_COMPONENT,
                                                torch_dtype=torch.float32)
    tensors = unet_tensors(unet)
    parts = ["unet_ema" if ema else "unet"]
    vae_levels = 4
    if not unet_only:
        from transformers import CLIPTextModel

        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32)
        vae_levels = len(vae.config.block_out_channels)
        tensors.update(vae_tensors(vae))
        tensors.update(text_encoder_tensors(CLIPTextModel.from_pretrained(source, subfolder="text_encoder",
                                                                          dtype=torch.float32)))
        parts += ["vae", "text_encoder"]
    tensors = _cast(tensors, target_dtype)

    prediction_type, zero_snr = schedule_facts(source)
    if prediction_type == "v_prediction":
        tensors[ldm_layout.V_PREDICTION_MARKER] = torch.zeros(0, dtype=target_dtype)
    if zero_snr:
        tensors[ldm_layout.ZERO_TERMINAL_SNR_MARKER] = torch.zeros(0, dtype=target_dtype)
    trained = unet.config.sample_size  # an int, or [height, width] for non-square training
    latent_height, latent_width = (trained, trained) if isinstance(trained, int) else trained
    factor = 2 ** (vae_levels - 1)
    steps = steps if steps is not None else steps_trained(source)
    metadata = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": SD1_ARCHITECTURE,
        "modelspec.implementation": SD1_IMPLEMENTATION,
        "modelspec.title": title or out.stem,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "modelspec.resolution": f"{latent_width * factor}x{latent_height * factor}",
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "cachetrain.version": __version__,
        "cachetrain.parts": ",".join(parts),
        "cachetrain.dtype": dtype,
    }
    if steps is not None:
        metadata["cachetrain.steps_trained"] = str(steps)
    if zero_snr:
        metadata["cachetrain.zero_terminal_snr"] = "true"

    out.parent.mkdir(parents=True, exist_ok=True)
    write_tensors_atomically(out, tensors, metadata)
    return {"parts": parts, "metadata": metadata, "tensors": len(tensors), "note": note}


def write_beside(folder: Path, dtype: str = "fp16", ema: bool = False, steps: int | None = None) -> Path:
    """``folder/model.safetensors`` from the pipeline folder itself (the trainer's --save_single_file)."""
    out = Path(folder) / SINGLE_FILE_NAME
    export_single_file(folder, out, dtype=dtype, ema=ema, steps=steps, title=Path(folder).name)
    return out


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m cachetrain.export",
        description="Write a diffusers SD1.5 folder (a checkpoint, a run's final model, any SD1.5 pipeline) as "
                    "one .safetensors file in the original SD layout, for A1111 / Forge / ComfyUI.")
    parser.add_argument("source", help="checkpoint folder, a run's output folder, or an SD1.5 pipeline folder")
    parser.add_argument("out", help="the .safetensors file to write")
    parser.add_argument("--dtype", default="fp16", choices=EXPORT_DTYPES, help="precision of the weights (default fp16)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (unet_ema/) instead of unet/")
    parser.add_argument("--unet_only", action="store_true", help="the UNet alone, without VAE and text encoder")
    parser.add_argument("--title", default=None, help="modelspec.title (default: the file's name)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.out.lower().endswith(".safetensors"):
        print_error(f"{args.out}: the output must be a .safetensors file")
        return 2
    problem = writable_problem(Path(args.out).parent)  # before the model loads
    if problem:
        print_error(f"{args.out}: {problem}")
        return 2
    torch.set_num_threads(min(4, torch.get_num_threads()))
    try:
        report = export_single_file(args.source, args.out, dtype=args.dtype, ema=args.ema,
                                    unet_only=args.unet_only, title=args.title)
    except (ExportError, OSError) as error:
        print_error(str(error))
        return 2
    if report["note"]:
        print(f"[export] note: {report['note']}", file=sys.stderr)
    steps = report["metadata"].get("cachetrain.steps_trained")
    print(f"[export] wrote {args.out}: {' + '.join(report['parts'])}, {report['tensors']} tensors, {args.dtype}"
          f"{f', trained {steps} steps' if steps else ''}; prediction {report['metadata']['modelspec.prediction_type']}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
