"""Hub-style custom pipeline folders, written from the tiny T5 model, and a plain-diffusers check of them.

Each folder carries a root ``pipeline.py`` of the kind a user of the original scripts has: a
DiffusionPipeline subclass with its own ``encode_prompt`` and ``__call__``, importing only torch,
diffusers and transformers (and, in the variant whose projection is ours, cachetrain.t5). The
variants differ where model_index.json points:

    module-projection   _class_name "HubT5Pipeline"; t5_projection ["hub_projection", "HubProjection"],
                        its code in t5_projection/hub_projection.py; T5 stored in the folder
    root-projection     _class_name ["pipeline", "HubT5Pipeline"]; t5_projection ["pipeline", "HubProjection"],
                        the class defined in the root pipeline.py (and the same file in t5_projection/,
                        where diffusers looks for a component's module); T5 stored
    our-projection      _class_name "HubT5Pipeline"; t5_projection ["cachetrain.t5", "T5Projection"];
                        no T5 in the folder: pipeline.py names it (T5_ENCODER, a local folder here)

``python -m tests.hubstyle_support draw FOLDER...`` loads each folder with plain diffusers, exactly as
a user does (``DiffusionPipeline.from_pretrained(F, custom_pipeline=F, trust_remote_code=True)``),
draws one image, and prints one JSON line per folder.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

PIPELINE_CLASS = "HubT5Pipeline"
PROJECTION_CLASS = "HubProjection"
VARIANTS = ("module-projection", "root-projection", "our-projection")

PROJECTION_CODE = '''
class HubProjection(ModelMixin, ConfigMixin):
    """T5 states -> the UNet's cross-attention width."""

    @register_to_config
    def __init__(self, in_features: int = 4096, out_features: int = 768, scaling_factor: float = 1.0):
        super().__init__()
        self.linear = torch.nn.Linear(in_features, out_features)

    def forward(self, states):
        return self.linear(states) * self.config.scaling_factor
'''

PIPELINE_CODE = '''"""SD1.5 UNet + SDXL VAE + T5: text to image."""

import torch
from diffusers import DiffusionPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from transformers import AutoTokenizer, T5EncoderModel
{extra_imports}
T5_ENCODER = {t5_encoder!r}  # where the T5 comes from when the folder stores none
{projection_code}

