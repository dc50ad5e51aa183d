"""A kept import path: ``cachetrain.t5`` is ``cachetrain.models.t5``.

It stays importable for good: saved T5 pipeline folders name their projection class here
(model_index.json: ["cachetrain.t5", "T5Projection"]), and code written for them imports it.
"""

import sys

from .models import t5 as _module

sys.modules[__name__] = _module
