#!/usr/bin/env python3
"""Compare the sample images of training runs side by side in one self-contained HTML page (see --help)."""

import sys

from cachetrain.cli import require_dependencies

require_dependencies()  # before torch is imported: one line, not a traceback

from cachetrain.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
