"""Loading models and their parts from a hub id or a local diffusers folder.

Every loader takes the same ``model`` string a user passes (``stable-diffusion-v1-5/stable-diffusion-v1-5``,
``/path/to/folder`` or ``/path/to/model.safetensors``, a single file in the original SD layout) and loads
only the component asked for. A single file holds weights only: its configs and tokenizer come from
``single_file_config`` (a folder or hub id; SD1.5's by default).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from . import ldm_layout, pipeline_code
from ..cli import first_line
from ..freshness import config_fingerprint

# The hub repositories our defaults and examples name: kept here alone, so a moved repository is one edit.
# (runwayml/stable-diffusion-v1-5 was taken down in 2024; this is the maintained copy diffusers' docs use.)
SD15_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_MODEL_ID = "stabilityai/stable-diffusion-xl-base-1.0"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(set(DTYPES))}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _kwargs(**extra: Any) -> dict[str, Any]:
    """Pass remote-code trust only when asked: custom folders carry their own pipeline code."""
    return {k: v for k, v in extra.items() if v is not None}


def load_vae(model: str, subfolder: str | None = "vae", dtype: torch.dtype = torch.float32,
             single_file_config: str | None = None):
    from diffusers import AutoencoderKL

    if ldm_layout.is_single_file(model):
        kwargs = _single_file_kwargs(AutoencoderKL, model, single_file_config, subfolder or "vae")
        with _without_hub_deprecation_noise():
            return AutoencoderKL.from_single_file(model, torch_dtype=dtype, **kwargs)
    return AutoencoderKL.from_pretrained(model, **_kwargs(subfolder=subfolder), torch_dtype=dtype)


def load_clip_text_encoder(model: str, dtype: torch.dtype = torch.float32, single_file_config: str | None = None):
    """The CLIP tokenizer and text encoder of an SD1.5 folder or hub id (or a single file: its weights,
    the tokenizer and config from ``single_file_config``)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    if ldm_layout.is_single_file(model):
        return _single_file_clip_text_encoder(model, dtype, single_file_config)
    _expect_clip_text_encoder(model)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype)
    return tokenizer, text_encoder


class NotClipTextEncoderError(ValueError):
    """A model whose text encoder is another kind than CLIP's (the T5 model's)."""

    def __init__(self, model_type: str):
        hint = " (a T5 pipeline: create_t5cache_768.py caches its captions)" if model_type == "t5" else ""
        super().__init__(f"its text_encoder is a {model_type} model, not CLIP's text model{hint}")
        self.model_type = model_type


def _expect_clip_text_encoder(model: str) -> None:
    """transformers builds a CLIPTextModel from any text encoder's config (a T5 one too) and fails only
    at the first caption, with an IndexError; so the config's model type is read first."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(model, subfolder="text_encoder").model_type
    if model_type not in ("clip_text_model", "clip"):
        raise NotClipTextEncoderError(model_type)


def quiet_loading() -> None:
    """No progress bar per component or weight file loaded (diffusers', transformers'): for commands whose
    output is their own lines."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def load_unet(model: str, dtype: torch.dtype = torch.float32, single_file_config: str | None = None):
    from diffusers import UNet2DConditionModel

    if ldm_layout.is_single_file(model):
        kwargs = _single_file_kwargs(UNet2DConditionModel, model, single_file_config, "unet")
        with _without_hub_deprecation_noise():
            return UNet2DConditionModel.from_single_file(model, torch_dtype=dtype, **kwargs)
    return UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype)


# Schedulers whose config is a DDPM noise schedule (betas, timesteps, prediction type): a model
# naming one of them trains as DDPM. FlowMatchEulerDiscreteScheduler trains flow matching.
DDPM_FAMILY_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                          "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
                          "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler", "KDPM2DiscreteScheduler",
                          "KDPM2AncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                          "UniPCMultistepScheduler", "DEISMultistepScheduler", "LCMScheduler", "TCDScheduler")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


class UnsupportedScheduler(ValueError):
    """The model's scheduler config names a class this trainer has no objective for."""


