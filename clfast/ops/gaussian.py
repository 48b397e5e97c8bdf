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
ops ``clfast::mahalanobis`` and ``clfast::gaussian_kl`` (C++, custom_ops) and ``clfast::mahalanobis_triton`` and
``clfast::gaussian_kl_triton`` (triton_ops), each with its backward op, fake and autograd, so torch.compile traces
them → the public functions :func:`mahalanobis` and :func:`gaussian_kl`. The statistics that produce the factor
live in :mod:`clfast.ops.gaussian_stats`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from clfast import _triton
from clfast.ops import _backends, _dispatch
from clfast.ops._backends import LOWP, define_op
from clfast.ops._checks import check_float_tensor, shape_str
from clfast.ops._dispatch import register_backend
from clfast.ops.gaussian_stats import GaussianStats

__all__ = [
    "mahalanobis",
    "gaussian_kl",
    "GaussianStats",
    "mahalanobis_reference",
    "gaussian_kl_reference",
]

OP_MAHALANOBIS = "mahalanobis"
OP_KL = "gaussian_kl"


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


class _Tolerances:
    ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, **_LOWP_ATOL}
    GRAD_ATOL = {torch.float64: 1e-9, torch.float32: 5e-5, **_LOWP_ATOL}


def _torch_mahalanobis(x: Tensor, means: Tensor, prec_chol: Tensor) -> Tensor:
    dtype = x.dtype
    if dtype in LOWP:  # the expansion cancels: never in 16 bits
        x, means, prec_chol = x.float(), means.float(), prec_chol.float()
    # Distances are translation invariant: centring on the mean of the means keeps ‖y‖² small (accuracy). On the
    # finite means: a NaN/Inf mean must not reach every distance.
    finite = means.detach().isfinite()
    c = torch.where(finite, means.detach(), 0.0).sum(0, keepdim=True) / finite.sum(0, keepdim=True).clamp_min(1)
    y, m = _project(x - c, prec_chol), _project(means - c, prec_chol)
    sq = torch.addmm((y * y).sum(1, keepdim=True) + (m * m).sum(1)[None, :], y, m.t(), alpha=-2.0)
    return sq.clamp_min(0.0).to(dtype)


def _torch_gaussian_kl(mu: Tensor, log_var: Tensor, prior_mean: Tensor, prec_chol: Tensor) -> Tensor:
    dtype = mu.dtype
    if dtype in LOWP:
        mu, log_var, prior_mean, prec_chol = mu.float(), log_var.float(), prior_mean.float(), prec_chol.float()
    return gaussian_kl_reference(mu, log_var, prior_mean, prec_chol).to(dtype)


@register_backend
class MahalanobisReference(_Tolerances, _backends.Reference):
    OP = OP_MAHALANOBIS
    run = staticmethod(mahalanobis_reference)


@register_backend
class MahalanobisTorch(_Tolerances, _backends.Torch):
    """``addmm`` on the projected, centred rows: the best stock-PyTorch composition."""

    OP = OP_MAHALANOBIS
    run = staticmethod(_torch_mahalanobis)


@register_backend
class KLReference(_Tolerances, _backends.Reference):
    OP = OP_KL
    run = staticmethod(gaussian_kl_reference)


@register_backend
class KLTorch(_Tolerances, _backends.Torch):
    """The closed form with one GEMM, fp32 compute for 16-bit inputs."""

    OP = OP_KL
    run = staticmethod(_torch_gaussian_kl)


class _FusedMahalanobis(_Tolerances):
    """Runs the registered op ``registered`` (set below, with the op), which returns ``(dist, proj)`` where
    ``proj`` ``(B+K, D)`` (fp32 for 16-bit inputs) holds the centred, projected rows ``[x − c; μ − c]·L`` saved
    for the backward."""

    registered = None

    @classmethod
    def run(cls, x, means, prec_chol):
        return cls.registered(x, means, prec_chol)[0]


class _FusedKL(_Tolerances):
    """Runs the registered op ``registered`` (set below), which returns ``(kl, proj)`` with ``proj = (m − mu)·L``
    ``(B, D)`` saved for the backward."""

    registered = None

    @classmethod
    def run(cls, mu, log_var, prior_mean, prec_chol):
        return cls.registered(mu, log_var, prior_mean, prec_chol)[0]


