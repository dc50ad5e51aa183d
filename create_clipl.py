#!/usr/bin/env python3
"""Write x.txt_clipl beside each caption x.txt: its CLIP-L embedding, as SD1.5 sampling computes it.

Each data root also gets the empty prompt's embedding at <root>/.empty_prompt.txt_clipl (for
caption dropout). The machinery is cachetrain.text_cache, shared with the T5 cache script.
"""

import sys

from cachetrain.cli import require_dependencies

require_dependencies()  # before torch is imported: one line, not a traceback

from cachetrain.text_cache import main_clip  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_clip())
