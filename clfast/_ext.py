"""Loads the compiled extension ``clfast._C`` once. If it is missing or broken, clfast still imports:
a single warning is issued and the ops dispatch to their other backends (``clfast info`` says why).

``CLFAST_EXTENSION=/path/to/_C.so`` (read once, at import) loads that build instead of the one in the package,
e.g. the ASan/UBSan build of ``make sanitize`` in build/sanitize."""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings

import torch

EXTENSION_PATH = os.environ.get("CLFAST_EXTENSION") or None


def _load_from(path: str) -> None:
    """Imports the extension module at ``path`` as ``clfast._C``."""
    spec = importlib.util.spec_from_file_location("clfast._C", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"CLFAST_EXTENSION={path} is not an extension module")
    module = importlib.util.module_from_spec(spec)
    sys.modules["clfast._C"] = module
    spec.loader.exec_module(module)


EXT_ERROR: str | None = None
try:
    if EXTENSION_PATH is not None:
        _load_from(EXTENSION_PATH)
    else:
        from clfast import _C  # noqa: F401  (importing runs the kernels' static registrations)
except Exception as exc:  # ImportError, or an undefined symbol after a torch upgrade
    EXT_ERROR = f"clfast._C could not be loaded ({type(exc).__name__}: {exc}); rebuild with `pip install -e . --no-build-isolation`"
    warnings.warn(EXT_ERROR + "; falling back to the Python backends", RuntimeWarning, stacklevel=2)


def has_op(name: str) -> bool:
    """Whether the extension registered the kernel ``torch.ops._clfast_C.<name>``."""
    if EXT_ERROR is not None:
        return False
    return hasattr(torch.ops._clfast_C, name)


def missing_op_reason(name: str) -> str | None:
    if EXT_ERROR is not None:
        return "compiled extension clfast._C not loaded"
    if not has_op(name):
        return f"clfast._C was built without the kernel {name} (rebuild the extension)"
    return None


def build_info() -> str:
    if EXT_ERROR is not None:
        return EXT_ERROR
    return torch.ops._clfast_C.build_info()


def cpu_kernels_info() -> str:
    """What the CPU kernels run here, decided at run time: the element-wise forms (avx512 / avx2 / scalar) and
    which GEMM operand types oneDNN's brgemm computes natively (``build_info`` says what was compiled)."""
    if EXT_ERROR is not None:
        return EXT_ERROR
    return torch.ops._clfast_C.cpu_kernels_info()


def cpu_kernels() -> dict[str, str]:
    """:func:`cpu_kernels_info` as fields: ``simd`` (the element-wise forms chosen here: ``avx512``, ``avx2`` or
    ``scalar``), ``simd_note`` (why, where the text says; else empty), and per GEMM operand type (``fp32``,
    ``bf16``, ``fp16``) what oneDNN's brgemm does with it (``yes``, ``computed in fp32``, ``no (at::mm)``, ...).
    ``{"error": ...}`` without the extension."""
    if EXT_ERROR is not None:
        return {"error": EXT_ERROR}
    import re

    m = re.fullmatch(r"simd forms=(\w+)(?: \((.*?)\))?((?:; [^=;]+=[^;]*)*)", cpu_kernels_info())
    if m is None:
        raise RuntimeError(f"clfast._ext.cpu_kernels: cannot read {cpu_kernels_info()!r}")
    out = {"simd": m.group(1), "simd_note": m.group(2) or ""}
    for part in filter(None, m.group(3).split("; ")):
        key, _, value = part.partition("=")
        out[key.replace("brgemm ", "")] = value
    return out


def built_with_cuda() -> bool:
    return EXT_ERROR is None and bool(torch.ops._clfast_C.built_with_cuda())
