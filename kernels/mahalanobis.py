"""Triton kernels of the Gaussian ops: squared Mahalanobis distances and the KL of diagonal Gaussians from a
full-covariance prior, both with the precision given by its lower Cholesky factor ``L`` (``P = L·Lᵀ``).

Math (rows times ``L``; ``c`` = mean of the means, a translation that leaves distances unchanged and keeps
the expansion well conditioned)::

    mahalanobis:  Z = [x; μ] − c,  Y = Z·L,  dist = ‖Y_x‖² + ‖Y_μ‖² − 2 Y_x Y_μᵀ  (clamped at 0)
                  dY_x = 2(r∘Y_x − G·Y_μ), dY_μ = 2(s∘Y_μ − Gᵀ·Y_x)  (r, s: row/column sums of G = d dist)
                  dZ = dY·Lᵀ,  dL = tril(Zᵀ·dY)
    gaussian_kl:  U = (m − mu)·L,  kl = ½ Σ_d (P_dd e^{lv} + U² − lv) − ½(D + log|P|)

Everything that costs is a GEMM with a triangular operand or output, so one kernel, ``_mm_kernel``, does them
all: constexpr flags skip the zero triangle of ``L`` (as the right operand, ``L`` or ``Lᵀ``) or compute only the
lower triangle of the output, and an epilogue finishes the tile (the distance with its norms and clamp, or the
``2(r∘Y − acc)`` of the backward). ``_kl_rows_kernel`` reduces the KL rows. The launchers use torch for the
cheap row/column reductions and ``torch.library.wrap_triton`` for the kernels; every input is computed in
fp32 (the expansion cancels: 16-bit inputs are upcast first), fp32 dots in 3×TF32 (fp32 accuracy).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ._common import FP32_DOT_PRECISION, INTERPRETED, aot_case

# _mm_kernel epilogues
EPI_NONE, EPI_DIST, EPI_ROWSCALE = 0, 1, 2


@triton.jit
def _mm_kernel(
        a_ptr, b_ptr, c_ptr, u_ptr, v_ptr, y_ptr,
        M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_ym, stride_yn,
        B_LOWER: tl.constexpr, B_UPPER: tl.constexpr, C_LOWER: tl.constexpr, EPILOGUE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of C = epilogue(A·B), fp32. Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)).

    B_LOWER: B is lower-triangular (B[k, n] = 0 for k < n): the k loop starts at the tile's first column.
    B_UPPER: B is upper-triangular (B = Lᵀ, B[k, n] = 0 for k > n): the k loop stops after its last column.
    C_LOWER: only the lower triangle of C is wanted; tiles above it store zeros without a k loop.
    EPILOGUE 0: C = acc. 1 (distance): C = max(u[m] + v[n] − 2·acc, 0). 2 (row scale):
    C = 2·(u[m]·Y[m, n] − acc). The triangles are masked by index, so the other triangle of B is never read."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_valid = offs_m < M
    n_valid = offs_n < N
    n_start = pid_n * BLOCK_N
    k_lo = 0
    k_hi = K
    if B_LOWER:
        k_lo = n_start
    if B_UPPER:
        k_hi = tl.minimum(K, n_start + BLOCK_N)
    if C_LOWER:  # a tile strictly above the diagonal runs no k loop
        k_hi = tl.where(pid_m * BLOCK_M + BLOCK_M <= n_start, k_lo, k_hi)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    offs_k0 = tl.arange(0, BLOCK_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + offs_k0
        k_valid = offs_k < k_hi
        a = tl.load(a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak,
                    mask=m_valid[:, None] & k_valid[None, :], other=0.0)
        b_mask = k_valid[:, None] & n_valid[None, :]
        if B_LOWER:
            b_mask = b_mask & (offs_k[:, None] >= offs_n[None, :])
        if B_UPPER:
            b_mask = b_mask & (offs_k[:, None] <= offs_n[None, :])
        b = tl.load(b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :] * stride_bn,
                    mask=b_mask, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if EPILOGUE == 1:
        u = tl.load(u_ptr + offs_m, mask=m_valid, other=0.0)
        v = tl.load(v_ptr + offs_n, mask=n_valid, other=0.0)
        acc = u[:, None] + v[None, :] - 2.0 * acc
        acc = tl.where(acc < 0.0, 0.0, acc)  # not tl.maximum, which turns NaN (a NaN or Inf input) into 0
    elif EPILOGUE == 2:
        u = tl.load(u_ptr + offs_m, mask=m_valid, other=0.0)
        y = tl.load(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn,
                    mask=m_valid[:, None] & n_valid[None, :], other=0.0)
        acc = 2.0 * (u[:, None] * y - acc)
    if C_LOWER:
        acc = tl.where(offs_m[:, None] >= offs_n[None, :], acc, 0.0)
    tl.store(c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn, acc,
             mask=m_valid[:, None] & n_valid[None, :])


@triton.jit
def _kl_rows_kernel(u_ptr, lv_ptr, rho_ptr, offset_ptr, out_ptr, B, D,
                    stride_ub, stride_ud, stride_lb, stride_ld,
                    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """kl[b] = ½ Σ_d (rho_d e^{lv_bd} + u_bd² − lv_bd) − offset, offset = ½(D + log|P|) read from memory (no host
    sync). Grid (cdiv(B, BLOCK_B),); out contiguous (B,) fp32."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    r_valid = rows < B
    acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = r_valid[:, None] & (cols < D)[None, :]
        u = tl.load(u_ptr + rows[:, None].to(tl.int64) * stride_ub + cols[None, :] * stride_ud, mask=mask, other=0.0)
        lv = tl.load(lv_ptr + rows[:, None].to(tl.int64) * stride_lb + cols[None, :] * stride_ld, mask=mask,
                     other=0.0)
        rho = tl.load(rho_ptr + cols, mask=cols < D, other=0.0)
        acc += tl.sum(rho[None, :] * tl.exp(lv) + u * u - lv, 1)
    offset = tl.load(offset_ptr)
    tl.store(out_ptr + rows, 0.5 * acc - offset, mask=r_valid)


