"""JSONL logs, checkpoints, RNG states and config hashes, all written atomically.

Every writer goes through :func:`clfast.utils.files.atomic_open` (re-exported here with the other
atomic writers): a reader sees either the old file or the complete new one.

Checkpoints hold only tensors and plain Python values so that :func:`load_checkpoint` can use
``torch.load(weights_only=True)``; :func:`rng_state` converts the Python, NumPy, torch and CUDA
generator states to that form. Each carries the sha256 of its content (:func:`content_digest`), checked
on load, so a damaged file is refused by name; :func:`load_latest_checkpoint` then falls back to the
newest intact one. Writes that fail (a full disk) raise :class:`CheckpointWriteError` naming the file and
the errno, and leave the files that were there as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import random
import shutil
import tempfile
import warnings
from typing import IO, Any, Optional

import numpy as np
import torch

from ..utils.files import (atomic_open, atomic_write_bytes, atomic_write_json, atomic_write_text,  # noqa: F401
                           to_jsonable)
from ..utils.checkpoint_file import (HASH_KEY, HASHED_SINCE_FORMAT, CheckpointError, CheckpointWarning,  # noqa: F401
                                     DamagedCheckpointError, content_digest, tensor_digest)
from ..utils.checkpoint_file import read_checkpoint as _read_checkpoint
from .faults import crash_point, crash_point_in_writes
from .progress import log_to_file  # noqa: F401  (re-exported: the trainer calls io.log_to_file)

__all__ = [
    "atomic_open", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "JsonlLogger", "read_jsonl",
    "CheckpointError", "DamagedCheckpointError", "CheckpointWarning", "CheckpointWriteError", "RunDirectoryError",
    "save_checkpoint", "load_checkpoint", "load_latest_checkpoint", "find_latest_checkpoint",
    "checkpoint_candidates", "checkpoint_problem", "content_digest", "remove_partial_files", "ensure_writable_dir",
    "free_bytes", "LATEST_POINTER", "HASH_KEY", "HASHED_SINCE_FORMAT", "PREVIOUS",
    "rng_state", "set_rng_state", "check_unchanged", "config_hash", "to_jsonable", "log_to_file",
]

LATEST_POINTER = "latest.json"
"""Name of the pointer file, next to the checkpoints, that names the newest one."""


# ----------------------------------------------------------------------------------------------------
# JSONL


def _drop_torn_line(path: str) -> None:
    """Truncate ``path`` after its last newline, dropping a final line torn by a crash."""
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return
    with f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        pos = end
        while pos > 0:  # scan back in blocks for the last newline
            start = max(0, pos - 65536)
            f.seek(start)
            k = f.read(pos - start).rfind(b"\n")
            if k >= 0:
                f.truncate(start + k + 1)
                return
            pos = start
        f.truncate(0)


class JsonlLogger:
    """Appends one JSON object per line to ``path`` and flushes every line.

    Opening an existing file appends to it, so a resumed run continues its log; if the file ends in a
    line torn by a crash (no final newline), that partial line is dropped first so the file stays valid
    JSONL. A disabled
    logger (e.g. on ranks other than 0) creates no file and ignores :meth:`log`.

    Args:
        path: the ``.jsonl`` file (parent directories are created).
        enabled: write nothing when False.
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True) -> None:
        self.path = os.fspath(path)
        self.enabled = bool(enabled)
        self._file: Optional[IO[str]] = None

    def _open(self) -> IO[str]:
        if self._file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            _drop_torn_line(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
        return self._file

    def log(self, **fields: Any) -> None:
        """Append ``fields`` as one JSON line and flush (no-op when disabled)."""
        if not self.enabled:
            return
        line = json.dumps(fields, ensure_ascii=False, default=to_jsonable)
        f = self._open()
        f.write(line + "\n")
        f.flush()

    def close(self) -> None:
        """Close the file (a later :meth:`log` reopens it in append mode)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "JsonlLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; blank lines and a torn (unparseable) final line are skipped."""
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    out = []
    for k, ln in enumerate(lines):
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            if k != len(lines) - 1:
                raise ValueError(f"path {os.fspath(path)!r}: line {k + 1} is not valid JSON: {ln[:200]!r}") from None
    return out


# ----------------------------------------------------------------------------------------------------
# checkpoints


PREVIOUS = ".prev.pt"
"""``<tag>.pt`` kept by ``save_checkpoint(..., keep_previous=True)`` when it is replaced: ``<tag>.prev.pt``."""


class _ExplainedOSError(OSError):
    """An OSError whose message already says everything (file, cause, errno): printed without ``[Errno N]``."""

    def __str__(self) -> str:
        return self.strerror if self.strerror is not None else super().__str__()


class CheckpointWriteError(_ExplainedOSError):
    """Writing a checkpoint or its pointer failed (disk full, permissions, an I/O error); ``errno`` is the
    cause's. No partial file is left, and the files that were there (the previous checkpoint under the
    same name, ``latest.json``) are as they were."""


class RunDirectoryError(_ExplainedOSError):
    """A run directory that cannot be created or written to."""


def _errno_text(e: OSError) -> str:
    """``"No space left on device (ENOSPC, errno 28)"`` for an OSError."""
    if e.errno is None:
        return str(e)
    return f"{e.strerror or os.strerror(e.errno)} ({errno.errorcode.get(e.errno, '?')}, errno {e.errno})"


def _os_error(cls: type, err: OSError, message: str) -> OSError:
    return cls(err.errno, message) if err.errno is not None else cls(message)


def _previous_path(path: str) -> str:
    return (path[:-3] if path.endswith(".pt") else path) + PREVIOUS


def save_checkpoint(path: str | os.PathLike, state: dict, *, update_latest: bool = True,
                    keep_previous: bool = False) -> None:
    """``torch.save`` ``state`` to ``path`` atomically with its content hash, then point ``latest.json`` at it.

    ``state`` should hold only tensors and plain values (dict, list, tuple, int, float, str, bool, None)
    so that :func:`load_checkpoint` can read it with ``weights_only=True``; use :func:`rng_state` for RNG
    states. The file holds ``state`` plus :data:`HASH_KEY`, the :func:`content_digest` of ``state``, which
    :func:`load_checkpoint` checks: a truncated, bit-flipped or half-written file is refused. The pointer
    file ``latest.json`` in the same directory (``{"checkpoint": "<file name>"}``) is written atomically
    after the checkpoint, so it always names a complete file.

    Args:
        path: checkpoint file, e.g. ``runs/x/checkpoints/task_3.pt``.
        state: the dict to save.
        update_latest: write the pointer file (set False for side checkpoints).
        keep_previous: when ``path`` already holds an intact checkpoint, keep it as ``<tag>.prev.pt``
            (replacing the one there), so that a newest file damaged later still leaves an older one to
            resume from. It is renamed there once the new file is complete and on disk, just before the new
            file takes its name (two renames; a file of its own, never a link to the new one). A damaged file
            at ``path`` is not kept (``<tag>.prev.pt`` stays as it was).

    Raises:
        CheckpointWriteError: (an ``OSError`` with the cause's ``errno``) the disk is full, the directory
            not writable, ...: the message names the file and the errno. No temporary file is left; the
            previous file at ``path`` and ``latest.json`` are untouched (a failure writing the pointer
            leaves the new checkpoint complete and the pointer naming the one before).
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    path = os.path.abspath(os.fspath(path))
    if os.path.basename(path) == LATEST_POINTER:
        raise ValueError(f"path must not be named {LATEST_POINTER!r}; that name is the pointer file")
    if HASH_KEY in state:
        raise ValueError(f"state must not hold {HASH_KEY!r}: save_checkpoint adds that entry")
    payload = dict(state)
    payload[HASH_KEY] = content_digest(state)
    directory = os.path.dirname(path)
    name, prev = os.path.basename(path), _previous_path(path)
    keep = keep_previous and os.path.isfile(path) and checkpoint_problem(path) is None
    existed, kept = os.path.exists(path), False
    try:
        with atomic_open(path, "wb") as f, crash_point_in_writes(f, "checkpoint", "payload") as out:
            torch.save(payload, out)
            if keep:   # only once the new file is complete and on disk: the old one moves aside, then the new
                f.flush()   # one takes its name (between the two renames a reader finds <tag>.prev.pt)
                os.fsync(f.fileno())
                os.replace(path, prev)
                kept = True
                crash_point("checkpoint", "rotated")
    except OSError as e:
        left = (f"the previous {name} was kept as {os.path.basename(prev)}" if kept
                else f"the previous {name} is unchanged" if existed else f"no {name} was created")
        raise _os_error(CheckpointWriteError, e, f"writing checkpoint {path} failed: {_errno_text(e)}; {left} "
                        f"({_pointer_note(directory)})") from e
    if update_latest:
        crash_point("checkpoint", "pointer")
        pointer = os.path.join(directory, LATEST_POINTER)
        try:
            atomic_write_json(pointer, {"checkpoint": os.path.basename(path)})
        except OSError as e:
            raise _os_error(CheckpointWriteError, e, f"writing {pointer} failed: {_errno_text(e)}; the checkpoint "
                            f"{path} is complete ({_pointer_note(directory)})") from e


def _pointer_note(directory: str) -> str:
    name = _pointer_target(directory)
    return f"{LATEST_POINTER} still names {name}" if name else f"there is no {LATEST_POINTER}"


def _pointer_target(directory: str) -> Optional[str]:
    """The file name ``latest.json`` in ``directory`` names, if it is readable and names a plain file name."""
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        with open(os.path.join(directory, LATEST_POINTER), encoding="utf-8") as f:
            name = json.load(f).get("checkpoint")
        if isinstance(name, str) and name and name == os.path.basename(name):
            return name
    return None


def _candidates_in(directory: str) -> list[str]:
    name = _pointer_target(directory)
    first = [os.path.join(directory, name)] if name and os.path.isfile(os.path.join(directory, name)) else []
    others = []
    for n in os.listdir(directory):
        p = os.path.join(directory, n)
        if n.endswith(".pt") and not n.startswith(".") and p not in first:
            with contextlib.suppress(OSError):   # gone since listdir: not a candidate
                if os.path.isfile(p):
                    others.append((os.path.getmtime(p), n, p))
    return first + [p for _, _, p in sorted(others, reverse=True)]


def checkpoint_candidates(run_dir: str | os.PathLike) -> list[str]:
    """Every checkpoint of ``run_dir`` (or of ``run_dir/checkpoints`` if ``run_dir`` itself has none), newest
    first: the file ``latest.json`` names, then the other ``*.pt`` files by modification time, newest first
    (temporary files are ignored). Opens none of them; empty if there are none or ``run_dir`` does not exist."""
    run_dir = os.fspath(run_dir)
    for directory in (run_dir, os.path.join(run_dir, "checkpoints")):
        if os.path.isdir(directory):
            found = _candidates_in(directory)
            if found:
                return found
    return []


def find_latest_checkpoint(run_dir: str | os.PathLike) -> Optional[str]:
    """The newest checkpoint in ``run_dir``, or in ``run_dir/checkpoints`` if ``run_dir`` itself has none.

    Uses the ``latest.json`` pointer that :func:`save_checkpoint` writes; if it is missing, unreadable or
    names a missing file, falls back to the most recently modified ``*.pt`` file (temporary files are
    ignored). The file is not opened: :func:`load_latest_checkpoint` gives the newest *intact* one.

    Returns:
        Its path, or None if there is none (including when ``run_dir`` does not exist).
    """
    found = checkpoint_candidates(run_dir)
    return found[0] if found else None


def remove_partial_files(directory: str | os.PathLike) -> list[str]:
    """Delete the temporary files a killed writer left in ``directory`` (``.<name>.*.tmp``, the names
    :func:`atomic_open` and :func:`save_checkpoint` use) and return their names. Call it only where no other
    process is writing (e.g. when a run is resumed)."""
    directory = os.fspath(directory)
    removed = []
    if os.path.isdir(directory):
        for n in sorted(os.listdir(directory)):
            if n.startswith(".") and n.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, n))
                    removed.append(n)
    return removed


def checkpoint_problem(path: str | os.PathLike) -> Optional[str]:
    """None if ``path`` is an intact checkpoint (it loads and matches its content hash; an old one without a
    hash counts as intact), else what is wrong with it. Reads the whole file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)
            _read_checkpoint(os.fspath(path), "cpu")
    except DamagedCheckpointError as e:
        return str(e)
    except OSError as e:
        return f"checkpoint {os.fspath(path)!r} could not be read: {_errno_text(e)}"
    return None