@register_backend
class MahalanobisCpu(_FusedMahalanobis, _backends.Cpp):
    """C++ (csrc/mahalanobis): one triangular-blocked GEMM projects x and the means together, one GEMM gives
    the cross term, and a parallel epilogue adds the norms; the backward is hand-derived, same structure."""

    OP, KERNEL = OP_MAHALANOBIS, "mahalanobis_fwd"
    DTYPES = _backends.FLOAT

    @staticmethod
    def forward(x, means, prec_chol):
        return torch.ops._clfast_C.mahalanobis_fwd(x, means, prec_chol)

    @staticmethod
    def backward(grad, x, means, prec_chol, proj):
        return torch.ops._clfast_C.mahalanobis_bwd(grad, x, means, prec_chol, proj)


@register_backend
class KLCpu(_FusedKL, _backends.Cpp):
    """C++ (csrc/mahalanobis): one triangular-blocked GEMM, the rest fused into one pass per row."""

    OP, KERNEL = OP_KL, "gaussian_kl_fwd"
    DTYPES = _backends.FLOAT

    @staticmethod
    def forward(mu, log_var, prior_mean, prec_chol):
        return torch.ops._clfast_C.gaussian_kl_fwd(mu, log_var, prior_mean, prec_chol)

    @staticmethod
    def backward(grad, mu, log_var, prior_mean, prec_chol, proj):
        return torch.ops._clfast_C.gaussian_kl_bwd(grad, mu, log_var, prior_mean, prec_chol, proj)


class _TritonTolerances:
    # fp32 tl.dot runs as 3xTF32 on GPUs; 16-bit inputs compute in fp32.
    ATOL = {torch.float32: 1e-4 if _triton.CUDA else 2e-5, **_LOWP_ATOL}
    GRAD_ATOL = {torch.float32: 2e-4 if _triton.CUDA else 5e-5, **_LOWP_ATOL}


@register_backend
class MahalanobisTriton(_TritonTolerances, _FusedMahalanobis, _backends.Triton):
    """Triton (kernels/mahalanobis.py): triangular projection GEMM, then a distance GEMM with the norms and
    the clamp in its epilogue; the backward reuses the GEMM kernel with its other epilogues."""

    OP = OP_MAHALANOBIS


@register_backend
class KLTriton(_TritonTolerances, _FusedKL, _backends.Triton):
    """Triton (kernels/mahalanobis.py): the triangular GEMM, then one row-reduction kernel for the KL."""

    OP = OP_KL


for _op in (OP_MAHALANOBIS, OP_KL):
    _backends.set_priorities(_op)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in LOWP else dtype


# ---------------------------------------------------------------------------------------------------
# The registered ops: clfast::mahalanobis, clfast::gaussian_kl (C++) and their _triton twins, each with its
# backward op, fakes and autograd
# ---------------------------------------------------------------------------------------------------

_MAHA_SCHEMA = "(Tensor x, Tensor means, Tensor prec_chol) -> (Tensor, Tensor)"
_MAHA_BACKWARD_SCHEMA = ("(Tensor grad, Tensor x, Tensor means, Tensor prec_chol, Tensor proj) "
                         "-> (Tensor, Tensor, Tensor)")
_KL_SCHEMA = "(Tensor mu, Tensor log_var, Tensor prior_mean, Tensor prec_chol) -> (Tensor, Tensor)"
_KL_BACKWARD_SCHEMA = ("(Tensor grad, Tensor mu, Tensor log_var, Tensor prior_mean, Tensor prec_chol, "
                       "Tensor proj) -> (Tensor, Tensor, Tensor, Tensor)")


def _maha_fake(x, means, prec_chol):
    """(dist (B,K) in x's dtype, proj (B+K, D) in the compute dtype, saved for the backward)."""
    B, D = x.shape
    K = means.shape[0]
    return x.new_empty((B, K)), x.new_empty((B + K, D), dtype=_acc_dtype(x.dtype))


def _maha_backward_fake(grad, x, means, prec_chol, proj):
    """(dx, dmeans, dprec_chol), each in its input's dtype and shape."""
    return x.new_empty(x.shape), means.new_empty(means.shape), prec_chol.new_empty(prec_chol.shape)


def _kl_fake(mu, log_var, prior_mean, prec_chol):
    """(kl (B,) in mu's dtype, proj = (prior_mean − mu)·L (B, D) in the compute dtype)."""
    return mu.new_empty(mu.shape[:1]), mu.new_empty(mu.shape, dtype=_acc_dtype(mu.dtype))


def _kl_backward_fake(grad, mu, log_var, prior_mean, prec_chol, proj):
    """(dmu, dlog_var, dprior_mean, dprec_chol); a shared (D,) prior_mean gets the batch sum."""
    return (mu.new_empty(mu.shape), log_var.new_empty(log_var.shape), prior_mean.new_empty(prior_mean.shape),
            prec_chol.new_empty(prec_chol.shape))


