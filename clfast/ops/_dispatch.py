"""Backend selection shared by every clfast op.

Each op registers backend classes (``Backend`` subclasses) and a priority list per device type. For a
call, :func:`select` walks the list and takes the first backend that is available and reports no
reason against the inputs. When none fits, the ``ValueError`` names every backend with its reasons.

A backend can be forced for all ops with the environment variable ``CLFAST_BACKEND`` (read once, at
import), e.g. ``CLFAST_BACKEND=reference`` or per op ``CLFAST_BACKEND=retrieve=faiss,prefix_attention=cpu``,
or in code with the context manager :func:`use_backend`. A forced backend that cannot run the inputs is an
error, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import os
from typing import ClassVar, Iterator, Sequence

import torch

__all__ = [
    "Backend",
    "register_backend",
    "set_priority",
    "select",
    "backends",
    "use_backend",
    "forced_backend",
    "ops",
    "priorities",
    "unavailable",
    "backend_summary",
]

# op name -> backend name -> backend class
_REGISTRY: dict[str, dict[str, type["Backend"]]] = {}
# op name -> device type -> ordered backend names
_PRIORITY: dict[str, dict[str, list[str]]] = {}
# backend class -> why it cannot run on this machine (None = available), resolved at registration
_UNAVAILABLE: dict[type, str | None] = {}
# stack of (op or None, backend name) pushed by use_backend
_FORCED: list[tuple[str | None, str]] = []


def _parse_env(value: str | None) -> dict[str | None, str]:
    """``"cpu"`` -> {None: "cpu"}; ``"retrieve=faiss,prefix_attention=cpu"`` -> per-op entries."""
    out: dict[str | None, str] = {}
    if not value:
        return out
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            op, name = (s.strip() for s in part.split("=", 1))
            out[op] = name
        else:
            out[None] = part
    return out


_ENV_FORCED = _parse_env(os.environ.get("CLFAST_BACKEND"))


class Backend:
    """One implementation of one op.

    Subclasses set ``OP``, ``NAME``, ``DEVICES`` (device types such as ``"cpu"``, ``"cuda"``) and
    ``DTYPES``; override :meth:`unavailable_reason` when the backend needs something that may be missing
    (the compiled extension, triton, faiss) and :meth:`extra_reasons` for input limits. ``ATOL``/``RTOL``
    per dtype are the tolerances tests hold the backend to against a float64 reference (``GRAD_*`` for
    gradients).
    """

    OP: ClassVar[str]
    NAME: ClassVar[str]
    DEVICES: ClassVar[tuple[str, ...]]
    DTYPES: ClassVar[tuple[torch.dtype, ...]]
    ATOL: ClassVar[dict[torch.dtype, float]] = {}
    RTOL: ClassVar[dict[torch.dtype, float]] = {}
    GRAD_ATOL: ClassVar[dict[torch.dtype, float]] = {}
    GRAD_RTOL: ClassVar[dict[torch.dtype, float]] = {}

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run on this machine at all, or None. Asked once, at registration."""
        return None

    @classmethod
    def available(cls) -> bool:
        return _UNAVAILABLE[cls] is None

    @classmethod
    def devices(cls) -> tuple[str, ...]:
        return cls.DEVICES

    @classmethod
    def extra_reasons(cls, inputs) -> list[str]:
        """Input-specific limits beyond device and dtype (size limits, unsupported options)."""
        return []

    @classmethod
    def not_supported_reasons(cls, inputs) -> list[str]:
        """Reasons this backend cannot run ``inputs`` (an op-specific object with ``device`` and ``dtype``)."""
        why = _UNAVAILABLE[cls]
        if why is not None:
            return [why]
        reasons = []
        if inputs.device.type not in cls.devices():
            reasons.append(f"device {inputs.device.type} not in {cls.devices()}")
        if inputs.dtype not in cls.DTYPES:
            names = ", ".join(str(d).replace("torch.", "") for d in cls.DTYPES)
            reasons.append(f"dtype {str(inputs.dtype).replace('torch.', '')} not in ({names})")
        return reasons + cls.extra_reasons(inputs)


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: add ``cls`` to the registry of ``cls.OP``."""
    table = _REGISTRY.setdefault(cls.OP, {})
    if cls.NAME in table and table[cls.NAME] is not cls:
        raise ValueError(f"backend {cls.NAME!r} is already registered for op {cls.OP!r}")
    table[cls.NAME] = cls
    # Capabilities are resolved here, once: a runtime query inside an op would break torch.compile graphs.
    _UNAVAILABLE[cls] = cls.unavailable_reason()
    return cls


def set_priority(op: str, device_type: str, names: Sequence[str]) -> None:
    """Priority list of backend names for ``op`` on ``device_type`` (first that fits wins)."""
    _PRIORITY.setdefault(op, {})[device_type] = list(names)


def ops() -> list[str]:
    return sorted(_REGISTRY)


def priorities(op: str) -> dict[str, list[str]]:
    """The priority list of ``op`` per device type (a copy), e.g. ``{"cpu": ["cpu", "torch", "reference"]}``."""
    return {dev: list(order) for dev, order in sorted(_PRIORITY.get(op, {}).items())}


def unavailable(cls: type[Backend]) -> str | None:
    """Why backend ``cls`` cannot run on this machine at all (None: it can), as resolved at registration."""
    return _UNAVAILABLE.get(cls)


def backend_summary() -> dict:
    """Per op: the priority order per device, the forced backend, and why each unavailable backend is
    (JSON-able; run records and ``clfast info`` quote it)::

        {"retrieve": {"priority": {"cpu": [...], "cuda": [...]}, "forced": None,
                      "unavailable": {"triton": "no CUDA device ..."}}, ...}
    """
    return {op: {"priority": priorities(op),
                 "forced": forced_backend(op),
                 "unavailable": {name: why for name, cls in sorted(_REGISTRY[op].items())
                                 if (why := unavailable(cls)) is not None}}
            for op in ops()}


def backends(op: str) -> dict[str, type[Backend]]:
    """The registered backends of ``op`` by name."""
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; known ops: {', '.join(sorted(_REGISTRY))}")
    return dict(_REGISTRY[op])


def forced_backend(op: str) -> str | None:
    """The backend forced for ``op`` by :func:`use_backend` (innermost first) or ``CLFAST_BACKEND``."""
    for scope, name in reversed(_FORCED):
        if scope is None or scope == op:
            if scope is None and name not in _REGISTRY.get(op, {}):
                continue  # a global force names a backend this op does not have (e.g. faiss)
            return name
    if op in _ENV_FORCED:
        return _ENV_FORCED[op]
    name = _ENV_FORCED.get(None)
    if name is not None and name in _REGISTRY.get(op, {}):
        return name
    return None


@contextlib.contextmanager
def use_backend(name: str, op: str | None = None) -> Iterator[None]:
    """Force backend ``name`` inside the ``with`` block, for ``op`` or for every op that has it.

    >>> with clfast.ops.use_backend("reference"):
    ...     out = clfast.ops.prefix_attention(q, k, v)
    """
    known = {n for table in _REGISTRY.values() for n in table}
    if op is not None and op not in _REGISTRY:
        raise ValueError(f"use_backend: unknown op {op!r}; known ops: {', '.join(sorted(_REGISTRY))}")
    pool = set(_REGISTRY[op]) if op is not None else known
    if name not in pool:
        raise ValueError(f"use_backend: unknown backend {name!r}; known: {', '.join(sorted(pool))}")
    _FORCED.append((op, name))
    try:
        yield
    finally:
        _FORCED.pop()


def select(op: str, inputs) -> type[Backend]:
    """The backend class that will run ``inputs`` for ``op``."""
    table = _REGISTRY[op]
    forced = forced_backend(op)
    if forced is not None:
        if forced not in table:
            raise ValueError(
                f"{op}: forced backend {forced!r} does not exist; backends: {', '.join(sorted(table))}")
        reasons = table[forced].not_supported_reasons(inputs)
        if reasons:
            raise ValueError(f"{op}: forced backend {forced!r} cannot run these inputs: {'; '.join(reasons)}")
        return table[forced]
    order = _PRIORITY.get(op, {}).get(inputs.device.type)
    if order is None:
        order = sorted(table)
    report = []
    for name in order:
        reasons = table[name].not_supported_reasons(inputs)
        if not reasons:
            return table[name]
        report.append(f"  {name}: {'; '.join(reasons)}")
    raise ValueError(f"{op}: no backend can run these inputs:\n" + "\n".join(report))