def load_training_scheduler(model: str, prediction_type: str | None = None, zero_terminal_snr: bool = False,
                            single_file_config: str | None = None):
    """The training schedule the model's scheduler config describes: a DDPMScheduler for the DDPM
    family, a FlowMatchEulerDiscreteScheduler for flow models; any other class is refused by name.

    ``prediction_type`` overrides the config's; ``zero_terminal_snr`` rescales the betas so the
    last timestep is pure noise (DDPM only)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if ldm_layout.is_single_file(model):  # the file's markers (v-prediction, zero terminal SNR) on the config's schedule
        source = single_file_config_source(single_file_config)
        config = {**from_single_file_config(model, source, "scheduler",
                                            lambda: DDPMScheduler.load_config(source, subfolder="scheduler")),
                  **single_file_schedule(model)}
        zero_terminal_snr = zero_terminal_snr or bool(config.get("rescale_betas_zero_snr"))
    else:
        config = DDPMScheduler.load_config(model, subfolder="scheduler")
    name = config.get("_class_name", "")
    if name in FLOW_SCHEDULERS:
        if prediction_type or zero_terminal_snr:
            raise UnsupportedScheduler(f"{model}: a flow-matching model ({name}) predicts noise - x0; "
                                       "--prediction_type and --zero_terminal_snr are DDPM options")
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    if name not in DDPM_FAMILY_SCHEDULERS:
        raise UnsupportedScheduler(f"{model}: its scheduler config names {name or 'no class'}, which this trainer "
                                   "cannot train (DDPM-family schedulers or FlowMatchEulerDiscreteScheduler)")
    overrides = {"prediction_type": prediction_type} if prediction_type else {}
    if zero_terminal_snr:
        overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return DDPMScheduler.from_config(config, **overrides)


def _sampling_scheduler_class(model: str):
    """The scheduler class named in the model's scheduler config (PNDM for SD1.5), DDIM if unknown."""
    import diffusers
    from diffusers import DDIMScheduler

    config = DDIMScheduler.load_config(model, subfolder="scheduler")
    return getattr(diffusers, config.get("_class_name", ""), None) or DDIMScheduler


WEIGHT_SAMPLES_PER_TENSOR = 4096


