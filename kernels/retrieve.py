"""Fused similarity + top-k retrieval: Triton kernel and launcher.

Math (query row b, key m; see clfast.ops.retrieval for the spec)::

    dot    = <q_b, key_m>                                   (tl.dot over D in BLOCK_D chunks, fp32 acc)
    cosine = dot · q_aux_b / max(|key_m|, eps),   q_aux_b = 1 / max(|q_b|, eps)
    ip     = dot
    l2     = 2·dot − |key_m|² − q_aux_b,          q_aux_b = |q_b|²
    result = the K best (score desc, index asc) per row;  NaN scores count as −inf

Grid (query blocks, key splits). A program owns BLOCK_B queries and one contiguous split of the keys; it
walks the split in BLOCK_N-key blocks, computes the (BLOCK_B, BLOCK_N) scores (key norms come from the same
loaded tiles) and merges them into a running top-K held in registers as (BLOCK_B, KPAD) values and int32
indices. The merge runs K rounds of "take the best remaining of list ∪ block" (maximum score, then the
minimum index among equal scores, so ties go to the lower index), and is skipped outright when no score of
the block reaches the current K-th value (the common case once the list has warmed up). Each split writes
its sorted list; the launcher merges the n_splits·K candidates of a row with a stable sort, which keeps the
(score desc, index asc) order because splits are in index order. The (B, M) matrix never exists; scratch is
(n_splits, B, K).

The launcher uses torch ops and ``torch.library.wrap_triton`` only. Nothing here imports clfast.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ._common import FP32_DOT_PRECISION, INTERPRETED, TL_DTYPE, aot_case

METRICS = {"cosine": 0, "ip": 1, "l2": 2}
NORM_EPS = 1e-12
MAX_K = 64
INT32_MAX = 2 ** 31 - 1


@triton.jit
def _retrieve_topk_kernel(
        q_ptr, k_ptr, qaux_ptr, out_s_ptr, out_i_ptr,
        B, M, D, keys_per_split,
        stride_qb, stride_qd, stride_km, stride_kd,
        METRIC: tl.constexpr, K: tl.constexpr, KPAD: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """out_s/out_i: (n_splits, B, K) float32 / int32, each row sorted by (score desc, index asc); slots
    beyond the split's key count hold (−inf, INT32_MAX)."""
    BIG: tl.constexpr = 2147483647
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    q_aux = tl.load(qaux_ptr + rows, mask=row_ok, other=0.0)
    n_lo = pid_s * keys_per_split
    n_hi = tl.minimum(n_lo + keys_per_split, M)
    cols = tl.arange(0, KPAD)
    top_s = tl.full((BLOCK_B, KPAD), float("-inf"), tl.float32)
    top_i = tl.full((BLOCK_B, KPAD), BIG, tl.int32)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D)
    for start in range(n_lo, n_hi, BLOCK_N):
        n = start + offs_n0
        n_ok = n < n_hi
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        k_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d0
            d_ok = d < D
            q = tl.load(q_ptr + rows[:, None] * stride_qb + d[None, :] * stride_qd,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            kt = tl.load(k_ptr + n[None, :].to(tl.int64) * stride_km + d[:, None] * stride_kd,
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
            if DOT_FP32:
                acc += tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision=PRECISION)
            else:
                acc += tl.dot(q, kt.to(q.dtype), input_precision=PRECISION)
            if METRIC != 1:
                kf = kt.to(tl.float32)
                k_sq += tl.sum(kf * kf, axis=0)
        if METRIC == 0:
            s = acc * q_aux[:, None] * (1.0 / tl.maximum(tl.sqrt(k_sq), 1e-12))[None, :]
        elif METRIC == 1:
            s = acc
        else:
            s = 2.0 * acc - k_sq[None, :] - q_aux[:, None]
        s = tl.where(s != s, float("-inf"), s)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        s_i = tl.where(n_ok, n, BIG)[None, :] + tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.int32)
        # the K-th entry of the sorted list: a block without a score >= it cannot change the list
        kth = tl.max(tl.where(cols[None, :] == K - 1, top_s, float("-inf")), axis=1)
        reach = tl.max(tl.where(row_ok & (tl.max(s, axis=1) >= kth), 1, 0), axis=0)
        if reach > 0:
            new_s = tl.full((BLOCK_B, KPAD), float("-inf"), tl.float32)
            new_i = tl.full((BLOCK_B, KPAD), BIG, tl.int32)
            for r in range(K):
                best = tl.maximum(tl.max(top_s, axis=1), tl.max(s, axis=1))
                pick = tl.minimum(tl.min(tl.where(top_s == best[:, None], top_i, BIG), axis=1),
                                  tl.min(tl.where(s == best[:, None], s_i, BIG), axis=1))
                new_s = tl.where(cols[None, :] == r, best[:, None], new_s)
                new_i = tl.where(cols[None, :] == r, pick[:, None], new_i)
                taken = top_i == pick[:, None]
                top_s = tl.where(taken, float("-inf"), top_s)
                top_i = tl.where(taken, BIG, top_i)
                taken = s_i == pick[:, None]
                s = tl.where(taken, float("-inf"), s)
                s_i = tl.where(taken, BIG, s_i)
            top_s = new_s
            top_i = new_i
    out = (pid_s * B + rows)[:, None].to(tl.int64) * K + cols[None, :]
    ok = row_ok[:, None] & (cols[None, :] < K)
    tl.store(out_s_ptr + out, top_s, mask=ok)
    tl.store(out_i_ptr + out, top_i, mask=ok)


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------

