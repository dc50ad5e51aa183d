"""Assemble an SD1.5 + SDXL VAE + T5 pipeline folder from parts (assemble_t5_pipeline.py).

Each part is a hub id or a local folder, either the part itself or a pipeline holding it:

    UNet        an SD1.5 UNet folder, or a whole SD1.5 pipeline (its unet/)
    VAE         the SDXL VAE folder, or an SDXL pipeline (its vae/)
    T5          a T5 encoder with its tokenizer (google/t5-v1_1-xxl), or a pipeline holding them
                (text_encoder/ + tokenizer/, or SD3's text_encoder_3/ + tokenizer_3/)
    projection  an existing T5Projection (folder, or a T5 pipeline's t5_projection/), or a new one:
                T5Projection.initialised(T5 width -> UNet cross-attention width, seed)
    scheduler   from --scheduler, else the UNet's pipeline if it has one, else SD1.5's DDIM schedule

The parts' configs are read and checked first (UNet in/out channels vs VAE latent channels, UNet
cross-attention width vs projection output, projection input vs T5 width), so a mismatch is
reported in words before any weights are loaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cli import ArgumentParser, first_line

# SD1.5's noise schedule, for a UNet that comes without its pipeline's scheduler.
SD15_DDIM_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")

T5_LOCATIONS = ((None, None), ("text_encoder", "tokenizer"), ("text_encoder_3", "tokenizer_3"))


class AssemblyError(ValueError):
    """Parts that cannot be found or do not fit together; the message says which and why."""


@dataclass(frozen=True)
class Part:
    """Where one part lives (``model`` + ``subfolder``) and its config."""

    what: str
    model: str
    subfolder: str | None
    config: dict

    @property
    def where(self) -> str:
        return f"{self.model}/{self.subfolder}" if self.subfolder else self.model

    def kwargs(self) -> dict:
        return {"subfolder": self.subfolder} if self.subfolder else {}


def _find_part(what: str, model: str, subfolders: tuple[str | None, ...], read_config,
               config_file: str = "config.json") -> Part:
    """The first of ``subfolders`` of ``model`` whose config reads; AssemblyError naming every place tried.

    In a local folder a place counts only if its own config file is there: diffusers would otherwise
    fall back to the folder's top-level config and report the wrong part.
    """
    tried = []
    for subfolder in subfolders:
        place = f"{model}/{subfolder}" if subfolder else model
        if os.path.isdir(model) and not os.path.isfile(os.path.join(model, subfolder or "", config_file)):
            tried.append(f"{place}: no {config_file}")
            continue
        try:
            config = read_config(model, subfolder)
        except (OSError, ValueError) as error:  # missing file, offline hub, not this kind of model
            tried.append(f"{place}: {first_line(error)}")
            continue
        return Part(what, model, subfolder, dict(config))
    raise AssemblyError(f"no {what} found in {model}:\n  - " + "\n  - ".join(tried))


def _diffusers_config(cls):
    def read(model: str, subfolder: str | None) -> dict:
        return cls.load_config(model, **({"subfolder": subfolder} if subfolder else {}))
    return read


def _read_t5_config(model: str, subfolder: str | None) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, **({"subfolder": subfolder} if subfolder else {}))
    if getattr(config, "model_type", None) not in ("t5", "umt5", "mt5"):
        raise ValueError(f"a {getattr(config, 'model_type', 'unknown')} model, not a T5 encoder")
    return config.to_dict()


def _load_t5_tokenizer(t5_part: Part, subfolder: str | None):
    from transformers import AutoTokenizer

    from .t5 import check_tokenizer_vocabulary

    place = f"{t5_part.model}/{subfolder}" if subfolder else t5_part.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(t5_part.model, **({"subfolder": subfolder} if subfolder else {}))
        check_tokenizer_vocabulary(tokenizer, place)
    except (OSError, ValueError, TypeError) as error:
        raise AssemblyError(f"no usable T5 tokenizer beside the encoder ({t5_part.where}): {place}: "
                            f"{first_line(error)}") from None
    return tokenizer


def _single_width(value) -> int:
    """cross_attention_dim may be given per block; the T5 projection feeds one width to all."""
    if isinstance(value, (list, tuple)):
        widths = set(value)
        if len(widths) != 1:
            raise AssemblyError(f"the UNet's blocks take different cross-attention widths {sorted(widths)}; "
                                "one projection cannot feed them all")
        return int(value[0])
    return int(value)


@dataclass(frozen=True)
class AssemblyPlan:
    unet: Part
    vae: Part
    t5: Part
    tokenizer: object  # loaded while planning: it is small, and a missing one is caught before any weights load
    projection: Part | None  # None: a new projection
    scheduler: Part | None  # None: SD1.5's DDIM schedule
    projection_in: int
    projection_out: int


def plan_assembly(unet: str, vae: str, t5: str, projection: str | None = None,
                  scheduler: str | None = None) -> AssemblyPlan:
    """Find every part and check that they fit, reading configs only. Raises AssemblyError."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from .t5 import PROJECTION_SUBFOLDER, T5Projection

    unet_part = _find_part("SD1.5 UNet", unet, ("unet", None), _diffusers_config(UNet2DConditionModel))
    vae_part = _find_part("VAE", vae, ("vae", None), _diffusers_config(AutoencoderKL))
    t5_part = _find_part("T5 encoder", t5, tuple(enc for enc, _ in T5_LOCATIONS), _read_t5_config)
    tokenizer = _load_t5_tokenizer(t5_part, dict(T5_LOCATIONS)[t5_part.subfolder])
    projection_part = None
    if projection:
        projection_part = _find_part("T5 projection", projection, (PROJECTION_SUBFOLDER, None),
                                     _diffusers_config(T5Projection))
    scheduler_part = None
    if scheduler:
        scheduler_part = _find_part("scheduler", scheduler, ("scheduler", None), _diffusers_config(DDIMScheduler),
                                    "scheduler_config.json")
    elif unet_part.subfolder:  # the UNet came with its pipeline: take its schedule too
        try:
            scheduler_part = _find_part("scheduler", unet, ("scheduler",), _diffusers_config(DDIMScheduler),
                                        "scheduler_config.json")
        except AssemblyError:
            scheduler_part = None

    problems = []
    extra_conditioning = {key: unet_part.config.get(key) for key in
                          ("addition_embed_type", "class_embed_type", "time_cond_proj_dim", "encoder_hid_dim_type")
                          if unet_part.config.get(key) is not None}
    if extra_conditioning:
        problems.append(f"the UNet ({unet_part.where}) is not an SD1.5-architecture UNet: it expects extra "
                        f"conditioning ({', '.join(f'{k}={v!r}' for k, v in extra_conditioning.items())}, as "
                        "SDXL's does), which this pipeline does not provide")
    latent_channels = int(vae_part.config.get("latent_channels", 4))
    for key in ("in_channels", "out_channels"):
        channels = int(unet_part.config.get(key, 4))
        if channels != latent_channels:
            problems.append(f"the UNet ({unet_part.where}) has {key}={channels} but the VAE ({vae_part.where}) "
                            f"makes {latent_channels}-channel latents (latent_channels): the UNet must work in "
                            "the VAE's latent space")
    try:
        cross_width = _single_width(unet_part.config.get("cross_attention_dim", 768))
    except AssemblyError as error:
        problems.append(str(error))
        cross_width = None
    t5_width = int(t5_part.config["d_model"])
    if projection_part is not None:
        projection_in = int(projection_part.config["in_features"])
        projection_out = int(projection_part.config["out_features"])
        if projection_in != t5_width:
            problems.append(f"the projection ({projection_part.where}) takes {projection_in}-dim input "
                            f"(in_features) but the T5 encoder ({t5_part.where}) gives {t5_width}-dim states "
                            "(d_model): it was trained for a different T5")
        if cross_width is not None and projection_out != cross_width:
            problems.append(f"the projection ({projection_part.where}) gives {projection_out}-dim tokens "
                            f"(out_features) but the UNet ({unet_part.where}) cross-attends to {cross_width}-dim "
                            "tokens (cross_attention_dim)")
    else:
        projection_in, projection_out = t5_width, cross_width or 0
    if problems:
        raise AssemblyError("the parts do not fit together:\n  - " + "\n  - ".join(problems))
    return AssemblyPlan(unet_part, vae_part, t5_part, tokenizer, projection_part, scheduler_part,
                        projection_in, projection_out)


