"""retrieve: top-k key retrieval by cosine, inner product or (negative squared) L2 similarity.

    scores, indices = top-k over m of  s(query_b, keys_m)      (ties: the lower index first)

    cosine  s = <q / max(|q|, eps), k / max(|k|, eps)>        (eps = 1e-12, as F.normalize)
    ip      s = <q, k>
    l2      s = -|q - k|^2                                    (the top-k are the nearest keys)

This one op serves the key-query matching of L2P/DualPrompt/CODA-Prompt (top-k over a prompt pool), GPLS's
task keys, STAR-Prompt's class selection, CluMo's visual and textual keys and retrieval over class
prototypes at ImageNet-21k scale (M up to 10^6 and beyond).

Layers, as for every clfast op: :func:`reference` (the spec: every pair score, stable sort) → backends
(``torch``: chunked matmul + topk, the bar to beat; ``cpu``: C++ in csrc/retrieve, a GEMM per key tile and a
running per-row top-k; ``triton``: kernels/retrieve.py; ``faiss``: FAISS's exact brute-force search) → the
registered op ``clfast::retrieve`` (fake + autograd; torch.compile traces a model that uses it without graph
breaks) → the public :func:`retrieve`, the stateful :class:`KeyIndex` and :func:`kmeans`.

Gradients. The fast backends only *select*: the op returns indices and detached scores. When a gradient is
needed, the scores are recomputed from the k selected key rows with plain torch ops (:func:`score_rows`:
gather, dot, norms), cost O(B·k·D), so autograd reaches ``query`` and ``keys`` without a hand-written
backward; without one, the op's scores are returned as they are.

Ordering. Each row's k results are ordered by (score desc, index asc). Every backend ranks its final
candidates by a score that depends on the (query, key) pair alone: the reference and the torch, faiss and
triton backends by :func:`pair_scores` (elementwise products summed over D), the C++ backend by its own
fixed-order sums; never by a GEMM, which may round two copies of one key differently depending on where they
sit. So exactly tied keys (duplicated rows, exactly representable scores) come back in index order on every
backend. The fast backends pick k + TIE_SLACK candidates with their GEMM first: more than TIE_SLACK keys
tied within rounding across the k-th place may still resolve differently, and keys whose scores differ by
rounding only (about 1e-7 relative in fp32) may be ordered differently by different backends, as by any two
BLAS libraries. A NaN score ranks as -inf (a NaN key never beats a finite one).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from clfast import _ext, _triton
from clfast.ops import _dispatch
from clfast.ops._dispatch import Backend, register_backend

__all__ = ["retrieve", "reference", "KeyIndex", "kmeans", "METRICS", "faiss_min_keys", "set_faiss_min_keys"]

OP = "retrieve"
METRICS = ("cosine", "ip", "l2")
_FLOAT = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_LOWP = (torch.bfloat16, torch.float16)
_EPS = 1e-12  # F.normalize's eps: |x| is clamped to at least this before dividing

# From this many keys the faiss backend may be chosen by itself, where it is in the priority list (read once;
# see set_faiss_min_keys).
_FAISS_MIN_KEYS = int(os.environ.get("CLFAST_FAISS_MIN_KEYS", "65536"))


def faiss_min_keys() -> int:
    """Key count from which :func:`retrieve` picks the faiss backend by itself (``CLFAST_FAISS_MIN_KEYS``)."""
    return _FAISS_MIN_KEYS


def set_faiss_min_keys(n: int) -> None:
    """Set the key count from which the faiss backend is chosen automatically (``CLFAST_FAISS_MIN_KEYS``)."""
    global _FAISS_MIN_KEYS
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"set_faiss_min_keys: n must be a non-negative int, got {n!r}")
    _FAISS_MIN_KEYS = n


class Inputs(NamedTuple):
    """What backends look at to decide whether they can run a call. ``dtype`` is the keys' dtype."""

    device: torch.device
    dtype: torch.dtype
    query_dtype: torch.dtype
    batch: int
    num_keys: int
    dim: int
    k: int
    metric: str
    exact: bool


# ---------------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------------


def _result_dtype(query: Tensor, keys: Tensor) -> torch.dtype:
    return torch.promote_types(query.dtype, keys.dtype)


def _rank_key(s: Tensor) -> Tensor:
    """Scores as ranked: NaN counts as -inf."""
    return torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)


def pair_scores(q: Tensor, rows: Tensor, metric: str) -> Tensor:
    """Scores of ``q`` ``(B, 1, D)`` against ``rows`` ``(B or 1, n, D)``: ``(B, n)``.

    Elementwise products summed over D, so that a score depends on its (query, key) pair only, never on
    where the key sits: a GEMM may round two copies of one key differently (its edge tiles take another
    path), which would make exact ties fall either way."""
    if metric == "cosine":  # <q/max(|q|,eps), k/max(|k|,eps)>, as F.normalize, in two passes over rows
        qn = torch.linalg.vector_norm(q, dim=-1).clamp_min(_EPS)
        return (q * rows).sum(-1) / (qn * torch.linalg.vector_norm(rows, dim=-1).clamp_min(_EPS))
    if metric == "ip":
        return (q * rows).sum(-1)
    if metric == "l2":
        return -(q - rows).pow(2).sum(-1)
    raise ValueError(f"retrieve: metric must be one of {METRICS}, got {metric!r}")


_REF_CHUNK_ELEMS = 1 << 24  # (B, chunk, D) products per step of the reference


