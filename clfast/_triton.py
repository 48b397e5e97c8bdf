"""Whether Triton kernels can run here, decided once at import (a runtime query inside an op breaks
torch.compile graphs). With ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (slowly): the test
suite uses that to check them without a GPU."""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
try:
    import triton  # noqa: F401

    TRITON_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - triton ships with CUDA torch builds
    TRITON_ERROR = f"triton not importable ({exc})"

CUDA = torch.cuda.is_available()


def unavailable_reason() -> str | None:
    if TRITON_ERROR is not None:
        return TRITON_ERROR
    if not CUDA and not INTERPRET:
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"
    return None


def devices() -> tuple[str, ...]:
    return ("cuda", "cpu") if INTERPRET else ("cuda",)


class TritonBackendMixin:
    """Availability and devices shared by every op's ``triton`` backend class."""

    @classmethod
    def unavailable_reason(cls):
        return unavailable_reason()

    @classmethod
    def devices(cls):
        return devices()