def encoder_identity(module: torch.nn.Module) -> tuple[str, str]:
    """(class name, fingerprint) of an encoder; the fingerprint covers its config and its weights.

    The SD1.5 and SDXL VAEs share a class but differ in config (scaling factor, upcasting), and a
    fine-tuned encoder differs only in weights, so both go into the fingerprint. The weights enter
    as the exact bytes of an evenly strided sample of each tensor, cast to bf16: the same whether
    the encoder was loaded in fp32 or bf16 (the cast rounds deterministically), on CPU or GPU, with
    no rounding edge to flip; and a few KiB per tensor, however large the encoder.
    """
    config = module.config
    config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    digest = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, parameter in module.named_parameters():  # once per load, not a hot path
            flat = parameter.detach().reshape(-1)
            stride = max(1, flat.numel() // WEIGHT_SAMPLES_PER_TENSOR)
            sample = flat[::stride][:WEIGHT_SAMPLES_PER_TENSOR].to(torch.bfloat16).cpu()
            digest.update(name.encode("utf-8"))
            digest.update(sample.view(torch.int16).numpy().tobytes())
    return type(module).__name__, config_fingerprint({"config": config_dict, "weights": digest.hexdigest()})


def model_name(model: str) -> str:
    """A readable identity for a model argument: the folder's absolute path or the hub id."""
    return os.path.abspath(model) if os.path.isdir(model) or os.path.isfile(model) else model


def read_vae_scaling_factor(model: str, single_file_config: str | None = None) -> float:
    from diffusers import AutoencoderKL

    if ldm_layout.is_single_file(model):
        source = single_file_config_source(single_file_config)
        config = from_single_file_config(model, source, "vae",
                                         lambda: AutoencoderKL.load_config(source, subfolder="vae"))
    else:
        config = AutoencoderKL.load_config(model, subfolder="vae")
    return float(config.get("scaling_factor", 0.18215))


# -- single-file models (the original SD layout, as A1111 / ComfyUI save them) ---------------------

def single_file_config_source(single_file_config: str | None) -> str:
    """Where the parts a single file does not hold (configs, tokenizer) come from: SD1.5 by default."""
    return single_file_config or SD15_MODEL_ID


class SingleFileConfigError(FileNotFoundError):
    """A single file's configs (or tokenizer) cannot be had: its config source is a hub id that cannot be
    reached (offline, not cached, no such repository) or a folder that lacks them. Its message is one line:
    the file, what is missing and the fix (the ``--single_file_config`` every such script takes)."""


_Read = TypeVar("_Read")


def from_single_file_config(model: str, source: str, part: str, read: Callable[[], _Read]) -> _Read:
    """``read()``: a config (or the tokenizer) of ``part`` that the single file ``model`` lacks, from ``source``.

    Every single-file load reads its configs through here, before any weights: what the source cannot give
    is a SingleFileConfigError naming the file, not the library's traceback (diffusers' and transformers'
    hub errors, e.g. "... does not appear to have a file named config.json" when offline)."""
    try:
        with _without_hub_deprecation_noise():
            return read()
    except OSError as error:
        if os.path.isdir(source):
            where = f"the folder {source}, which lacks it ({first_line(error)})"
        else:
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            where = (f"{source}, which is no local folder and could not be fetched from the hub "
                     f"({'HF_HUB_OFFLINE is set' if offline else first_line(error)})")
        raise SingleFileConfigError(
            f"{model}: a single file holds weights only; its {part} config comes from {where}; give the folder of "
            f"its model's configs (a diffusers folder with {part}/) with --single_file_config FOLDER, or make the "
            "hub reachable") from None


@contextlib.contextmanager
def _without_hub_deprecation_noise():
    """diffusers' single-file loaders pass huggingface_hub an argument it has deprecated, and its warning (two
    lines, naming neither our flags nor the user's files) would stand beside our one-line message."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*", category=UserWarning)
        yield


def _single_file_kwargs(cls, model: str, single_file_config: str | None, subfolder: str) -> dict[str, Any]:
    """from_single_file's arguments for the ``cls`` part of ``model``, its config found first (or refused)."""
    if not os.path.isfile(model):
        raise FileNotFoundError(f"{model}: no such single-file model")
    source = single_file_config_source(single_file_config)
    kwargs: dict[str, Any] = {"config": source, "subfolder": subfolder}
    if os.path.isdir(source):  # a local folder: nothing to fetch
        kwargs["local_files_only"] = True
    from_single_file_config(model, source, subfolder,
                            lambda: cls.load_config(source, subfolder=subfolder,
                                                    **_kwargs(local_files_only=kwargs.get("local_files_only"))))
    return kwargs


def single_file_schedule(model: str) -> dict[str, Any]:
    """Scheduler config overrides a single file's marker keys ask for (v-prediction, zero terminal SNR)."""
    markers = ldm_layout.read_markers(model)
    overrides: dict[str, Any] = {}
    if ldm_layout.V_PREDICTION_MARKER in markers:
        overrides["prediction_type"] = "v_prediction"
    if ldm_layout.ZERO_TERMINAL_SNR_MARKER in markers:
        overrides["rescale_betas_zero_snr"] = True
    return overrides


def _clip_tokenizer(source: str):
    """The CLIP tokenizer of ``source``; OSError when it has no vocabulary (transformers builds one of the
    special tokens alone, silently, when the tokenizer's files are missing)."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    if len(tokenizer.get_vocab()) <= len(tokenizer.all_special_tokens):
        raise FileNotFoundError("no tokenizer files (vocab.json, merges.txt) in its tokenizer/")
    return tokenizer


def _single_file_clip_text_encoder(model: str, dtype: torch.dtype, single_file_config: str | None):
    """The CLIP text encoder of a single file: the config's architecture, the file's weights (exactly)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if not os.path.isfile(model):
        raise FileNotFoundError(f"{model}: no such single-file model")
    source = single_file_config_source(single_file_config)
    tokenizer = from_single_file_config(model, source, "tokenizer", lambda: _clip_tokenizer(source))
    text_config = from_single_file_config(model, source, "text_encoder",
                                          lambda: CLIPTextConfig.from_pretrained(source, subfolder="text_encoder"))
    weights = ldm_layout.read_part(model, ldm_layout.TEXT_ENCODER_PREFIX)
    if not weights:
        raise ValueError(f"{model}: no CLIP text encoder in the file (no {ldm_layout.TEXT_ENCODER_PREFIX} keys)")
    text_encoder = CLIPTextModel(text_config)
    weights = ldm_layout.text_encoder_weights_for_model(weights, text_encoder.state_dict())
    missing, unexpected = text_encoder.load_state_dict(weights, strict=False)
    missing = [key for key in missing if not key.endswith("position_ids")]
    if missing:
        raise ValueError(f"{model}: the text encoder lacks {len(missing)} weights of {source}'s (e.g. {missing[0]})")
    return tokenizer, text_encoder.to(dtype)


def load_single_file_pipeline_around(model: str, unet: torch.nn.Module, single_file_config: str | None = None):
    """An SD1.5 pipeline of a single file's VAE and text encoder around ``unet`` (as load_pipeline_around)."""
    from diffusers import StableDiffusionPipeline

    source = single_file_config_source(single_file_config)
    tokenizer, text_encoder = load_clip_text_encoder(model, single_file_config=single_file_config)
    markers = single_file_schedule(model)
    scheduler = from_single_file_config(
        model, source, "scheduler",
        lambda: _sampling_scheduler_class(source).from_pretrained(source, subfolder="scheduler", **markers))
    return StableDiffusionPipeline(vae=load_vae(model, single_file_config=single_file_config), text_encoder=text_encoder,
                                   tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def load_pipeline_around(model: str, unet: torch.nn.Module, is_custom: bool = False):
    """The model's own pipeline with ``unet`` in place of its UNet; the other parts loaded (on CPU).

    Passing the UNet in means from_pretrained does not load a second copy of it. The safety
    checker, if the folder names one, is left out: samples are for the researcher's eyes.
    """
    from diffusers import DiffusionPipeline

    from . import flow, t5  # noqa: F401  (register our pipelines, the T5 one and its projection, with diffusers)

    index = DiffusionPipeline.load_config(model)
    extra: dict[str, Any] = {}
    if "safety_checker" in index:
        extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    code = pipeline_code.read_folder_code(model) if os.path.isdir(model) else None
    if code is not None and code.carries_code:  # a hub-style folder: its classes come from its own files
        pipeline_code.require_trust(code, is_custom, "--custom")
        return pipeline_code.load_pipeline_with_its_code(code, unet=unet, **extra)
    if is_custom:
        extra["trust_remote_code"] = True
    return DiffusionPipeline.from_pretrained(model, unet=unet, **extra)


def folder_code_problem(model: str, trusted: bool, flag: str = "--custom") -> str | None:
    """Why ``model``'s own code cannot be loaded, or may not be run (not trusted with ``flag``), if so.

    Checked before any work: a hub-style folder whose pipeline.py is missing or broken, or that was not
    trusted, would otherwise fail only when the first checkpoint is saved. Untrusted code is only read.
    """
    if not os.path.isfile(os.path.join(model, pipeline_code.MODEL_INDEX_FILE)):
        return None  # a hub id, or no pipeline folder: the loaders say so in their own words
    from . import flow, t5  # noqa: F401  (names our pipeline classes on diffusers: they need no pipeline.py)

    try:
        code = pipeline_code.read_folder_code(model)
        pipeline_code.require_trust(code, trusted, flag)
        for entry in code.entries:  # trusted: import each file now, so one that fails as it runs stops us here
            pipeline_code.load_class(entry)
    except pipeline_code.FolderCodeError as error:
        return str(error)
    return None


def put_folder_code_back(source: str, saved: os.PathLike | str) -> bool:
    """A pipeline saved from the hub-style folder ``source`` gets its code files back (diffusers' save drops
    them), so it loads as the source did: ``from_pretrained(saved, custom_pipeline=saved, trust_remote_code=True)``."""
    return pipeline_code.put_code_back(source, saved)