class HubT5Pipeline(DiffusionPipeline):
    _optional_components = ["tokenizer", "text_encoder"]

    def __init__(self, vae, t5_projection, unet, scheduler, tokenizer=None, text_encoder=None):
        super().__init__()
        if text_encoder is None:
            text_encoder = T5EncoderModel.from_pretrained(T5_ENCODER)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(T5_ENCODER)
        self.register_modules(vae=vae, t5_projection=t5_projection, unet=unet, scheduler=scheduler,
                              tokenizer=tokenizer, text_encoder=text_encoder)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @torch.no_grad()
    def encode_prompt(self, prompts, device):
        tokens = self.tokenizer(prompts, padding="longest", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt")
        mask = tokens.attention_mask.to(device)
        states = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
        return self.t5_projection(states.to(self.t5_projection.dtype)), mask

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt=None, height=None, width=None, num_inference_steps=30,
                 guidance_scale=7.5, generator=None, output_type="pil"):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        guided = guidance_scale > 1.0
        if guided:
            prompts = [negative_prompt or ""] * len(prompts) + prompts
        device = self._execution_device
        context, mask = self.encode_prompt(prompts, device)
        batch = len(prompts) // 2 if guided else len(prompts)
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = torch.randn(shape, generator=generator, device=device) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise = self.unet(model_input, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
            if guided:
                unconditional, conditional = noise.chunk(2)
                noise = unconditional + guidance_scale * (conditional - unconditional)
            latents = self.scheduler.step(noise, t, latents).prev_sample
        images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        images = self.image_processor.postprocess(images, output_type=output_type)
        return ImagePipelineOutput(images=images)
'''


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def write_t5_encoder_folder(tiny_t5_model: Path, folder: Path) -> Path:
    """The tiny model's T5 encoder and tokenizer in one flat folder, as an encoder-only hub repository is."""
    folder.mkdir(parents=True)
    for part in ("text_encoder", "tokenizer"):
        for file in (tiny_t5_model / part).iterdir():
            shutil.copy2(file, folder / file.name)
    return folder


def pipeline_code(projection_in_file: bool, t5_encoder: str, imports_ours: bool = False) -> str:
    extra = "import cachetrain.t5  # the projection's class (model_index.json: cachetrain.t5)\n" if imports_ours else ""
    return PIPELINE_CODE.format(extra_imports=extra, t5_encoder=t5_encoder,
                                projection_code=PROJECTION_CODE if projection_in_file else "")


def write_hubstyle_folder(tiny_t5_model: Path, folder: Path, variant: str, t5_encoder: Path | None = None) -> Path:
    """A hub-style copy of the tiny T5 model (same weights), as ``variant`` (see the module's doc)."""
    shutil.copytree(tiny_t5_model, folder)
    projection = folder / "t5_projection"
    if variant == "module-projection":
        (folder / "pipeline.py").write_text(pipeline_code(False, "google/t5-v1_1-xxl"), encoding="utf-8")
        module = "from diffusers.configuration_utils import ConfigMixin, register_to_config\n" \
                 "from diffusers.models.modeling_utils import ModelMixin\nimport torch\n" + PROJECTION_CODE
        (projection / "hub_projection.py").write_text(module, encoding="utf-8")
        _edit_json(folder / "model_index.json", _class_name=PIPELINE_CLASS,
                   t5_projection=["hub_projection", PROJECTION_CLASS])
        _edit_json(projection / "config.json", _class_name=PROJECTION_CLASS, token_length=None)
    elif variant == "root-projection":
        code = pipeline_code(True, "google/t5-v1_1-xxl")
        (folder / "pipeline.py").write_text(code, encoding="utf-8")
        (projection / "pipeline.py").write_text(code, encoding="utf-8")
        _edit_json(folder / "model_index.json", _class_name=["pipeline", PIPELINE_CLASS],
                   t5_projection=["pipeline", PROJECTION_CLASS])
        _edit_json(projection / "config.json", _class_name=PROJECTION_CLASS, token_length=None)
    elif variant == "our-projection":
        assert t5_encoder is not None, "this variant's pipeline.py names a T5 folder"
        (folder / "pipeline.py").write_text(pipeline_code(False, str(t5_encoder), imports_ours=True), encoding="utf-8")
        shutil.rmtree(folder / "text_encoder")
        shutil.rmtree(folder / "tokenizer")
        _edit_json(folder / "model_index.json", _class_name=PIPELINE_CLASS, text_encoder=None, tokenizer=None)
    else:
        raise ValueError(f"unknown variant {variant!r}; one of {VARIANTS}")
    return folder


def draw_with_plain_diffusers(folders: list[str]) -> list[dict]:
    """Load each folder as a user of the original does and draw one image; what came out, per folder."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(1)
    results = []
    for folder in folders:
        pipeline = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
        pipeline.set_progress_bar_config(disable=True)
        image = pipeline("a red circle on a blue background", num_inference_steps=2, guidance_scale=2.0,
                         generator=torch.Generator().manual_seed(0)).images[0]
        pixels = np.asarray(image)
        results.append({"folder": folder, "class": type(pipeline).__name__, "module": type(pipeline).__module__,
                        "projection": type(pipeline.t5_projection).__name__, "size": list(image.size),
                        "pixel_std": float(pixels.std()), "cachetrain_imported": "cachetrain" in sys.modules})
    return results


if __name__ == "__main__":
    if sys.argv[1:2] != ["draw"]:
        sys.exit("usage: python -m tests.hubstyle_support draw FOLDER...")
    for result in draw_with_plain_diffusers(sys.argv[2:]):
        print(json.dumps(result))
