#!/usr/bin/env python3
"""Write x.txt_t5cache beside each caption x.txt: T5 states of its real tokens, projected to the UNet's 768 dims."""

import sys

from cachetrain.cli import require_dependencies

require_dependencies()  # before torch is imported: one line, not a traceback

from cachetrain.t5_cache import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
