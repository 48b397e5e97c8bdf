"""Crash points: the places where a fault-injection test kills the engine on purpose.

The engine calls :func:`crash_point` at the moments a crash does the most damage:

- ``step``: inside a training step, after the backward and before the optimizer step (``backward``), and
  after the optimizer step before the step is counted (``update``);
- ``eval``: inside evaluation, after each batch's prediction (``batch``);
- ``checkpoint``: inside a checkpoint write: half-way through writing the payload to its temporary file,
  once 64 KiB of it reached the file (``payload``; at its end for a smaller payload); with the new file
  complete and the previous one renamed to ``<tag>.prev.pt``, but the new one not yet under its name
  (``rotated``: there is no ``<tag>.pt`` at that moment); and with the new file in place but
  ``latest.json`` not yet updated (``pointer``).

Unarmed (the normal case) a crash point is one test of a module flag. A crash is armed by the
environment, read once at import, or by :func:`arm` (in a forked child, where the import has happened):

- ``CLFAST_CRASH_AT=<phase>:<n>``: the ``n``-th crash point of ``phase`` that this process reaches
  sends SIGKILL to the process itself: no handler, no ``finally``, no flush runs, as when the OOM
  killer or a scheduler's hard kill strikes; ``<phase>/<where>:<n>`` counts only that one point
  (``checkpoint/payload:2``: inside the second checkpoint's payload write);
- ``CLFAST_CRASH_LOG=<file>``: append ``<phase> <count> <where>`` for every crash point reached, and
  ``KILL <phase> <count> <where>`` before the kill (so a test sees which phases a run went through, and
  where a timed kill from outside landed).

Never set these outside tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import IO, Iterator, Optional

__all__ = ["PHASES", "crash_point", "crash_point_in_writes", "arm", "parse_crash_at"]

PHASES = ("step", "eval", "checkpoint")

_target: Optional[tuple[str, int]] = None     # (phase or "phase/where", n)
_log: Optional[str] = None
_counts: dict[str, int] = {}


def parse_crash_at(text: str) -> tuple[str, int]:
    """``"<phase>[/<where>]:<n>"`` → ``("<phase>[/<where>]", n)``; ValueError naming ``CLFAST_CRASH_AT`` and
    the expected form."""
    key, _, n = text.partition(":")
    if key.split("/", 1)[0] not in PHASES or not n.isdigit() or int(n) < 1:
        raise ValueError(f"CLFAST_CRASH_AT must be '<phase>[/<where>]:<n>' with phase one of {PHASES} and "
                         f"n >= 1, got {text!r}")
    return key, int(n)


def arm(crash_at: Optional[str], log: Optional[str] = None) -> None:
    """Arm (or, with ``None``, disarm) a crash as ``CLFAST_CRASH_AT`` would; counts start again at 0."""
    global _target, _log
    _target = parse_crash_at(crash_at) if crash_at else None
    _log = log
    _counts.clear()


def _write_log(line: str) -> None:
    with open(_log, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def crash_point(phase: str, where: str) -> None:
    """Count a crash point of ``phase`` (one of :data:`PHASES`; ``where`` says which one) and, if this
    is the armed one, SIGKILL this process."""
    if _target is None and _log is None:
        return
    n = _counts[phase] = _counts.get(phase, 0) + 1
    point = f"{phase}/{where}"
    _counts[point] = _counts.get(point, 0) + 1
    if _log is not None:
        _write_log(f"{phase} {n} {where}")
    if _target is not None and _counts.get(_target[0]) == _target[1] and _target[0] in (phase, point):
        if _log is not None:
            _write_log(f"KILL {phase} {n} {where}")
        os.kill(os.getpid(), signal.SIGKILL)


class _WatchedWriter:
    """A binary file that passes a crash point once the bytes written through it first reach ``after``."""

    def __init__(self, f: IO[bytes], phase: str, where: str, after: int) -> None:
        self.f, self.phase, self.where, self.after = f, phase, where, after
        self.written, self.passed = 0, False

    def write(self, data) -> int:
        n = self.f.write(data)
        self.written += len(data)
        if not self.passed and self.written >= self.after:
            self.passed = True
            self.f.flush()   # what was written so far is in the file, the rest is not: a half-written file
            crash_point(self.phase, self.where)
        return n

    def flush(self) -> None:
        self.f.flush()


@contextlib.contextmanager
def crash_point_in_writes(f: IO[bytes], phase: str, where: str, after: int = 1 << 16) -> Iterator[IO[bytes]]:
    """``f`` itself when no crash is armed or logged; otherwise ``f`` wrapped so that a crash point of ``phase``
    is passed once ``after`` bytes were written through it (or when the block ends, if fewer were)."""
    if _target is None and _log is None:
        yield f
        return
    w = _WatchedWriter(f, phase, where, after)
    yield w
    if not w.passed:
        w.passed = True
        crash_point(phase, where)


arm(os.environ.get("CLFAST_CRASH_AT") or None, os.environ.get("CLFAST_CRASH_LOG") or None)
