"""Fused prefix attention: flash-attention-2 style Triton kernels, forward and backward.

Math (one batch row b, head h; the concatenation is never formed)::

    K' = [prefix_k ; k],  V' = [prefix_v ; v]            (P + Nk keys; kv_mask hides sequence keys only)
    S  = scale · q K'ᵀ,   lse = logsumexp(S, -1),   out = exp(S − lse) V'

Forward: online softmax (Milakov & Gimelshein 2018; Dao, "FlashAttention-2", 2023, Alg. 1) over the
prefix blocks, then the sequence blocks, in base 2 (scores pre-multiplied by log2 e). A row with
nothing to attend keeps m = −inf; it yields out = 0 and lse = −inf, never NaN.

Backward (FlashAttention-2, Alg. 2, recomputing P from the saved lse)::

    Δ   = rowsum(dout ∘ out)
    dV' = Pᵀ dout,   dP = dout V'ᵀ,   dS = P ∘ (dP − Δ)
    dq  = scale · dS K',   dK' = scale · dSᵀ q

``_bwd_kv_kernel`` owns a block of keys (prefix blocks first, then sequence blocks, in one grid) and
loops over all queries; ``_bwd_q_kernel`` owns a block of queries and loops over all keys. No atomics:
the backward is deterministic. Prefix gradients are written per sample in fp32 and, for a shared
(H,P,d) prefix, summed over the batch by torch.

The launchers use torch ops and ``torch.library.wrap_triton`` only, so ``clfast.ops`` registers them with
``torch.library.triton_op``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ._common import FP32_DOT_PRECISION, INTERPRETED, TL_DTYPE, aot_case

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with an fp32 accumulator. DOT_FP32 (interpreter only) upcasts the operands, which are
    already rounded to their storage dtype, so the interpreter reproduces the GPU's products."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _query_tile(H, NQ, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (BLOCK_M queries, b, h) tile of a grid (cdiv(NQ, BLOCK_M), B·H): b and h (int64), the query
    and head-dim offsets, and their masks. The tile's rows of a contiguous (B·H, NQ) array start at
    ``_row0(NQ)``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return b, h, offs_m, offs_d, offs_m < NQ, offs_d < D


@triton.jit
def _row0(NQ):
    """First row of this program's (b, h) in a contiguous (B·H, NQ) array (int64)."""
    return tl.program_id(1).to(tl.int64) * NQ


@triton.jit
def _load_rows(ptr, b, h, offs_m, offs_d, stride_b, stride_h, stride_m, stride_d, mask):
    """The (rows offs_m, columns offs_d) tile of the (b, h) slice of a strided (B,H,N,D) tensor, 0 off ``mask``."""
    return tl.load(ptr + b * stride_b + h * stride_h + offs_m[:, None] * stride_m + offs_d[None, :] * stride_d,
                   mask=mask, other=0.0)


@triton.jit
def _fwd_key_loop(acc, l_i, m_i, kept, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                  mask_base, stride_mn, N, qk_scale, offs_d, d_valid,
                  HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) with keys [0, N) of one key source (base 2); ``kept`` counts the
    keys attended."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(0, N, BLOCK_N):
        n = start_n + offs_n
        n_valid = n < N
        keep = n_valid
        if HAS_MASK:
            keep = keep & (tl.load(mask_base + n * stride_mn, mask=n_valid, other=0) != 0)
        kept += tl.sum(keep.to(tl.int32), 0)
        kt = tl.load(k_base + n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=n_valid[None, :] & d_valid[:, None], other=0.0)
        s = _dot(q, kt, DOT_FP32, PRECISION) * qk_scale
        s = tl.where(keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: avoid (−inf) − (−inf)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=keep[:, None] & d_valid[None, :], other=0.0)  # padding may be NaN: 0 · NaN = NaN
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32, PRECISION)
        m_i = m_new
    return acc, l_i, m_i, kept


