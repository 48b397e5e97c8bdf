"""Pieces shared by the methods on a frozen ViT: the cached frozen query, a classifier head, Gram–Schmidt
initialisation of new rows, and a snapshot of parameters taken at the start of a task."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .base import Method, MethodConfig, TaskContext, masked_logits

__all__ = ["QueryCache", "FrozenQueryMethod", "orthogonal_rows", "ParameterSnapshot"]


def orthogonal_rows(x: Tensor, start: int, stop: int, gen: torch.Generator, exact: bool = False) -> Tensor:
    """Rows ``start:stop`` of ``x`` (M, D) replaced by random unit rows orthogonal to all rows before ``stop``.

    Gram–Schmidt in float64 (twice, for working precision) against rows ``0:start`` (kept) and each other;
    needs ``stop <= D``. Returns the whole (M, D) float64 matrix. Plain projection onto the kept rows is exact only
    while they are orthonormal (CODA-Prompt's components, projected as its released code does); ``exact=True``
    projects onto an orthonormal basis of them (float64 QR), so the new rows are orthogonal to trained rows too
    (ConvPrompt's keys).
    """
    if not 0 <= start <= stop <= x.shape[0]:
        raise ValueError(f"orthogonal_rows: need 0 <= start <= stop <= {x.shape[0]} rows, got {start}, {stop}")
    if stop > x.shape[1]:
        raise ValueError(f"orthogonal_rows: {stop} rows cannot be orthonormal in {x.shape[1]} dimensions")
    x = x.detach().double().clone()
    kept = torch.linalg.qr(x[:start].T).Q.T if exact and start else x[:start]
    for i in range(start, stop):
        v = torch.randn(x.shape[1], generator=gen, dtype=torch.float64)
        basis = torch.cat([kept, x[start:i]])
        for _ in range(2):  # twice is enough for orthogonality to working precision
            if len(basis):
                v = v - basis.T @ (basis @ v)
        x[i] = v / v.norm()
    return x


class ParameterSnapshot(nn.Module):
    """Copies of some parameters taken at the start of a task, for drift penalties (ConvPrompt's L1 terms).

    The copies are persistent buffers in the parameters' dtype, so checkpoints carry them and a run resumed in
    the middle of a task penalises drift from the same values as the uninterrupted run.

    Args:
        params: ``{name: parameter}``; names may contain dots (stored with ``__`` instead).
    """

    def __init__(self, params: dict[str, Tensor]):
        super().__init__()
        self._params = dict(params)   # plain references: the parameters stay owned by their modules
        for name, p in self._params.items():
            self.register_buffer(self._key(name), p.detach().clone())

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    @torch.no_grad()
    def take(self) -> None:
        """Copy the current values."""
        for name, p in self._params.items():
            getattr(self, self._key(name)).copy_(p.detach())

    def l1(self, names: Optional[list[str]] = None) -> Tensor:
        """``Σ ‖θ − θ_snapshot‖₁`` over ``names`` (default all), float32, differentiable w.r.t. the parameters."""
        names = list(self._params) if names is None else names
        terms = [(self._params[n].float() - getattr(self, self._key(n)).float()).abs().sum() for n in names]
        return torch.stack(terms).sum()


class QueryCache:
    """Frozen-backbone features per image, so the query pass runs once per image, not once per epoch.

    Rows are keyed by ``(split, index)`` (``batch["index"]``, the item's position in its split). The
    engine marks a context cacheable only when the split's transform is deterministic (evaluation, or
    training with augmentation off); otherwise every call computes. Not saved in checkpoints.
    """

    def __init__(self) -> None:
        self._rows: dict[str, Tensor] = {}
        self._filled: dict[str, Tensor] = {}

    def clear(self) -> None:
        self._rows.clear()
        self._filled.clear()

    def _grow(self, split: str, n: int, dim: int, device) -> None:
        rows, filled = self._rows.get(split), self._filled.get(split)
        if rows is not None and rows.shape[0] >= n and rows.shape[1] == dim and rows.device == device:
            return
        cap = max(n, 2 * (rows.shape[0] if rows is not None else 0), 256)
        new_rows = torch.zeros(cap, dim, device=device)
        new_filled = torch.zeros(cap, dtype=torch.bool, device=device)
        if rows is not None and rows.shape[1] == dim:
            new_rows[: rows.shape[0]] = rows.to(device)
            new_filled[: filled.shape[0]] = filled.to(device)
        self._rows[split], self._filled[split] = new_rows, new_filled

    def __call__(self, split: str, index: Tensor, compute) -> Tensor:
        """Rows for ``index`` (B,) int64; ``compute(mask) -> (n_missing, D)`` fills the missing ones."""
        index = index.long()
        rows, filled = self._rows.get(split), self._filled.get(split)
        if rows is not None and int(index.max()) < rows.shape[0]:
            idx = index.to(rows.device)
            hit = filled[idx]
            if bool(hit.all()):
                return rows[idx]
        else:
            hit = torch.zeros(index.shape[0], dtype=torch.bool)
        hit = hit.cpu()
        missing = ~hit
        fresh = compute(missing).float()
        self._grow(split, int(index.max()) + 1, fresh.shape[1], fresh.device)
        rows, filled = self._rows[split], self._filled[split]
        idx = index.to(rows.device)
        rows[idx[missing.to(rows.device)]] = fresh
        filled[idx[missing.to(rows.device)]] = True
        return rows[idx]


class FrozenQueryMethod(Method):
    """A method with a linear head over ``embed_dim`` features and a frozen [CLS] query per image.

    The head is dense over all classes (``num_classes`` outputs from the start), so no parameter is
    created mid-run; unseen classes are masked.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, num_tasks: int, cfg: MethodConfig):
        super().__init__(backbone, num_classes, num_tasks, cfg)
        self.embed_dim = int(backbone.embed_dim)
        self.head = nn.Linear(self.embed_dim, self.num_classes, bias=cfg.head_bias)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)
        self.query_cache = QueryCache()

    def query(self, batch: dict, ctx: TaskContext) -> Tensor:
        """The frozen backbone's [CLS] feature (B, C), fp32, no gradient; cached when ``ctx`` allows."""
        images = batch["image"]

        def compute(mask: Optional[Tensor] = None) -> Tensor:
            x = images if mask is None else images[mask.to(images.device)]
            with torch.no_grad():
                return self.backbone.query(x).float()

        cacheable = getattr(ctx, "cacheable", False) and "index" in batch
        if not cacheable:
            return compute()
        return self.query_cache(ctx.split, batch["index"], compute)

    def check_layers(self, layers) -> None:
        """ValueError naming the method if a prompted block index is outside the backbone."""
        n = int(self.backbone.num_layers)
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"{self.name}: layers {bad} out of range for a {n}-block backbone")

    def classify(self, features: Tensor) -> Tensor:
        return self.head(features)

    def predict_logits(self, logits: Tensor, ctx: TaskContext) -> Tensor:
        return masked_logits(logits, (0, ctx.seen_classes))
