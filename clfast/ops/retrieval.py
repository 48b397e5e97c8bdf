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
registered ops ``clfast::retrieve`` (the torch, C++ and FAISS selections, a custom_op) and
``clfast::retrieve_triton`` (a triton_op) (fake + autograd; torch.compile traces a model that uses them without
graph breaks) → the public :func:`retrieve`. Built on it: the stateful :class:`~clfast.ops.key_index.KeyIndex`
and :func:`~clfast.ops.clustering.kmeans` (their own modules; FAISS glue in ``clfast/ops/_faiss.py``).

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

import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from clfast import _triton
from clfast.ops import _backends, _dispatch
from clfast.ops import _faiss as faiss_glue
from clfast.ops._backends import LOWP
from clfast.ops._checks import check_float_tensor, check_k, shape_str
from clfast.ops._dispatch import Backend, register_backend

__all__ = ["retrieve", "reference", "KeyIndex", "kmeans", "METRICS", "faiss_min_keys", "set_faiss_min_keys"]

OP = "retrieve"
METRICS = ("cosine", "ip", "l2")
NORM_EPS = 1e-12  # F.normalize's eps: |x| is clamped to at least this before dividing

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


def rank_key(s: Tensor) -> Tensor:
    """Scores as ranked: NaN counts as -inf."""
    return torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)


def pair_scores(q: Tensor, rows: Tensor, metric: str) -> Tensor:
    """Scores of ``q`` ``(B, 1, D)`` against ``rows`` ``(B or 1, n, D)``: ``(B, n)``.

    Elementwise products summed over D, so that a score depends on its (query, key) pair only, never on
    where the key sits: a GEMM may round two copies of one key differently (its edge tiles take another
    path), which would make exact ties fall either way."""
    if metric == "cosine":  # <q/max(|q|,eps), k/max(|k|,eps)>, as F.normalize, in two passes over rows
        qn = torch.linalg.vector_norm(q, dim=-1).clamp_min(NORM_EPS)
        return (q * rows).sum(-1) / (qn * torch.linalg.vector_norm(rows, dim=-1).clamp_min(NORM_EPS))
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
    order = torch.sort(rank_key(s.detach()), dim=1, descending=True, stable=True).indices[:, :k]
    return s.gather(1, order), order


def score_rows(query: Tensor, keys: Tensor, indices: Tensor, metric: str) -> Tensor:
    """Scores ``(B, k)`` of the key rows ``keys[indices]`` against each query row: the differentiable half of
    every fast backend, the same function of (query, key) as :func:`reference` uses. Low-precision inputs
    are computed in float32 and rounded once to the result dtype."""
    dt = _result_dtype(query, keys)
    acc = torch.float32 if dt in LOWP else dt
    B, kk = indices.shape
    rows = keys.index_select(0, indices.reshape(-1)).reshape(B, kk, keys.shape[-1]).to(acc)
    return pair_scores(query.to(acc)[:, None, :], rows, metric).to(dt)


