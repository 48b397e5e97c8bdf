"""Argument checks shared by the public ops: errors name the function, the argument and what was expected."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from clfast.ops._backends import FLOAT

__all__ = ["shape_str", "check_float_tensor", "check_k"]


def shape_str(t: Tensor) -> str:
    """``(2,3,5)``: a shape as the error messages spell it."""
    return "(" + ",".join(str(s) for s in t.shape) + ")"


def check_float_tensor(fn: str, name: str, t: Any, *, shape: str | None = None, dim: int | None = None) -> None:
    """``t`` is a tensor of a floating dtype clfast computes in; with ``dim``, of that rank (the error quotes
    ``shape``, e.g. ``"(B,D)"``)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT:
        raise TypeError(f"{fn}: {name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{fn}: {name} must have shape {shape}, got {shape_str(t)}")


def check_k(fn: str, k: Any, M: int) -> None:
    """``k`` is an int in ``[1, M]`` (a top-k over M keys)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{fn}: k must be an int, got {type(k).__name__}")
    if not 1 <= k <= M:
        raise ValueError(f"{fn}: k must be in [1, M] = [1, {M}] (M = number of keys), got k = {k}")
