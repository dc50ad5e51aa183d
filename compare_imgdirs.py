#!/usr/bin/env python3
"""Compare the sample images of training runs side by side in one self-contained HTML page (see --help)."""

import sys

from cachetrain.commands import compare_imgdirs

if __name__ == "__main__":
    sys.exit(compare_imgdirs())
