"""JSONL logs, checkpoints, RNG states and config hashes, all written atomically.

Every writer goes through :func:`clfast.utils.files.atomic_open` (re-exported here with the other
atomic writers): a reader sees either the old file or the complete new one.

Checkpoints hold only tensors and plain Python values so that :func:`load_checkpoint` can use
``torch.load(weights_only=True)``; :func:`rng_state` converts the Python, NumPy, torch and CUDA
generator states to that form.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import warnings
from typing import IO, Any, Optional

import numpy as np
import torch

from ..utils.files import (atomic_open, atomic_write_bytes, atomic_write_json, atomic_write_text,  # noqa: F401
                           to_jsonable)
from .progress import log_to_file  # noqa: F401  (re-exported: the trainer calls io.log_to_file)

__all__ = [
    "atomic_open", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "JsonlLogger", "read_jsonl",
    "CheckpointError", "save_checkpoint", "load_checkpoint", "find_latest_checkpoint", "LATEST_POINTER",
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, or that belongs to another method or configuration."""


def save_checkpoint(path: str | os.PathLike, state: dict, *, update_latest: bool = True) -> None:
    """``torch.save`` ``state`` to ``path`` atomically, then point ``latest.json`` at it.

    ``state`` should hold only tensors and plain values (dict, list, tuple, int, float, str, bool, None)
    so that :func:`load_checkpoint` can read it with ``weights_only=True``; use :func:`rng_state` for RNG
    states. The pointer file ``latest.json`` in the same directory (``{"checkpoint": "<file name>"}``)
    is written atomically after the checkpoint, so it always names a complete file.

    Args:
        path: checkpoint file, e.g. ``runs/x/checkpoints/task_3.pt``.
        state: the dict to save.
        update_latest: write the pointer file (set False for side checkpoints).
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    path = os.path.abspath(os.fspath(path))
    if os.path.basename(path) == LATEST_POINTER:
        raise ValueError(f"path must not be named {LATEST_POINTER!r}; that name is the pointer file")
    with atomic_open(path, "wb") as f:
        torch.save(state, f)
    if update_latest:
        atomic_write_json(os.path.join(os.path.dirname(path), LATEST_POINTER),
                          {"checkpoint": os.path.basename(path)})


def _latest_in(directory: str) -> Optional[str]:
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        with open(os.path.join(directory, LATEST_POINTER), encoding="utf-8") as f:
            name = json.load(f).get("checkpoint")
        if isinstance(name, str) and name == os.path.basename(name):
            candidate = os.path.join(directory, name)
            if os.path.isfile(candidate):
                return candidate
    files = [os.path.join(directory, n) for n in os.listdir(directory)
             if n.endswith(".pt") and not n.startswith(".")]
    files = [p for p in files if os.path.isfile(p)]
    return max(files, key=os.path.getmtime) if files else None


def find_latest_checkpoint(run_dir: str | os.PathLike) -> Optional[str]:
    """The newest checkpoint in ``run_dir``, or in ``run_dir/checkpoints`` if ``run_dir`` itself has none.

    Uses the ``latest.json`` pointer that :func:`save_checkpoint` writes; if it is missing, unreadable or
    names a missing file, falls back to the most recently modified ``*.pt`` file (temporary files are
    ignored).

    Returns:
        Its path, or None if there is none (including when ``run_dir`` does not exist).
    """
    run_dir = os.fspath(run_dir)
    for directory in (run_dir, os.path.join(run_dir, "checkpoints")):
        if os.path.isdir(directory):
            found = _latest_in(directory)
            if found is not None:
                return found
    return None


def load_checkpoint(path: str | os.PathLike, *, expected: Optional[dict] = None,
                    map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)`` and check it belongs to this run.

    Args:
        path: a checkpoint file, or a directory (its :func:`find_latest_checkpoint` is loaded).
        expected: values the checkpoint must hold, e.g. ``{"method": "l2p", "config_hash": h}``.
        map_location: passed to ``torch.load`` (default: CPU).

    Returns:
        The saved dict.

    Raises:
        FileNotFoundError: no such file, or a directory without checkpoints.
        CheckpointError: (a ``ValueError``) the file is corrupt, holds objects ``weights_only`` refuses,
            is not a dict, or an ``expected`` key is missing or differs.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        found = find_latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint (*.pt or {LATEST_POINTER}) in directory {path!r}")
        path = found
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt zip, truncated file, disallowed globals, ...
        raise CheckpointError(f"checkpoint {path!r} could not be loaded with torch.load(weights_only=True): "
                              f"{type(e).__name__}: {str(e).strip()[:500]}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path!r} must hold a dict, got {type(state).__name__}")
    for key, want in (expected or {}).items():
        if key not in state:
            raise CheckpointError(f"checkpoint {path!r} has no {key!r} entry; this run expects {key}={want!r}")
        if state[key] != want:
            raise CheckpointError(f"checkpoint {path!r} was written with {key}={state[key]!r}, but this run has "
                                  f"{key}={want!r}; refusing to resume from another run's checkpoint")
    return state


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


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (equal digests: bitwise equal tensors)."""
    t = t.detach()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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

