#!/usr/bin/env python3
"""Build an SD1.5 UNet + SDXL VAE + T5 pipeline folder from parts, checking that they fit (see --help)."""

import sys

from cachetrain.commands import assemble_t5_pipeline

if __name__ == "__main__":
    sys.exit(assemble_t5_pipeline())