def load_checkpoint(path: str | os.PathLike, *, expected: Optional[dict] = None,
                    map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)``, check its content hash and that it belongs to
    this run.

    Args:
        path: a checkpoint file, or a directory (its newest intact checkpoint is loaded, see
            :func:`load_latest_checkpoint`; damaged newer ones are skipped with a :class:`CheckpointWarning`).
        expected: values the checkpoint must hold, e.g. ``{"method": "l2p", "config_hash": h}``.
        map_location: passed to ``torch.load`` (default: CPU).

    Returns:
        The saved dict (without :data:`HASH_KEY`). A checkpoint from before content hashes loads with a
        :class:`CheckpointWarning`.

    Raises:
        FileNotFoundError: no such file, or a directory without checkpoints.
        DamagedCheckpointError: (a ``CheckpointError``) the file is empty, truncated or corrupt, does not match
            its content hash, holds objects ``weights_only`` refuses, or is not a dict.
        CheckpointError: (a ``ValueError``) an ``expected`` key is missing or differs.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        found, state, skipped = load_latest_checkpoint(path, expected=expected, map_location=map_location)
        for bad, why in skipped:
            warnings.warn(f"skipped {bad}: {why}; loaded {found} instead", CheckpointWarning, stacklevel=2)
        return state
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    state = _read_checkpoint(path, map_location)
    for key, want in (expected or {}).items():
        if key not in state:
            raise CheckpointError(f"checkpoint {path!r} has no {key!r} entry; this run expects {key}={want!r}")
        if state[key] != want:
            raise CheckpointError(f"checkpoint {path!r} was written with {key}={state[key]!r}, but this run has "
                                  f"{key}={want!r}; refusing to resume from another run's checkpoint")
    return state


