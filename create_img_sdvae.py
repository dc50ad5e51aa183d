#!/usr/bin/env python3
"""Write x.img_sdvae beside each image x.jpg: its SD1.5 VAE latent (posterior mean, unscaled).

The same implementation as create_img_sdxl.py with SD1.5 defaults (cachetrain.image_cache).
"""

import sys

from cachetrain.commands import SD_VAE_DEFAULTS as DEFAULTS  # noqa: F401  (the tests read the defaults here)
from cachetrain.commands import create_img_sdvae

if __name__ == "__main__":
    sys.exit(create_img_sdvae())
