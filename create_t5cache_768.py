#!/usr/bin/env python3
"""Write x.txt_t5cache beside each caption x.txt: T5 states of its real tokens, projected to the UNet's 768 dims."""

import sys

from cachetrain.commands import create_t5cache_768

if __name__ == "__main__":
    sys.exit(create_t5cache_768())
