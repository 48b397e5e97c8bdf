"""Pieces shared by the methods on a frozen ViT: the cached frozen query, a classifier head, Gram–Schmidt
initialisation of new rows, and a snapshot of parameters taken at the start of a task."""

from __future__ import annotations

import math
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

    Args:
        dtype: the stored dtype (features are cast to it; default float32), or None to keep what ``compute``
            returns (the first call's dtype; a tensor of rows of any shape, e.g. a VLM's image tokens).
        max_bytes: a budget for the stored rows of all splits together; rows past it are computed on every call
            and not kept (``overflowed`` then counts the rows that were not kept). None: no budget.
    """

    def __init__(self, dtype: Optional[torch.dtype] = torch.float32, max_bytes: Optional[int] = None) -> None:
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
            raise ValueError(f"QueryCache: max_bytes must be an int >= 0 or None, got {max_bytes!r}")
        self.dtype, self.max_bytes = dtype, max_bytes
        self.overflowed = 0
        self._rows: dict[str, Tensor] = {}
        self._filled: dict[str, Tensor] = {}

    def clear(self) -> None:
        self._rows.clear()
        self._filled.clear()
        self.overflowed = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored rows (allocated capacity) of every split."""
        return sum(r.numel() * r.element_size() for r in self._rows.values())

    def _grow(self, split: str, n: int, like: Tensor) -> bool:
        """Make room for ``n`` rows shaped as ``like``'s (one row each); False when the budget does not allow it."""
        rows, filled = self._rows.get(split), self._filled.get(split)
        shape, dev = tuple(like.shape[1:]), like.device
        same = rows is not None and tuple(rows.shape[1:]) == shape and rows.dtype == like.dtype
        if same and rows.shape[0] >= n and rows.device == dev:
            return True
        cap = max(n, 2 * (rows.shape[0] if same else 0), 256)
        if self.max_bytes is not None:
            row_bytes = math.prod(shape) * like.element_size()
            other = self.nbytes - (rows.numel() * rows.element_size() if rows is not None else 0)
            fit = (self.max_bytes - other) // max(row_bytes, 1)
            if fit < n:
                return False
            cap = min(cap, fit)
        new_rows = torch.zeros((cap, *shape), dtype=like.dtype, device=dev)
        new_filled = torch.zeros(cap, dtype=torch.bool, device=dev)
        if same:
            new_rows[: rows.shape[0]] = rows.to(dev)
            new_filled[: filled.shape[0]] = filled.to(dev)
        self._rows[split], self._filled[split] = new_rows, new_filled
        return True

    def __call__(self, split: str, index: Tensor, compute) -> Tensor:
        """Rows for ``index`` (B,) int64; ``compute(mask) -> (n_missing, ...)`` fills the missing ones."""
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
        fresh = compute(missing)
        if self.dtype is not None:
            fresh = fresh.to(self.dtype)
        if not self._grow(split, int(index.max()) + 1, fresh):
            self.overflowed += int(missing.sum())
            out = fresh.new_empty((index.shape[0], *fresh.shape[1:]))
            out[missing.to(out.device)] = fresh
            if bool(hit.any()):
                out[hit.to(out.device)] = rows[index[hit].to(rows.device)].to(out.device)
            return out
        rows, filled = self._rows[split], self._filled[split]
        idx = index.to(rows.device)
        rows[idx[missing.to(rows.device)]] = fresh
        filled[idx[missing.to(rows.device)]] = True
        return rows[idx]


def check_cache_mb(method: str, value) -> None:
    """ValueError naming ``method`` unless ``image_token_cache_mb`` is an int >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{method}: image_token_cache_mb must be an int >= 0 (0: no cache), got {value!r}")


def eval_image_tokens(cache: "QueryCache", vlm, batch: dict, ctx: TaskContext):
    """``image_tokens`` for :meth:`~clfast.backbones.VLM.encode` at evaluation: the frozen image tower's tokens of
    each item computed once per split and read from ``cache`` afterwards (a VQA test item is answered after every
    later task too), or None (run the tower) in training, for a split whose transform is not deterministic, or
    without ``batch["index"]``. The first evaluation computes whole batches, as without the cache, so a cached
    evaluation gives the same results."""
    if ctx.split == "train" or not getattr(ctx, "cacheable", False) or "index" not in batch:
        return None
    index = batch["index"]

    def tokens(images: Tensor) -> Tensor:
        return cache(ctx.split, index, lambda missing: vlm.towers.image_tokens(images[missing.to(images.device)]))
    return tokens


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
