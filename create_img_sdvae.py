#!/usr/bin/env python3
"""Write x.img_sdvae beside each image x.jpg: its SD1.5 VAE latent (posterior mean, unscaled).

The same implementation as create_img_sdxl.py with SD1.5 defaults (cachetrain.image_cache).
"""

import sys

from cachetrain.cli import require_dependencies

require_dependencies()  # before torch is imported: one line, not a traceback

from cachetrain import models  # noqa: E402
from cachetrain.image_cache import ImageScriptDefaults, main  # noqa: E402

DEFAULTS = ImageScriptDefaults(
    model=models.SD15_MODEL_ID,
    out_suffix=".img_sdvae",
    description="Cache SD1.5 VAE latents of every image under the data roots.",
)

if __name__ == "__main__":
    sys.exit(main(None, DEFAULTS))
