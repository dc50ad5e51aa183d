"""The demo's VAE: committed small, trained by a command in the repo, and it reconstructs the shapes."""

from __future__ import annotations

import torch

from cachetrain.tiny import models as tiny
from cachetrain.tiny.shapes import TINY_RESOLUTION, shape_pixels


def _reconstruction_error(vae) -> float:
    pixels = shape_pixels(16, TINY_RESOLUTION, seed=0)  # the demo dataset's images
    with torch.no_grad():
        return (vae.decode(vae.encode(pixels).latent_dist.mean).sample - pixels).abs().mean().item()


def test_the_committed_demo_vae_is_small_and_reconstructs_the_shapes_a_random_one_cannot():
    from diffusers import AutoencoderKL

    weights = tiny.DEMO_VAE_DIR / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 1_000_000
    record = (tiny.DEMO_VAE_DIR / "TRAINING.md").read_text(encoding="utf-8")
    assert "python -m cachetrain.tiny train_vae cachetrain/tiny/demo_vae --seed 0 --steps 1500" in record
    trained = AutoencoderKL.from_pretrained(tiny.DEMO_VAE_DIR, torch_dtype=torch.float32).eval()
    torch.manual_seed(0)
    untrained = AutoencoderKL(**tiny.DEMO_VAE).eval()
    assert _reconstruction_error(trained) < 0.06  # on [-1, 1]: flat colours and clean shape edges
    assert _reconstruction_error(untrained) > 0.3


def test_the_demo_model_uses_the_trained_vae_and_the_default_tiny_model_keeps_its_random_one(tmp_path):
    from diffusers import AutoencoderKL

    demo = tiny.build_tiny_sd(tmp_path / "demo", trained_vae=True)
    default = tiny.build_tiny_sd(tmp_path / "default")
    committed = AutoencoderKL.from_pretrained(tiny.DEMO_VAE_DIR).state_dict()
    demo_vae = AutoencoderKL.from_pretrained(demo, subfolder="vae").state_dict()
    assert all(torch.equal(demo_vae[key].to(committed[key].dtype), committed[key]) for key in committed)
    assert AutoencoderKL.load_config(default, subfolder="vae")["block_out_channels"] == list(tiny.TINY_VAE["block_out_channels"])


def test_train_vae_writes_a_loadable_fp16_vae_folder(tmp_path):
    from diffusers import AutoencoderKL

    from safetensors.torch import load_file

    out = tiny.train_demo_vae(tmp_path / "vae", seed=5, steps=2, image_count=32, log=lambda line: None)
    stored = load_file(out / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in stored.values()} == {torch.float16}  # half the bytes to commit
    vae = AutoencoderKL.from_pretrained(out)
    assert vae.config.block_out_channels == list(tiny.DEMO_VAE["block_out_channels"])
    assert vae.config.scaling_factor > 0
