"""clfast.ops.KeyIndex (exact against a float64 brute force, HNSW, IVF-Flat; checkpointing; sharded over 2 gloo
processes) and clfast.ops.kmeans."""

from __future__ import annotations

import io
import os

import pytest
import torch
import torch.nn.functional as F

from clfast.ops import KeyIndex, kmeans, retrieve
from clfast.ops import retrieval as rt
from tests.ops._util import free_port, magnitude, max_err, run_processes

import faiss  # noqa: E402,F401  (a declared dependency; KeyIndex and kmeans need it)


def _data(n, d, seed=0, b=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(b, d, generator=g)


def _roundtrip(index: KeyIndex, **kwargs) -> KeyIndex:
    """state_dict → torch.save → torch.load(weights_only=True) → a fresh index."""
    buf = io.BytesIO()
    torch.save(index.state_dict(), buf)
    buf.seek(0)
    fresh = KeyIndex(index.dim, index.metric, index.exact, **kwargs)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    return fresh


# --------------------------------------------------------------------------------------------------
# Exact
# --------------------------------------------------------------------------------------------------


def brute_force(q, keys, k, metric):
    """Float64 scores of every (query, key) pair by a matmul, then a stable sort: the top-k, ties to the lower
    index. Written here, independently of retrieve (which the exact index calls)."""
    q, keys = q.double(), keys.double()
    if metric == "cosine":
        s = F.normalize(q, dim=-1) @ F.normalize(keys, dim=-1).T
    elif metric == "ip":
        s = q @ keys.T
    else:
        s = -torch.cdist(q, keys).square()
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    return s.gather(1, order[:, :k]), order[:, :k], s.gather(1, order)


@pytest.mark.parametrize("metric", rt.METRICS)
def test_exact_index_equals_brute_force_over_all_keys(metric):
    """Keys added in three parts; the float32 search returns the float64 brute force's top-k (indices exactly on
    rows whose k+1 best scores are apart by more than float32 rounding, scores to float32 accuracy)."""
    keys, q = _data(3000, 24, b=20)
    index = KeyIndex(24, metric)
    ids = [index.add(keys[:1000]), index.add(keys[1000:1001]), index.add(keys[1001:])]
    assert torch.equal(torch.cat(ids), torch.arange(3000)) and len(index) == 3000
    s, i = index.search(q, 7)
    rs, ri, all_scores = brute_force(q, keys, 7, metric)
    tol = 2e-5 * magnitude(rs)
    assert max_err(s, rs) <= tol
    apart = (all_scores[:, :7] - all_scores[:, 1:8]).min(1).values > 10 * tol
    assert apart.sum() >= 10 and torch.equal(i[apart], ri[apart])


def test_search_is_differentiable_wrt_query():
    keys, q = _data(500, 16)
    q.requires_grad_(True)
    index = KeyIndex(16, "cosine")
    index.add(keys)
    s, i = index.search(q, 3)
    (g,) = torch.autograd.grad(s.sum(), q)
    q2 = q.detach().clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(rt.score_rows(q2, keys, i, "cosine").sum(), q2)
    assert torch.allclose(g, g2)


def test_state_dict_round_trip_and_reset():
    keys, q = _data(2000, 32)
    index = KeyIndex(32, "l2", dtype=torch.bfloat16)
    index.add(keys[:1200])
    index.add(keys[1200:])
    fresh = _roundtrip(index, dtype=torch.bfloat16)
    a, b = index.search(q, 5), fresh.search(q, 5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and len(fresh) == 2000
    assert fresh.keys.dtype == torch.bfloat16
    index.reset()
    assert len(index) == 0
    with pytest.raises(ValueError, match=r"k must be in \[1, M\] = \[1, 0\]"):
        index.search(q, 1)


def test_bad_input_names_the_argument():
    index = KeyIndex(8, "cosine")
    with pytest.raises(ValueError, match=r"KeyIndex.add: keys must have shape \(n,D\) = \(n,8\)"):
        index.add(torch.randn(3, 7))
    index.add(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"k must be in \[1, M\] = \[1, 3\]"):
        index.search(torch.randn(2, 8), 4)
    with pytest.raises(ValueError, match=r"KeyIndex.search: query must have shape \(B,D\) = \(B,8\)"):
        index.search(torch.randn(2, 9), 1)
    with pytest.raises(TypeError, match="KeyIndex.search: query must be float32"):
        index.search(torch.ones(2, 8, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="metric must be one of"):
        KeyIndex(8, "dot")
    with pytest.raises(ValueError, match="metric is 'cosine' in the state, 'l2' here"):
        KeyIndex(8, "l2").load_state_dict(index.state_dict())


# --------------------------------------------------------------------------------------------------
# Approximate: HNSW and IVF-Flat
# --------------------------------------------------------------------------------------------------


def _recall(i, ri):
    return sum(len(set(a) & set(b)) for a, b in zip(i.tolist(), ri.tolist())) / ri.numel()


@pytest.mark.parametrize("index_type,metric", [("hnsw", "cosine"), ("hnsw", "l2"), ("ivf", "ip"),
                                               ("ivf", "cosine")])
def test_approximate_index_recall_exact_scores_and_round_trip(index_type, metric):
    keys, q = _data(4000, 32, b=20)
    kw = dict(index_type=index_type, nprobe=32)  # of ~51 lists: random data has no cluster structure
    index = KeyIndex(32, metric, exact=False, **kw)
    if index_type == "ivf":
        index.train(keys[:2000])
    index.add(keys[:2500])
    index.add(keys[2500:])
    s, i = index.search(q, 10)
    _, ri = retrieve(q, keys, 10, metric=metric)
    assert _recall(i, ri) >= 0.9
    assert torch.allclose(s, rt.score_rows(q, keys, i, metric))  # approximate choice, exact scores
    assert (s[:, :-1] >= s[:, 1:]).all()
    fresh = _roundtrip(index, **kw)
    s2, i2 = fresh.search(q, 10)
    assert torch.equal(i, i2) and torch.equal(s, s2)


def test_ivf_trains_itself_on_the_first_add_and_keeps_training_over_reset():
    keys, q = _data(3000, 16)
    index = KeyIndex(16, "l2", exact=False, index_type="ivf", nprobe=64)
    index.add(keys)
    assert index._faiss.is_trained
    index.reset()
    assert index._faiss.is_trained and len(index) == 0
    index.add(keys)
    _, i = index.search(q, 5)
    assert _recall(i, retrieve(q, keys, 5, metric="l2")[1]) >= 0.95


# --------------------------------------------------------------------------------------------------
# kmeans
# --------------------------------------------------------------------------------------------------


def test_kmeans_is_deterministic_for_a_seed_and_assigns_the_nearest_centroid():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 12, generator=g) * 5
    x = (centers[torch.arange(600) % 5] + torch.randn(600, 12, generator=g)).double()
    c1, a1 = kmeans(x, 5, n_iter=20, seed=3, n_redo=5)
    c2, a2 = kmeans(x, 5, n_iter=20, seed=3, n_redo=5)
    assert torch.equal(c1, c2) and torch.equal(a1, a2)
    assert c1.dtype == torch.float64 and c1.shape == (5, 12) and a1.shape == (600,) and a1.dtype == torch.int64
    d = torch.cdist(x.float(), c1.float())
    assert torch.equal(a1, d.argmin(1))
    # well separated blobs, best of 5 runs: each cluster is one blob
    assert all(len(set(a1[torch.arange(600) % 5 == b].tolist())) == 1 for b in range(5))
    c3, _ = kmeans(x, 5, n_iter=20, seed=4)
    assert not torch.equal(c3, kmeans(x, 5, n_iter=20, seed=3)[0])  # the seed matters
    # a 64-bit seed (derive_seed's) is taken mod 2**31 (FAISS's seed is an int32): no OverflowError
    assert torch.equal(kmeans(x, 5, n_iter=20, seed=2**40 + 4)[0], c3)


def test_kmeans_spherical_and_bad_input():
    x, _ = _data(300, 8)
    c, a = kmeans(x, 3, n_iter=10, seed=0, spherical=True)
    assert torch.allclose(c.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(a, (x @ c.T).argmax(1))
    with pytest.raises(ValueError, match="n_clusters must be <= N = 300"):
        kmeans(x, 301)
    with pytest.raises(ValueError, match="n_iter must be an int >= 1"):
        kmeans(x, 3, n_iter=0)
    with pytest.raises(ValueError, match=r"x must have shape \(N,D\)"):
        kmeans(x[0], 3)


# --------------------------------------------------------------------------------------------------
# Sharded over 2 gloo processes
# --------------------------------------------------------------------------------------------------


def _sharded_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=60))
    try:
        keys, _ = _data(1001, 16, seed=1)
        queries = torch.randn(3 + 2 * rank, 16, generator=torch.Generator().manual_seed(10 + rank))
        queries.requires_grad_(True)
        result = {}
        for metric in rt.METRICS:
            index = KeyIndex(16, metric, shard=True)
            index.add(keys[:600])
            index.add(keys[600:])
            s, i = index.search(queries, 7)
            (g,) = torch.autograd.grad(s.sum(), queries)
            result[metric] = (s.detach(), i, g, index.keys.shape[0])
            if metric == "l2":  # each rank's shard round-trips; the rebuilt index searches the same
                fresh = KeyIndex(16, metric, shard=True)
                fresh.load_state_dict(index.state_dict())
                result["l2_reloaded"] = fresh.search(queries, 7)[1]
        hnsw = KeyIndex(16, "cosine", exact=False, shard=True)
        hnsw.add(keys)
        result["hnsw"] = hnsw.search(queries.detach(), 5)[1]
        torch.save({"queries": queries.detach(), **result}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sharded_index_over_two_gloo_processes(tmp_path):
    """Each rank holds half the keys, queries differ per rank (3 and 5 rows); every rank's result equals an
    unsharded exact search of all keys, with gradients for its own queries."""
    run_processes(_sharded_worker, (2, free_port(), str(tmp_path)), timeout=180)
    keys, _ = _data(1001, 16, seed=1)
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        q = res["queries"].requires_grad_(True)
        for metric in rt.METRICS:
            s, i, g, n_local = res[metric]
            rs, ri = retrieve(q, keys, 7, metric=metric)
            (rg,) = torch.autograd.grad(rs.sum(), q)
            assert n_local in (500, 501)
            assert torch.equal(i, ri), (rank, metric)
            assert torch.allclose(s, rs.detach()) and torch.allclose(g, rg, atol=1e-6), (rank, metric)
        assert torch.equal(res["l2_reloaded"], res["l2"][1])
        _, ri = retrieve(q.detach(), keys, 5, metric="cosine")
        assert _recall(res["hnsw"], ri) >= 0.9


def test_kmeans_min_points_per_centroid_silences_faiss_small_set_warning(capfd):
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    kmeans(x, 5, n_iter=2, seed=1)
    assert "WARNING clustering 6 points to 5 centroids" in "".join(capfd.readouterr())
    centres, assign = kmeans(x, 5, n_iter=2, seed=1, min_points_per_centroid=1)
    assert "WARNING" not in "".join(capfd.readouterr())
    assert centres.shape == (5, 4) and assign.shape == (6,)


def test_kmeans_n_threads_is_for_this_call_only():
    import faiss

    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(2))
    before = faiss.omp_get_max_threads()
    one = kmeans(x, 3, n_iter=3, seed=1, n_threads=1)
    assert faiss.omp_get_max_threads() == before
    assert all(torch.equal(a, b) for a, b in zip(one, kmeans(x, 3, n_iter=3, seed=1)))
    with pytest.raises(ValueError, match="n_threads"):
        kmeans(x, 3, n_threads=0)
