"""One classifier head per task, stored densely: ConvPrompt's ``LayerNorm_τ → Linear_τ``, a plain ``Linear_τ``,
or ATLAS's ``Linear_τ → LayerNorm_τ → GELU → Linear_τ``.

All heads exist from the start (``num_tasks`` is known), so no parameter is created mid-run: resume, ``init_from``,
DDP and optimizer state see the same tensors throughout. The output layers of all tasks form one
``(num_classes, width)`` matrix whose rows follow the scenario's remapped labels; which rows belong to which task
comes with each call (``task_ranges``, as in :class:`~clfast.methods.TaskContext`). A method freezes the heads of
finished tasks with :meth:`TaskHeads.freeze_finished`.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TaskHeads"]


class TaskHeads(nn.Module):
    """Per-task heads over shared ``(B, in_features)`` features → ``(B, num_classes)`` logits.

    Args:
        in_features: D, the feature width.
        num_classes: C, classes over all tasks (the output rows).
        num_tasks: T.
        norm: a LayerNorm per task: on the input (``hidden=None``: ConvPrompt's ``LN_τ → Linear_τ``) or on the
            hidden layer (ATLAS). False: no norm.
        hidden: None for a single linear layer per task; an int H for ``Linear(D, H) → [LN] → GELU → Linear(H, n)``.
        bias: biases on the linear layers.
        init_std: linear weights ~ trunc-normal(0, init_std) (the papers' 0.02), biases 0; norms start at (1, 0).
        eps: the LayerNorm epsilon.

    Logit ``c`` of task ``τ`` (rows ``task_ranges[τ]``) is ``W[c] · f_τ(x) + b[c]``, where ``f_τ`` is task ``τ``'s own
    norm (and hidden layer). ``forward`` computes every task's rows; the engine masks classes not seen yet.

    Equivalent PyTorch (``hidden=None``, ``norm=True``), for each task ``τ`` with rows ``[a, z)``::

        logits[:, a:z] = F.linear(F.layer_norm(x, (D,), ln_weight[τ], ln_bias[τ]), weight[a:z], bias[a:z])
    """

    def __init__(self, in_features: int, num_classes: int, num_tasks: int, *, norm: bool = True,
                 hidden: Optional[int] = None, bias: bool = True, init_std: float = 0.02, eps: float = 1e-5):
        super().__init__()
        for name, v in (("in_features", in_features), ("num_classes", num_classes), ("num_tasks", num_tasks)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TaskHeads: {name} must be a positive int, got {v!r}")
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
            raise ValueError(f"TaskHeads: hidden must be a positive int or None, got {hidden!r}")
        self.in_features, self.num_classes, self.num_tasks = in_features, num_classes, num_tasks
        self.hidden, self.eps = hidden, float(eps)
        width = in_features if hidden is None else hidden
        if hidden is not None:
            self.hidden_weight = nn.Parameter(torch.empty(num_tasks, hidden, in_features))
            self.hidden_bias = nn.Parameter(torch.zeros(num_tasks, hidden)) if bias else None
        if norm:
            self.norm_weight = nn.Parameter(torch.ones(num_tasks, width))
            self.norm_bias = nn.Parameter(torch.zeros(num_tasks, width))
        else:
            self.norm_weight = self.norm_bias = None
        self.weight = nn.Parameter(torch.empty(num_classes, width))
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None
        with torch.no_grad():
            nn.init.trunc_normal_(self.weight, std=init_std)
            if hidden is not None:
                nn.init.trunc_normal_(self.hidden_weight, std=init_std)

    def _check_ranges(self, task_ranges: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        ranges = [(int(a), int(z)) for a, z in task_ranges]
        if len(ranges) > self.num_tasks or not ranges or ranges[0][0] != 0 or any(
                r[1] != s[0] for r, s in zip(ranges, ranges[1:])) or ranges[-1][1] > self.num_classes or any(
                z < a for a, z in ranges):
            raise ValueError(f"TaskHeads: task_ranges must be at most {self.num_tasks} consecutive (start, stop) "
                             f"ranges from 0 within {self.num_classes} classes, got {ranges}")
        return ranges

    def task_features(self, x: Tensor, task: int) -> Tensor:
        """``(B, width)``: what task ``task``'s output layer reads (its norm and hidden layer applied)."""
        if self.hidden is not None:
            b = self.hidden_bias[task] if self.hidden_bias is not None else None
            x = F.linear(x, self.hidden_weight[task], b)
        if self.norm_weight is not None:
            x = F.layer_norm(x, (x.shape[-1],), self.norm_weight[task], self.norm_bias[task], self.eps)
        if self.hidden is not None:
            x = F.gelu(x)
        return x

    def forward(self, x: Tensor, task_ranges: Sequence[Sequence[int]]) -> Tensor:
        """``x`` ``(B, D)`` → logits ``(B, C)``; ``task_ranges``: each task's ``(start, stop)`` rows, in order
        (``ctx.task_ranges``). Rows after the last range are 0."""
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"TaskHeads: x must have shape (B,{self.in_features}), got {tuple(x.shape)}")
        ranges = self._check_ranges(task_ranges)
        parts = []
        for t, (a, z) in enumerate(ranges):
            b = self.bias[a:z] if self.bias is not None else None
            parts.append(F.linear(self.task_features(x, t), self.weight[a:z], b))
        out = torch.cat(parts, dim=1)
        if out.shape[1] < self.num_classes:
            out = F.pad(out, (0, self.num_classes - out.shape[1]))
        return out

    def freeze_finished(self, freeze_rows: Callable, task: Callable[[], int], first_class: Callable[[], int]) -> None:
        """Hold the heads of finished tasks fixed: per-task tensors below ``task()``, output rows below
        ``first_class()`` (the current task's first class). ``freeze_rows`` is :meth:`Method.freeze_rows`."""
        for p in (self.hidden_weight if self.hidden is not None else None,
                  self.hidden_bias if self.hidden is not None else None, self.norm_weight, self.norm_bias):
            if p is not None:
                freeze_rows(p, stop=task)
        for p in (self.weight, self.bias):
            if p is not None:
                freeze_rows(p, stop=first_class)

    def extra_repr(self) -> str:
        kind = "linear" if self.hidden is None else f"mlp(hidden={self.hidden})"
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, num_tasks={self.num_tasks}, "
                f"{kind}, norm={self.norm_weight is not None}")
