"""python -m cachetrain.tiny: build the tiny offline models and the synthetic shapes data."""

import sys

from .models import main

sys.exit(main())
