"""The engine: the continual-learning loop (:class:`Trainer`), run configuration, metrics,
checkpoints, plots and progress reporting. The only part of clfast that knows about processes,
devices, files and logging.
"""

from .config import RunConfig, apply_overrides, list_presets, load_config, parse_override
from .trainer import Interrupted, Position, Trainer, format_summary

__all__ = ["RunConfig", "load_config", "parse_override", "apply_overrides", "list_presets", "Trainer",
           "Interrupted", "Position", "format_summary"]
