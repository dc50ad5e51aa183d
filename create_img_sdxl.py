#!/usr/bin/env python3
"""Write x.img_sdxl beside each image x.jpg: its SDXL VAE latent (posterior mean, unscaled).

The same implementation as create_img_sdvae.py with SDXL defaults; --custom FOLDER takes the VAE
from a custom pipeline folder's vae/. The SDXL VAE is refused in float16 (it overflows there).
"""

import sys

from cachetrain.cli import require_dependencies

require_dependencies()  # before torch is imported: one line, not a traceback

from cachetrain import models  # noqa: E402
from cachetrain.image_cache import ImageScriptDefaults, main  # noqa: E402

DEFAULTS = ImageScriptDefaults(
    model=models.SDXL_MODEL_ID,
    out_suffix=".img_sdxl",
    description="Cache SDXL VAE latents of every image under the data roots.",
)

if __name__ == "__main__":
    sys.exit(main(None, DEFAULTS))