@triton.jit
def _bwd_q_key_loop(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                    mask_base, stride_mn, N, qk_scale, offs_d, d_valid,
                    HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
                    PRECISION: tl.constexpr):
    """dq += dS K over keys [0, N) of one key source (unscaled: the caller multiplies by scale)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(0, N, BLOCK_N):
        n = start_n + offs_n
        n_valid = n < N
        keep = n_valid
        if HAS_MASK:
            keep = keep & (tl.load(mask_base + n * stride_mn, mask=n_valid, other=0) != 0)
        kd_mask = keep[:, None] & d_valid[None, :]  # padding may be NaN: never loaded (0 · NaN = NaN)
        k = tl.load(k_base + n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kd_mask, other=0.0)
        v = tl.load(v_base + n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kd_mask, other=0.0)
        s = _dot(q, tl.trans(k), DOT_FP32, PRECISION) * qk_scale
        p = tl.where(keep[None, :], tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), DOT_FP32, PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_FP32, PRECISION)
    return dq


@triton.jit
def _bwd_kv_block(q_base, do_base, lse_base, delta_base, stride_qn, stride_qd, stride_don, stride_dod,
                  stride_ln, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                  mask_base, stride_mn, dk_base, dv_base, start_n, N, NQ, D, qk_scale, scale,
                  HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV of keys [start_n, start_n + BLOCK_N) of one key source, looping over every query.
    dk_base/dv_base point at a contiguous (N, D) output."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < N
    d_valid = offs_d < D
    kd_mask = n_valid[:, None] & d_valid[None, :]
    keep = n_valid
    if HAS_MASK:
        keep = keep & (tl.load(mask_base + offs_n * stride_mn, mask=n_valid, other=0) != 0)
    kv_load = keep[:, None] & d_valid[None, :]  # padding may be NaN: never loaded (0 · NaN = NaN)
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_load, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_load, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(0, NQ, BLOCK_M):
        offs_m = start_m + offs_m0
        m_valid = offs_m < NQ
        md_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=md_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod, mask=md_mask,
                     other=0.0)
        lse = tl.load(lse_base + offs_m * stride_ln, mask=m_valid, other=float("inf"))
        # A row with nothing to attend (lse = −inf) gets P = 0: use +inf instead.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(delta_base + offs_m, mask=m_valid, other=0.0)
        st = _dot(k, tl.trans(q), DOT_FP32, PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        pt = tl.where(keep[:, None], tl.math.exp2(st - lse2[None, :]), 0.0)
        dv += _dot(pt.to(do.dtype), do, DOT_FP32, PRECISION)
        dpt = _dot(v, tl.trans(do), DOT_FP32, PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, DOT_FP32, PRECISION)
    dk = dk * scale
    out_offs = offs_n[:, None] * D + offs_d[None, :]
    tl.store(dk_base + out_offs, dk.to(dk_base.dtype.element_ty), mask=kd_mask)
    tl.store(dv_base + out_offs, dv.to(dv_base.dtype.element_ty), mask=kd_mask)


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
        q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, mask_ptr, out_ptr, lse_ptr,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_pkb, stride_pkh, stride_pkn, stride_pkd,
        stride_pvb, stride_pvh, stride_pvn, stride_pvd,
        stride_mb, stride_mn,
        H, NQ, NK, P, D, qk_scale,
        HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """out, lse of one (BLOCK_M queries, b, h) tile. Grid (cdiv(NQ, BLOCK_M), B·H).

    qk_scale = scale·log2 e. A shared prefix comes with stride_pkb = stride_pvb = 0. out is contiguous
    (B,H,NQ,D) and lse contiguous (B,H,NQ)."""
    b, h, offs_m, offs_d, m_valid, d_valid = _query_tile(H, NQ, D, BLOCK_M, BLOCK_D)
    md_mask = m_valid[:, None] & d_valid[None, :]
    q = _load_rows(q_ptr, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qn, stride_qd, md_mask)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kept = tl.zeros([], dtype=tl.int32)
    mask_base = mask_ptr + b * stride_mb
    acc, l_i, m_i, kept = _fwd_key_loop(
        acc, l_i, m_i, kept, q, pk_ptr + b * stride_pkb + h * stride_pkh, pv_ptr + b * stride_pvb + h * stride_pvh,
        stride_pkn, stride_pkd, stride_pvn, stride_pvd, mask_base, stride_mn, P, qk_scale, offs_d, d_valid,
        False, BLOCK_N, DOT_FP32, PRECISION)
    acc, l_i, m_i, kept = _fwd_key_loop(
        acc, l_i, m_i, kept, q, k_ptr + b * stride_kb + h * stride_kh, v_ptr + b * stride_vb + h * stride_vh,
        stride_kn, stride_kd, stride_vn, stride_vd, mask_base, stride_mn, NK, qk_scale, offs_d, d_valid,
        HAS_MASK, BLOCK_N, DOT_FP32, PRECISION)
    attended = l_i > 0.0
    l_safe = tl.where(attended, l_i, 1.0)
    out = acc / l_safe[:, None]
    # keys attended but every score -inf (a non-finite q or k): softmax is 0/0, NaN as in the reference
    out = tl.where(((kept > 0) & (l_i == 0.0))[:, None], float("nan"), out)
    lse = tl.where(attended, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    row = _row0(NQ) + offs_m
    tl.store(out_ptr + row[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=md_mask)
    tl.store(lse_ptr + row, lse, mask=m_valid)


@triton.jit
def _bwd_preprocess_kernel(
        out_ptr, do_ptr, delta_ptr,
        stride_ob, stride_oh, stride_on, stride_od,
        stride_dob, stride_doh, stride_don, stride_dod,
        H, NQ, D,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dout ∘ out) in fp32, contiguous (B,H,NQ). Grid (cdiv(NQ, BLOCK_M), B·H)."""
    b, h, offs_m, offs_d, m_valid, d_valid = _query_tile(H, NQ, D, BLOCK_M, BLOCK_D)
    md_mask = m_valid[:, None] & d_valid[None, :]
    o = _load_rows(out_ptr, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_on, stride_od, md_mask)
    do = _load_rows(do_ptr, b, h, offs_m, offs_d, stride_dob, stride_doh, stride_don, stride_dod, md_mask)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + _row0(NQ) + offs_m, delta, mask=m_valid)