def rescore(query: Tensor, keys: Tensor, indices: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """Differentiable scores of the selected indices, each row ordered by (score desc, index asc)."""
    indices = indices.sort(dim=1).values  # index order first, so the stable sort below breaks ties by index
    s = score_rows(query, keys, indices, metric)
    order = torch.sort(rank_key(s.detach()), dim=1, descending=True, stable=True).indices
    return s.gather(1, order), indices.gather(1, order)


def merge_candidates(scores: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of per-row candidate lists by (score desc, index asc); candidates may repeat no index. A NaN score
    ranks last and comes back as NaN, as the reference returns it."""
    idx_sorted, perm = indices.sort(dim=1)
    s = scores.gather(1, perm)
    order = torch.sort(rank_key(s), dim=1, descending=True, stable=True).indices[:, :k]
    return s.gather(1, order), idx_sorted.gather(1, order)


# ---------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------

# fp32: GEMM rounding of scores of size O(1) (cosine) or O(D) (ip, l2). Low precision: the tests compare
# the true (float64) scores of the selected keys against the best achievable, relative to PyTorch's own
# same-dtype error (see tests/ops/test_retrieve.py).
_ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


class _Tolerances:
    ATOL = _ATOL
    GRAD_ATOL = _ATOL


@register_backend
class ReferenceBackend(_Tolerances, _backends.Reference):
    OP = OP

    @staticmethod
    def run(query, keys, k, metric, exact):
        return reference(query, keys, k, metric)


class _OpBackend(_Tolerances):
    """A backend that selects inside a registered op (``clfast::retrieve``, which takes the backend's name, or its
    own). When a gradient is needed the scores are recomputed by :func:`score_rows` outside it, so autograd flows
    without a custom backward."""

    IN_OP = True
    SHARED_OP = True  # selects inside clfast::retrieve, which takes the backend's name (False: an op of its own)
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
        return merge_candidates(score_rows(query, keys, idx, metric), idx, k)

    @classmethod
    def selected(cls, query: Tensor, keys: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
        """The registered op's (detached scores, indices)."""
        return torch.ops.clfast.retrieve(query, keys, k, metric, cls.NAME)

    @classmethod
    def run(cls, query, keys, k, metric, exact):
        s, idx = cls.selected(query.detach(), keys.detach(), k, metric)
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


@register_backend
class TorchBackend(_OpBackend, _backends.Torch):
    """Stock PyTorch, chunked over keys: (normalised query) @ chunkᵀ, scaled by 1/|key| for cosine, topk,
    merged across chunks. Holds at most ``(B, chunk)`` scores and never a normalised copy of the keys."""

    OP = OP
    CHUNK_ELEMS = 1 << 24  # scores per chunk: 64 MB of float32

    @classmethod
    def candidates(cls, query, keys, n, metric):
        acc = torch.float64 if keys.dtype == torch.float64 else torch.float32
        q = query.to(acc)
        if metric == "cosine":
            q = F.normalize(q, dim=-1, eps=NORM_EPS)
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
                s.div_(torch.linalg.vector_norm(kc, dim=-1).clamp_min(NORM_EPS))
            elif metric == "l2":
                s.mul_(2).sub_(kc.pow(2).sum(-1)).sub_(q_sq)
            cand.append(_topk_low_index(s.masked_fill_(s.isnan(), float("-inf")), min(n, s.shape[1])) + j0)
        return torch.cat(cand, 1)


@register_backend
class CpuBackend(_OpBackend, _backends.Cpp):
    """C++ (csrc/retrieve/retrieve_cpu.cpp): per key tile, the dot products with a block of queries (AVX2 dot
    products for B <= 8, vdpbf16ps for bf16 x bf16 on AVX512-BF16 CPUs, else a float32 GEMM) into a
    per-thread buffer, and a running per-row top-(k + 8); threads over key tiles, so one query over a huge
    pool uses every core; the candidates are re-ranked by exact fixed-order pair scores. Never holds
    ``(B, M)``; 16-bit keys are read as stored (half the memory traffic)."""

    OP, KERNEL = OP, "retrieve_topk"
    MAX_K = 1024  # per-row lists are sorted arrays: insertion is O(k)

    @staticmethod
    def select(query, keys, k, metric):
        # the kernel keeps k + 8 candidates and re-ranks them by exact pair scores itself
        return torch.ops._clfast_C.retrieve_topk(query, keys, k, metric)


@register_backend
class TritonBackend(_OpBackend, _backends.Triton):
    """Fused similarity + running top-k in Triton (kernels/retrieve.py), in the triton_op
    ``clfast::retrieve_triton``; per-split candidates merged by torch."""

    OP = OP
    SHARED_OP = False
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

    @classmethod
    def selected(cls, query, keys, k, metric):
        return torch.ops.clfast.retrieve_triton(query, keys, k, metric)


@register_backend
class FaissBackend(_OpBackend, Backend):
    """FAISS's exact brute-force search (``knn_inner_product`` / ``knn_L2sqr``, the kernels of
    IndexFlatIP/IndexFlatL2) on the torch memory without copies (float32 contiguous keys; cosine and 16-bit
    keys go through bounded float32 chunks). faiss-gpu on CUDA when installed. Taken by itself from
    ``CLFAST_FAISS_MIN_KEYS`` keys where it is in the priority list. FAISS picks arbitrarily among equal
    distances: with more than TIE_SLACK keys tied exactly at the k-th place it may miss a lower index."""

    OP, NAME = OP, "faiss"
    DTYPES = _backends.FAST_DTYPES
    CHUNK_ROWS = 8192  # converted / normalised rows per FAISS call: 24 MB at D = 768, stays in cache
    MAX_K = 2048  # faiss-gpu's limit; the CPU has none but huge k is not what FAISS is for

    @classmethod
    def unavailable_reason(cls):
        return faiss_glue.unavailable_reason()

    @classmethod
    def devices(cls):
        return ("cpu", "cuda") if _triton.CUDA and faiss_glue.gpu() else ("cpu",)

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
            q = F.normalize(q, dim=-1, eps=NORM_EPS)
        q = q.contiguous()
        # contiguous float32 keys are searched in place; cosine and 16-bit keys go through float32 chunks
        in_place = metric != "cosine" and keys.dtype == torch.float32 and keys.is_contiguous()

        def search(j0: int, j1: int) -> Tensor:
            out = []
            step = (j1 - j0) if in_place else cls.CHUNK_ROWS
            for a in range(j0, j1, step):
                kc = keys[a:min(a + step, j1)]
                if not in_place:
                    kc = faiss_glue.float32_rows(kc, metric == "cosine", NORM_EPS)
                out.append(faiss_glue.knn(q, kc, min(n, kc.shape[0]), metric) + a)
            return torch.cat(out, 1)

        if query.is_cuda or q.shape[0] == 0:
            return search(0, M)
        return faiss_glue.cpu_parallel(search, M)


# On the CPU the C++ backend comes first: on the 2-core development machine it matches FAISS for ip/l2 and
# is 2x faster for cosine (FAISS needs normalised float32 copies of the keys); faiss takes over from torch
# above CLFAST_FAISS_MIN_KEYS when the extension is missing. On CUDA, faiss-gpu above the threshold.
_backends.set_priorities(OP, cpu=["cpu", "faiss", "torch", "reference"], cuda=["faiss", "triton", "torch", "reference"])


def _op_backend(name: str) -> type[_OpBackend]:
    """The backend ``name`` that selects inside ``clfast::retrieve``."""
    shared = {n: c for n, c in _dispatch.backends(OP).items() if getattr(c, "SHARED_OP", False)}
    if name not in shared:
        raise ValueError(f"clfast::retrieve: backend {name!r} does not run inside the op; use one of {sorted(shared)}")
    return shared[name]


# ---------------------------------------------------------------------------------------------------
# The registered ops: clfast::retrieve (torch, C++ or FAISS selection, by name) and clfast::retrieve_triton, with a
# fake implementation and (non-differentiable) autograd
# ---------------------------------------------------------------------------------------------------


def _op_score_dtype(query: Tensor) -> torch.dtype:
    return torch.float64 if query.dtype == torch.float64 else torch.float32


def _op_outputs(query: Tensor, scores: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """What the registered ops return: (scores (B,k), indices (B,k) int64), each row by (score desc, index asc);
    scores float32 (float64 for float64 inputs). Both are non-differentiable: :func:`retrieve` recomputes
    differentiable scores from the indices when a gradient is needed."""
    return scores.to(_op_score_dtype(query)).contiguous(), indices.to(torch.int64).contiguous()


def _fake(query, keys, k, metric, *backend):
    B = query.shape[0]
    return query.new_empty((B, k), dtype=_op_score_dtype(query)), query.new_empty((B, k), dtype=torch.int64)


def _register(name: str, schema: str, impl, *, triton: bool = False) -> None:
    op = _backends.define_op(name, schema, impl, _fake, triton=triton)

    def setup_context(ctx, inputs, output):
        ctx.num_inputs = len(inputs)
        ctx.mark_non_differentiable(*output)

    def backward(ctx, _dscores, _dindices):
        return (None,) * ctx.num_inputs

    op.register_autograd(backward, setup_context=setup_context)


def _selection(query, keys, k, metric, backend):
    return _op_outputs(query, *_op_backend(backend).select(query, keys, k, metric))


_register(OP, "(Tensor query, Tensor keys, int k, str metric, str backend) -> (Tensor, Tensor)", _selection)
if _backends.TRITON_OPS:
    from clfast.kernels.retrieve import retrieve_topk as _triton_retrieve_topk

    def _triton_selection(query, keys, k, metric):
        idx = _triton_retrieve_topk(query, keys, TritonBackend.n_candidates(k, keys.shape[0]), metric)[1]
        return _op_outputs(query, *merge_candidates(score_rows(query, keys, idx, metric), idx, k))

    _register(f"{OP}_triton", "(Tensor query, Tensor keys, int k, str metric) -> (Tensor, Tensor)",
              _triton_selection, triton=True)


# ---------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------


def check_metric(fn: str, metric) -> None:
    if metric not in METRICS:
        raise ValueError(f"{fn}: metric must be one of {', '.join(METRICS)}, got {metric!r}")


def _validate(query, keys, k, metric, exact) -> Inputs:
    fn = "retrieve"
    check_float_tensor(fn, "query", query, shape="(B,D)", dim=2)
    B, D = query.shape
    check_float_tensor(fn, "keys", keys, shape=f"(M,D) = (M,{D})", dim=2)
    if keys.shape[1] != D:
        raise ValueError(f"{fn}: keys must have shape (M,D) = (M,{D}) to match query {shape_str(query)}, "
                         f"got {shape_str(keys)}")
    if D < 1:
        raise ValueError(f"{fn}: query must have shape (B,D) with D >= 1, got {shape_str(query)}")
    if keys.dtype != query.dtype and not (query.dtype == torch.float32 and keys.dtype in LOWP):
        raise TypeError(f"{fn}: keys must have query's dtype {query.dtype} (or be bfloat16/float16 with a "
                        f"float32 query), got {keys.dtype}")
    if keys.device != query.device:
        raise ValueError(f"{fn}: keys must be on query's device {query.device}, got {keys.device}")
    check_k(fn, k, keys.shape[0])
    check_metric(fn, metric)
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

