"""kmeans: FAISS's K-means, deterministic for a seed, with assignments by :func:`clfast.ops.retrieve`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from clfast.ops._checks import check_float_tensor
from clfast.ops.retrieval import retrieve

__all__ = ["kmeans"]


def kmeans(x: Tensor, n_clusters: int, n_iter: int = 25, seed: int = 1993, *, n_redo: int = 1,
           spherical: bool = False, max_points_per_centroid: Optional[int] = None,
           min_points_per_centroid: Optional[int] = None,
           n_threads: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """K-means by ``faiss.Kmeans`` (Lloyd iterations from FAISS's random initial centroids), deterministic for
    a seed.

    Args:
        x: ``(N, D)`` points, any float dtype (clustered in float32).
        n_clusters: K, ``1 <= K <= N``.
        n_iter: Lloyd iterations per run.
        seed: the random seed (initial centroids, subsampling): any int; FAISS takes a 32-bit one, so
            ``seed mod 2³¹`` is passed (seeds from :func:`clfast.utils.seeding.derive_seed` are 64-bit).
        n_redo: runs; the one with the lowest objective is kept (STAR-Prompt: 50).
        spherical: normalise the centroids after each step (cosine k-means).
        max_points_per_centroid: FAISS subsamples to K·this points (its default, 256) when given more.
        min_points_per_centroid: FAISS prints a warning for fewer than K·this points (its default, 39); a
            caller that clusters small sets on purpose (a per-class mixture's initialisation) passes 1.
        n_threads: FAISS's OpenMP threads for this call (default ``torch.get_num_threads()``); 1 for a few
            hundred points, where thread start-up costs more than it saves.

    Returns:
        ``(centroids (K, D) in x's dtype, assignments (N,) int64)``; the assignment of a point is its nearest
        centroid (largest inner product when ``spherical``), ties to the lower centroid index, computed by
        :func:`retrieve`.
    """
    check_float_tensor("kmeans", "x", x, shape="(N,D)", dim=2)
    for name, v, lo in (("n_clusters", n_clusters, 1), ("n_iter", n_iter, 1), ("n_redo", n_redo, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"kmeans: {name} must be an int >= {lo}, got {v!r}")
    if n_clusters > x.shape[0]:
        raise ValueError(f"kmeans: n_clusters must be <= N = {x.shape[0]} points, got {n_clusters}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"kmeans: seed must be an int, got {type(seed).__name__}")
    import faiss

    pts = x.detach().to("cpu", torch.float32).contiguous()
    kw = dict(niter=n_iter, seed=seed % 2**31, nredo=n_redo, spherical=spherical, verbose=False)
    if max_points_per_centroid is not None:
        kw["max_points_per_centroid"] = max_points_per_centroid
    if min_points_per_centroid is not None:
        kw["min_points_per_centroid"] = min_points_per_centroid
    if n_threads is not None and (isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1):
        raise ValueError(f"kmeans: n_threads must be an int >= 1 or None, got {n_threads!r}")
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n_threads or torch.get_num_threads())
    try:
        km = faiss.Kmeans(pts.shape[1], n_clusters, **kw)
        km.train(pts.numpy())
    finally:   # FAISS's thread count is process-wide: leave it as found (KeyIndex searches read it)
        faiss.omp_set_num_threads(before)
    centroids = torch.from_numpy(km.centroids.copy())
    metric = "ip" if spherical else "l2"
    _, assign = retrieve(pts, centroids, 1, metric=metric)
    return centroids.to(x.device, x.dtype), assign[:, 0].to(x.device)
