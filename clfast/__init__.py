"""clfast: fast, correct prompt-based continual learning on frozen pre-trained transformers."""

__version__ = "0.1.0"

from clfast import _ext  # noqa: E402,F401  (loads the compiled kernels, or warns once)
from clfast import ops  # noqa: E402

__all__ = ["ops", "__version__"]
