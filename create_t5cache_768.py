#!/usr/bin/env python3
"""Write x.txt_t5cache beside each caption x.txt: T5 states of its real tokens, projected to the UNet's 768 dims."""

import sys

from cachetrain.t5_cache import main

if __name__ == "__main__":
    sys.exit(main())
