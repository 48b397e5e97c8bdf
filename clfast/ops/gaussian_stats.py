"""GaussianStats: streaming per-group means and the pooled within-group covariance of feature rows, and the
Cholesky factor of the precision that :func:`clfast.ops.mahalanobis` and :func:`clfast.ops.gaussian_kl` take."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from clfast.ops._checks import shape_str

__all__ = ["GaussianStats"]


class GaussianStats:
    """Streaming per-group means and pooled within-group covariance of feature rows, in float64.

    Chunks are merged with Chan et al.'s parallel update (each chunk centred on its own group means, then the
    mean shift added as a rank-``G`` correction), so the result does not suffer the cancellation of raw
    ``Σffᵀ/n − mmᵀ`` sums and equals a one-shot computation up to rounding. ``num_groups=1`` gives the plain
    mean and covariance; with groups (GPLS's tasks, classes) the covariance is the pooled within-group one.

    >>> stats = GaussianStats(768, num_groups=10)
    >>> for feats, task in loader:
    ...     stats.update(feats, task)                       # (N, D); task: int or (N,) ints
    >>> stats.all_reduce()                                  # under DDP, once, before using the results
    >>> L = stats.precision_cholesky(shrinkage=0.1)         # (D, D): L Lᵀ = S⁻¹
    >>> d = clfast.ops.mahalanobis(q, stats.mean.float(), L.float())

    Attributes:
        count: ``(G,)`` float64 numbers of rows per group.
        mean: ``(G, D)`` float64 group means (zero for empty groups).
        scatter: ``(D, D)`` float64 ``Σ_g Σ_{i∈g} (x_i − mean_g)(x_i − mean_g)ᵀ``.
    """

    def __init__(self, dim: int, num_groups: int = 1, *, device: Union[str, torch.device, None] = None) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"GaussianStats: dim must be a positive int, got {dim!r}")
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"GaussianStats: num_groups must be a positive int, got {num_groups!r}")
        self.dim, self.num_groups = dim, num_groups
        kw = dict(dtype=torch.float64, device=device)
        self.count = torch.zeros(num_groups, **kw)
        self.mean = torch.zeros(num_groups, dim, **kw)
        self.scatter = torch.zeros(dim, dim, **kw)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def total(self) -> int:
        """Number of rows seen, all groups together."""
        return int(self.count.sum().item())

    def _groups(self, groups, n: int) -> Tensor:
        if groups is None:
            return torch.zeros(n, dtype=torch.long, device=self.device)
        if isinstance(groups, int) and not isinstance(groups, bool):
            if not 0 <= groups < self.num_groups:
                raise ValueError(f"GaussianStats.update: groups must be in [0, {self.num_groups}), got {groups}")
            return torch.full((n,), groups, dtype=torch.long, device=self.device)
        if not isinstance(groups, Tensor) or groups.dtype.is_floating_point or groups.dtype == torch.bool:
            raise TypeError(f"GaussianStats.update: groups must be None, an int or an integer tensor (N,), got "
                            f"{getattr(groups, 'dtype', type(groups).__name__)}")
        if groups.shape != (n,):
            raise ValueError(f"GaussianStats.update: groups must have shape (N,) = ({n},), got {shape_str(groups)}")
        groups = groups.to(self.device, torch.long)
        if n and (int(groups.min()) < 0 or int(groups.max()) >= self.num_groups):
            raise ValueError(f"GaussianStats.update: groups must be in [0, {self.num_groups})")
        return groups

    @torch.no_grad()
    def update(self, x: Tensor, groups: Union[None, int, Tensor] = None) -> "GaussianStats":
        """Adds the rows of ``x`` ``(N, D)`` (any float dtype, any device; computed in float64 on the
        accumulator's device), all to ``groups`` if an int (default 0) or row by row if an ``(N,)`` tensor."""
        if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"GaussianStats.update: x must be a floating-point tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"GaussianStats.update: x must have shape (N,D) with D = {self.dim}, got {shape_str(x)}")
        n = x.shape[0]
        if n == 0:
            return self
        g = self._groups(groups, n)
        x = x.to(self.device, torch.float64)
        G = self.num_groups
        n_b = torch.bincount(g, minlength=G).to(torch.float64)
        sums = torch.zeros(G, self.dim, dtype=torch.float64, device=self.device).index_add_(0, g, x)
        mean_b = sums / n_b.clamp_min(1.0)[:, None]
        xc = x - mean_b[g]
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        # Chan's merge: scatter += chunk scatter + Σ_g n_a n_b / n · δ_g δ_gᵀ (zero weight for untouched groups).
        w = torch.where(n > 0, n_a * n_b / n.clamp_min(1.0), torch.zeros_like(n))
        dw = delta * w.sqrt()[:, None]
        self.scatter += xc.T @ xc + dw.T @ dw
        self.mean += delta * torch.where(n > 0, n_b / n.clamp_min(1.0), torch.zeros_like(n))[:, None]
        self.count = n
        return self

    @torch.no_grad()
    def merge(self, other: "GaussianStats") -> "GaussianStats":
        """Adds another accumulator's rows (same dim and groups), as if its rows had been passed to update."""
        if not isinstance(other, GaussianStats) or (other.dim, other.num_groups) != (self.dim, self.num_groups):
            raise ValueError("GaussianStats.merge: other must be a GaussianStats with the same dim and num_groups")
        n_a, n_b = self.count, other.count.to(self.device)
        n = n_a + n_b
        delta = other.mean.to(self.device) - self.mean
        w = torch.where(n > 0, n_a * n_b / n.clamp_min(1.0), torch.zeros_like(n))
        dw = delta * w.sqrt()[:, None]
        self.scatter += other.scatter.to(self.device) + dw.T @ dw
        self.mean += delta * torch.where(n > 0, n_b / n.clamp_min(1.0), torch.zeros_like(n))[:, None]
        self.count = n
        return self

    @torch.no_grad()
    def all_reduce(self, group=None) -> "GaussianStats":
        """Combines the accumulators of every rank of ``group`` (default: the world) in place; every rank ends
        with the statistics of all rows. Two collectives: counts with weighted sums, then the scatter
        (re-centred on the global means first, so no cancellation)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        G, D = self.num_groups, self.dim
        buf = torch.cat([self.count[:, None], self.count[:, None] * self.mean], dim=1)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        count = buf[:, 0]
        mean = buf[:, 1:] / count.clamp_min(1.0)[:, None]
        dw = (self.mean - mean) * self.count.sqrt()[:, None]
        scatter = self.scatter + dw.T @ dw
        dist.all_reduce(scatter, op=dist.ReduceOp.SUM, group=group)
        self.count, self.mean, self.scatter = count, mean.reshape(G, D), scatter
        return self

    def covariance(self, shrinkage: float = 0.0, *, correction: int = 1) -> Tensor:
        """The pooled within-group covariance ``Ŝ = scatter / (N − correction·G')`` (G' = non-empty groups),
        shrunk toward a scaled identity: ``S = (1 − γ)·Ŝ + γ·tr(Ŝ)/D·I``. ``(D, D)`` float64."""
        if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)) or not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"GaussianStats.covariance: shrinkage must be a float in [0, 1], got {shrinkage!r}")
        groups = int((self.count > 0).sum())
        dof = float(self.count.sum()) - correction * groups
        if dof <= 0:
            raise ValueError(f"GaussianStats.covariance: needs more rows than correction × groups "
                             f"({self.total} rows in {groups} groups)")
        cov = self.scatter / dof
        if shrinkage:
            target = torch.diagonal(cov).mean()
            cov = (1.0 - shrinkage) * cov
            cov.diagonal().add_(shrinkage * target)
        return cov

    def precision_cholesky(self, shrinkage: float = 0.0, *, correction: int = 1, diagonal: bool = False,
                           dtype: Optional[torch.dtype] = None) -> Tensor:
        """The factor ``L`` of the precision ``S⁻¹ = L·Lᵀ``, lower-triangular ``(D, D)``, computed in float64
        without forming ``S⁻¹``: with ``J`` the index reversal, ``chol(J S J) = C`` gives ``L = J C⁻ᵀ J``.
        ``diagonal=True`` returns the vector ``1/sqrt(diag S)`` ``(D,)`` (a diagonal model). Cast to ``dtype``."""
        cov = self.covariance(shrinkage, correction=correction)
        if diagonal:
            var = torch.diagonal(cov)
            if not bool((var > 0).all()):
                raise ValueError("GaussianStats.precision_cholesky: a feature has zero variance; use shrinkage > 0")
            out = var.rsqrt()
        else:
            flipped = cov.flip(0, 1)
            chol, info = torch.linalg.cholesky_ex(flipped)
            if int(info) != 0:
                raise ValueError("GaussianStats.precision_cholesky: the covariance is not positive definite "
                                 f"({self.total} rows for D = {self.dim}); use shrinkage > 0")
            eye = torch.eye(self.dim, dtype=cov.dtype, device=cov.device)
            inv = torch.linalg.solve_triangular(chol, eye, upper=False)  # C⁻¹, lower
            out = inv.T.flip(0, 1).contiguous()  # J C⁻ᵀ J: lower, with L Lᵀ = S⁻¹
        return out if dtype is None else out.to(dtype)

    def state_dict(self) -> dict:
        return {"dim": self.dim, "num_groups": self.num_groups, "count": self.count.clone(),
                "mean": self.mean.clone(), "scatter": self.scatter.clone()}

    def load_state_dict(self, state: dict) -> "GaussianStats":
        if (state["dim"], state["num_groups"]) != (self.dim, self.num_groups):
            raise ValueError(f"GaussianStats.load_state_dict: state has dim {state['dim']} and num_groups "
                             f"{state['num_groups']}, this accumulator {self.dim} and {self.num_groups}")
        self.count = state["count"].to(self.device, torch.float64).clone()
        self.mean = state["mean"].to(self.device, torch.float64).clone()
        self.scatter = state["scatter"].to(self.device, torch.float64).clone()
        return self

    def __repr__(self) -> str:
        return f"GaussianStats(dim={self.dim}, num_groups={self.num_groups}, rows={self.total})"
