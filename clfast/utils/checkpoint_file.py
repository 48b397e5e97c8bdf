"""Reading clfast checkpoint files: the content hash every checkpoint carries and the checked reader.

A leaf (imports nothing of clfast), so that the engine, which writes and resumes checkpoints
(:mod:`clfast.engine.io`, which re-exports these names), and code below the engine that reads a finished
run's weights (:func:`clfast.backbones.vlm.load_vlm_checkpoint`) share one reader.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["HASH_KEY", "HASHED_SINCE_FORMAT", "CheckpointError", "DamagedCheckpointError", "CheckpointWarning",
           "content_digest", "tensor_digest", "read_checkpoint", "latest_task_checkpoint"]

HASH_KEY = "content_sha256"
"""The entry :func:`clfast.engine.io.save_checkpoint` adds: the :func:`content_digest` of everything else in the checkpoint."""

HASHED_SINCE_FORMAT = 3
"""Checkpoints whose ``format`` entry is at least this carry :data:`HASH_KEY`; one without it is damaged.
Older checkpoints (no hash) still load, with a :class:`CheckpointWarning`."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, or that belongs to another method or configuration."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file that is empty, truncated, altered or otherwise unreadable (as opposed to an intact
    one of another run, a plain :class:`CheckpointError`)."""


class CheckpointWarning(UserWarning):
    """A checkpoint loaded without an integrity check (written before checkpoints carried a content hash),
    or a damaged newest checkpoint skipped in favour of an older intact one."""


def content_digest(obj: Any) -> str:
    """sha256 of a checkpoint's content: its structure and every value, tensors by dtype, shape and bytes.

    Defined on what ``torch.load(weights_only=True)`` reads back (dicts, lists, tuples, str, bytes, int,
    float, bool, None, tensors, torch dtypes and devices), so a loaded checkpoint has the digest of the dict
    that was saved exactly when its content is bitwise the same. Dict entries count in order (pickle keeps
    it), floats by their exact bits, tensors by value (not by stride or device).

    Raises:
        TypeError: an entry of another type, named by its path (``state['opt']['x']``).
    """
    h = hashlib.sha256()
    _feed(h, obj, "state")
    return h.hexdigest()


def _feed(h: "hashlib._Hash", obj: Any, where: str) -> None:
    def tagged(tag: bytes, data: bytes) -> None:
        h.update(tag + str(len(data)).encode() + b":")
        h.update(data)

    if obj is None:
        h.update(b"N")
    elif isinstance(obj, bool):
        h.update(b"T" if obj else b"F")
    elif isinstance(obj, int):
        tagged(b"i", str(obj).encode())
    elif isinstance(obj, float):
        tagged(b"f", obj.hex().encode())
    elif isinstance(obj, str):
        tagged(b"s", obj.encode("utf-8", "surrogatepass"))
    elif isinstance(obj, (bytes, bytearray)):
        tagged(b"b", bytes(obj))
    elif isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.layout != torch.strided or t.is_quantized:
            raise TypeError(f"{where}: a checkpoint's tensors must be dense (strided, not quantized), got "
                            f"layout {t.layout}")
        tagged(b"t", f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.cpu().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, Mapping):
        tagged(b"d", str(len(obj)).encode())
        for k, v in obj.items():
            _feed(h, k, f"{where} key")
            _feed(h, v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        tagged(b"l" if isinstance(obj, list) else b"u", str(len(obj)).encode())
        for i, v in enumerate(obj):
            _feed(h, v, f"{where}[{i}]")
    elif isinstance(obj, (torch.dtype, torch.device)):
        tagged(b"D" if isinstance(obj, torch.dtype) else b"V", str(obj).encode())
    else:
        raise TypeError(f"{where}: a checkpoint may hold tensors, dicts, lists, tuples, str, bytes, int, float, "
                        f"bool and None (what torch.load(weights_only=True) reads back), got {type(obj).__name__}")


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (equal digests: bitwise equal tensors)."""
    t = t.detach()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _has_zip_end(path: str) -> bool:
    """Whether ``path`` ends in a zip end-of-central-directory record (``torch.save`` files are zip archives;
    the record is in the last 22 bytes plus at most a 64 KiB comment)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - (1 << 16) - 22))
        return b"PK\x05\x06" in f.read()


def read_checkpoint(path: str, map_location: Any = "cpu") -> dict:
    """``torch.load`` ``path`` and check its content hash; DamagedCheckpointError says what is wrong."""
    size = os.path.getsize(path)
    if size == 0:
        raise DamagedCheckpointError(f"checkpoint {path!r} is damaged: the file is empty (0 bytes; a write that "
                                     f"never completed)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated or corrupt zip, a damaged pickle, disallowed globals, ...
        cut = "" if _has_zip_end(path) else "; it is truncated: the end of its zip archive is missing"
        raise DamagedCheckpointError(f"checkpoint {path!r} is damaged or not a checkpoint: it could not be loaded "
                                     f"with torch.load(weights_only=True) ({size} bytes{cut}): "
                                     f"{type(e).__name__}: {str(e).strip()[:500]}") from e
    if not isinstance(state, dict):
        raise DamagedCheckpointError(f"checkpoint {path!r} is damaged or not a checkpoint: it holds a "
                                     f"{type(state).__name__}, not a dict")
    saved = state.pop(HASH_KEY, None)
    if saved is None:
        fmt = state.get("format")
        if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt >= HASHED_SINCE_FORMAT:
            raise DamagedCheckpointError(f"checkpoint {path!r} is damaged: format {fmt} checkpoints carry a content "
                                         f"hash ({HASH_KEY!r}) and this one has none")
        warnings.warn(f"checkpoint {path} was written before checkpoints carried a content hash: loaded without "
                      f"an integrity check", CheckpointWarning, stacklevel=3)
        return state
    try:
        now = content_digest(state)
    except TypeError as e:
        raise DamagedCheckpointError(f"checkpoint {path!r} is damaged: {e}") from e
    if saved != now:
        raise DamagedCheckpointError(f"checkpoint {path!r} is damaged: its content does not match the sha256 it was "
                                     f"saved with (saved {str(saved)[:16]}…, content now {now[:16]}…): the file was "
                                     f"changed after it was written (a disk or copy error, or an edit)")
    return state


def latest_task_checkpoint(run_dir: str) -> str:
    """The newest ``checkpoints/task<NNN>.pt`` of ``run_dir`` (end-of-task checkpoints, not interrupts)."""
    paths = sorted(p for p in glob.glob(os.path.join(run_dir, "checkpoints", "task*.pt"))
                   if re.fullmatch(r"task\d+\.pt", os.path.basename(p)))
    if not paths:
        raise FileNotFoundError(f"{run_dir}: no end-of-task checkpoint in {os.path.join(run_dir, 'checkpoints')} "
                                "(the run has not finished its first task)")
    return paths[-1]
