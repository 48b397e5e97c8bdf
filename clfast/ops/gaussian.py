"""Gaussian ops with a shared precision given by its Cholesky factor: ``mahalanobis``, ``gaussian_kl`` and the
streaming statistics :class:`GaussianStats` that produce the factor.

The precision is ``P = L·Lᵀ`` with ``L`` lower-triangular ``(D,D)`` with a positive diagonal, or diagonal and
given as the vector ``l`` ``(D,)`` (then ``P = diag(l²)``). With ``y = (x − μ)·L`` (rows times ``L``)::

    mahalanobis:  dist[b,k] = (x_b − μ_k)ᵀ P (x_b − μ_k) = ‖x_b L‖² − 2 (x_b L)·(μ_k L) + ‖μ_k L‖²
    gaussian_kl:  KL(N(mu, diag e^{log_var}) ‖ N(m, P⁻¹))
                  = ½[Σ_d P_dd σ_d² + ‖(m − mu) L‖² − D − log|P| − Σ_d log σ_d²]
                  with P_dd = Σ_j L_dj² (squared row norms of L) and log|P| = 2 Σ_d log L_dd.

No ``(B,K,D)`` difference tensor and no ``D×D`` inverse are ever formed: the fast backends project with GEMMs
(skipping the zero triangle of ``L``), then finish with fused epilogues. This serves GPLS (its ELBO term and
optional Mahalanobis task inference), Mahalanobis class/task inference on frozen features for any method,
and STAR-Prompt's mixture-of-Gaussians responsibilities (the diagonal case).

Layers, as for every clfast op: the references (the spec) → backends (``torch``: the GEMM composition in stock
PyTorch, the bar to beat; ``cpu``: C++ in csrc/mahalanobis; ``triton``: kernels/mahalanobis.py) → the registered
ops ``clfast::mahalanobis`` and ``clfast::gaussian_kl`` (fake + autograd, so torch.compile traces them) → the
public functions :func:`mahalanobis` and :func:`gaussian_kl`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from clfast import _ext, _triton
from clfast.ops import _dispatch
from clfast.ops._dispatch import Backend, register_backend

__all__ = [
    "mahalanobis",
    "gaussian_kl",
    "GaussianStats",
    "mahalanobis_reference",
    "gaussian_kl_reference",
]

OP_MAHALANOBIS = "mahalanobis"
OP_KL = "gaussian_kl"
_FLOAT = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_LOWP = (torch.bfloat16, torch.float16)


class MahalanobisInputs(NamedTuple):
    """What backends look at to decide whether they can run a ``mahalanobis`` call."""

    device: torch.device
    dtype: torch.dtype
    batch: int
    num_means: int
    dim: int
    diagonal: bool


class KLInputs(NamedTuple):
    """What backends look at to decide whether they can run a ``gaussian_kl`` call."""

    device: torch.device
    dtype: torch.dtype
    batch: int
    dim: int
    diagonal: bool
    shared_prior: bool


# ---------------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------------


def _project(t: Tensor, prec_chol: Tensor) -> Tensor:
    """``t · L`` for a factor given as a matrix (only its lower triangle is read) or as a diagonal vector."""
    return t * prec_chol if prec_chol.dim() == 1 else t @ prec_chol.tril()


def mahalanobis_reference(x: Tensor, means: Tensor, prec_chol: Tensor) -> Tensor:
    """Explicit differences, projected: ``‖(x_b − μ_k)·L‖²``. Forms ``(B,K,D)``; the spec, not a fast path."""
    diff = x[:, None, :] - means[None, :, :]
    return _project(diff, prec_chol).pow(2).sum(-1)


def gaussian_kl_reference(mu: Tensor, log_var: Tensor, prior_mean: Tensor, prec_chol: Tensor) -> Tensor:
    """The closed form ``½[Σ P_dd σ² + ‖(m − mu)·L‖² − D − log|P| − Σ log σ²]``, row by row."""
    D = mu.shape[-1]
    if prec_chol.dim() == 1:
        diag_p, log_l = prec_chol.pow(2), prec_chol.log()
    else:
        tril = prec_chol.tril()
        diag_p, log_l = tril.pow(2).sum(1), torch.diagonal(tril).log()
    quad = _project(prior_mean - mu, prec_chol).pow(2).sum(-1)
    trace = (diag_p * log_var.exp()).sum(-1)
    return 0.5 * (trace + quad - D - 2.0 * log_l.sum() - log_var.sum(-1))


# ---------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------

# Distances come out of a cancellation (‖y‖² − 2y·m + ‖m‖², inputs centred first): errors scale with the
# squared norms, so the tests compare relative to the largest distance. Low precision computes in fp32.
_LOWP_ATOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


class _GaussianBackend(Backend):
    ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, **_LOWP_ATOL}
    GRAD_ATOL = {torch.float64: 1e-9, torch.float32: 5e-5, **_LOWP_ATOL}


def _torch_mahalanobis(x: Tensor, means: Tensor, prec_chol: Tensor) -> Tensor:
    dtype = x.dtype
    if dtype in _LOWP:  # the expansion cancels: never in 16 bits
        x, means, prec_chol = x.float(), means.float(), prec_chol.float()
    # Distances are translation invariant: centring on the mean of the means keeps ‖y‖² small (accuracy).
    c = means.mean(0, keepdim=True).detach()
    y, m = _project(x - c, prec_chol), _project(means - c, prec_chol)
    sq = torch.addmm((y * y).sum(1, keepdim=True) + (m * m).sum(1)[None, :], y, m.t(), alpha=-2.0)
    return sq.clamp_min(0.0).to(dtype)


def _torch_gaussian_kl(mu: Tensor, log_var: Tensor, prior_mean: Tensor, prec_chol: Tensor) -> Tensor:
    dtype = mu.dtype
    if dtype in _LOWP:
        mu, log_var, prior_mean, prec_chol = mu.float(), log_var.float(), prior_mean.float(), prec_chol.float()
    return gaussian_kl_reference(mu, log_var, prior_mean, prec_chol).to(dtype)


@register_backend
class MahalanobisReference(_GaussianBackend):
    OP, NAME = OP_MAHALANOBIS, "reference"
    DEVICES = ("cpu", "cuda")
    DTYPES = _FLOAT

    @staticmethod
    def run(x, means, prec_chol):
        return mahalanobis_reference(x, means, prec_chol)


@register_backend
class MahalanobisTorch(_GaussianBackend):
    """``addmm`` on the projected, centred rows: the best stock-PyTorch composition."""

    OP, NAME = OP_MAHALANOBIS, "torch"
    DEVICES = ("cpu", "cuda")
    DTYPES = _FLOAT

    @staticmethod
    def run(x, means, prec_chol):
        return _torch_mahalanobis(x, means, prec_chol)


@register_backend
class KLReference(_GaussianBackend):
    OP, NAME = OP_KL, "reference"
    DEVICES = ("cpu", "cuda")
    DTYPES = _FLOAT

    @staticmethod
    def run(mu, log_var, prior_mean, prec_chol):
        return gaussian_kl_reference(mu, log_var, prior_mean, prec_chol)


@register_backend
class KLTorch(_GaussianBackend):
    """The closed form with one GEMM, fp32 compute for 16-bit inputs."""

    OP, NAME = OP_KL, "torch"
    DEVICES = ("cpu", "cuda")
    DTYPES = _FLOAT

    @staticmethod
    def run(mu, log_var, prior_mean, prec_chol):
        return _torch_gaussian_kl(mu, log_var, prior_mean, prec_chol)


class _FusedMahalanobis(_GaussianBackend):
    """A backend whose kernels run inside the registered op ``clfast::mahalanobis``. ``forward`` returns
    ``(dist, proj)`` where ``proj`` ``(B+K, D)`` (fp32 for 16-bit inputs) holds the centred, projected rows
    ``[x − c; μ − c]·L`` saved for the backward."""

    FUSED = True

    @classmethod
    def run(cls, x, means, prec_chol):
        return torch.ops.clfast.mahalanobis(x, means, prec_chol, cls.NAME)[0]


class _FusedKL(_GaussianBackend):
    """A backend whose kernels run inside ``clfast::gaussian_kl``. ``forward`` returns ``(kl, proj)`` with
    ``proj = (m − mu)·L`` ``(B, D)`` saved for the backward."""

    FUSED = True

    @classmethod
    def run(cls, mu, log_var, prior_mean, prec_chol):
        return torch.ops.clfast.gaussian_kl(mu, log_var, prior_mean, prec_chol, cls.NAME)[0]


@register_backend
class MahalanobisCpu(_FusedMahalanobis):
    """C++ (csrc/mahalanobis): one triangular-blocked GEMM projects x and the means together, one GEMM gives
    the cross term, and a parallel epilogue adds the norms; the backward is hand-derived, same structure."""

    OP, NAME = OP_MAHALANOBIS, "cpu"
    DEVICES = ("cpu",)
    DTYPES = _FLOAT

    @classmethod
    def unavailable_reason(cls):
        return _ext.missing_op_reason("mahalanobis_fwd")

    @staticmethod
    def forward(x, means, prec_chol):
        return torch.ops._clfast_C.mahalanobis_fwd(x, means, prec_chol)

    @staticmethod
    def backward(grad, x, means, prec_chol, proj):
        return torch.ops._clfast_C.mahalanobis_bwd(grad, x, means, prec_chol, proj)


@register_backend
class KLCpu(_FusedKL):
    """C++ (csrc/mahalanobis): one triangular-blocked GEMM, the rest fused into one pass per row."""

    OP, NAME = OP_KL, "cpu"
    DEVICES = ("cpu",)
    DTYPES = _FLOAT

    @classmethod
    def unavailable_reason(cls):
        return _ext.missing_op_reason("gaussian_kl_fwd")

    @staticmethod
    def forward(mu, log_var, prior_mean, prec_chol):
        return torch.ops._clfast_C.gaussian_kl_fwd(mu, log_var, prior_mean, prec_chol)

    @staticmethod
    def backward(grad, mu, log_var, prior_mean, prec_chol, proj):
        return torch.ops._clfast_C.gaussian_kl_bwd(grad, mu, log_var, prior_mean, prec_chol, proj)


class _TritonMixin(_triton.TritonBackendMixin):
    DTYPES = (torch.float32, torch.bfloat16, torch.float16)
    # fp32 tl.dot runs as 3xTF32 on GPUs; 16-bit inputs compute in fp32.
    ATOL = {torch.float32: 1e-4 if _triton.CUDA else 2e-5, **_LOWP_ATOL}
    GRAD_ATOL = {torch.float32: 2e-4 if _triton.CUDA else 5e-5, **_LOWP_ATOL}


@register_backend
class MahalanobisTriton(_TritonMixin, _FusedMahalanobis):
    """Triton (kernels/mahalanobis.py): triangular projection GEMM, then a distance GEMM with the norms and
    the clamp in its epilogue; the backward reuses the GEMM kernel with its other epilogues."""

    OP, NAME = OP_MAHALANOBIS, "triton"

    @staticmethod
    def forward(x, means, prec_chol):
        from clfast.kernels import mahalanobis as kern

        return kern.mahalanobis_fwd(x, means, prec_chol)

    @staticmethod
    def backward(grad, x, means, prec_chol, proj):
        from clfast.kernels import mahalanobis as kern

        return kern.mahalanobis_bwd(grad, x, means, prec_chol, proj)


@register_backend
class KLTriton(_TritonMixin, _FusedKL):
    """Triton (kernels/mahalanobis.py): the triangular GEMM, then one row-reduction kernel for the KL."""

    OP, NAME = OP_KL, "triton"

    @staticmethod
    def forward(mu, log_var, prior_mean, prec_chol):
        from clfast.kernels import mahalanobis as kern

        return kern.gaussian_kl_fwd(mu, log_var, prior_mean, prec_chol)

    @staticmethod
    def backward(grad, mu, log_var, prior_mean, prec_chol, proj):
        from clfast.kernels import mahalanobis as kern

        return kern.gaussian_kl_bwd(grad, mu, log_var, prior_mean, prec_chol, proj)


for _op in (OP_MAHALANOBIS, OP_KL):
    _dispatch.set_priority(_op, "cpu", ["cpu", "torch", "reference"])
    _dispatch.set_priority(_op, "cuda", ["triton", "torch", "reference"])


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOWP else dtype


# ---------------------------------------------------------------------------------------------------
# The registered ops: clfast::mahalanobis, clfast::gaussian_kl (+ backward ops), fakes and autograd
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("clfast::mahalanobis", mutates_args=())
def _mahalanobis_op(x: Tensor, means: Tensor, prec_chol: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """Returns (dist (B,K) in x's dtype, proj (B+K, D) in the compute dtype, saved for the backward)."""
    return _dispatch.fused_backend(OP_MAHALANOBIS, backend).forward(x, means, prec_chol)


@_mahalanobis_op.register_fake
def _(x, means, prec_chol, backend):
    B, D = x.shape
    K = means.shape[0]
    return x.new_empty((B, K)), x.new_empty((B + K, D), dtype=_acc_dtype(x.dtype))


@torch.library.custom_op("clfast::mahalanobis_backward", mutates_args=())
def _mahalanobis_backward_op(grad: Tensor, x: Tensor, means: Tensor, prec_chol: Tensor, proj: Tensor,
                             backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dmeans, dprec_chol), each in its input's dtype and shape."""
    return _dispatch.fused_backend(OP_MAHALANOBIS, backend).backward(grad, x, means, prec_chol, proj)


@_mahalanobis_backward_op.register_fake
def _(grad, x, means, prec_chol, proj, backend):
    return x.new_empty(x.shape), means.new_empty(means.shape), prec_chol.new_empty(prec_chol.shape)


def _maha_setup_context(ctx, inputs, output):
    x, means, prec_chol, backend = inputs
    ctx.save_for_backward(x, means, prec_chol, output[1])
    ctx.backend = backend


def _maha_backward(ctx, grad, _dproj):
    x, means, prec_chol, proj = ctx.saved_tensors
    dx, dm, dl = torch.ops.clfast.mahalanobis_backward(grad, x, means, prec_chol, proj, ctx.backend)
    return dx, dm, dl, None


_mahalanobis_op.register_autograd(_maha_backward, setup_context=_maha_setup_context)


@torch.library.custom_op("clfast::gaussian_kl", mutates_args=())
def _gaussian_kl_op(mu: Tensor, log_var: Tensor, prior_mean: Tensor, prec_chol: Tensor,
                    backend: str) -> tuple[Tensor, Tensor]:
    """Returns (kl (B,) in mu's dtype, proj = (prior_mean − mu)·L (B, D) in the compute dtype)."""
    return _dispatch.fused_backend(OP_KL, backend).forward(mu, log_var, prior_mean, prec_chol)


@_gaussian_kl_op.register_fake
def _(mu, log_var, prior_mean, prec_chol, backend):
    return mu.new_empty(mu.shape[:1]), mu.new_empty(mu.shape, dtype=_acc_dtype(mu.dtype))


@torch.library.custom_op("clfast::gaussian_kl_backward", mutates_args=())
def _gaussian_kl_backward_op(grad: Tensor, mu: Tensor, log_var: Tensor, prior_mean: Tensor, prec_chol: Tensor,
                             proj: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dmu, dlog_var, dprior_mean, dprec_chol); a shared (D,) prior_mean gets the batch sum."""
    return _dispatch.fused_backend(OP_KL, backend).backward(grad, mu, log_var, prior_mean, prec_chol, proj)


@_gaussian_kl_backward_op.register_fake
def _(grad, mu, log_var, prior_mean, prec_chol, proj, backend):
    return (mu.new_empty(mu.shape), log_var.new_empty(log_var.shape), prior_mean.new_empty(prior_mean.shape),
            prec_chol.new_empty(prec_chol.shape))


def _kl_setup_context(ctx, inputs, output):
    mu, log_var, prior_mean, prec_chol, backend = inputs
    ctx.save_for_backward(mu, log_var, prior_mean, prec_chol, output[1])
    ctx.backend = backend


def _kl_backward(ctx, grad, _dproj):
    mu, log_var, prior_mean, prec_chol, proj = ctx.saved_tensors
    grads = torch.ops.clfast.gaussian_kl_backward(grad, mu, log_var, prior_mean, prec_chol, proj, ctx.backend)
    return (*grads, None)


_gaussian_kl_op.register_autograd(_kl_backward, setup_context=_kl_setup_context)


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------


def _shape(t: Tensor) -> str:
    return "(" + ",".join(str(s) for s in t.shape) + ")"


def _check_tensor(op: str, name: str, t, dtype: Optional[torch.dtype] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is None:
        if t.dtype not in _FLOAT:
            raise TypeError(f"{op}: {name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    elif t.dtype != dtype:
        raise TypeError(f"{op}: {name} must have the dtype of the first input ({dtype}), got {t.dtype}")


def _check_prec_chol(op: str, prec_chol, D: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Shape/dtype/device checks, then (in eager mode) the values: a positive diagonal and, for a matrix, a zero
    strictly upper triangle. A factor that passed is remembered by its version counter, so a fixed buffer
    (GPLS's per-layer factors) is checked once, not at every step. Returns whether it is the diagonal form."""
    _check_tensor(op, "prec_chol", prec_chol, dtype)
    if prec_chol.device != device:
        raise ValueError(f"{op}: prec_chol must be on the device of the other inputs ({device}), got {prec_chol.device}")
    if prec_chol.dim() == 1:
        if prec_chol.shape[0] != D:
            raise ValueError(f"{op}: prec_chol must have shape (D,D) or (D,) with D = {D}, got {_shape(prec_chol)}")
        diagonal = True
    elif prec_chol.dim() == 2:
        if tuple(prec_chol.shape) != (D, D):
            raise ValueError(f"{op}: prec_chol must have shape (D,D) or (D,) with D = {D}, got {_shape(prec_chol)}")
        diagonal = False
    else:
        raise ValueError(f"{op}: prec_chol must have shape (D,D) (lower Cholesky factor of the precision) or (D,) "
                         f"(a diagonal factor), got {_shape(prec_chol)}")
    if torch.compiler.is_compiling() or prec_chol.device.type == "meta" or D == 0:
        return diagonal
    version = prec_chol._version
    if getattr(prec_chol, "_clfast_checked_version", None) == version:
        return diagonal
    with torch.no_grad():
        diag = prec_chol if diagonal else torch.diagonal(prec_chol)
        if not bool((diag > 0).all()):
            raise ValueError(f"{op}: prec_chol must have a strictly positive diagonal (it is the Cholesky factor of "
                             "a positive-definite precision); found an entry <= 0 or NaN")
        if not diagonal and bool(torch.triu(prec_chol, 1).ne(0).any()):
            raise ValueError(f"{op}: prec_chol must be lower-triangular (its strictly upper triangle is not zero); "
                             "pass the lower Cholesky factor L of the precision P = L·Lᵀ, e.g. "
                             "torch.linalg.cholesky(P), not P itself")
    try:
        prec_chol._clfast_checked_version = version
    except (AttributeError, RuntimeError):  # tensor subclasses without a __dict__
        pass
    return diagonal


def _validate_mahalanobis(x, means, prec_chol) -> MahalanobisInputs:
    op = "mahalanobis"
    _check_tensor(op, "x", x)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must have shape (B,D), got {_shape(x)}")
    B, D = x.shape
    _check_tensor(op, "means", means, x.dtype)
    if means.dim() != 2 or means.shape[1] != D:
        raise ValueError(f"{op}: means must have shape (K,D) with D = {D} to match x, got {_shape(means)}")
    if means.device != x.device:
        raise ValueError(f"{op}: means must be on x's device {x.device}, got {means.device}")
    diagonal = _check_prec_chol(op, prec_chol, D, x.dtype, x.device)
    return MahalanobisInputs(x.device, x.dtype, B, means.shape[0], D, diagonal)


def _validate_kl(mu, log_var, prior_mean, prec_chol) -> KLInputs:
    op = "gaussian_kl"
    _check_tensor(op, "mu", mu)
    if mu.dim() != 2:
        raise ValueError(f"{op}: mu must have shape (B,D), got {_shape(mu)}")
    B, D = mu.shape
    _check_tensor(op, "log_var", log_var, mu.dtype)
    if tuple(log_var.shape) != (B, D):
        raise ValueError(f"{op}: log_var must have the shape of mu (B,D) = ({B},{D}), got {_shape(log_var)}")
    _check_tensor(op, "prior_mean", prior_mean, mu.dtype)
    if not (prior_mean.dim() == 1 and prior_mean.shape[0] == D) and tuple(prior_mean.shape) != (B, D):
        raise ValueError(f"{op}: prior_mean must have shape (B,D) = ({B},{D}) or (D,) = ({D},), got "
                         f"{_shape(prior_mean)}")
    for name, t in (("log_var", log_var), ("prior_mean", prior_mean)):
        if t.device != mu.device:
            raise ValueError(f"{op}: {name} must be on mu's device {mu.device}, got {t.device}")
    diagonal = _check_prec_chol(op, prec_chol, D, mu.dtype, mu.device)
    return KLInputs(mu.device, mu.dtype, B, D, diagonal, prior_mean.dim() == 1)


# ---------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------


def mahalanobis(x: Tensor, means: Tensor, prec_chol: Tensor) -> Tensor:
    """Squared Mahalanobis distances of every row of ``x`` to every mean, under a shared precision.

    Args:
        x: ``(B, D)`` rows; float32, bfloat16, float16 or float64.
        means: ``(K, D)``, same dtype and device.
        prec_chol: the precision's lower Cholesky factor ``L`` ``(D, D)`` (``P = L·Lᵀ``, positive diagonal, zero
            strictly upper triangle), or a diagonal factor as the vector ``(D,)`` (``P = diag(l²)``). Build it
            with :meth:`GaussianStats.precision_cholesky`.

    Returns:
        ``(B, K)`` in the dtype of ``x``: ``(x_b − μ_k)ᵀ P (x_b − μ_k) ≥ 0``. 16-bit inputs are computed in
        fp32. Differentiable w.r.t. x, means and prec_chol (the gradient of ``L`` is lower-triangular).

    Equivalent PyTorch::

        ((x[:, None] - means[None]) @ L).pow(2).sum(-1)       # or (... * l) for a diagonal factor

    Fast backends never form the ``(B,K,D)`` differences: memory is O(B·K + (B+K)·D).
    """
    inputs = _validate_mahalanobis(x, means, prec_chol)
    return _dispatch.select(OP_MAHALANOBIS, inputs).run(x, means, prec_chol)


def gaussian_kl(mu: Tensor, log_var: Tensor, prior_mean: Tensor, prec_chol: Tensor) -> Tensor:
    """KL divergence of diagonal Gaussians ``N(mu, diag e^{log_var})`` from a full-covariance prior ``N(m, P⁻¹)``.

    Args:
        mu: ``(B, D)`` posterior means; float32, bfloat16, float16 or float64.
        log_var: ``(B, D)`` posterior log-variances, same dtype.
        prior_mean: ``(B, D)`` per row or ``(D,)`` shared.
        prec_chol: the prior precision's lower Cholesky factor ``(D, D)`` or a diagonal factor ``(D,)``
            (see :func:`mahalanobis`).

    Returns:
        ``(B,)`` in the dtype of ``mu``:
        ``½[Σ_d P_dd e^{log_var_d} + ‖(m − mu)·L‖² − D − log|P| − Σ_d log_var_d]``.
        Differentiable w.r.t. every input (a shared prior_mean receives the batch sum).

    Equivalent PyTorch (float64)::

        q = MultivariateNormal(mu, scale_tril=torch.diag_embed((0.5 * log_var).exp()))
        p = MultivariateNormal(prior_mean, precision_matrix=L @ L.T)
        torch.distributions.kl_divergence(q, p)
    """
    inputs = _validate_kl(mu, log_var, prior_mean, prec_chol)
    return _dispatch.select(OP_KL, inputs).run(mu, log_var, prior_mean, prec_chol)


# ---------------------------------------------------------------------------------------------------
# Streaming statistics
# ---------------------------------------------------------------------------------------------------


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
            raise ValueError(f"GaussianStats.update: groups must have shape (N,) = ({n},), got {_shape(groups)}")
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
            raise ValueError(f"GaussianStats.update: x must have shape (N,D) with D = {self.dim}, got {_shape(x)}")
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
