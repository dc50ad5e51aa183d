"""A kept import path: ``cachetrain.flow`` is ``cachetrain.models.flow``.

It stays importable for good: code written for flow checkpoints imports the flow pipeline from here.
"""

import sys

from .models import flow as _module

sys.modules[__name__] = _module
