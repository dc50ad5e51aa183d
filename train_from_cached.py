#!/usr/bin/env python3
"""Train an SD1.5-architecture UNet from cached latent + text-embedding sidecars (see --help)."""

import sys

from cachetrain.trainer import main

if __name__ == "__main__":
    sys.exit(main())