def build_pipeline(plan: AssemblyPlan, dtype: torch.dtype = torch.float32, projection_seed: int = 0,
                   projection_scaling_factor: float = 1.0):
    """Load the planned parts and put them into a StableDiffusionT5Pipeline."""
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import T5EncoderModel

    from .t5 import StableDiffusionT5Pipeline, T5Projection

    unet = UNet2DConditionModel.from_pretrained(plan.unet.model, torch_dtype=dtype, **plan.unet.kwargs())
    vae = AutoencoderKL.from_pretrained(plan.vae.model, torch_dtype=dtype, **plan.vae.kwargs())
    text_encoder = T5EncoderModel.from_pretrained(plan.t5.model, dtype=dtype, **plan.t5.kwargs())
    if plan.projection is not None:
        projection = T5Projection.from_pretrained(plan.projection.model, torch_dtype=dtype, **plan.projection.kwargs())
    else:
        projection = T5Projection.initialised(plan.projection_in, plan.projection_out, projection_scaling_factor,
                                              seed=projection_seed).to(dtype)
    if plan.scheduler is not None:
        scheduler_class = getattr(diffusers, plan.scheduler.config.get("_class_name", ""), None) or DDIMScheduler
        scheduler = scheduler_class.from_pretrained(plan.scheduler.model, **plan.scheduler.kwargs())
    else:
        scheduler = DDIMScheduler(**SD15_DDIM_SCHEDULE)
    return StableDiffusionT5Pipeline(vae=vae, text_encoder=text_encoder, tokenizer=plan.tokenizer,
                                     t5_projection=projection, unet=unet, scheduler=scheduler)


