"""The SD1.5 + SDXL VAE + T5 model: its text projection, its pipeline, and loading its text parts.

Three families in one pipeline folder:

    tokenizer, text_encoder   a T5 tokenizer and T5EncoderModel (T5-xxl: 4096-dim states)
    t5_projection             T5Projection: Linear in -> out (4096 -> 768) times config.scaling_factor
    unet                      an SD1.5-architecture UNet whose cross-attention takes the projected tokens
    vae                       the SDXL VAE (4 latent channels, scaling factor 0.13025)
    scheduler                 any diffusers scheduler

A prompt becomes UNet conditioning by ``text_encoding.encode_t5_prompts`` (real tokens only, end
token included) and ``text_encoding.pad_text_embeddings`` (the pad rule): the same two functions
the T5 cache and the trainer's collate use.

Importing this module registers the pipeline class with diffusers, so after ``import cachetrain.t5``
both ``StableDiffusionT5Pipeline.from_pretrained(folder)`` and ``DiffusionPipeline.from_pretrained(folder)``
load such a folder offline.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import shutil

import torch
from diffusers import DiffusionPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from . import pipeline_code
from .flow import drawable
from .text_encoding import encode_t5_prompts, pad_text_embeddings

PROJECTION_SUBFOLDER = "t5_projection"
DYNAMIC_MODULES_PREFIX = "diffusers_modules."  # where diffusers imports code that a folder carries
TEXT_PART_SUBFOLDERS = ("tokenizer", "text_encoder", PROJECTION_SUBFOLDER)


class T5Projection(ModelMixin, ConfigMixin):
    """Maps T5 hidden states to the UNet's cross-attention width: ``linear(states) * scaling_factor``.

    ``scaling_factor`` lives in the config (like a VAE's) so the range of the projected tokens can be
    matched to what a UNet was trained on without touching the learned weights. ``token_length``,
    when set, is the number of tokens the UNet was trained on (--force_toklen): the pipeline pads or
    truncates every prompt's conditioning to it.
    """

    @register_to_config
    def __init__(self, in_features: int = 4096, out_features: int = 768, scaling_factor: float = 1.0,
                 token_length: int | None = None):
        super().__init__()
        self.linear = torch.nn.Linear(in_features, out_features)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden_states) * self.config.scaling_factor

    @classmethod
    def initialised(cls, in_features: int, out_features: int, scaling_factor: float = 1.0,
                    seed: int = 0) -> T5Projection:
        """A new projection: weights ~ N(0, 1/in_features), bias 0, from a generator seeded with ``seed``.

        The 1/in_features variance keeps each projected feature at the variance of the T5 features
        (as a UNet expects its context near unit scale), and a zero bias adds nothing the UNet has to
        unlearn. The same seed and shapes give the same projection on any machine.
        """
        projection = cls(in_features=in_features, out_features=out_features, scaling_factor=scaling_factor)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            weight = torch.randn(out_features, in_features, generator=generator) / math.sqrt(in_features)
            projection.linear.weight.copy_(weight)
            projection.linear.bias.zero_()
        return projection


class StableDiffusionT5Pipeline(DiffusionPipeline):
    """Text-to-image with a T5 text encoder, a learned projection, an SD1.5 UNet and the SDXL VAE."""

    model_cpu_offload_seq = "text_encoder->t5_projection->unet->vae"

    def __init__(self, vae, text_encoder, tokenizer, t5_projection: T5Projection, unet, scheduler):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, t5_projection=t5_projection,
                              unet=unet, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as diffusers does, then put back the code of components that came with their folder.

        A component loaded from code its folder carried (trusted with --custom) would
        otherwise be saved under the name of a module that exists only in this process: the code file
        goes back beside its weights and model_index.json names it, so the copy loads as the original did.
        """
        super().save_pretrained(save_directory, *args, **kwargs)
        carried = {name: type(component) for name, component in self.components.items()
                   if type(component).__module__.startswith(DYNAMIC_MODULES_PREFIX)}
        if not carried:
            return
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
        for name, cls in carried.items():
            source = inspect.getsourcefile(cls)
            shutil.copy2(source, os.path.join(save_directory, name, os.path.basename(source)))
            index[name] = [os.path.splitext(os.path.basename(source))[0], cls.__name__]
        with open(index_path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(index, indent=2, sort_keys=True) + "\n")

    @property
    def default_max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def encode_prompt(self, prompt: str | list[str], device: torch.device | None = None,
                      num_images_per_prompt: int = 1, do_classifier_free_guidance: bool = False,
                      negative_prompt: str | list[str] | None = None, max_sequence_length: int | None = None,
                      token_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(conditioning [B, L, D], attention mask [B, L] or None) for the UNet.

        With classifier-free guidance the negative prompts come first, then the prompts, padded
        together by the pad rule (the trainer's collate applies the same rule to cached sidecars).
        ``token_length`` pads or truncates every embedding to that many tokens after encoding, as
        training with --force_toklen does to the cached ones; by default, the projection's own
        (set when the model was trained so), else none.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if do_classifier_free_guidance:
            negatives = negative_prompt if negative_prompt is not None else ""
            negatives = [negatives] * len(prompts) if isinstance(negatives, str) else \
                [n for n in negatives for _ in range(num_images_per_prompt)]
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives) // num_images_per_prompt} negative prompts for "
                                 f"{len(prompts) // num_images_per_prompt} prompts")
            prompts = negatives + prompts
        max_length = max_sequence_length or self.default_max_length
        embeddings = encode_t5_prompts(self.tokenizer, self.text_encoder, self.t5_projection, prompts, max_length)
        if token_length is None:
            token_length = dict(getattr(self.t5_projection, "config", {})).get("token_length")
        conditioning, mask = pad_text_embeddings(embeddings, token_length)
        device = device or self._execution_device
        return conditioning.to(device), (mask.to(device) if mask is not None else None)

    def _step_kwargs(self, scheduler, generator) -> dict:
        """Pass the generator to schedulers that draw noise in their step (ancestral, DDPM)."""
        accepted = inspect.signature(scheduler.step).parameters
        return {"generator": generator} if "generator" in accepted else {}

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 30,
                 guidance_scale: float = 7.5, num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
                 max_sequence_length: int | None = None, token_length: int | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """Draw images for ``prompt``; guidance_scale <= 1 turns classifier-free guidance off.

        ``token_length``: condition on exactly that many tokens, for a UNet trained with --force_toklen."""
        trained = self.unet.config.sample_size  # an int, or [height, width] for non-square training
        trained_height, trained_width = (trained, trained) if isinstance(trained, int) else trained
        height = height or trained_height * self.vae_scale_factor
        width = width or trained_width * self.vae_scale_factor
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}")
        device = self._execution_device
        guided = guidance_scale > 1.0
        context, mask = self.encode_prompt(prompt, device, num_images_per_prompt, guided, negative_prompt,
                                           max_sequence_length, token_length)
        batch = context.shape[0] // 2 if guided else context.shape[0]
        context = context.to(self.unet.dtype)

        scheduler = drawable(self.scheduler)  # a flow-matching one as this loop drives it (see cachetrain.flow)
        scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=context.dtype)
        latents = latents.to(device) * scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(scheduler, generator)
        for t in self.progress_bar(scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise = self.unet(model_input, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
            if guided:
                unconditional, conditional = noise.chunk(2)
                noise = unconditional + guidance_scale * (conditional - unconditional)
            latents = scheduler.step(noise, t, latents, **step_kwargs).prev_sample

        if output_type == "latent":
            images = latents
        else:
            images = self._decode(latents)
            images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        # The SDXL VAE overflows in fp16 (force_upcast in its config): decode in fp32 then.
        upcast = self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        dtype = torch.float32 if upcast else self.vae.dtype
        if upcast:
            self.vae.to(torch.float32)
        try:
            latents = latents.to(dtype) / self.vae.config.scaling_factor
            shift = getattr(self.vae.config, "shift_factor", None)
            if shift:
                latents = latents + shift
            return self.vae.decode(latents).sample
        finally:
            if upcast:
                self.vae.to(torch.float16)


def _load_part(cls, model: str, subfolder: str, **kwargs):
    """A component from a pipeline folder or hub id (``model/subfolder``)."""
    return cls.from_pretrained(model, subfolder=subfolder, **kwargs)


def check_tokenizer_vocabulary(tokenizer, where: str) -> None:
    """Raise if ``tokenizer`` maps ordinary words to <unk>: what a T5 tokenizer built without its
    vocabulary file does, silently (e.g. AutoTokenizer on a folder holding only the encoder)."""
    ids = tokenizer("a photo of a cat on a table", add_special_tokens=False).input_ids
    if not ids or all(i == tokenizer.unk_token_id for i in ids if i != tokenizer.convert_tokens_to_ids("▁")):
        raise ValueError(f"the tokenizer of {where} maps every word to <unk>: its vocabulary "
                         "(spiece.model or tokenizer.json) is missing")


def _folder_code(model: str, trust_remote_code: bool) -> pipeline_code.FolderCode | None:
    """The code a local folder carries (checked, and trusted or refused); None for a hub id or a folder
    of parts without model_index.json."""
    if not os.path.isfile(os.path.join(model, pipeline_code.MODEL_INDEX_FILE)):
        return None
    code = pipeline_code.read_folder_code(model)
    pipeline_code.require_trust(code, trust_remote_code, "--custom")
    return code


def projection_class(model: str, trust_remote_code: bool = False) -> type:
    """The class that loads ``model``'s t5_projection/: T5Projection, or the folder's own code.

    A folder published with its own code names, in model_index.json, a module file beside the
    projection's weights. That code runs only when the caller trusts the folder (``--custom``).
    """
    code = _folder_code(model, trust_remote_code)
    entry = code.component(PROJECTION_SUBFOLDER) if code is not None else None
    if entry is not None:
        return pipeline_code.load_class(entry)
    if code is None:  # a hub id (ours is the only projection that loads without its files at hand), or parts
        try:
            index = DiffusionPipeline.load_config(model)
        except (OSError, ValueError):  # no model_index.json: the parts alone, ours by default
            return T5Projection
        library, class_name = index.get(PROJECTION_SUBFOLDER, (__name__, T5Projection.__name__))[:2]
        if library not in (__name__, "cachetrain") or class_name != T5Projection.__name__:
            raise ValueError(f"{model}: its {PROJECTION_SUBFOLDER} is a {library}.{class_name}, which cachetrain "
                             "does not know; download the folder and pass its path")
    return T5Projection


def _text_parts_of_pipeline(code: pipeline_code.FolderCode, dtype: torch.dtype):
    """(tokenizer, text encoder, projection) of a folder that does not store its T5: its pipeline's code
    names the encoder (a hub id or a path), so the pipeline is loaded through that code and its text
    parts are kept."""
    pipeline = pipeline_code.load_pipeline_with_its_code(code, torch_dtype=dtype)
    parts = {name: getattr(pipeline, name, None) for name in TEXT_PART_SUBFOLDERS}
    missing = [name for name, part in parts.items() if part is None]
    if missing:
        raise pipeline_code.FolderCodeError(f"{code.pipeline.path}: its pipeline has no {', '.join(missing)}, and "
                                            f"{code.folder} stores none")
    text_encoder, projection = (part if part.dtype == dtype else part.to(dtype)
                                for part in (parts["text_encoder"], parts[PROJECTION_SUBFOLDER]))
    return parts["tokenizer"], text_encoder, projection


def load_t5_text_parts(model: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(tokenizer, text encoder, projection) of a T5 pipeline folder or hub id; nothing else is loaded,
    except from a folder that stores no T5 of its own (its pipeline code names one): then the whole
    pipeline is loaded through that code, and only its text parts kept.

    ``trust_remote_code``: the folder may carry its own code (pipeline.py, a projection module), and it is run.
    """
    from transformers import AutoTokenizer, T5EncoderModel

    code = _folder_code(model, trust_remote_code)
    if os.path.isdir(model):
        missing = [name for name in TEXT_PART_SUBFOLDERS if not os.path.isdir(os.path.join(model, name))]
        if missing and code is not None and code.pipeline is not None and PROJECTION_SUBFOLDER not in missing:
            tokenizer, text_encoder, projection = _text_parts_of_pipeline(code, dtype)
            check_tokenizer_vocabulary(tokenizer, f"the T5 tokenizer {code.pipeline.path} loads")
            return tokenizer, text_encoder, projection
        if missing:
            raise FileNotFoundError(f"{model} is not a T5 pipeline folder: no {', '.join(missing)} subfolder "
                                    "(build one with assemble_t5_pipeline.py)")
    tokenizer = _load_part(AutoTokenizer, model, "tokenizer")
    check_tokenizer_vocabulary(tokenizer, f"{model}/tokenizer")
    text_encoder = _load_part(T5EncoderModel, model, "text_encoder", dtype=dtype)
    projection = _load_part(projection_class(model, trust_remote_code), model, PROJECTION_SUBFOLDER,
                            torch_dtype=dtype)
    return tokenizer, text_encoder, projection


def _register_with_diffusers() -> None:
    # diffusers resolves a folder's pipeline class by name on its own module, and a component's
    # library ("cachetrain.t5", recorded by save_pretrained) among already-imported modules. Naming
    # the class on diffusers lets DiffusionPipeline.from_pretrained (and so every loader in
    # cachetrain) open a T5 pipeline folder without remote code.
    import diffusers

    if getattr(diffusers, StableDiffusionT5Pipeline.__name__, None) is not StableDiffusionT5Pipeline:
        setattr(diffusers, StableDiffusionT5Pipeline.__name__, StableDiffusionT5Pipeline)


# A saved folder names its projection by the class's module (model_index.json: ["cachetrain.t5",
# "T5Projection"]); folders saved before and after the code moved here all say cachetrain.t5, the
# kept path (cachetrain/t5.py), so every checkpoint loads wherever this file lives.
T5Projection.__module__ = "cachetrain.t5"
_register_with_diffusers()

# The kept path: saved folders name this module "cachetrain.t5" and diffusers looks that name up among
# imported modules, so loading this code imports it too (cachetrain/t5.py, this module by that name).
importlib.import_module("cachetrain.t5")