def reference(query: Tensor, keys: Tensor, k: int = 1, metric: str = "cosine") -> tuple[Tensor, Tensor]:
    """The spec: every (query, key) score by :func:`pair_scores` in the inputs' (promoted) dtype, then a
    stable descending sort, so that equal scores keep the lower index first. Chunked over keys (memory
    ``B·chunk·D``), readable rather than fast; differentiable w.r.t. query and keys."""
    dt = _result_dtype(query, keys)
    q, kk = query.to(dt)[:, None, :], keys.to(dt)[None]
    B, M, D = query.shape[0], keys.shape[0], keys.shape[1]
    chunk = max(1, _REF_CHUNK_ELEMS // max(1, B * D))
    s = torch.cat([pair_scores(q, kk[:, j:j + chunk], metric) for j in range(0, M, chunk)], dim=1)
    order = torch.sort(_rank_key(s.detach()), dim=1, descending=True, stable=True).indices[:, :k]
    return s.gather(1, order), order


def score_rows(query: Tensor, keys: Tensor, indices: Tensor, metric: str) -> Tensor:
    """Scores ``(B, k)`` of the key rows ``keys[indices]`` against each query row: the differentiable half of
    every fast backend, the same function of (query, key) as :func:`reference` uses. Low-precision inputs
    are computed in float32 and rounded once to the result dtype."""
    dt = _result_dtype(query, keys)
    acc = torch.float32 if dt in _LOWP else dt
    B, kk = indices.shape
    rows = keys.index_select(0, indices.reshape(-1)).reshape(B, kk, keys.shape[-1]).to(acc)
    return pair_scores(query.to(acc)[:, None, :], rows, metric).to(dt)


def _rescore(query: Tensor, keys: Tensor, indices: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """Differentiable scores of the selected indices, each row ordered by (score desc, index asc)."""
    indices = indices.sort(dim=1).values  # index order first, so the stable sort below breaks ties by index
    s = score_rows(query, keys, indices, metric)
    order = torch.sort(_rank_key(s.detach()), dim=1, descending=True, stable=True).indices
    return s.gather(1, order), indices.gather(1, order)


def _merge_candidates(scores: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of per-row candidate lists by (score desc, index asc); candidates may repeat no index."""
    idx_sorted, perm = indices.sort(dim=1)
    s = _rank_key(scores.gather(1, perm))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return s.gather(1, order), idx_sorted.gather(1, order)


# ---------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------

# fp32: GEMM rounding of scores of size O(1) (cosine) or O(D) (ip, l2). Low precision: the tests compare
# the true (float64) scores of the selected keys against the best achievable, relative to PyTorch's own
# same-dtype error (see tests/ops/test_retrieve.py).
_ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@register_backend
class ReferenceBackend(Backend):
    OP, NAME = OP, "reference"
    DEVICES = ("cpu", "cuda")
    DTYPES = _FLOAT
    ATOL = _ATOL
    GRAD_ATOL = _ATOL

    @staticmethod
    def run(query, keys, k, metric, exact):
        return reference(query, keys, k, metric)


class _OpBackend(Backend):
    """A backend that selects inside the registered op ``clfast::retrieve``. When a gradient is needed the
    scores are recomputed by :func:`score_rows` outside it, so autograd flows without a custom backward."""

    IN_OP = True
    # query dtypes accepted with keys of each dtype (a float32 query may search a 16-bit key pool)
    QUERY_DTYPES = {torch.float32: (torch.float32,), torch.bfloat16: (torch.bfloat16, torch.float32),
                    torch.float16: (torch.float16, torch.float32), torch.float64: (torch.float64,)}
    MAX_K: Optional[int] = None
    # Candidates a backend returns beyond k; they are re-ranked by exact pair scores (ties by index) inside
    # the op. A backend's GEMM may round near-equal keys apart: this slack absorbs up to TIE_SLACK of them
    # straddling the k-th place.
    TIE_SLACK = 8

    @classmethod
    def extra_reasons(cls, inputs):
        reasons = []
        if inputs.query_dtype not in cls.QUERY_DTYPES.get(inputs.dtype, ()):
            reasons.append(f"query dtype {str(inputs.query_dtype)[6:]} with keys {str(inputs.dtype)[6:]}")
        if cls.MAX_K is not None and inputs.k > cls.MAX_K:
            reasons.append(f"k {inputs.k} > {cls.MAX_K}")
        return reasons

    @classmethod
    def n_candidates(cls, k: int, M: int) -> int:
        return min(M, max(k, min(k + cls.TIE_SLACK, cls.MAX_K or k + cls.TIE_SLACK)))

    @staticmethod
    def candidates(query: Tensor, keys: Tensor, n: int, metric: str) -> Tensor:
        """Indices ``(B, >= n)`` int64 holding each row's n best keys (any order, no repeats in a row)."""
        raise NotImplementedError

    @classmethod
    def select(cls, query: Tensor, keys: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
        """(scores float32 (B,k), indices int64 (B,k)), each row by (score desc, index asc), the scores by
        :func:`score_rows`."""
        idx = cls.candidates(query, keys, cls.n_candidates(k, keys.shape[0]), metric)
        return _merge_candidates(score_rows(query, keys, idx, metric), idx, k)

    @classmethod
    def run(cls, query, keys, k, metric, exact):
        s, idx = torch.ops.clfast.retrieve(query.detach(), keys.detach(), k, metric, cls.NAME)
        if torch.is_grad_enabled() and (query.requires_grad or keys.requires_grad):
            # the same scores, differentiable (the op has ordered them already)
            return score_rows(query, keys, idx, metric), idx
        return s.to(_result_dtype(query, keys)), idx


def _topk_low_index(s: Tensor, k: int) -> Tensor:
    """Indices of ``torch.topk`` of NaN-free ``s`` whose ties go to the lower index (torch.topk leaves the
    choice among equal values unspecified). Rows where a tie straddles the k-th place (duplicated keys) are
    redone by a stable sort."""
    vals, idx = s.topk(k, dim=1)
    kth = vals[:, -1:]
    straddle = (s == kth).sum(1) != (vals == kth).sum(1)
    if bool(straddle.any()):
        rows = straddle.nonzero().squeeze(1)
        idx[rows] = torch.sort(s[rows], dim=1, descending=True, stable=True).indices[:, :k]
    return idx


def _faiss_unavailable_reason() -> Optional[str]:
    """Whether faiss is installed (found without importing it: clfast.ops resolves backends at import)."""
    import importlib.util

    if importlib.util.find_spec("faiss") is None:
        return "faiss not installed (pip install faiss-cpu, or faiss-gpu on CUDA)"
    return None


@functools.cache
def _faiss_gpu() -> bool:
    """faiss-gpu is installed and a CUDA device is visible (decided once, at the first CUDA dispatch)."""
    if _faiss_unavailable_reason() is not None or not torch.cuda.is_available():
        return False
    import faiss

    return hasattr(faiss, "StandardGpuResources")


@register_backend
class TorchBackend(_OpBackend):
    """Stock PyTorch, chunked over keys: (normalised query) @ chunkᵀ, scaled by 1/|key| for cosine, topk,
    merged across chunks. Holds at most ``(B, chunk)`` scores and never a normalised copy of the keys."""

    OP, NAME = OP, "torch"
    DEVICES = ("cpu", "cuda")
    DTYPES = _FLOAT
    ATOL = _ATOL
    GRAD_ATOL = _ATOL
    CHUNK_ELEMS = 1 << 24  # scores per chunk: 64 MB of float32

    @classmethod
    def candidates(cls, query, keys, n, metric):
        acc = torch.float64 if keys.dtype == torch.float64 else torch.float32
        q = query.to(acc)
        if metric == "cosine":
            q = F.normalize(q, dim=-1, eps=_EPS)
        M = keys.shape[0]
        chunk = cls.CHUNK_ELEMS // max(1, q.shape[0])
        if keys.dtype != acc:  # the float32 copy of a 16-bit chunk is bounded too
            chunk = min(chunk, cls.CHUNK_ELEMS // max(1, keys.shape[1]))
        chunk = max(n, chunk)
        cand = []
        q_sq = q.pow(2).sum(-1, keepdim=True) if metric == "l2" else None
        for j0 in range(0, M, chunk):
            kc = keys[j0:j0 + chunk].to(acc)
            s = q @ kc.T  # the one (B, chunk) buffer: the rest is in place
            if metric == "cosine":
                s.div_(torch.linalg.vector_norm(kc, dim=-1).clamp_min(_EPS))
            elif metric == "l2":
                s.mul_(2).sub_(kc.pow(2).sum(-1)).sub_(q_sq)
            cand.append(_topk_low_index(s.masked_fill_(s.isnan(), float("-inf")), min(n, s.shape[1])) + j0)
        return torch.cat(cand, 1)


@register_backend
class CpuBackend(_OpBackend):
    """C++ (csrc/retrieve/retrieve_cpu.cpp): per key tile, the dot products with a block of queries (AVX2 dot
    products for B <= 8, vdpbf16ps for bf16 x bf16 on AVX512-BF16 CPUs, else a float32 GEMM) into a
    per-thread buffer, and a running per-row top-(k + 8); threads over key tiles, so one query over a huge
    pool uses every core; the candidates are re-ranked by exact fixed-order pair scores. Never holds
    ``(B, M)``; 16-bit keys are read as stored (half the memory traffic)."""

    OP, NAME = OP, "cpu"
    DEVICES = ("cpu",)
    DTYPES = (torch.float32, torch.bfloat16, torch.float16)
    ATOL = _ATOL
    GRAD_ATOL = _ATOL
    MAX_K = 1024  # per-row lists are sorted arrays: insertion is O(k)

    @classmethod
    def unavailable_reason(cls):
        return _ext.missing_op_reason("retrieve_topk")

    @staticmethod
    def select(query, keys, k, metric):
        # the kernel keeps k + 8 candidates and re-ranks them by exact pair scores itself
        return torch.ops._clfast_C.retrieve_topk(query, keys, k, metric)


@register_backend
class TritonBackend(_triton.TritonBackendMixin, _OpBackend):
    """Fused similarity + running top-k in Triton (kernels/retrieve.py); per-split candidates merged by torch."""

    OP, NAME = OP, "triton"
    DTYPES = (torch.float32, torch.bfloat16, torch.float16)
    # fp32 uses 3xTF32 tl.dot on GPUs (about fp32 accuracy)
    ATOL = {**_ATOL, torch.float32: 1e-4 if _triton.CUDA else 2e-5}
    GRAD_ATOL = ATOL
    MAX_K = 64

    @classmethod
    def extra_reasons(cls, inputs):
        reasons = super().extra_reasons(inputs)
        if inputs.num_keys >= 2 ** 31 - 1:
            reasons.append(f"M = {inputs.num_keys} keys >= 2^31 - 1")
        return reasons

    @staticmethod
    def candidates(query, keys, n, metric):
        from clfast.kernels import retrieve as kern

        return kern.retrieve_topk(query, keys, n, metric)[1]


@register_backend
class FaissBackend(_OpBackend):
    """FAISS's exact brute-force search (``knn_inner_product`` / ``knn_L2sqr``, the kernels of
    IndexFlatIP/IndexFlatL2) on the torch memory without copies (float32 contiguous keys; cosine and 16-bit
    keys go through bounded float32 chunks). faiss-gpu on CUDA when installed. Taken by itself from
    ``CLFAST_FAISS_MIN_KEYS`` keys where it is in the priority list. FAISS picks arbitrarily among equal
    distances: with more than TIE_SLACK keys tied exactly at the k-th place it may miss a lower index."""

    OP, NAME = OP, "faiss"
    DTYPES = (torch.float32, torch.bfloat16, torch.float16)
    ATOL = _ATOL
    GRAD_ATOL = _ATOL
    CHUNK_ROWS = 8192  # converted / normalised rows per FAISS call: 24 MB at D = 768, stays in cache
    MAX_K = 2048  # faiss-gpu's limit; the CPU has none but huge k is not what FAISS is for

    @classmethod
    def unavailable_reason(cls):
        return _faiss_unavailable_reason()

    @classmethod
    def devices(cls):
        return ("cpu", "cuda") if _triton.CUDA and _faiss_gpu() else ("cpu",)

    @classmethod
    def extra_reasons(cls, inputs):
        reasons = super().extra_reasons(inputs)
        if inputs.num_keys < _FAISS_MIN_KEYS and _dispatch.forced_backend(OP) != cls.NAME:
            reasons.append(f"M = {inputs.num_keys} < CLFAST_FAISS_MIN_KEYS = {_FAISS_MIN_KEYS} (force it with "
                           "use_backend('faiss'))")
        return reasons

    @classmethod
    def candidates(cls, query, keys, n, metric):
        M = keys.shape[0]
        q = query.float()
        if metric == "cosine":
            q = F.normalize(q, dim=-1, eps=_EPS)
        q = q.contiguous()
        # contiguous float32 keys are searched in place; cosine and 16-bit keys go through float32 chunks
        in_place = metric != "cosine" and keys.dtype == torch.float32 and keys.is_contiguous()

        def search(j0: int, j1: int) -> Tensor:
            out = []
            step = (j1 - j0) if in_place else cls.CHUNK_ROWS
            for a in range(j0, j1, step):
                kc = keys[a:min(a + step, j1)]
                if not in_place:
                    kc = _float32_rows(kc, normalize=metric == "cosine")
                out.append(_faiss_knn(q, kc, min(n, kc.shape[0]), metric) + a)
            return torch.cat(out, 1)

        if query.is_cuda or q.shape[0] == 0:
            return search(0, M)
        return _faiss_cpu_parallel(search, M)


_GPU_RES: list = []  # one StandardGpuResources, created on first GPU search


def _faiss_knn(q: Tensor, kc: Tensor, k: int, metric: str) -> Tensor:
    """Indices (B,k) int64 of FAISS's exact search of float32 ``q`` in contiguous float32 ``kc``, zero-copy."""
    import faiss

    fmetric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    if q.is_cuda:  # faiss-gpu: torch tensors in, on torch's current stream (faiss.contrib.torch_utils)
        import faiss.contrib.torch_utils  # noqa: F401  (lets faiss.knn_gpu take torch tensors)

        if not _GPU_RES:
            _GPU_RES.append(faiss.StandardGpuResources())
        _, idx = faiss.knn_gpu(_GPU_RES[0], q, kc, k, metric=fmetric)
        return idx.to(torch.int64)
    if not (q.dtype == kc.dtype == torch.float32 and q.is_contiguous() and kc.is_contiguous()):
        raise ValueError("faiss search needs contiguous float32 tensors")
    _, idx = faiss.knn(q.numpy(), kc.numpy(), k, fmetric)
    idx = torch.from_numpy(idx)
    short = (idx < 0).any(1)
    if bool(short.any()):
        # FAISS leaves a slot empty (-1) for keys whose distance is NaN; it has returned every other key of
        # the chunk, so the lowest unused indices are the lowest NaN keys (which rank last, by index)
        for r in short.nonzero().flatten().tolist():
            have = idx[r][idx[r] >= 0]
            unused = torch.ones(kc.shape[0], dtype=torch.bool)
            unused[have] = False
            fill = unused.nonzero().flatten()[: int((idx[r] < 0).sum())]
            idx[r, idx[r] < 0] = fill
    return idx


def _float32_rows(rows: Tensor, normalize: bool) -> Tensor:
    """Contiguous float32 copy of ``rows`` (M_chunk, D), normalised as F.normalize when asked. Runs in a
    worker thread: float32 input goes through numpy (single-threaded, no nested OpenMP team)."""
    if rows.is_cuda or rows.dtype != torch.float32:
        x = rows.float()
        return (F.normalize(x, dim=-1, eps=_EPS) if normalize else x).contiguous()
    import numpy as np

    x = rows.numpy()
    if not normalize:
        return torch.from_numpy(np.ascontiguousarray(x))
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    return torch.from_numpy(np.ascontiguousarray(x / np.maximum(norms, _EPS)[:, None]))


def _faiss_cpu_parallel(search, M: int) -> Tensor:
    """Run ``search(j0, j1)`` over torch.get_num_threads() contiguous key ranges in parallel threads (FAISS
    releases the GIL), each with one OpenMP thread, and concatenate the candidates.

    Why not FAISS's own threading: with fewer than ``distance_compute_blas_threshold`` queries (128,000 in
    faiss 1.15) faiss.knn takes its per-pair SIMD path, about 6x slower than a GEMM for a batch of 128; and
    its bundled OpenMP OpenBLAS, nested under FAISS's OpenMP loops, oversubscribes the cores. So, for the
    duration of the call: the GEMM path always, OpenBLAS single-threaded (through threadpoolctl when it is
    installed), parallelism over key ranges."""
    import concurrent.futures
    import contextlib

    import faiss

    n = max(1, min(torch.get_num_threads(), M // 4096 or 1))
    bounds = [(M * i) // n for i in range(n + 1)]

    def one(i: int) -> Tensor:
        faiss.omp_set_num_threads(1)
        return search(bounds[i], bounds[i + 1])

    limits = contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(1, user_api="blas")
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        pass
    old = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 1
    try:
        with limits:
            if n == 1:
                return one(0)
            with concurrent.futures.ThreadPoolExecutor(n) as ex:
                return torch.cat(list(ex.map(one, range(n))), 1)
    finally:
        faiss.cvar.distance_compute_blas_threshold = old


# On the CPU the C++ backend comes first: on the 2-core development machine it matches FAISS for ip/l2 and
# is 2x faster for cosine (FAISS needs normalised float32 copies of the keys); faiss takes over from torch
# above CLFAST_FAISS_MIN_KEYS when the extension is missing. On CUDA, faiss-gpu above the threshold.
_dispatch.set_priority(OP, "cpu", ["cpu", "faiss", "torch", "reference"])
_dispatch.set_priority(OP, "cuda", ["faiss", "triton", "torch", "reference"])


def _op_backend(name: str) -> type[_OpBackend]:
    cls = _dispatch.backends(OP).get(name)
    if cls is None or not getattr(cls, "IN_OP", False):
        raise ValueError(f"clfast::retrieve: backend {name!r} does not run inside the op; use one of "
                         f"{sorted(n for n, c in _dispatch.backends(OP).items() if getattr(c, 'IN_OP', False))}")
    return cls


# ---------------------------------------------------------------------------------------------------
# The registered op: clfast::retrieve, with a fake implementation and (non-differentiable) autograd
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("clfast::retrieve", mutates_args=())
def _retrieve_op(query: Tensor, keys: Tensor, k: int, metric: str, backend: str) -> tuple[Tensor, Tensor]:
    """Returns (scores (B,k), indices (B,k) int64), each row by (score desc, index asc); scores are float32
    (float64 for float64 inputs). Both are non-differentiable: :func:`retrieve` recomputes differentiable
    scores from the indices when a gradient is needed."""
    s, i = _op_backend(backend).select(query, keys, k, metric)
    return s.to(_op_score_dtype(query)).contiguous(), i.to(torch.int64).contiguous()


def _op_score_dtype(query: Tensor) -> torch.dtype:
    return torch.float64 if query.dtype == torch.float64 else torch.float32


@_retrieve_op.register_fake
def _(query, keys, k, metric, backend):
    B = query.shape[0]
    return query.new_empty((B, k), dtype=_op_score_dtype(query)), query.new_empty((B, k), dtype=torch.int64)


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _backward(ctx, _dscores, _dindices):
    return None, None, None, None, None


_retrieve_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------


def _shape(t: Tensor) -> str:
    return "(" + ",".join(str(s) for s in t.shape) + ")"


def _check_matrix(fn: str, name: str, t: Any, expect: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT:
        raise TypeError(f"{fn}: {name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{fn}: {name} must have shape {expect}, got {_shape(t)}")


def _check_k(fn: str, k: Any, M: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{fn}: k must be an int, got {type(k).__name__}")
    if not 1 <= k <= M:
        raise ValueError(f"{fn}: k must be in [1, M] = [1, {M}] (M = number of keys), got k = {k}")


def _check_metric(fn: str, metric: Any) -> None:
    if metric not in METRICS:
        raise ValueError(f"{fn}: metric must be one of {', '.join(METRICS)}, got {metric!r}")


def _validate(query, keys, k, metric, exact) -> Inputs:
    fn = "retrieve"
    _check_matrix(fn, "query", query, "(B,D)")
    B, D = query.shape
    _check_matrix(fn, "keys", keys, f"(M,D) = (M,{D})")
    if keys.shape[1] != D:
        raise ValueError(f"{fn}: keys must have shape (M,D) = (M,{D}) to match query {_shape(query)}, "
                         f"got {_shape(keys)}")
    if D < 1:
        raise ValueError(f"{fn}: query must have shape (B,D) with D >= 1, got {_shape(query)}")
    if keys.dtype != query.dtype and not (query.dtype == torch.float32 and keys.dtype in _LOWP):
        raise TypeError(f"{fn}: keys must have query's dtype {query.dtype} (or be bfloat16/float16 with a "
                        f"float32 query), got {keys.dtype}")
    if keys.device != query.device:
        raise ValueError(f"{fn}: keys must be on query's device {query.device}, got {keys.device}")
    _check_k(fn, k, keys.shape[0])
    _check_metric(fn, metric)
    if not isinstance(exact, bool):
        raise TypeError(f"{fn}: exact must be a bool, got {type(exact).__name__}")
    return Inputs(query.device, keys.dtype, query.dtype, B, keys.shape[0], D, k, metric, exact)


def retrieve(query: Tensor, keys: Tensor, k: int = 1, *, metric: str = "cosine",
             exact: bool = True) -> tuple[Tensor, Tensor]:
    """Top-``k`` keys for each query row, without forming the ``(B, M)`` similarity matrix (fast backends).

    Args:
        query: ``(B, D)`` queries; float32, bfloat16, float16 (float64 on the reference/torch backends).
        keys: ``(M, D)`` keys on query's device, query's dtype, or bfloat16/float16 with a float32 query (a
            16-bit key pool halves the memory read per search). Any strides.
        k: results per query, ``1 <= k <= M``.
        metric: ``"cosine"`` (rows normalised with eps 1e-12, as F.normalize), ``"ip"`` (inner product) or
            ``"l2"`` (score = minus the squared Euclidean distance, so the top-k are the nearest keys).
        exact: False allows approximate search. Every backend of this stateless function searches exactly
            (building an approximate index costs more than one exact scan); approximate indexes (HNSW,
            IVF-Flat) live in :class:`KeyIndex`.

    Returns:
        ``(scores, indices)``, both ``(B, k)``: scores in the promoted dtype of (query, keys), differentiable
        w.r.t. query and keys; indices int64. Each row is ordered by score descending, then index ascending
        (exact ties go to the lower index on every backend; a NaN score ranks last).

    Equivalent PyTorch::

        s = F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T      # metric="cosine"
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
        scores, indices = s.gather(1, order), order

    The backend is chosen per call (``clfast info``): ``cpu`` (C++) on the CPU, ``triton`` on CUDA, with
    ``faiss`` taking over from ``CLFAST_FAISS_MIN_KEYS`` keys (default 65,536) on CUDA (faiss-gpu) and, when
    the C++ extension is missing, on the CPU. Force one with ``clfast.ops.use_backend(name, op="retrieve")``.
    """
    inputs = _validate(query, keys, k, metric, exact)
    backend = _dispatch.select(OP, inputs)
    return backend.run(query, keys, k, metric, exact)


# ---------------------------------------------------------------------------------------------------
# KeyIndex: a stateful, checkpointable, optionally sharded key pool
# ---------------------------------------------------------------------------------------------------


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


class KeyIndex:
    """A pool of keys for repeated top-k search: large, slowly changing key sets (class prototypes, cluster
    keys, ImageNet-21k-scale pools).

    Args:
        dim: key dimension D.
        metric: ``"cosine"``, ``"ip"`` or ``"l2"`` (as :func:`retrieve`).
        exact: True searches exactly (through :func:`retrieve`, so the C++ or faiss backend). False uses a
            FAISS approximate index (``index_type`` ``"hnsw"``, default, or ``"ivf"`` = IVF-Flat): results may
            miss true neighbours; their scores are still exact and differentiable w.r.t. the query.
        shard: under ``torch.distributed``, each rank keeps 1/world of the keys. :meth:`add` and
            :meth:`search` are then collective (every rank calls them; :meth:`add` with the same keys on every
            rank); :meth:`search` returns each rank the results for its own queries, merged over all shards.
        dtype: storage dtype of the keys (float32, or bfloat16/float16 to halve the memory).
        device: where the keys live (default CPU).
        index_type, nlist, nprobe, hnsw_m, ef_search: the approximate index (``exact=False`` only; a faiss-cpu
            index, whatever ``device``). IVF needs :meth:`train` (or trains itself on the first :meth:`add`);
            ``nlist`` defaults to about 4·√n of the training sample.
        process_group: the group for ``shard=True`` (default: the world).

    Indices are global and sequential in order of :meth:`add`. The state is checkpointable:
    :meth:`state_dict` holds only tensors and plain values (``torch.load(weights_only=True)`` works), including
    a trained approximate index, so nothing is retrained on load.
    """

    def __init__(self, dim: int, metric: str = "cosine", exact: bool = True, *, shard: bool = False,
                 dtype: torch.dtype = torch.float32, device: Any = None, index_type: str = "hnsw",
                 nlist: Optional[int] = None, nprobe: int = 16, hnsw_m: int = 32, ef_search: int = 64,
                 process_group: Any = None) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"KeyIndex: dim must be a positive int, got {dim!r}")
        _check_metric("KeyIndex", metric)
        if not isinstance(exact, bool):
            raise TypeError(f"KeyIndex: exact must be a bool, got {type(exact).__name__}")
        if dtype not in _FLOAT:
            raise TypeError(f"KeyIndex: dtype must be a floating dtype, got {dtype}")
        if index_type not in ("hnsw", "ivf"):
            raise ValueError(f"KeyIndex: index_type must be 'hnsw' or 'ivf', got {index_type!r}")
        if not exact and _faiss_unavailable_reason() is not None:
            raise RuntimeError(f"KeyIndex(exact=False) needs faiss: {_faiss_unavailable_reason()}")
        self.dim, self.metric, self.exact, self.dtype = dim, metric, exact, dtype
        self.device = torch.device(device if device is not None else "cpu")
        self.index_type, self.nlist, self.nprobe = index_type, nlist, nprobe
        self.hnsw_m, self.ef_search = hnsw_m, ef_search
        self.shard, self.group = shard, process_group
        if shard and _dist() is None:
            raise RuntimeError("KeyIndex(shard=True) needs an initialised torch.distributed process group")
        self.reset()

    # -- bookkeeping -------------------------------------------------------------------------------

    @property
    def world(self) -> tuple[int, int]:
        """(rank, world size) of the sharding; (0, 1) when not sharded."""
        if not self.shard:
            return 0, 1
        dist = _dist()
        return dist.get_rank(self.group), dist.get_world_size(self.group)

    def reset(self) -> None:
        """Drop every key (a trained IVF index keeps its training)."""
        self._buf = torch.empty((0, self.dim), dtype=self.dtype, device=self.device)
        self._ids = torch.empty((0,), dtype=torch.int64, device=self.device)
        self._n = 0  # local rows in use
        self.ntotal = 0  # global number of keys added
        old = getattr(self, "_faiss", None)
        if self.exact:
            self._faiss = None
        elif old is not None and self.index_type == "ivf" and old.is_trained:
            old.reset()
        else:
            self._faiss = self._new_faiss_index()

    def __len__(self) -> int:
        return self.ntotal

    @property
    def keys(self) -> Tensor:
        """This rank's keys ``(n_local, D)`` (all keys when not sharded), a view into the pool."""
        return self._buf[: self._n]

    @property
    def ids(self) -> Tensor:
        """Global indices ``(n_local,)`` of :attr:`keys`, ascending."""
        return self._ids[: self._n]

    def _new_faiss_index(self, nlist: Optional[int] = None):
        import faiss

        fm = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        if self.index_type == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, fm)
            index.hnsw.efSearch = self.ef_search
            return index
        nlist = nlist or self.nlist
        if nlist is None:
            return None  # chosen from the training sample by train()
        quantizer = faiss.IndexFlatL2(self.dim) if fm == faiss.METRIC_L2 else faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, fm)  # faiss keeps the quantizer alive
        index.nprobe = self.nprobe
        return index

    def _faiss_rows(self, x: Tensor):
        x = x.detach().to("cpu", torch.float32)
        if self.metric == "cosine":
            x = F.normalize(x, dim=-1, eps=_EPS)
        return x.contiguous().numpy()

    # -- the API -----------------------------------------------------------------------------------

    def train(self, sample: Tensor) -> None:
        """Train the IVF coarse quantizer on ``sample`` ``(n, D)`` (a no-op for exact and HNSW indexes).
        Under ``shard=True`` pass the same sample on every rank, so that every shard shares one quantizer."""
        _check_matrix("KeyIndex.train", "sample", sample, f"(n,D) = (n,{self.dim})")
        if sample.shape[1] != self.dim:
            raise ValueError(f"KeyIndex.train: sample must have shape (n,D) = (n,{self.dim}), got {_shape(sample)}")
        if self.exact or self.index_type != "ivf":
            return
        if self._faiss is not None and self._faiss.ntotal > 0:
            raise RuntimeError("KeyIndex.train: the IVF index already holds keys; reset() first")
        if self._faiss is None:
            n = sample.shape[0]
            self._faiss = self._new_faiss_index(max(1, min(int(4 * math.sqrt(n)), n // 39)))
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        self._faiss.train(self._faiss_rows(sample))

    def add(self, keys: Tensor) -> Tensor:
        """Append keys ``(n, D)``; returns their global indices ``(n,)``. Sharded: collective, same keys on
        every rank, of which each keeps a contiguous 1/world slice. An untrained IVF index trains on them."""
        _check_matrix("KeyIndex.add", "keys", keys, f"(n,D) = (n,{self.dim})")
        if keys.shape[1] != self.dim:
            raise ValueError(f"KeyIndex.add: keys must have shape (n,D) = (n,{self.dim}), got {_shape(keys)}")
        n = keys.shape[0]
        new_ids = torch.arange(self.ntotal, self.ntotal + n, dtype=torch.int64, device=self.device)
        rank, world = self.world
        lo, hi = (rank * n) // world, ((rank + 1) * n) // world
        local = keys.detach()[lo:hi].to(self.device, self.dtype)
        if not self.exact:
            import faiss

            if self._faiss is None or not self._faiss.is_trained:
                self.train(keys)
            faiss.omp_set_num_threads(torch.get_num_threads())
            if local.shape[0]:
                self._faiss.add(self._faiss_rows(local))
        self._append(local, new_ids[lo:hi])
        self.ntotal += n
        return new_ids

    def _append(self, rows: Tensor, ids: Tensor) -> None:
        need = self._n + rows.shape[0]
        if need > self._buf.shape[0]:  # grow geometrically: many small adds stay linear in time
            cap = max(need, 2 * self._buf.shape[0], 1024)
            buf = torch.empty((cap, self.dim), dtype=self.dtype, device=self.device)
            buf[: self._n] = self._buf[: self._n]
            idb = torch.empty((cap,), dtype=torch.int64, device=self.device)
            idb[: self._n] = self._ids[: self._n]
            self._buf, self._ids = buf, idb
        self._buf[self._n:need] = rows
        self._ids[self._n:need] = ids
        self._n = need

    def search(self, query: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """Top-``k`` keys of the pool for each query row ``(B, D)``: ``(scores, indices)``, both ``(B, k)``,
        ordered as :func:`retrieve`; scores differentiable w.r.t. the query. Collective when sharded."""
        _check_matrix("KeyIndex.search", "query", query, f"(B,D) = (B,{self.dim})")
        if query.shape[1] != self.dim:
            raise ValueError(f"KeyIndex.search: query must have shape (B,D) = (B,{self.dim}), got {_shape(query)}")
        _check_k("KeyIndex.search", k, self.ntotal)
        if self.shard:
            return self._sharded_search(query, k)
        if self.exact:
            s, i = retrieve(query.to(self._query_dtype(query)), self.keys.to(query.device), k, metric=self.metric)
        else:
            local = self._local_search(query.detach().to(self.device), k)
            s, i = _rescore(query, self.keys.to(query.device), local.to(query.device), self.metric)
        return s, self.ids.to(query.device)[i]

    def _query_dtype(self, query: Tensor) -> torch.dtype:
        """The dtype a query is searched in against keys stored as self.dtype (see retrieve's dtype rules)."""
        if query.dtype == self.dtype:
            return query.dtype
        return torch.float32 if self.dtype in _LOWP else self.dtype

    def _local_search(self, q: Tensor, k: int) -> Tensor:
        """Local row indices ``(B, min(k, n_local))`` of this rank's best keys for each row of ``q``."""
        kk = min(k, self._n)
        if kk == 0 or q.shape[0] == 0:
            return torch.empty((q.shape[0], kk), dtype=torch.int64, device=q.device)
        qq = q.to(self._query_dtype(q))
        if self.exact:
            return retrieve(qq, self.keys, kk, metric=self.metric)[1]
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        if self.index_type == "hnsw":
            self._faiss.hnsw.efSearch = max(self.ef_search, kk)
        _, local = self._faiss.search(self._faiss_rows(q), kk)
        local = torch.from_numpy(local).to(q.device)
        short = (local < 0).any(1)  # an IVF probe reached fewer than kk keys: search those rows exactly
        if bool(short.any()):
            local[short] = retrieve(qq[short], self.keys, kk, metric=self.metric)[1]
        return local

    def _sharded_search(self, query: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Every rank searches every rank's queries on its shard; the candidates are all-gathered and merged
        (each rank can merge every query), then each key row that won is contributed by its owner through an
        all-reduce, so that each rank recomputes differentiable scores for its own queries."""
        dist = _dist()
        rank, world = self.world
        B, dev = query.shape[0], self.device
        sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([B], dtype=torch.int64, device=dev), group=self.group)
        bmax = max(int(s.item()) for s in sizes)
        wide = torch.float64 if self.dtype == torch.float64 or query.dtype == torch.float64 else torch.float32
        qpad = torch.zeros((bmax, self.dim), dtype=wide, device=dev)
        qpad[:B] = query.detach().to(dev, wide)
        gathered = [torch.empty_like(qpad) for _ in range(world)]
        dist.all_gather(gathered, qpad, group=self.group)
        allq = torch.cat(gathered, 0)  # (world * bmax, D)
        # this shard's k best for every query; a shard with fewer than k keys pads with -inf
        local = self._local_search(allq, k)
        kk = local.shape[1]
        s = torch.full((world * bmax, k), float("-inf"), dtype=wide, device=dev)
        gid = torch.full((world * bmax, k), -1, dtype=torch.int64, device=dev)
        if kk:
            s[:, :kk] = score_rows(allq, self.keys, local, self.metric).to(wide)
            gid[:, :kk] = self.ids[local]
        all_s = [torch.empty_like(s) for _ in range(world)]
        all_i = [torch.empty_like(gid) for _ in range(world)]
        dist.all_gather(all_s, s, group=self.group)
        dist.all_gather(all_i, gid, group=self.group)
        cs = torch.stack(all_s, 1).reshape(world * bmax, world * k)
        ci = torch.stack(all_i, 1).reshape(world * bmax, world * k)
        # padding must lose every tie, so it gets indices above any real one
        pad = ci < 0
        ci = torch.where(pad, 2 ** 62 + torch.arange(ci.shape[1], device=dev).expand_as(ci), ci)
        _, top = _merge_candidates(cs.masked_fill(pad, float("-inf")), ci, k)  # (world * bmax, k) global ids
        rows = torch.zeros((world * bmax, k, self.dim), dtype=wide, device=dev)
        if self._n:
            pos = torch.searchsorted(self.ids, top).clamp_max(self._n - 1)
            mine = self.ids[pos] == top
            rows[mine] = self.keys[pos[mine]].to(wide)
        dist.all_reduce(rows, group=self.group)  # one owner per row: the sum is exact
        mine_q = slice(rank * bmax, rank * bmax + B)
        my_top, my_rows = top[mine_q].to(query.device), rows[mine_q].to(query.device)
        seq = torch.arange(B * k, device=query.device).reshape(B, k)
        # the rows came from self.dtype storage: casting back is exact, and the scores are then the same
        # function of (query, row) as without sharding
        scores = score_rows(query, my_rows.reshape(B * k, self.dim).to(self.dtype), seq, self.metric)
        order = torch.sort(_rank_key(scores.detach()), dim=1, descending=True, stable=True).indices
        return scores.gather(1, order), my_top.gather(1, order)

    # -- checkpointing -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Tensors and plain values only (this rank's shard when sharded)."""
        rank, world = self.world
        state = {"dim": self.dim, "metric": self.metric, "exact": self.exact, "dtype": str(self.dtype)[6:],
                 "index_type": self.index_type, "shard": self.shard, "rank": rank, "world_size": world,
                 "ntotal": self.ntotal, "keys": self.keys.detach().cpu().clone(), "ids": self.ids.cpu().clone()}
        if self._faiss is not None:
            import faiss

            state["faiss_index"] = torch.from_numpy(faiss.serialize_index(self._faiss).copy())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; the index must have the same dim, metric and exactness (and,
        when sharded, the same rank and world size)."""
        for key in ("dim", "metric", "exact", "index_type"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"KeyIndex.load_state_dict: {key} is {state.get(key)!r} in the state, "
                                 f"{getattr(self, key)!r} here")
        rank, world = self.world
        same_shard = not self.shard or (state.get("rank"), state.get("world_size")) == (rank, world)
        if bool(state.get("shard")) != self.shard or not same_shard:
            raise ValueError(f"KeyIndex.load_state_dict: the state is rank {state.get('rank')} of "
                             f"{state.get('world_size')} (shard={state.get('shard')}); this index is rank {rank} "
                             f"of {world} (shard={self.shard})")
        keys, ids = state["keys"], state["ids"]
        if keys.dim() != 2 or keys.shape[1] != self.dim or ids.shape != (keys.shape[0],):
            raise ValueError(f"KeyIndex.load_state_dict: keys must be (n,{self.dim}) with ids (n,), got "
                             f"{_shape(keys)} and {_shape(ids)}")
        self._faiss = None
        self.reset()
        self._append(keys.to(self.device, self.dtype), ids.to(self.device))
        self.ntotal = int(state["ntotal"])
        if "faiss_index" in state:
            import faiss

            self._faiss = faiss.deserialize_index(state["faiss_index"].numpy())
            if self.index_type == "hnsw":
                self._faiss.hnsw.efSearch = self.ef_search
            else:
                faiss.extract_index_ivf(self._faiss).nprobe = self.nprobe


# ---------------------------------------------------------------------------------------------------
# kmeans
# ---------------------------------------------------------------------------------------------------


def kmeans(x: Tensor, n_clusters: int, n_iter: int = 25, seed: int = 1993, *, n_redo: int = 1,
           spherical: bool = False, max_points_per_centroid: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """K-means by ``faiss.Kmeans`` (Lloyd iterations from FAISS's random initial centroids), deterministic for
    a seed.

    Args:
        x: ``(N, D)`` points, any float dtype (clustered in float32).
        n_clusters: K, ``1 <= K <= N``.
        n_iter: Lloyd iterations per run.
        seed: FAISS's random seed (initial centroids, subsampling).
        n_redo: runs; the one with the lowest objective is kept (STAR-Prompt: 50).
        spherical: normalise the centroids after each step (cosine k-means).
        max_points_per_centroid: FAISS subsamples to K·this points (its default, 256) when given more.

    Returns:
        ``(centroids (K, D) in x's dtype, assignments (N,) int64)``; the assignment of a point is its nearest
        centroid (largest inner product when ``spherical``), ties to the lower centroid index, computed by
        :func:`retrieve`.
    """
    _check_matrix("kmeans", "x", x, "(N,D)")
    for name, v, lo in (("n_clusters", n_clusters, 1), ("n_iter", n_iter, 1), ("n_redo", n_redo, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"kmeans: {name} must be an int >= {lo}, got {v!r}")
    if n_clusters > x.shape[0]:
        raise ValueError(f"kmeans: n_clusters must be <= N = {x.shape[0]} points, got {n_clusters}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"kmeans: seed must be an int, got {type(seed).__name__}")
    import faiss

    pts = x.detach().to("cpu", torch.float32).contiguous()
    kw = dict(niter=n_iter, seed=seed, nredo=n_redo, spherical=spherical, verbose=False)
    if max_points_per_centroid is not None:
        kw["max_points_per_centroid"] = max_points_per_centroid
    faiss.omp_set_num_threads(torch.get_num_threads())
    km = faiss.Kmeans(pts.shape[1], n_clusters, **kw)
    km.train(pts.numpy())
    centroids = torch.from_numpy(km.centroids.copy())
    metric = "ip" if spherical else "l2"
    _, assign = retrieve(pts, centroids, 1, metric=metric)
    return centroids.to(x.device, x.dtype), assign[:, 0].to(x.device)