def describe(plan: AssemblyPlan) -> str:
    projection = plan.projection.where if plan.projection is not None else "new (seeded N(0, 1/in) weights, zero bias)"
    scheduler = plan.scheduler.where if plan.scheduler is not None else "SD1.5 DDIM schedule"
    return "\n".join([
        f"  unet          {plan.unet.where}",
        f"  vae           {plan.vae.where} (scaling_factor {plan.vae.config.get('scaling_factor')})",
        f"  text_encoder  {plan.t5.where} (d_model {plan.t5.config['d_model']})",
        f"  t5_projection {projection}: {plan.projection_in} -> {plan.projection_out}",
        f"  scheduler     {scheduler}",
    ])


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Build an SD1.5 UNet + SDXL VAE + T5 pipeline folder from parts "
                                                 "(each a hub id or a local folder).")
    parser.add_argument("--unet", required=True, help="SD1.5 UNet folder, or a whole SD1.5 pipeline (its unet/)")
    parser.add_argument("--vae", required=True, help="SDXL VAE folder, or an SDXL pipeline (its vae/)")
    parser.add_argument("--t5", required=True,
                        help="T5 encoder + tokenizer (e.g. google/t5-v1_1-xxl), or a pipeline holding them")
    parser.add_argument("--projection", default=None,
                        help="an existing T5 projection (folder, or a T5 pipeline); default: a new one")
    parser.add_argument("--projection_seed", type=int, default=0, help="seed of a new projection's weights")
    parser.add_argument("--projection_scaling_factor", type=float, default=1.0,
                        help="scaling_factor of a new projection (multiplies its output)")
    parser.add_argument("--scheduler", default=None,
                        help="scheduler source; default: the UNet's pipeline, else SD1.5's DDIM schedule")
    parser.add_argument("--dtype", default="float32", help="precision of the saved weights (float32, bfloat16)")
    parser.add_argument("--out", required=True, help="the pipeline folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .loading import parse_dtype

    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"error: {out} exists and is not empty (use --overwrite to replace it)", file=sys.stderr)
        return 2
    try:
        plan = plan_assembly(args.unet, args.vae, args.t5, args.projection, args.scheduler)
    except AssemblyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("[assemble] parts fit:\n" + describe(plan), file=sys.stderr)
    pipeline = build_pipeline(plan, parse_dtype(args.dtype), args.projection_seed, args.projection_scaling_factor)
    if out.exists() and args.overwrite:  # only now: a failed check or load leaves the old folder alone
        shutil.rmtree(out)
    pipeline.save_pretrained(os.fspath(out), safe_serialization=True)
    print(f"[assemble] wrote {out} (load it with StableDiffusionT5Pipeline.from_pretrained after import "
          "cachetrain.t5)", file=sys.stderr)
    return 0