# ---------------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------------


class Config(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Interpreted (TRITON_INTERPRET=1) on CPU tensors: 16-wide tiles (tl.dot's minimum) so that small test
# shapes cross tile and triangle boundaries.
_INTERPRETER_MM = Config(16, 16, 16, 1, 1)
_GPU_MM = Config(64, 64, 32, 4, 3)
_KL_BLOCK_B, _KL_BLOCK_D = (16, 16) if INTERPRETED else (16, 128)


def _mm(a: Tensor, b: Tensor, *, b_lower=False, b_upper=False, c_lower=False, epilogue=EPI_NONE, u=None, v=None,
        y=None, out=None) -> Tensor:
    """epilogue(a @ b) in fp32 for fp32 operands of any strides; ``out`` (M, N) may be a strided view."""
    M, K = a.shape
    N = b.shape[1]
    if out is None:
        out = torch.empty((M, N), dtype=torch.float32, device=a.device)
    if M == 0 or N == 0:
        return out
    cfg = _INTERPRETER_MM if INTERPRETED else _GPU_MM
    dummy = out
    u = dummy if u is None else u
    v = dummy if v is None else v
    y_ = dummy if y is None else y
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n))
    wrap_triton(_mm_kernel)[grid](
        a, b, out, u, v, y_, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        y_.stride(0) if y is not None else 0, y_.stride(1) if y is not None else 0,
        B_LOWER=b_lower, B_UPPER=b_upper, C_LOWER=c_lower, EPILOGUE=epilogue,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=FP32_DOT_PRECISION,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32)


def _owned(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype, copy=True)


def _centred_rows(x: Tensor, means: Tensor) -> Tensor:
    z = torch.cat([_f32(x), _f32(means)], dim=0)
    if means.shape[0] > 0:  # the mean of the finite means: a NaN/Inf mean must not reach every distance
        m = z[x.shape[0]:]
        finite = m.isfinite()
        z = z - torch.where(finite, m, 0.0).sum(0, keepdim=True) / finite.sum(0, keepdim=True).clamp_min(1)
    return z


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------


def mahalanobis_fwd(x: Tensor, means: Tensor, prec_chol: Tensor) -> tuple[Tensor, Tensor]:
    """(dist (B, K) in x's dtype, proj (B+K, D) fp32 = [x − c; μ − c]·L, saved for the backward).

    Args: x (B, D), means (K, D), prec_chol (D, D) lower (its upper triangle is never read) or (D,); any strides.
    """
    B = x.shape[0]
    L = _f32(prec_chol)
    z = _centred_rows(x, means)
    y = z * L if L.dim() == 1 else _mm(z, L, b_lower=True)
    norms = (y * y).sum(1)
    dist = _mm(y[:B], y[B:].t(), epilogue=EPI_DIST, u=norms[:B], v=norms[B:])
    return dist.to(x.dtype), y


