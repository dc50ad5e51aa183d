#!/usr/bin/env python3
"""Build an SD1.5 UNet + SDXL VAE + T5 pipeline folder from parts, checking that they fit (see --help)."""

import sys

from cachetrain.cli import require_dependencies

require_dependencies()  # before torch is imported: one line, not a traceback

from cachetrain.assemble import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
