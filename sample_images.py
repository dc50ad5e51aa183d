#!/usr/bin/env python3
"""Draw sample images from a checkpoint or pipeline folder, or from each checkpoint of a running training (see --help)."""

import sys

from cachetrain.commands import sample_images

if __name__ == "__main__":
    sys.exit(sample_images())