def mahalanobis_bwd(grad: Tensor, x: Tensor, means: Tensor, prec_chol: Tensor,
                    proj: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dmeans, dprec_chol), each in its input's dtype and shape; dprec_chol is lower-triangular."""
    B, D = x.shape
    g = _f32(grad)
    L = _f32(prec_chol)
    yx, ym = proj[:B], proj[B:]
    dy = torch.empty_like(proj)
    _mm(g, ym, epilogue=EPI_ROWSCALE, u=g.sum(1), y=yx, out=dy[:B])
    _mm(g.t(), yx, epilogue=EPI_ROWSCALE, u=g.sum(0), y=ym, out=dy[B:])
    z = _centred_rows(x, means)
    if L.dim() == 1:
        dz = dy * L
        dl = (z * dy).sum(0)
    else:
        dz = _mm(dy, L.t(), b_upper=True)
        dl = _mm(z.t(), dy, c_lower=True)
    # dx and dmeans are row blocks of dz: each gets storage of its own (op outputs may not alias)
    return _owned(dz[:B], x.dtype), _owned(dz[B:], means.dtype), dl.to(prec_chol.dtype)


def _precision_diag(L: Tensor) -> tuple[Tensor, Tensor]:
    """(P_dd, Σ log L_dd) of a factor given as a matrix (lower triangle) or a diagonal vector."""
    if L.dim() == 1:
        return L * L, L.log().sum()
    return L.tril().square().sum(1), torch.diagonal(L).log().sum()


def gaussian_kl_fwd(mu: Tensor, log_var: Tensor, prior_mean: Tensor, prec_chol: Tensor) -> tuple[Tensor, Tensor]:
    """(kl (B,) in mu's dtype, proj (B, D) fp32 = (m − mu)·L, saved for the backward)."""
    B, D = mu.shape
    L = _f32(prec_chol)
    delta = (_f32(prior_mean) - _f32(mu)).expand(B, D).contiguous()
    u = delta * L if L.dim() == 1 else _mm(delta, L, b_lower=True)
    rho, log_half = _precision_diag(L)
    offset = (0.5 * D + log_half).reshape(1)
    lv = _f32(log_var)
    kl = torch.empty((B,), dtype=torch.float32, device=mu.device)
    if B > 0:
        wrap_triton(_kl_rows_kernel)[(triton.cdiv(B, _KL_BLOCK_B),)](
            u, lv, rho, offset, kl, B, D, u.stride(0), u.stride(1), lv.stride(0), lv.stride(1),
            BLOCK_B=_KL_BLOCK_B, BLOCK_D=_KL_BLOCK_D, num_warps=4, num_stages=1)
    return kl.to(mu.dtype), u


def gaussian_kl_bwd(grad: Tensor, mu: Tensor, log_var: Tensor, prior_mean: Tensor, prec_chol: Tensor,
                    proj: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dmu, dlog_var, dprior_mean, dprec_chol); a shared (D,) prior_mean gets the batch sum."""
    B, D = mu.shape
    g = _f32(grad)
    L = _f32(prec_chol)
    lv = _f32(log_var)
    delta = (_f32(prior_mean) - _f32(mu)).expand(B, D)
    rho, _ = _precision_diag(L)
    var = lv.exp()
    dlv = 0.5 * g[:, None] * (rho * var - 1.0)
    w = g @ var  # (D,): Σ_b g_b e^{lv_bd}
    gsum = g.sum()
    if L.dim() == 1:
        ddelta = g[:, None] * (proj * L)
        dl = (delta * proj * g[:, None]).sum(0) + L * w - gsum / L
    else:
        ddelta = g[:, None] * _mm(proj, L.t(), b_upper=True)
        dl = _mm((delta * g[:, None]).t(), proj, c_lower=True)
        dl += L.tril() * w[:, None]
        dl.diagonal().sub_(gsum / torch.diagonal(L))
    dprior = ddelta.sum(0) if prior_mean.dim() == 1 else ddelta
    return (-ddelta).to(mu.dtype), dlv.to(log_var.dtype), dprior.to(prior_mean.dtype), dl.to(prec_chol.dtype)


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (tests/kernels/test_triton_aot.py)
# ---------------------------------------------------------------------------------------------------

# (B_LOWER, B_UPPER, C_LOWER, EPILOGUE): the combinations the launchers use.
_MM_VARIANTS = [(True, False, False, EPI_NONE), (False, False, False, EPI_DIST), (False, False, False, EPI_ROWSCALE),
                (False, True, False, EPI_NONE), (False, False, True, EPI_NONE)]


def aot_cases() -> list:
    """Every _mm_kernel variant with the GPU tile config, and the KL row kernel."""
    cases = []
    cfg = _GPU_MM
    for b_lower, b_upper, c_lower, epi in _MM_VARIANTS:
        consts = dict(B_LOWER=b_lower, B_UPPER=b_upper, C_LOWER=c_lower, EPILOGUE=epi, BLOCK_M=cfg.block_m,
                      BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=FP32_DOT_PRECISION)
        cases.append(aot_case(_mm_kernel, consts, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}))
    cases.append(aot_case(_kl_rows_kernel, dict(BLOCK_B=16, BLOCK_D=128), {"num_warps": 4, "num_stages": 1}))
    return cases


AOT_CASES = aot_cases
