"""A kept import path: ``cachetrain.export`` is ``cachetrain.models.export``, and ``python -m cachetrain.export`` runs it."""

import sys

from .models import export as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
