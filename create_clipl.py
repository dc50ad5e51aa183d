#!/usr/bin/env python3
"""Write x.txt_clipl beside each caption x.txt: its CLIP-L embedding, as SD1.5 sampling computes it.

Each data root also gets the empty prompt's embedding at <root>/.empty_prompt.txt_clipl (for
caption dropout). The machinery is cachetrain.text_cache, shared with the T5 cache script.
"""

import sys

from cachetrain.commands import create_clipl

if __name__ == "__main__":
    sys.exit(create_clipl())