def block_d(dim: int) -> int:
    """BLOCK_D: a power of two, at least 16 (tl.dot's minimum), at most 64 (D is looped over)."""
    return min(64, max(16, triton.next_power_of_2(dim)))


def kpad(k: int) -> int:
    return max(2, triton.next_power_of_2(k))


def config(dtype: torch.dtype, k: int) -> tuple[int, int, int, int]:
    """GPU (BLOCK_B, BLOCK_N, num_warps, num_stages) for a key dtype and k."""
    if k > 16:
        return 32, 64, 4, 2
    return (64, 64, 4, 3) if dtype != torch.float32 else (64, 64, 4, 2)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def retrieve_topk(query: Tensor, keys: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
    """(scores (B,k) float32, indices (B,k) int64), each row by (score desc, index asc).

    Args:
        query: (B, D) float32, or the keys' dtype; any strides.
        keys: (M, D) float32, bfloat16 or float16; any strides; M < 2^31 − 1.
        k: 1 <= k <= min(M, 64).
        metric: "cosine", "ip" or "l2".
    """
    B, D = query.shape
    M = keys.shape[0]
    dev = query.device
    if not 1 <= k <= min(M, MAX_K):
        raise ValueError(f"retrieve_topk: k must be in [1, min(M, {MAX_K})], got {k} with M = {M}")
    if B == 0:
        return (torch.empty((0, k), dtype=torch.float32, device=dev),
                torch.empty((0, k), dtype=torch.int64, device=dev))
    mcode = METRICS[metric]
    q_sq = query.float().pow(2).sum(-1)
    if mcode == 0:
        q_aux = 1.0 / q_sq.sqrt().clamp_min(NORM_EPS)
    elif mcode == 2:
        q_aux = q_sq
    else:
        q_aux = torch.zeros_like(q_sq)
    q_aux = q_aux.contiguous()
    if INTERPRETED:
        bb, bn, warps, stages = 16, 16, 1, 1
        n_splits = min(3, triton.cdiv(M, bn))
    else:
        bb, bn, warps, stages = config(keys.dtype, k)
        want = 4 * _sm_count(dev.index if dev.index is not None else torch.cuda.current_device())
        n_splits = max(1, min(triton.cdiv(want, triton.cdiv(B, bb)), triton.cdiv(M, 4 * bn)))
    per_split = triton.cdiv(triton.cdiv(M, n_splits), bn) * bn
    n_splits = triton.cdiv(M, per_split)
    out_s = torch.empty((n_splits, B, k), dtype=torch.float32, device=dev)
    out_i = torch.empty((n_splits, B, k), dtype=torch.int32, device=dev)
    grid = (triton.cdiv(B, bb), n_splits)
    wrap_triton(_retrieve_topk_kernel)[grid](
        query, keys, q_aux, out_s, out_i, B, M, D, per_split,
        *query.stride(), *keys.stride(),
        METRIC=mcode, K=k, KPAD=kpad(k), BLOCK_B=bb, BLOCK_N=bn, BLOCK_D=block_d(D),
        DOT_FP32=INTERPRETED or query.dtype != keys.dtype, PRECISION=FP32_DOT_PRECISION,
        num_warps=warps, num_stages=stages)
    # merge the splits: index order first (padding, INT32_MAX, last), then a stable sort by score
    s = out_s.permute(1, 0, 2).reshape(B, n_splits * k)
    i = out_i.permute(1, 0, 2).reshape(B, n_splits * k).to(torch.int64)
    i, perm = i.sort(dim=1)
    s = s.gather(1, perm)
    s, order = torch.sort(s, dim=1, descending=True, stable=True)
    return s[:, :k].contiguous(), i.gather(1, order[:, :k]).contiguous()


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (tests/kernels/test_triton_aot.py)
# ---------------------------------------------------------------------------------------------------

def _aot_case(q_dtype: torch.dtype, k_dtype: torch.dtype, metric: int, k: int):
    bb, bn, warps, stages = config(k_dtype, k)
    consts = dict(METRIC=metric, K=k, KPAD=kpad(k), BLOCK_B=bb, BLOCK_N=bn, BLOCK_D=64,
                  DOT_FP32=q_dtype != k_dtype, PRECISION=FP32_DOT_PRECISION, stride_qd=1, stride_kd=1)
    pointers = {"q_ptr": "*" + TL_DTYPE[q_dtype], "k_ptr": "*" + TL_DTYPE[k_dtype], "out_i_ptr": "*i32"}
    return aot_case(_retrieve_topk_kernel, consts, {"num_warps": warps, "num_stages": stages}, types=pointers.get)


def aot_cases() -> list:
    """K = 13 (k = 5 plus the 8 candidates of tie slack clfast.ops asks for) with every metric in fp32 and
    bf16; fp16 and the fp32-query/bf16-keys pair (upcast tl.dot) with cosine and l2; K = 9 (k = 1) in fp32;
    K = 64 (the second tile config) in fp32 and bf16."""
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    cases = [_aot_case(dt, dt, m, 13) for dt in (f32, bf16) for m in (0, 1, 2)]
    cases += [_aot_case(f16, f16, 0, 13), _aot_case(f32, bf16, 0, 13), _aot_case(f32, bf16, 2, 13)]
    cases += [_aot_case(f32, f32, 0, 9), _aot_case(f32, f32, 0, 64), _aot_case(bf16, bf16, 0, 64)]
    return cases


AOT_CASES = aot_cases
