"""Parameter helpers every method uses and other codebases can import alone: learning-rate groups by name
prefix, logit masks, and rows of a parameter held fixed across optimizer steps (finished tasks' slices)."""

from __future__ import annotations

import difflib
from typing import Callable, Optional

import torch
from torch import Tensor, nn

__all__ = ["scaled_param_groups", "masked_logits", "FrozenRows", "freeze_rows"]


def scaled_param_groups(module: nn.Module, lr_scales: dict[str, float]) -> list[dict]:
    """``module``'s trainable parameters grouped by learning-rate multiplier.

    Each parameter takes the multiplier of the longest prefix of ``lr_scales`` that equals its name or
    a dotted ancestor of it (1.0 when none does). A prefix that names no parameter of ``module`` is a
    ValueError with the close matches, so a typo cannot silently train at the wrong rate. Groups come
    in order of first appearance, so the optimizer's state lines up across runs and resumes.
    """
    named = list(module.named_parameters())
    names = {n for n, _ in named}
    ancestors = {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)}
    for prefix in lr_scales:
        if prefix not in ancestors:
            close = difflib.get_close_matches(prefix, sorted(ancestors), n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"lr_scales: {prefix!r} names no parameter of {type(module).__name__}{hint}")
    groups: dict[float, list[Tensor]] = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        parts = name.split(".")
        scale = 1.0
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in lr_scales:
                scale = lr_scales[prefix]
                break
        groups.setdefault(scale, []).append(p)
    if not lr_scales:
        return [{"params": params} for params in groups.values()]
    return [{"params": params, "lr_scale": scale} for scale, params in groups.items()]


def masked_logits(logits: Tensor, keep: tuple[int, int]) -> Tensor:
    """``logits`` (B, K) with columns outside ``keep = (start, stop)`` set to -inf (out of place)."""
    start, stop = keep
    mask = torch.full((logits.shape[-1],), float("-inf"), device=logits.device, dtype=logits.dtype)
    mask[start:stop] = 0
    return logits + mask


class FrozenRows:
    """Rows ``[start, stop)`` of ``param`` along ``dim`` held fixed (the slices of finished tasks).

    Two parts: a gradient hook zeroes the rows' gradient, and :meth:`restore` (called by the engine
    after every optimizer step, through :meth:`Method.after_optimizer_step`) writes back the values
    they had when they became frozen, so that momentum and weight decay of an optimizer kept across
    tasks cannot move them either. ``start``/``stop`` may be callables read when used, so one record
    serves every task; the snapshot is taken in the first backward pass that sees a new range (before
    that step's update), so a resumed run re-takes it from the restored parameters.
    """

    def __init__(self, param: Tensor, stop: Callable[[], int] | int, start: Callable[[], int] | int = 0,
                 dim: int = 0):
        if not isinstance(param, Tensor) or not param.requires_grad:
            raise ValueError("freeze_rows: param must be a tensor that requires grad")
        if not -param.dim() <= dim < param.dim():
            raise ValueError(f"freeze_rows: dim must be in [{-param.dim()}, {param.dim()}) for a "
                             f"{param.dim()}-d param, got {dim}")
        self.param, self._start, self._stop, self.dim = param, start, stop, dim % param.dim()
        self._range: tuple[int, int] = (0, 0)
        self._snapshot: Optional[Tensor] = None
        self._handle = param.register_hook(self._hook)

    def range(self) -> tuple[int, int]:
        a = self._start() if callable(self._start) else self._start
        b = self._stop() if callable(self._stop) else self._stop
        return int(a), max(int(a), int(b))

    def _hook(self, grad: Tensor) -> Tensor:
        a, b = self.range()
        if b <= a:
            return grad
        if (a, b) != self._range or self._snapshot is None:
            self._snapshot = self.param.detach().narrow(self.dim, a, b - a).clone()
            self._range = (a, b)
        grad = grad.clone()
        grad.narrow(self.dim, a, b - a).zero_()
        return grad

    @torch.no_grad()
    def restore(self) -> None:
        """Write the frozen rows back (no-op before the first backward pass of a range)."""
        a, b = self.range()
        if self._snapshot is not None and (a, b) == self._range:
            self.param.narrow(self.dim, a, b - a).copy_(self._snapshot)

    def remove(self) -> None:
        self._handle.remove()


def freeze_rows(param: Tensor, stop: Callable[[], int] | int, start: Callable[[], int] | int = 0,
                dim: int = 0) -> FrozenRows:
    """Hold ``param``'s rows ``[start, stop)`` along ``dim`` fixed (see :class:`FrozenRows`).

    Inside a :class:`Method` use ``self.freeze_rows(...)``, which also registers the record so that
    the engine restores the rows after every optimizer step. Used alone (another codebase's loop),
    the gradient is zeroed, and the caller restores with ``.restore()`` after its optimizer step when
    the optimizer keeps momentum or weight decay across tasks.
    """
    return FrozenRows(param, stop, start, dim)
