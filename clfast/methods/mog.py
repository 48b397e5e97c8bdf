"""Per-class mixtures of diagonal Gaussians, fitted by EM in float64 for all classes at once (STAR-Prompt's
generative replay; spec: ``methods/star_prompt.md`` §2 "MoG generative replay").

    mog = ClassMixtures(num_classes=200, dim=768, n_components=5)
    mog.fit(features, labels)                            # every class present in ``labels``
    x, y = mog.sample([0, 1, 2], 256, generator)         # (768, 768) float32, (768,) int64
    lp = mog.log_prob(features, [0, 1, 2])               # (N, 3) float64

The EM is batched over classes: every class's samples sit in one zero-padded ``(C, N_max, D)`` float64
tensor with a validity mask, and each E- and M-step is one ``bmm``. The E-step writes the diagonal Gaussian
log-density as a GEMM against ``[x², x]``:

    log N(x | μ, σ²) = −½ (x²·(1/σ²)ᵀ − 2x·(μ/σ²)ᵀ + Σ_d μ²/σ² + Σ_d log σ² + D log 2π)

A class stops when its mean log-likelihood per sample improves by less than ``tol`` (scikit-learn's order:
E-step, M-step, then the test on the log-likelihoods of the two E-steps; so the M-step of the last iteration
is kept) or after ``max_iter`` M-steps; finished classes no longer update and, once they are half of the
batch, are dropped from it. :func:`batched_em` is that loop from given initial parameters;
:class:`ClassMixtures` adds the K-means initialisation, the refits and the per-class buffers.

``gmm_torch_density=True`` reproduces the density of the official code (a port of gmm-torch): the E-step
evaluates each component as if its variance were √var (the quadratic term divided by σ, the
log-determinant halved). The M-step, sampling and the stored variances use the true variance. Two other
habits of that loop are not reproduced: its start (unit variances, uniform weights; here they come from the
K-means clusters) and its reverting of μ and σ² (not the weights) when an iteration gains less than ``tol``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from clfast.ops import kmeans

__all__ = ["ClassMixtures", "EMResult", "batched_em", "mixture_log_prob"]

_LOG_2PI = math.log(2.0 * math.pi)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_EPS = 10 * torch.finfo(torch.float64).eps   # added to each component's responsibility mass (as scikit-learn)


# ---------------------------------------------------------------------------------------------------------
# The density and the batched EM, on padded float64 tensors.
# ---------------------------------------------------------------------------------------------------------


def _gemm_terms(means: Tensor, variances: Tensor, gmm_torch_density: bool) -> tuple[Tensor, Tensor]:
    """``(W (..., K, 2D), c (..., K))`` with ``log N(x | μ_k, σ_k²) = −½ ([x², x]·W_kᵀ + c_k)``."""
    if gmm_torch_density:   # the component as if its variance were √var
        prec, logdet = variances.rsqrt(), 0.5 * variances.log().sum(-1)
    else:
        prec, logdet = variances.reciprocal(), variances.log().sum(-1)
    w = torch.cat([prec, -2.0 * means * prec], dim=-1)
    c = (means * means * prec).sum(-1) + logdet + means.shape[-1] * _LOG_2PI
    return w, c


def mixture_log_prob(x: Tensor, means: Tensor, variances: Tensor, log_weights: Tensor, *,
                     gmm_torch_density: bool = False) -> Tensor:
    """Log-density of each row of ``x`` under each of C diagonal mixtures, computed in float64.

    Args:
        x: ``(B, D)`` points, any float dtype.
        means, variances: ``(C, K, D)``; variances > 0.
        log_weights: ``(C, K)``, log mixing weights (each row's exp sums to 1).
        gmm_torch_density: evaluate each component with variance √var, as the official code's E-step does
            (not a normalised density).

    Returns:
        ``(B, C)`` float64: ``logsumexp_k (log w_ck + log N(x | μ_ck, diag σ²_ck))``.

    Equivalent PyTorch::

        comp = torch.distributions.Normal(means, variances.sqrt())                 # (C, K, D)
        lp = comp.log_prob(x[:, None, None, :]).sum(-1) + log_weights              # (B, C, K)
        return lp.logsumexp(-1)
    """
    x = x.to(means.device, torch.float64)
    w, c = _gemm_terms(means.double(), variances.double(), gmm_torch_density)
    C, K, _ = w.shape
    quad = torch.cat([x * x, x], dim=-1) @ w.reshape(C * K, -1).T                  # (B, C·K)
    lp = -0.5 * (quad.view(-1, C, K) + c) + log_weights.double()
    return lp.logsumexp(-1)


def _e_step(xx: Tensor, means: Tensor, variances: Tensor, log_weights: Tensor, quirk: bool) -> tuple[Tensor, Tensor]:
    """``xx (G, N, 2D) = [x², x]`` → ``(log p(x_n) (G, N), log responsibilities (G, K, N))``.

    Components-major ``(G, K, N)``: both GEMMs of an iteration then read contiguous operands (on the CPU, a
    transposed responsibility matrix in the M-step's GEMM costs 1.5×)."""
    w, c = _gemm_terms(means, variances, quirk)
    lp = torch.baddbmm((log_weights - 0.5 * c)[..., None], w, xx.transpose(1, 2), alpha=-0.5)    # (G, K, N)
    lse = lp.logsumexp(1)
    return lse, lp - lse[:, None, :]


def _m_step(xx: Tensor, valid: Tensor, log_resp: Tensor, reg_covar: float) -> tuple[Tensor, Tensor, Tensor]:
    """Weights = mean responsibility, means = weighted mean, variances = weighted E[x²] − μ² + reg_covar
    (clamped at reg_covar against round-off). Padded samples (``valid`` False) carry no responsibility."""
    D = xx.shape[-1] // 2
    resp = log_resp.exp() * valid[:, None, :]                                      # (G, K, N)
    nk = resp.sum(2) + _EPS                                                        # (G, K)
    s = torch.bmm(resp, xx) / nk[..., None]                                        # (G, K, 2D): [E x², E x]
    means = s[..., D:]
    variances = (s[..., :D] - means * means + reg_covar).clamp_min(reg_covar)
    log_weights = nk.log() - nk.sum(-1, keepdim=True).log()
    return means, variances, log_weights


@dataclass
class EMResult:
    """What :func:`batched_em` returns, one row per mixture (G of them).

    Attributes:
        means, variances: ``(G, K, D)`` float64; log_weights ``(G, K)`` float64.
        log_likelihood: ``(G,)`` mean log-likelihood per sample of the returned parameters (under the E-step's
            density); non-finite where ``finite`` is False.
        iterations: ``(G,)`` int64, M-steps taken.
        converged: ``(G,)`` bool, stopped by ``tol`` (False: by ``max_iter``, or not finite).
        finite: ``(G,)`` bool, False where an E-step's log-likelihood was ±inf or NaN (the mixture stopped
            there; its parameters are the ones that gave it).
        history: ``(G, max_iter + 1)`` float64; ``history[g, i]`` is the mean log-likelihood after i M-steps,
            for i ≤ iterations[g]; NaN after.
    """

    means: Tensor
    variances: Tensor
    log_weights: Tensor
    log_likelihood: Tensor
    iterations: Tensor
    converged: Tensor
    finite: Tensor
    history: Tensor


def batched_em(x: Tensor, valid: Tensor, means: Tensor, variances: Tensor, log_weights: Tensor, *,
               reg_covar: float = 1e-6, max_iter: int = 200, tol: float = 1e-3,
               gmm_torch_density: bool = False) -> EMResult:
    """EM for G diagonal Gaussian mixtures at once, from given initial parameters, in float64.

    Iteration i of mixture g (scikit-learn's order): E-step on the current parameters, giving the mean
    log-likelihood L_{i-1}; M-step; then g stops if ``L_{i-1} − L_{i-2} < tol`` (a decrease stops it too) or
    if i = max_iter. ``tol = -inf`` runs exactly ``max_iter`` M-steps.

    Args:
        x: ``(G, N, D)`` samples of mixture g in ``x[g][valid[g]]``; padded rows are ignored (any finite value).
        valid: ``(G, N)`` bool, at least one True per row.
        means, variances, log_weights: initial ``(G, K, D)``, ``(G, K, D)`` (> 0), ``(G, K)``.
        reg_covar: ≥ 0, added to every variance in each M-step.
        max_iter: ≥ 0 M-steps at most.
        tol: stopping threshold on the improvement of the mean log-likelihood per sample.
        gmm_torch_density: the official code's E-step density (module docstring).

    Returns:
        :class:`EMResult` (float64, on x's device).
    """
    if x.dim() != 3:
        raise ValueError(f"batched_em: x must have shape (G,N,D), got {tuple(x.shape)}")
    G, N, D = x.shape
    if valid.shape != (G, N) or valid.dtype != torch.bool:
        raise ValueError(f"batched_em: valid must be a bool tensor of shape ({G},{N}), got {valid.dtype} "
                         f"{tuple(valid.shape)}")
    K = means.shape[1] if means.dim() == 3 else -1
    for name, t, shape in (("means", means, (G, K, D)), ("variances", variances, (G, K, D)),
                           ("log_weights", log_weights, (G, K))):
        if tuple(t.shape) != shape:
            raise ValueError(f"batched_em: {name} must have shape {shape} (G,K,D from x and means), "
                             f"got {tuple(t.shape)}")
    _check_int("batched_em", "max_iter", max_iter, 0)
    counts = valid.sum(1)
    if bool((counts == 0).any()):
        raise ValueError("batched_em: valid must mark at least one sample per mixture")

    dev, f64 = x.device, torch.float64
    xx = torch.empty(G, N, 2 * D, dtype=f64, device=dev)   # [x², x]: read once per E-step, once per M-step
    xx[..., D:] = x
    torch.mul(xx[..., D:], xx[..., D:], out=xx[..., :D])
    xx.masked_fill_(~valid[..., None], 0.0)                  # padding: any value, NaN included
    counts = counts.to(f64)
    means, variances, log_weights = (t.to(dev, f64).clone() for t in (means, variances, log_weights))
    history = torch.full((G, max_iter + 1), math.nan, dtype=f64, device=dev)
    iterations = torch.zeros(G, dtype=torch.int64, device=dev)
    converged = torch.zeros(G, dtype=torch.bool, device=dev)
    finite = torch.ones(G, dtype=torch.bool, device=dev)

    # The working batch: rows (indices into G) and their state; finished mixtures stay in it, frozen, until
    # they are half of it. Per-row flags live in the batch and are written out with the parameters, so an
    # iteration synchronises with the device once (the count of mixtures still running).
    out = dict(means=means, variances=variances, log_weights=log_weights, iterations=iterations,
               converged=converged, finite=finite)
    w = dict(out)
    rows = torch.arange(G, device=dev)
    alive = torch.ones(G, dtype=torch.bool, device=dev)
    w_xx, w_valid, w_counts = xx, valid, counts
    prev = torch.full((G,), -math.inf, dtype=f64, device=dev)
    for it in range(1, max_iter + 1):
        lse, log_resp = _e_step(w_xx, w["means"], w["variances"], w["log_weights"], gmm_torch_density)
        ll = torch.where(w_valid, lse, 0.0).sum(1) / w_counts
        history[rows, it - 1] = torch.where(alive, ll, history[rows, it - 1])
        bad = alive & ~ll.isfinite()
        w["finite"] = w["finite"] & ~bad
        alive = alive & ~bad
        m, v, lw = _m_step(w_xx, w_valid, log_resp, reg_covar)
        w["means"] = torch.where(alive[:, None, None], m, w["means"])
        w["variances"] = torch.where(alive[:, None, None], v, w["variances"])
        w["log_weights"] = torch.where(alive[:, None], lw, w["log_weights"])
        w["iterations"] = torch.where(alive, it, w["iterations"])
        stop = alive & (ll - prev < tol)
        w["converged"] = w["converged"] | stop
        alive = alive & ~stop
        prev = ll
        n_alive = int(alive.sum())
        if n_alive == 0 or it == max_iter:
            break
        if 2 * n_alive <= len(rows):
            keep = alive.nonzero().squeeze(1)
            for name in out:
                out[name][rows] = w[name]
                w[name] = w[name][keep]
            rows, alive, prev = rows[keep], alive[keep], prev[keep]
            w_xx, w_valid, w_counts = w_xx[keep], w_valid[keep], w_counts[keep]
    if max_iter > 0:   # (with none, w holds the result tensors themselves)
        for name in out:
            out[name][rows] = w[name]

    lse, _ = _e_step(xx, means, variances, log_weights, gmm_torch_density)
    log_likelihood = torch.where(valid, lse, 0.0).sum(1) / counts
    history.scatter_(1, iterations[:, None], log_likelihood[:, None])
    return EMResult(means, variances, log_weights, log_likelihood, iterations, converged, finite, history)


# ---------------------------------------------------------------------------------------------------------
# The module: one mixture per class, K-means initialisation, refits.
# ---------------------------------------------------------------------------------------------------------


class ClassMixtures(nn.Module):
    """One mixture of K diagonal Gaussians per class, fitted by float64 EM over all classes at once.

    Buffers (in ``state_dict``, so checkpoints and resumed runs keep the fits): ``means (C, K, D)``,
    ``variances (C, K, D)``, ``log_weights (C, K)`` (float64) and ``fitted (C,)`` bool. Fitting and sampling run
    on the buffers' device. Under DDP, gather the features of all ranks before :meth:`fit` (the fit is
    deterministic, so every rank then holds the same mixtures). The fit is computed in float64 whatever the
    buffers' dtype, and stored in it: keep the module out of ``.to(dtype)`` / ``.half()`` casts. Results do not
    depend on which classes are fitted together, up to float64 round-off (the batch's padding changes the GEMM
    shapes); the same call on the same device and thread count is bitwise repeatable.

    Initialisation of class c (``n_c`` samples): K-means (:func:`clfast.ops.kmeans`, FAISS, ``n_init_redo``
    restarts of ``kmeans_iter`` Lloyd iterations, seed ``seed + c``) on min–max-normalised features; the
    centres, mapped back to the original scale, are the initial means. ``minmax="global"`` normalises by the
    class's one minimum and maximum over all its values, as the official code does (K-means is unchanged by it
    up to float32 round-off); ``"per_dim"`` by each dimension's own (a dimension with max = min is left
    unscaled). From the hard K-means assignments: weight_k = n_k / n_c (empty clusters count as one sample);
    variance_k = mean over the cluster of (x − mean_k)² + reg_covar, or, for clusters of fewer than two
    samples, the variance of all the class's samples + reg_covar.

    Refits: a class whose log-likelihood becomes ±inf or NaN is re-initialised (K-means seed
    ``seed + c + r·num_classes`` at refit r) and its EM restarted, at most 10 times; then :meth:`fit` raises.

    Args:
        num_classes: C. dim: D. n_components: K.
        reg_covar: ≥ 0, added to every variance (and its floor).
        max_iter: M-steps at most per class (STAR-Prompt: 200 on CLIP features, 500 on ViT features).
        tol: a class stops when its mean log-likelihood per sample improves by less than this.
        n_init_redo: K-means restarts; kmeans_iter: Lloyd iterations per restart.
        gmm_torch_density: the official code's E-step density (module docstring).
        seed: K-means seeds (above).
        minmax: ``"global"`` or ``"per_dim"`` normalisation before K-means.
        max_batch_bytes: classes are fitted in batches whose padded ``[x², x]`` float64 tensor
            (``16·N_max·D`` bytes per class) stays under this; the rest of EM's memory is O(N_max·K) per class.
    """

    MAX_REFITS = 10

    def __init__(self, num_classes: int, dim: int, n_components: int = 5, *, reg_covar: float = 1e-6,
                 max_iter: int = 200, tol: float = 1e-3, n_init_redo: int = 50, kmeans_iter: int = 25,
                 gmm_torch_density: bool = False, seed: int = 0, minmax: str = "global",
                 max_batch_bytes: int = 2 ** 31):
        super().__init__()
        for name, v, lo in (("num_classes", num_classes, 1), ("dim", dim, 1), ("n_components", n_components, 1),
                            ("max_iter", max_iter, 0), ("n_init_redo", n_init_redo, 1),
                            ("kmeans_iter", kmeans_iter, 1), ("seed", seed, 0),
                            ("max_batch_bytes", max_batch_bytes, 1)):
            _check_int("ClassMixtures", name, v, lo)
        if not (isinstance(reg_covar, (int, float)) and reg_covar >= 0):
            raise ValueError(f"ClassMixtures: reg_covar must be a float >= 0, got {reg_covar!r}")
        if not isinstance(tol, (int, float)) or math.isnan(tol):
            raise ValueError(f"ClassMixtures: tol must be a float, got {tol!r}")
        if minmax not in ("global", "per_dim"):
            raise ValueError(f"ClassMixtures: minmax must be 'global' or 'per_dim', got {minmax!r}")
        self.num_classes, self.dim, self.n_components = num_classes, dim, n_components
        self.reg_covar, self.max_iter, self.tol = float(reg_covar), max_iter, float(tol)
        self.n_init_redo, self.kmeans_iter, self.seed = n_init_redo, kmeans_iter, seed
        self.gmm_torch_density, self.minmax, self.max_batch_bytes = bool(gmm_torch_density), minmax, max_batch_bytes
        C, K, D, f64 = num_classes, n_components, dim, torch.float64
        self.register_buffer("means", torch.zeros(C, K, D, dtype=f64))
        self.register_buffer("variances", torch.ones(C, K, D, dtype=f64))
        self.register_buffer("log_weights", torch.full((C, K), -math.log(K), dtype=f64))
        self.register_buffer("fitted", torch.zeros(C, dtype=torch.bool))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, dim={self.dim}, n_components={self.n_components}, "
                f"gmm_torch_density={self.gmm_torch_density}")

    # -- fitting ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def fit(self, features: Tensor, labels: Tensor, classes: Optional[Sequence[int]] = None, *,
            max_iter: Optional[int] = None) -> dict[str, Tensor]:
        """Fit the mixture of every class present in ``labels`` (or of those in ``classes``), replacing any
        earlier fit of those classes.

        Args:
            features: ``(N, D)`` any float dtype, finite, on any device.
            labels: ``(N,)`` integer class ids in ``[0, num_classes)``.
            classes: the classes to fit (each needs ≥ K samples); default: the distinct labels, ascending.
            max_iter: overrides the module's ``max_iter`` for this call.

        Returns:
            ``{"classes", "log_likelihood", "iterations", "converged", "refits"}``: CPU tensors ``(C',)`` in
            the order of ``classes`` (int64, float64 mean log-likelihood per sample, int64, bool, int64).
        """
        self._check_features("fit", features)
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
                or labels.dtype == torch.bool:
            raise TypeError(f"ClassMixtures.fit: labels must be an integer tensor, got "
                            f"{labels.dtype if isinstance(labels, Tensor) else type(labels).__name__}")
        if labels.shape != (features.shape[0],):
            raise ValueError(f"ClassMixtures.fit: labels must have shape (N,) = ({features.shape[0]},), "
                             f"got {tuple(labels.shape)}")
        if not bool(features.isfinite().all()):
            raise ValueError("ClassMixtures.fit: features must be finite (found inf or NaN)")
        labels = labels.to(features.device, torch.int64)
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"ClassMixtures.fit: labels must lie in [0, num_classes) = [0, {self.num_classes}), "
                             f"got values in [{int(labels.min())}, {int(labels.max())}]")
        cls = labels.unique() if classes is None else self._class_index("fit", classes).to(labels.device)
        if len(cls) == 0:
            raise ValueError("ClassMixtures.fit: nothing to fit (no labels, or classes is empty)")
        if len(cls.unique()) != len(cls):
            raise ValueError(f"ClassMixtures.fit: classes must not repeat, got {cls.tolist()}")
        counts = torch.bincount(labels, minlength=self.num_classes)[cls]
        short = counts < self.n_components
        if bool(short.any()):
            c = int(short.nonzero()[0, 0])
            raise ValueError(f"ClassMixtures.fit: class {int(cls[c])} has {int(counts[c])} samples in labels, "
                             f"fewer than n_components = {self.n_components}")
        max_iter = self.max_iter if max_iter is None else max_iter
        _check_int("ClassMixtures.fit", "max_iter", max_iter, 0)

        n = len(cls)
        out = {"classes": cls.cpu(), "log_likelihood": torch.empty(n, dtype=torch.float64),
               "iterations": torch.empty(n, dtype=torch.int64), "converged": torch.empty(n, dtype=torch.bool),
               "refits": torch.zeros(n, dtype=torch.int64)}
        order = counts.argsort(descending=True, stable=True).cpu()   # similar sizes batch together: less padding
        per_class = 16 * self.dim
        start = 0
        while start < n:
            n_max = int(counts[order[start]])
            stop = min(n, start + max(1, self.max_batch_bytes // (per_class * n_max)))
            self._fit_batch(features, labels, cls, order[start:stop], max_iter, out)
            start = stop
        return out

    def _fit_batch(self, features: Tensor, labels: Tensor, cls: Tensor, pick: Tensor, max_iter: int,
                   out: dict[str, Tensor]) -> None:
        """Fit classes ``cls[pick]`` as one batch and write their buffers and ``out[...][pick]``."""
        x, valid = _pad_by_class(features, labels, cls[pick], self.means.device)
        ids = cls[pick].tolist()
        init = [self._init_class(x[g][valid[g]], c, 0) for g, c in enumerate(ids)]
        means, variances, log_weights = (torch.stack(t) for t in zip(*init))
        em_kw = dict(reg_covar=self.reg_covar, max_iter=max_iter, tol=self.tol,
                     gmm_torch_density=self.gmm_torch_density)
        res = batched_em(x, valid, means, variances, log_weights, **em_kw)
        refits = torch.zeros(len(ids), dtype=torch.int64)
        for r in range(1, self.MAX_REFITS + 1):
            bad = (~res.finite).nonzero().squeeze(1)
            if len(bad) == 0:
                break
            refits[bad.cpu()] = r
            init = [self._init_class(x[g][valid[g]], ids[g], r) for g in bad.tolist()]
            redo = batched_em(x[bad], valid[bad], *(torch.stack(t) for t in zip(*init)), **em_kw)
            for f in ("means", "variances", "log_weights", "log_likelihood", "iterations", "converged", "finite"):
                getattr(res, f)[bad] = getattr(redo, f)
        if not bool(res.finite.all()):
            c = ids[int((~res.finite).nonzero()[0, 0])]
            raise RuntimeError(f"ClassMixtures.fit: the log-likelihood of class {c} stayed non-finite after "
                               f"{self.MAX_REFITS} refits (constant features with reg_covar = {self.reg_covar}?)")
        idx = cls[pick].to(self.means.device)
        self.means[idx] = res.means.to(self.means.dtype)
        self.variances[idx] = res.variances.to(self.variances.dtype)
        self.log_weights[idx] = res.log_weights.to(self.log_weights.dtype)
        self.fitted[idx] = True
        out["log_likelihood"][pick] = res.log_likelihood.cpu()
        out["iterations"][pick] = res.iterations.cpu()
        out["converged"][pick] = res.converged.cpu()
        out["refits"][pick] = refits

    def _init_class(self, x: Tensor, c: int, refit: int) -> tuple[Tensor, Tensor, Tensor]:
        """Initial ``(means (K, D), variances (K, D), log_weights (K,))`` of class ``c`` from ``x (n_c, D)``
        float64 (class docstring)."""
        K = self.n_components
        if self.minmax == "global":
            lo, hi = x.min(), x.max()
        else:
            lo, hi = x.min(0).values, x.max(0).values
        span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
        seed = (self.seed + c + refit * self.num_classes) % (2 ** 31 - 1)
        # a few hundred points: one thread (FAISS's OpenMP start-up costs more than it saves)
        centres, assign = kmeans(((x - lo) / span).float(), K, self.kmeans_iter, seed, n_redo=self.n_init_redo,
                                 min_points_per_centroid=1, n_threads=1)
        means = centres.double() * span + lo
        n_k = torch.bincount(assign, minlength=K).to(torch.float64)
        sq = torch.zeros_like(means).index_add_(0, assign, (x - means[assign]) ** 2)
        variances = torch.where((n_k >= 2)[:, None], sq / n_k.clamp_min(1)[:, None], x.var(0, unbiased=False))
        n_k = n_k.clamp_min(1)
        return means, variances + self.reg_covar, n_k.log() - n_k.sum().log()

    # -- using the fits -----------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, classes: Union[Sequence[int], Tensor], n_per_class: int,
               generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n_per_class`` synthetic features per listed class: a component drawn by its weight, then
        ``μ_k + σ_k ⊙ n`` with ``n ~ N(0, I)`` (true variances, whatever ``gmm_torch_density``).

        All randomness comes from ``generator``, drawn on its device (a CPU and a CUDA generator give different
        streams); the same generator state gives bitwise the same samples.

        Returns:
            ``(x (len(classes)·n_per_class, D) float32, y (len(classes)·n_per_class,) int64)`` on the buffers'
            device; rows ``i·n .. (i+1)·n − 1`` belong to ``classes[i]``.
        """
        idx = self._fitted_index("sample", classes)
        _check_int("ClassMixtures.sample", "n_per_class", n_per_class, 1)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"ClassMixtures.sample: generator must be a torch.Generator, got "
                            f"{type(generator).__name__}")
        gdev = generator.device
        comp = torch.multinomial(self.log_weights[idx].exp().to(gdev), n_per_class, replacement=True,
                                 generator=generator)                                         # (C', n)
        noise = torch.randn(len(idx), n_per_class, self.dim, generator=generator, device=gdev)
        dev = self.means.device
        comp, noise = comp.to(dev), noise.to(dev)
        rows = idx[:, None] * self.n_components + comp                                       # (C', n)
        mu = self.means.reshape(-1, self.dim)[rows].float()
        sigma = self.variances.reshape(-1, self.dim)[rows].sqrt().float()
        x = (mu + sigma * noise).view(-1, self.dim)
        y = idx.repeat_interleave(n_per_class)
        return x, y

    @torch.no_grad()
    def log_prob(self, x: Tensor, classes: Union[Sequence[int], Tensor]) -> Tensor:
        """``(B, len(classes))`` float64 log-density of each row of ``x (B, D)`` under each listed class's
        mixture, on the buffers' device; with ``gmm_torch_density`` the E-step's (unnormalised) density."""
        self._check_features("log_prob", x, name="x")
        idx = self._fitted_index("log_prob", classes)
        return mixture_log_prob(x, self.means[idx], self.variances[idx], self.log_weights[idx],
                                gmm_torch_density=self.gmm_torch_density)

    # -- argument checks ----------------------------------------------------------------------------------

    def _check_features(self, fn: str, t, name: str = "features") -> None:
        if not isinstance(t, Tensor):
            raise TypeError(f"ClassMixtures.{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"ClassMixtures.{fn}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dim() != 2 or t.shape[1] != self.dim:
            raise ValueError(f"ClassMixtures.{fn}: {name} must have shape (N, D) = (N, {self.dim}), "
                             f"got {tuple(t.shape)}")

    def _class_index(self, fn: str, classes) -> Tensor:
        """``classes`` (ints or an integer tensor) as an int64 tensor on the buffers' device, range-checked."""
        if isinstance(classes, Tensor):
            if classes.dtype.is_floating_point or classes.dtype == torch.bool or classes.dim() != 1:
                raise TypeError(f"ClassMixtures.{fn}: classes must be a 1-D integer tensor or a sequence of ints, "
                                f"got a {classes.dtype} tensor of shape {tuple(classes.shape)}")
            idx = classes.to(self.means.device, torch.int64)
        else:
            if isinstance(classes, (str, bytes)) or not all(
                    isinstance(c, int) and not isinstance(c, bool) for c in classes):
                raise TypeError(f"ClassMixtures.{fn}: classes must be a sequence of ints, got {classes!r}")
            idx = torch.tensor(list(classes), dtype=torch.int64, device=self.means.device)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self.num_classes):
            raise ValueError(f"ClassMixtures.{fn}: classes must lie in [0, num_classes) = [0, {self.num_classes}), "
                             f"got {idx.tolist()}")
        return idx

    def _fitted_index(self, fn: str, classes) -> Tensor:
        idx = self._class_index(fn, classes)
        if len(idx) == 0:
            raise ValueError(f"ClassMixtures.{fn}: classes must not be empty")
        missing = idx[~self.fitted[idx]]
        if len(missing):
            raise ValueError(f"ClassMixtures.{fn}: classes {missing.tolist()} have not been fitted")
        return idx


# ---------------------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------------------


def _pad_by_class(features: Tensor, labels: Tensor, classes: Tensor, device) -> tuple[Tensor, Tensor]:
    """``(x (G, N_max, D) float64 on device, valid (G, N_max) bool)``: row g holds the samples labelled
    ``classes[g]``, in their order in ``features``, then zeros."""
    classes = classes.to(labels.device)
    table = torch.full((int(max(labels.max(), classes.max())) + 1,), -1, dtype=torch.int64, device=labels.device)
    table[classes] = torch.arange(len(classes), device=labels.device)
    slot = table[labels]                                                        # each sample's row, or -1
    sel = (slot >= 0).nonzero().squeeze(1)
    slot = slot[sel]
    counts = torch.bincount(slot, minlength=len(classes))
    order = torch.argsort(slot, stable=True)
    sel, slot = sel[order], slot[order]
    pos = torch.arange(len(sel), device=sel.device) - (counts.cumsum(0) - counts)[slot]
    G, n_max = len(classes), int(counts.max())
    x = torch.zeros(G, n_max, features.shape[1], dtype=torch.float64, device=device)
    slot, pos = slot.to(device), pos.to(device)
    x[slot, pos] = features[sel.to(features.device)].to(device, torch.float64)
    valid = torch.zeros(G, n_max, dtype=torch.bool, device=device)
    valid[slot, pos] = True
    return x, valid


def _check_int(fn: str, name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{fn}: {name} must be an int >= {lo}, got {v!r}")
