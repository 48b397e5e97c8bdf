"""clfast: fast, correct prompt-based continual learning on frozen pre-trained transformers.

``import clfast`` loads nothing heavy: the subpackages are imported on first use (PEP 562), so
``import clfast.data``, ``clfast.engine.config`` or ``clfast --help`` neither load the compiled extension
nor any op. ``clfast.ops`` loads the extension (or warns once that it is missing) and registers the ops.
"""

import importlib

__version__ = "0.1.0"

# Subpackages and modules reachable as attributes of ``clfast`` without importing them first.
_LAZY = ("ops", "kernels", "backbones", "methods", "data", "engine", "info", "cli")

__all__ = ["ops", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")  # also binds clfast.<name>
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
