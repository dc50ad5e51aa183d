#!/usr/bin/env python3
"""Write x.img_sdxl beside each image x.jpg: its SDXL VAE latent (posterior mean, unscaled).

The same implementation as create_img_sdvae.py with SDXL defaults; --custom FOLDER takes the VAE
from a custom pipeline folder's vae/. The SDXL VAE is refused in float16 (it overflows there).
"""

import sys

from cachetrain.commands import SDXL_VAE_DEFAULTS as DEFAULTS  # noqa: F401  (the tests read the defaults here)
from cachetrain.commands import create_img_sdxl

if __name__ == "__main__":
    sys.exit(create_img_sdxl())
