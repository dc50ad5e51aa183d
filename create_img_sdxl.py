#!/usr/bin/env python3
"""Write x.img_sdxl beside each image x.jpg: its SDXL VAE latent (posterior mean, unscaled).

The same implementation as create_img_sdvae.py with SDXL defaults; --custom FOLDER takes the VAE
from a custom pipeline folder's vae/. The SDXL VAE is refused in float16 (it overflows there).
"""

import sys

from cachetrain.image_cache import ImageScriptDefaults, main

DEFAULTS = ImageScriptDefaults(
    model="stabilityai/stable-diffusion-xl-base-1.0",
    out_suffix=".img_sdxl",
    description="Cache SDXL VAE latents of every image under the data roots.",
)

if __name__ == "__main__":
    sys.exit(main(None, DEFAULTS))