def load_latest_checkpoint(run_dir: str | os.PathLike, *, expected: Optional[dict] = None,
                           map_location: Any = "cpu") -> tuple[str, dict, list[tuple[str, str]]]:
    """The newest intact checkpoint of ``run_dir`` (see :func:`checkpoint_candidates`), loaded.

    Damaged checkpoints (:class:`DamagedCheckpointError`) are skipped, newest first, until one loads; the
    caller should say which were skipped. A checkpoint of another run (``expected`` differs) is not
    skipped: that raises at once.

    Returns:
        ``(path, state, skipped)``: the file used, its content, and ``(file, what is wrong)`` for each newer
        damaged one (and for the file ``latest.json`` names if it does not exist).

    Raises:
        FileNotFoundError: there is no checkpoint.
        DamagedCheckpointError: every checkpoint is damaged (the message lists each and what is wrong).
        CheckpointError: the newest intact checkpoint belongs to another run.
    """
    candidates = checkpoint_candidates(run_dir)
    if not candidates:
        raise FileNotFoundError(f"no checkpoint (*.pt or {LATEST_POINTER}) in {os.fspath(run_dir)!r} or its "
                                f"checkpoints/ folder")
    skipped: list[tuple[str, str]] = []
    directory = os.path.dirname(candidates[0])
    named = _pointer_target(directory)
    if named and not os.path.isfile(os.path.join(directory, named)):   # e.g. killed between two renames
        skipped.append((os.path.join(directory, named), f"{LATEST_POINTER} names it but it does not exist"))
    for path in candidates:
        try:
            return path, load_checkpoint(path, expected=expected, map_location=map_location), skipped
        except DamagedCheckpointError as e:
            skipped.append((path, str(e)))
    raise DamagedCheckpointError(f"every checkpoint of {os.fspath(run_dir)!r} is damaged: "
                                 + "; ".join(why if why.startswith("checkpoint") else f"{p}: {why}"
                                             for p, why in skipped))


