"""Leaf file helpers shared by every layer: atomic writes and file digests.

Every writer here goes through :func:`atomic_open`: the data goes to a temporary file in the
destination directory, is flushed and fsynced, then ``os.replace`` puts it in place. A reader therefore
sees either the old file or the complete new one, and a writer that fails part-way leaves the old file
untouched and no temporary file behind. Imports nothing of clfast.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from typing import IO, Any, Iterator

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "to_jsonable",
           "sha256_file"]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file's bytes, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _default_mode() -> int:
    """Permissions a plain ``open(path, "w")`` would give (0o666 minus the umask), read without changing it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o644


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable where the platform allows it (best effort)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, encoding: str = "utf-8") -> Iterator[IO]:
    """Open a temporary file that replaces ``path`` when the ``with`` block succeeds.

    The temporary file lives in the destination directory (created if missing), so the final
    ``os.replace`` is atomic. If the block raises, the temporary file is removed and ``path`` is left as
    it was. An existing file's permissions are kept; a new file gets the usual ``0o666 & ~umask``.

    Args:
        path: destination file.
        mode: ``"wb"`` (bytes) or ``"w"`` (text).
        encoding: text encoding for ``mode="w"``.

    Yields:
        The open temporary file.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"path {path!r} is a directory; expected a file path")
    os.makedirs(directory, exist_ok=True)
    try:
        file_mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        file_mode = _default_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        f = os.fdopen(fd, mode, **({"encoding": encoding, "newline": ""} if mode == "w" else {}))
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`); newlines are written as given."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)


def to_jsonable(obj: Any) -> Any:
    """``json`` ``default`` hook: NumPy scalars/arrays and tensors via ``tolist()``, paths as strings.

    Raises:
        TypeError: for any other type, naming it.
    """
    if hasattr(obj, "tolist") and type(obj).__module__.split(".")[0] in ("numpy", "torch"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON (indent 2, keys in insertion order, trailing newline) atomically.

    The JSON is streamed into the temporary file, so a value that cannot be serialised fails part-way
    through and leaves ``path`` untouched. NumPy and torch values are converted with :func:`to_jsonable`.
    """
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, ensure_ascii=False, default=to_jsonable)
        f.write("\n")
