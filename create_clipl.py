#!/usr/bin/env python3
"""Write x.txt_clipl beside each caption x.txt: its CLIP-L embedding, as SD1.5 sampling computes it."""

import sys

from cachetrain.text_cache import main_clip

if __name__ == "__main__":
    sys.exit(main_clip())
