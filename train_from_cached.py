#!/usr/bin/env python3
"""Train an SD1.5-architecture UNet from cached latent + text-embedding sidecars (see --help)."""

import sys

from cachetrain.commands import train_from_cached

if __name__ == "__main__":
    sys.exit(train_from_cached())