@triton.jit
def _bwd_kv_kernel(
        q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr,
        dk_ptr, dv_ptr, dpk_ptr, dpv_ptr,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_pkb, stride_pkh, stride_pkn, stride_pkd,
        stride_pvb, stride_pvh, stride_pvn, stride_pvd,
        stride_mb, stride_mn,
        stride_dob, stride_doh, stride_don, stride_dod,
        stride_lb, stride_lh, stride_ln,
        H, NQ, NK, P, D, qk_scale, scale,
        HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """dK', dV' of one (BLOCK_N keys, b, h) tile. Grid (cdiv(P, BLOCK_N) + cdiv(NK, BLOCK_N), B·H):
    the first cdiv(P, BLOCK_N) key blocks are prefix keys, written to the per-sample fp32 buffers
    dpk/dpv (B,H,P,D); the rest are sequence keys, written to dk/dv (B,H,NK,D). All outputs contiguous;
    delta contiguous (B,H,NQ)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    lse_base = lse_ptr + b * stride_lb + h * stride_lh
    delta_base = delta_ptr + bh * NQ
    mask_base = mask_ptr + b * stride_mb
    n_prefix_blocks = tl.cdiv(P, BLOCK_N)
    if pid_n < n_prefix_blocks:
        _bwd_kv_block(q_base, do_base, lse_base, delta_base, stride_qn, stride_qd, stride_don, stride_dod,
                      stride_ln, pk_ptr + b * stride_pkb + h * stride_pkh, pv_ptr + b * stride_pvb + h * stride_pvh,
                      stride_pkn, stride_pkd, stride_pvn, stride_pvd, mask_base, stride_mn,
                      dpk_ptr + bh * P * D, dpv_ptr + bh * P * D, pid_n * BLOCK_N, P, NQ, D, qk_scale, scale,
                      False, BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, PRECISION)
    else:
        _bwd_kv_block(q_base, do_base, lse_base, delta_base, stride_qn, stride_qd, stride_don, stride_dod,
                      stride_ln, k_ptr + b * stride_kb + h * stride_kh, v_ptr + b * stride_vb + h * stride_vh,
                      stride_kn, stride_kd, stride_vn, stride_vd, mask_base, stride_mn,
                      dk_ptr + bh * NK * D, dv_ptr + bh * NK * D, (pid_n - n_prefix_blocks) * BLOCK_N, NK, NQ, D,
                      qk_scale, scale, HAS_MASK, BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, PRECISION)


@triton.jit
def _bwd_q_kernel(
        q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_pkb, stride_pkh, stride_pkn, stride_pkd,
        stride_pvb, stride_pvh, stride_pvn, stride_pvd,
        stride_mb, stride_mn,
        stride_dob, stride_doh, stride_don, stride_dod,
        stride_lb, stride_lh, stride_ln,
        H, NQ, NK, P, D, qk_scale, scale,
        HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """dq of one (BLOCK_M queries, b, h) tile, over the prefix keys then the sequence keys.
    Grid (cdiv(NQ, BLOCK_M), B·H); dq contiguous (B,H,NQ,D), delta contiguous (B,H,NQ)."""
    b, h, offs_m, offs_d, m_valid, d_valid = _query_tile(H, NQ, D, BLOCK_M, BLOCK_D)
    md_mask = m_valid[:, None] & d_valid[None, :]
    q = _load_rows(q_ptr, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qn, stride_qd, md_mask)
    do = _load_rows(do_ptr, b, h, offs_m, offs_d, stride_dob, stride_doh, stride_don, stride_dod, md_mask)
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_m * stride_ln, mask=m_valid, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(delta_ptr + _row0(NQ) + offs_m, mask=m_valid, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    mask_base = mask_ptr + b * stride_mb
    dq = _bwd_q_key_loop(
        dq, q, do, lse2, delta, pk_ptr + b * stride_pkb + h * stride_pkh, pv_ptr + b * stride_pvb + h * stride_pvh,
        stride_pkn, stride_pkd, stride_pvn, stride_pvd, mask_base, stride_mn, P, qk_scale, offs_d, d_valid,
        False, BLOCK_N, DOT_FP32, PRECISION)
    dq = _bwd_q_key_loop(
        dq, q, do, lse2, delta, k_ptr + b * stride_kb + h * stride_kh, v_ptr + b * stride_vb + h * stride_vh,
        stride_kn, stride_kd, stride_vn, stride_vd, mask_base, stride_mn, NK, qk_scale, offs_d, d_valid,
        HAS_MASK, BLOCK_N, DOT_FP32, PRECISION)
    dq = dq * scale
    row = _row0(NQ) + offs_m
    tl.store(dq_ptr + row[:, None] * D + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=md_mask)


# ---------------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------------


class Config(NamedTuple):
    block_m: int  # queries per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


# Interpreted kernels (TRITON_INTERPRET=1 at import) run on CPU tensors: small tiles, so that test
# shapes of a few dozen tokens still cross block boundaries. 16 is tl.dot's minimum.
_INTERPRETER_CONFIG = Config(16, 16, 1, 1)
_PREPROCESS_BLOCK_M = 64


def block_d(head_dim: int) -> int:
    """The padded head dimension of the tiles: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


# (kernel, widest padded head dim) -> (16-bit config, fp32 config). Untuned defaults (written without a
# GPU): FlashAttention-2-like tiles for 16-bit inputs. fp32 is the accuracy mode: its 3xTF32 tl.dot
# splits every operand in two, doubling registers and shared memory, so it gets small tiles (which also
# keep its compile time to about a second). Every entry stays under 100 KB of shared memory on sm_80
# and sm_90, so it also fits sm_86/sm_89; the AOT test checks the sm_80/sm_90 limits.
_CONFIGS = {
    ("fwd", 64): (Config(64, 64, 4, 3), Config(64, 32, 4, 1)),
    ("fwd", 128): (Config(64, 64, 4, 2), Config(64, 32, 4, 1)),
    ("fwd", 256): (Config(64, 32, 8, 2), Config(32, 32, 4, 1)),
    ("bwd_kv", 64): (Config(64, 64, 4, 2), Config(32, 32, 4, 1)),
    ("bwd_kv", 128): (Config(32, 64, 8, 2), Config(32, 32, 4, 1)),
    ("bwd_kv", 256): (Config(32, 32, 8, 1), Config(16, 16, 4, 1)),
    ("bwd_q", 64): (Config(64, 64, 4, 2), Config(32, 32, 4, 1)),
    ("bwd_q", 128): (Config(64, 32, 8, 2), Config(32, 32, 4, 1)),
    ("bwd_q", 256): (Config(32, 32, 8, 1), Config(16, 16, 4, 1)),
}


def config(kernel: str, head_dim_block: int, dtype: torch.dtype) -> Config:
    """GPU tile sizes for kernel "fwd", "bwd_kv" or "bwd_q" at a padded head dim and dtype."""
    if kernel not in ("fwd", "bwd_kv", "bwd_q"):
        raise ValueError(f"unknown kernel {kernel!r}")
    bucket = 64 if head_dim_block <= 64 else 128 if head_dim_block <= 128 else 256
    low, fp32 = _CONFIGS[(kernel, bucket)]
    return fp32 if dtype == torch.float32 else low


def _launch_config(kernel: str, head_dim_block: int, dtype: torch.dtype) -> Config:
    return _INTERPRETER_CONFIG if INTERPRETED else config(kernel, head_dim_block, dtype)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------


def _check_head_dim(d: int) -> None:
    if d > MAX_HEAD_DIM:
        raise ValueError(f"prefix_attention (triton): head dim d={d} is above the kernels' {MAX_HEAD_DIM}")


def _prefix_args(prefix_k: Optional[Tensor], prefix_v: Optional[Tensor], k: Tensor, v: Tensor):
    """(pk, pv, P, pk strides, pv strides) with 4 strides each; a shared (H,P,d) prefix gets batch
    stride 0; no prefix becomes P = 0 with k/v standing in as (never read) pointers."""
    if prefix_k is None or prefix_k.shape[-2] == 0:
        return k, v, 0, k.stride(), v.stride()
    if prefix_k.dim() == 3:
        return (prefix_k, prefix_v, prefix_k.shape[1], (0, *prefix_k.stride()), (0, *prefix_v.stride()))
    return prefix_k, prefix_v, prefix_k.shape[2], prefix_k.stride(), prefix_v.stride()


def _mask_args(kv_mask: Optional[Tensor], like: Tensor):
    """(uint8 mask pointer, (stride_b, stride_n), HAS_MASK)."""
    if kv_mask is None:
        return torch.empty((1,), dtype=torch.uint8, device=like.device), (0, 0), False
    m = kv_mask.view(torch.uint8) if kv_mask.dtype == torch.bool else kv_mask.to(torch.uint8)
    return m, m.stride(), True


def prefix_attention_fwd(q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor], prefix_v: Optional[Tensor],
                         kv_mask: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    """Forward of prefix attention: (out (B,H,Nq,d) in q's dtype, contiguous; lse (B,H,Nq) float32).

    Args:
        q: (B,H,Nq,d); k, v: (B,H,Nk,d); any strides; float32, bfloat16 or float16; d <= 256.
        prefix_k, prefix_v: (B,H,P,d) per sample, (H,P,d) shared, or both None; P may be 0.
        kv_mask: (B,Nk) bool, True = attend; masks sequence keys only, never the prefix. Or None.
        scale: multiplies q·kᵀ (a Python float).
    """
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    _check_head_dim(D)
    pk, pv, P, spk, spv = _prefix_args(prefix_k, prefix_v, k, v)
    mask, smask, has_mask = _mask_args(kv_mask, q)
    out = torch.empty((B, H, NQ, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    bd = block_d(D)
    cfg = _launch_config("fwd", bd, q.dtype)
    grid = (triton.cdiv(NQ, cfg.block_m), B * H)
    wrap_triton(_fwd_kernel)[grid](
        q, k, v, pk, pv, mask, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *spk, *spv, *smask,
        H, NQ, NK, P, D, scale * LOG2E,
        HAS_MASK=has_mask, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd,
        DOT_FP32=INTERPRETED, PRECISION=FP32_DOT_PRECISION,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def prefix_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor],
                         prefix_v: Optional[Tensor], kv_mask: Optional[Tensor], out: Tensor, lse: Tensor,
                         scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of prefix attention: (dq, dk, dv, dprefix_k, dprefix_v), each in its input's dtype and
    shape (contiguous). A shared (H,P,d) prefix gets the batch sum; no prefix gives empty tensors.
    ``out`` and ``lse`` are the forward's outputs; every tensor may have any strides."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    _check_head_dim(D)
    dev = q.device
    pk, pv, P, spk, spv = _prefix_args(prefix_k, prefix_v, k, v)
    mask, smask, has_mask = _mask_args(kv_mask, q)
    dq = torch.empty((B, H, NQ, D), dtype=q.dtype, device=dev)
    dk = torch.empty((B, H, NK, D), dtype=k.dtype, device=dev)
    dv = torch.empty((B, H, NK, D), dtype=v.dtype, device=dev)
    # Prefix grads per sample, in fp32 so that a shared prefix's batch sum rounds once.
    dpk32 = torch.empty((B, H, P, D) if P else (1,), dtype=torch.float32, device=dev)
    dpv32 = torch.empty((B, H, P, D) if P else (1,), dtype=torch.float32, device=dev)
    if B * H * D > 0 and (NQ > 0 or NK > 0 or P > 0):
        bd = block_d(D)
        common = dict(BLOCK_D=bd, DOT_FP32=INTERPRETED, PRECISION=FP32_DOT_PRECISION)
        args = (*q.stride(), *k.stride(), *v.stride(), *spk, *spv, *smask, *dout.stride(), *lse.stride(),
                H, NQ, NK, P, D, scale * LOG2E, scale)
        delta = torch.empty((B, H, NQ), dtype=torch.float32, device=dev)
        if NQ > 0:
            bm = _INTERPRETER_CONFIG.block_m if INTERPRETED else _PREPROCESS_BLOCK_M
            wrap_triton(_bwd_preprocess_kernel)[(triton.cdiv(NQ, bm), B * H)](
                out, dout, delta, *out.stride(), *dout.stride(), H, NQ, D,
                BLOCK_M=bm, BLOCK_D=bd, num_warps=4, num_stages=1)
        cfg = _launch_config("bwd_kv", bd, q.dtype)
        grid = (triton.cdiv(P, cfg.block_n) + triton.cdiv(NK, cfg.block_n), B * H)
        if grid[0] > 0:
            wrap_triton(_bwd_kv_kernel)[grid](
                q, k, v, pk, pv, mask, dout, lse, delta, dk, dv, dpk32, dpv32, *args,
                HAS_MASK=has_mask, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **common,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        cfg = _launch_config("bwd_q", bd, q.dtype)
        if NQ > 0:
            wrap_triton(_bwd_q_kernel)[(triton.cdiv(NQ, cfg.block_m), B * H)](
                q, k, v, pk, pv, mask, dout, lse, delta, dq, *args,
                HAS_MASK=has_mask, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **common,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if prefix_k is None:
        return dq, dk, dv, q.new_empty((0,)), q.new_empty((0,))
    if P == 0:
        return dq, dk, dv, torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
    if prefix_k.dim() == 3:
        return dq, dk, dv, dpk32.sum(0).to(prefix_k.dtype), dpv32.sum(0).to(prefix_v.dtype)
    return dq, dk, dv, dpk32.to(prefix_k.dtype), dpv32.to(prefix_v.dtype)


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (tests/kernels/test_triton_aot.py)
# ---------------------------------------------------------------------------------------------------

_FP32_PTRS = ("lse_ptr", "delta_ptr", "dpk_ptr", "dpv_ptr")
# Strides the JIT sees as 1 for contiguous inputs (and then specialises as constants).
_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_pkd", "stride_pvd", "stride_mn", "stride_od",
                 "stride_dod", "stride_ln")


def _aot_case(fn, dtype: torch.dtype, constexprs: dict, cfg: Optional[Config] = None):
    consts = {**constexprs, **{name: 1 for name in _UNIT_STRIDES if name in fn.arg_names}}

    def types(name):
        if name == "mask_ptr":
            return "*u8"
        if name.endswith("_ptr"):
            return "*fp32" if name in _FP32_PTRS else "*" + TL_DTYPE[dtype]
        return "fp32" if name in ("qk_scale", "scale") else None

    options = None if cfg is None else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return aot_case(fn, consts, options, types=types)


def aot_cases() -> list:
    """A covering set, not the full product (each case costs 1-4 s of CPU, twice): for each of the
    three attention kernels, every tile configuration of ``config`` (16-bit head-dim buckets 64, 128,
    256; fp32 buckets 128 and 256), every BLOCK_D (16 to 256), every dtype and both HAS_MASK values; the
    preprocess kernel in every dtype."""
    cases = []
    combos = [(torch.bfloat16, 64, True), (torch.bfloat16, 64, False), (torch.float16, 64, True),
              (torch.float32, 64, False), (torch.float16, 16, False), (torch.bfloat16, 32, True),
              (torch.bfloat16, 128, True), (torch.bfloat16, 256, True), (torch.float32, 256, True)]
    for dtype, bd, has_mask in combos:
        for name, fn in (("fwd", _fwd_kernel), ("bwd_kv", _bwd_kv_kernel), ("bwd_q", _bwd_q_kernel)):
            cfg = config(name, bd, dtype)
            cases.append(_aot_case(fn, dtype, dict(
                HAS_MASK=has_mask, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd, DOT_FP32=False,
                PRECISION=FP32_DOT_PRECISION), cfg))
    for dtype, bd in ((torch.float32, 64), (torch.bfloat16, 256), (torch.float16, 16)):
        cases.append(_aot_case(_bwd_preprocess_kernel, dtype, dict(BLOCK_M=_PREPROCESS_BLOCK_M, BLOCK_D=bd),
                               Config(_PREPROCESS_BLOCK_M, 0, 4, 1)))
    return cases


AOT_CASES = aot_cases
