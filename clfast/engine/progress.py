"""Progress bars and the ``clfast`` logger.

:func:`progress` wraps ``tqdm`` (to stderr, ``dynamic_ncols``) and becomes a silent passthrough when
bars are off. Whether they are on:

1. ``enabled=False`` (e.g. ``--quiet``) → off;
2. ranks other than 0 of a distributed run → off;
3. environment ``CLFAST_PROGRESS=0`` → off, ``CLFAST_PROGRESS=1`` → on (also when stderr is not a
   terminal, e.g. a log file);
4. otherwise on only if stderr is a terminal.

:func:`get_logger` configures the ``clfast`` logger once (a stderr handler with a short format); child
loggers such as ``clfast.engine`` share it. That handler is the module's only global state.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Iterable, Iterator, Optional

__all__ = ["progress", "progress_enabled", "is_rank_zero", "get_logger", "log_to_file", "LOG_FORMAT"]

LOG_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"
_DATE_FORMAT = "%H:%M:%S"
_HANDLER_FLAG = "_clfast_handler"


def is_rank_zero() -> bool:
    """True unless this is a non-zero rank of a ``torch.distributed`` (or ``torchrun``-launched) job."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0").strip() in ("", "0")


def progress_enabled(enabled: bool = True) -> bool:
    """Whether :func:`progress` would draw a bar (see the module docstring for the rules)."""
    if not enabled or not is_rank_zero():
        return False
    env = os.environ.get("CLFAST_PROGRESS", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _NoBar:
    """Stands in for a tqdm bar when bars are off: iterates the iterable and ignores bar calls."""

    def __init__(self, iterable: Optional[Iterable], total: Optional[int]) -> None:
        self.iterable = iterable
        self.total = total
        self.n = 0

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("progress(None, ...) is a manual bar; call update() instead of iterating it")
        return iter(self.iterable)

    def __len__(self) -> int:
        if self.total is not None:
            return int(self.total)
        return len(self.iterable)  # type: ignore[arg-type]

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
             enabled: bool = True, leave: bool = False, unit: str = "it"):
    """Wrap ``iterable`` in a progress bar, or pass it through when bars are off.

    Args:
        iterable: what to iterate; None for a manual bar driven by ``update(n)``.
        total: expected number of items (default ``len(iterable)`` where it has one).
        desc: label in front of the bar.
        enabled: False turns the bar off (quiet mode).
        leave: keep the finished bar on screen (False suits inner loops).
        unit: unit name shown by the bar.

    Returns:
        A ``tqdm`` bar, or an object with the same iteration, ``update``, ``set_postfix``,
        ``set_description`` and ``close`` methods that draws nothing.
    """
    if not progress_enabled(enabled):
        return _NoBar(iterable, total)
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc or None, leave=leave, dynamic_ncols=True, file=sys.stderr,
                unit=unit)


def _formatter() -> logging.Formatter:
    return logging.Formatter(LOG_FORMAT, datefmt=_DATE_FORMAT)


def get_logger(name: str = "clfast", quiet: Optional[bool] = None) -> logging.Logger:
    """The ``clfast`` logger (or a child such as ``clfast.engine``), configured on first use.

    The first call adds a stderr handler to the top logger of ``name``'s hierarchy (``"clfast"`` for
    ``"clfast.engine"``), sets that logger to INFO and stops propagation to the root logger, so lines are
    not printed twice. Later calls add nothing.

    Args:
        name: logger name.
        quiet: True sets the stderr handler to WARNING, False to INFO; None leaves it as it is (INFO
            after the first configuration). Only the terminal goes quiet: files added with
            :func:`log_to_file` (a run's ``train.log``) still get every INFO line.

    Returns:
        ``logging.getLogger(name)``.
    """
    top = logging.getLogger(name.split(".", 1)[0])
    ours = [h for h in top.handlers if getattr(h, _HANDLER_FLAG, False)]
    if not ours:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_formatter())
        handler.setLevel(logging.INFO)
        setattr(handler, _HANDLER_FLAG, True)
        top.addHandler(handler)
        top.propagate = False
        top.setLevel(logging.INFO)
        ours = [handler]
    if quiet is not None:
        for handler in ours:
            handler.setLevel(logging.WARNING if quiet else logging.INFO)
    return logging.getLogger(name)


def log_to_file(logger: logging.Logger, path: str | os.PathLike, level: int = logging.DEBUG) -> logging.FileHandler:
    """Also write ``logger``'s records to ``path`` (appending; parent directories are created).

    Adding the same file twice returns the existing handler.

    Args:
        logger: e.g. the result of :func:`get_logger`.
        path: log file, e.g. ``runs/<name>/train.log``.
        level: the file handler's level (the logger's own level still filters first).

    Returns:
        The file handler (remove it with ``logger.removeHandler`` and close it when the run ends).
    """
    target = os.path.abspath(os.fspath(path))
    for h in logger.handlers:
        if isinstance(h, logging.FileHandler) and os.path.abspath(h.baseFilename) == target:
            return h
    os.makedirs(os.path.dirname(target), exist_ok=True)
    handler = logging.FileHandler(target, mode="a", encoding="utf-8")
    handler.setFormatter(_formatter())
    handler.setLevel(level)
    logger.addHandler(handler)
    return handler