def _save_inputs_and_proj(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1])


# op -> (schema, backward schema, fake, backward fake)
_SIGNATURES = {OP_MAHALANOBIS: (_MAHA_SCHEMA, _MAHA_BACKWARD_SCHEMA, _maha_fake, _maha_backward_fake),
               OP_KL: (_KL_SCHEMA, _KL_BACKWARD_SCHEMA, _kl_fake, _kl_backward_fake)}


def _register(op: str, suffix: str, forward, backward, *, triton: bool = False):
    """``clfast::<op><suffix>`` computed by ``forward`` (returning ``(result, proj)``), and its ``_backward`` op by
    ``backward(grad, *inputs, proj)``, tied by autograd. Returns the forward op."""
    schema, backward_schema, fake, backward_fake = _SIGNATURES[op]
    name = op + suffix
    forward_op = define_op(name, schema, forward, fake, triton=triton)
    backward_op = define_op(f"{name}_backward", backward_schema, backward, backward_fake, triton=triton)

    def _backward(ctx, grad, _dproj):
        return backward_op(grad, *ctx.saved_tensors)

    forward_op.register_autograd(_backward, setup_context=_save_inputs_and_proj)
    return getattr(torch.ops.clfast, name)


MahalanobisCpu.registered = _register(OP_MAHALANOBIS, "", MahalanobisCpu.forward, MahalanobisCpu.backward)
KLCpu.registered = _register(OP_KL, "", KLCpu.forward, KLCpu.backward)
if _backends.TRITON_OPS:
    from clfast.kernels import mahalanobis as _kern

    MahalanobisTriton.registered = _register(OP_MAHALANOBIS, "_triton", _kern.mahalanobis_fwd,
                                             _kern.mahalanobis_bwd, triton=True)
    KLTriton.registered = _register(OP_KL, "_triton", _kern.gaussian_kl_fwd, _kern.gaussian_kl_bwd, triton=True)


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------


def _check_tensor(op: str, name: str, t, dtype: Optional[torch.dtype] = None) -> None:
    """A float tensor; with ``dtype`` (the first input's), of exactly that dtype."""
    if dtype is None or not isinstance(t, Tensor):
        check_float_tensor(op, name, t)
    if dtype is not None and t.dtype != dtype:
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
            raise ValueError(f"{op}: prec_chol must have shape (D,D) or (D,) with D = {D}, got {shape_str(prec_chol)}")
        diagonal = True
    elif prec_chol.dim() == 2:
        if tuple(prec_chol.shape) != (D, D):
            raise ValueError(f"{op}: prec_chol must have shape (D,D) or (D,) with D = {D}, got {shape_str(prec_chol)}")
        diagonal = False
    else:
        raise ValueError(f"{op}: prec_chol must have shape (D,D) (lower Cholesky factor of the precision) or (D,) "
                         f"(a diagonal factor), got {shape_str(prec_chol)}")
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
        raise ValueError(f"{op}: x must have shape (B,D), got {shape_str(x)}")
    B, D = x.shape
    _check_tensor(op, "means", means, x.dtype)
    if means.dim() != 2 or means.shape[1] != D:
        raise ValueError(f"{op}: means must have shape (K,D) with D = {D} to match x, got {shape_str(means)}")
    if means.device != x.device:
        raise ValueError(f"{op}: means must be on x's device {x.device}, got {means.device}")
    diagonal = _check_prec_chol(op, prec_chol, D, x.dtype, x.device)
    return MahalanobisInputs(x.device, x.dtype, B, means.shape[0], D, diagonal)


def _validate_kl(mu, log_var, prior_mean, prec_chol) -> KLInputs:
    op = "gaussian_kl"
    _check_tensor(op, "mu", mu)
    if mu.dim() != 2:
        raise ValueError(f"{op}: mu must have shape (B,D), got {shape_str(mu)}")
    B, D = mu.shape
    _check_tensor(op, "log_var", log_var, mu.dtype)
    if tuple(log_var.shape) != (B, D):
        raise ValueError(f"{op}: log_var must have the shape of mu (B,D) = ({B},{D}), got {shape_str(log_var)}")
    _check_tensor(op, "prior_mean", prior_mean, mu.dtype)
    if not (prior_mean.dim() == 1 and prior_mean.shape[0] == D) and tuple(prior_mean.shape) != (B, D):
        raise ValueError(f"{op}: prior_mean must have shape (B,D) = ({B},{D}) or (D,) = ({D},), got "
                         f"{shape_str(prior_mean)}")
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
