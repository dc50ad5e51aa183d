#!/usr/bin/env python3
"""Train an SD1.5-architecture UNet from cached latent + text-embedding sidecars (see --help)."""

import sys

from cachetrain.cli import require_dependencies

require_dependencies()  # before torch is imported: one line, not a traceback

from cachetrain.trainer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
