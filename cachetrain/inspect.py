"""A kept import path: ``cachetrain.inspect`` is ``cachetrain.view.inspect``, and ``python -m cachetrain.inspect`` runs it."""

import sys

from .view import inspect as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
