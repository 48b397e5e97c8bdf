"""FAISS glue for clfast's retrieval: whether faiss is installed, its exact search on torch memory without
copies (faiss-cpu on numpy views, faiss-gpu on torch tensors on torch's current stream), and the CPU threading
around it. Used by the ``faiss`` backend of :func:`clfast.ops.retrieve` and by :class:`clfast.ops.KeyIndex`."""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["unavailable_reason", "gpu", "knn", "float32_rows", "cpu_parallel"]


def unavailable_reason() -> Optional[str]:
    """Whether faiss is installed (found without importing it: clfast.ops resolves backends at import)."""
    import importlib.util

    if importlib.util.find_spec("faiss") is None:
        return "faiss not installed (pip install faiss-cpu, or faiss-gpu on CUDA)"
    return None


@functools.cache
def gpu() -> bool:
    """faiss-gpu is installed and a CUDA device is visible (decided once, at the first CUDA dispatch)."""
    if unavailable_reason() is not None or not torch.cuda.is_available():
        return False
    import faiss

    return hasattr(faiss, "StandardGpuResources")


_GPU_RES: list = []  # one StandardGpuResources, created on first GPU search


def knn(q: Tensor, kc: Tensor, k: int, metric: str) -> Tensor:
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


def float32_rows(rows: Tensor, normalize: bool, eps: float) -> Tensor:
    """Contiguous float32 copy of ``rows`` (M_chunk, D), normalised as ``F.normalize(eps=eps)`` when asked. Runs in
    a worker thread: float32 input goes through numpy (single-threaded, no nested OpenMP team)."""
    if rows.is_cuda or rows.dtype != torch.float32:
        x = rows.float()
        return (F.normalize(x, dim=-1, eps=eps) if normalize else x).contiguous()
    import numpy as np

    x = rows.numpy()
    if not normalize:
        return torch.from_numpy(np.ascontiguousarray(x))
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    return torch.from_numpy(np.ascontiguousarray(x / np.maximum(norms, eps)[:, None]))


def cpu_parallel(search: Callable[[int, int], Tensor], M: int) -> Tensor:
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