def ensure_writable_dir(directory: str | os.PathLike, what: str = "run directory") -> None:
    """Create ``directory`` if it is missing and check that a file can be created in it (then removed).

    Raises:
        RunDirectoryError: (an ``OSError`` with the cause's ``errno``) naming ``directory`` and the cause.
    """
    directory = os.path.abspath(os.fspath(directory))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".clfast-write-test.", suffix=".tmp", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        at = f" at {e.filename}" if e.filename and os.path.abspath(os.fspath(e.filename)) != directory else ""
        raise _os_error(RunDirectoryError, e, f"{what} {directory} cannot be created or written to: "
                        f"{_errno_text(e)}{at}") from e


def free_bytes(directory: str | os.PathLike) -> Optional[int]:
    """Bytes free to this user on the file system holding ``directory`` (None if that cannot be asked)."""
    try:
        return int(shutil.disk_usage(os.fspath(directory)).free)
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> dict:
    """The global RNG states of Python ``random``, NumPy (legacy global), torch CPU and CUDA.

    Everything is a tensor, int, float, str, list, dict or None, so the result can be saved in a
    checkpoint and loaded with ``weights_only=True``. ``"cuda"`` is present only when CUDA is available
    (one state per visible device). ``numpy.random.Generator`` objects are not global and not covered.
    """
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": {"version": int(version), "state": [int(x) for x in internal],
                   "gauss_next": None if gauss_next is None else float(gauss_next)},
        "numpy": {"bit_generator": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restore states saved by :func:`rng_state`.

    A CUDA state is restored for as many devices as both sides have; a mismatch in device count, or CUDA
    states without CUDA, gives a warning.
    """
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state):
        raise ValueError(f"state must be a dict from rng_state() with keys 'python', 'numpy', 'torch'; "
                         f"got {sorted(state) if isinstance(state, dict) else type(state).__name__}")
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))
    npst = state["numpy"]
    keys = npst["keys"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((npst["bit_generator"], keys.astype(np.uint32), int(npst["pos"]),
                         int(npst["has_gauss"]), float(npst["cached_gaussian"])))
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    cuda = state.get("cuda")
    if cuda is not None:
        if not torch.cuda.is_available():
            warnings.warn("the saved RNG state has CUDA generator states but CUDA is not available; "
                          "they are not restored", RuntimeWarning, stacklevel=2)
            return
        n = torch.cuda.device_count()
        if len(cuda) != n:
            warnings.warn(f"the saved RNG state has {len(cuda)} CUDA generator states but {n} devices are "
                          f"visible; restoring the first {min(n, len(cuda))}", RuntimeWarning, stacklevel=2)
        for i, s in enumerate(cuda[:n]):
            torch.cuda.set_rng_state(s.cpu().to(torch.uint8), device=i)


# ----------------------------------------------------------------------------------------------------
# config hash


def config_hash(cfg: Any) -> str:
    """First 16 hex characters of the sha256 of ``cfg`` as canonical JSON.

    Canonical: keys sorted, no whitespace, UTF-8, tuples as lists, NumPy/torch values as plain numbers.
    A dataclass (e.g. the run config) is converted with ``dataclasses.asdict`` first.

    Args:
        cfg: a JSON-serialisable dict (or dataclass instance).
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = dataclasses.asdict(cfg)
    if not isinstance(cfg, dict):
        raise TypeError(f"cfg must be a dict (or a dataclass instance), got {type(cfg).__name__}")
    text = json.dumps(cfg, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=to_jsonable)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def split_unchanged(state: dict, built: dict[str, str], min_bytes: int = 1 << 16) -> tuple[dict, dict]:
    """``state`` split into (what to save, {key: digest} of tensors still equal to the model as built).

    ``built`` holds the digests taken when the model was built (:func:`tensor_digest`); tensors of at
    least ``min_bytes`` whose digest still matches (frozen pretrained weights, untouched slices) are
    left out of the checkpoint and checked again when it is loaded (:func:`restore_unchanged`).
    """
    keep, same = {}, {}
    for k, v in state.items():
        d = built.get(k)
        if (d is not None and isinstance(v, torch.Tensor) and v.numel() * v.element_size() >= min_bytes
                and tensor_digest(v) == d):
            same[k] = d
        else:
            keep[k] = v
    return keep, same


def check_unchanged(module: torch.nn.Module, unchanged: dict[str, str]) -> None:
    """ValueError unless ``module``'s tensors named in ``unchanged`` have those digests (the tensors a
    checkpoint left out because they still equalled the model as built when the run started)."""
    current = module.state_dict()
    bad = [k for k, d in unchanged.items() if k not in current or tensor_digest(current[k]) != d]
    if bad:
        raise ValueError(f"the checkpoint leaves out {len(bad)} tensors that were unchanged from the model as "
                         f"built when the run started (e.g. {bad[:3]}), but the model built now differs there: "
                         f"were the pretrained weights (backbone, checkpoint_path) or the method's code changed?")


def restore_unchanged(module: torch.nn.Module, state: dict, unchanged: dict[str, str]) -> None:
    """Load ``state`` into ``module`` whose other tensors must match the ``unchanged`` digests.

    Raises:
        ValueError: a left-out tensor differs in the module built now (other pretrained weights or a
            changed initialisation since the run started), or keys are missing/unexpected.
    """
    check_unchanged(module, unchanged)
    result = module.load_state_dict(state, strict=False)
    missing = sorted(set(result.missing_keys) - set(unchanged))
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected "
                         f"{list(result.unexpected_keys)[:5]}")

