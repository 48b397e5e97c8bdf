"""Property-based tests of clfast.ops.retrieve, KeyIndex and kmeans (hypothesis; profiles in tests/conftest.py).

Properties: every backend that claims an input (dtype pair, shapes, layouts, k from 1 to M and around each
backend's MAX_K; faiss forced at any M) returns k distinct valid indices whose float64 scores are the best k, in
order, with scores and gradients (query and keys) those of the selected keys, writing nothing into its inputs;
exact ties (small-integer data) go to the lower index; NaN/Inf give the reference's indices and scores (a NaN
key ranks last, a NaN query row scores NaN); invalid input raises ValueError/TypeError naming the argument and
the C++ kernel called directly with it raises; an exact KeyIndex filled in any chunks equals retrieve over its
keys, before and after a state_dict round trip; an approximate one returns valid indices with exact scores;
kmeans assigns every point a nearest centroid and is deterministic for a seed."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from clfast.ops import KeyIndex, _dispatch, kmeans, retrieve, use_backend
from clfast.ops import retrieval as rt
from tests.ops._fuzz import (assert_close, assert_kernel_rejects, assert_rejected, assert_unchanged, budget, claiming,
                             counted, emptied, is_tiny, layouts, leaves, make_tensor, normal, seeds, shape_mutations,
                             small_integers, snapshot)
from tests.ops._util import magnitude, runnable_backends

OP = "retrieve"
HAS_KERNEL = "cpu" in runnable_backends(OP)
# (query dtype, keys dtype) pairs retrieve accepts
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
               (torch.float16, torch.float16), (torch.float32, torch.bfloat16), (torch.float32, torch.float16)]
# crossing the C++ kernel's few-query path (B <= 8), SIMD widths (16), tiles, the backends' MAX_K (64, 1024)
batches = st.one_of(st.integers(1, 10), st.sampled_from([16, 17, 33]))
pools = st.one_of(st.integers(1, 40), st.sampled_from([63, 64, 65, 73, 257, 1030]))
dims = st.one_of(st.integers(1, 20), st.sampled_from([31, 32, 33, 64, 65, 129]))


@st.composite
def ks(draw, M):
    return draw(st.sampled_from([1, M, min(M, 9), min(M, 64), min(M, 65), min(M, 1024), min(M, 1025)]) |
                st.integers(1, M))


def fill(kind):
    """``normal``; ``integers`` in [-2, 2] (exact scores: many exact ties); ``duplicates`` (normal rows, each
    twice: rows 2m and 2m+1); ``zeros`` (every third row zero)."""
    def duplicates(shape, g):
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        return t[torch.arange(shape[0]) // 2]

    def zeros(shape, g):
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        t[::3] = 0.0
        return t

    return {"normal": normal(), "integers": small_integers, "duplicates": duplicates, "zeros": zeros}[kind]


@st.composite
def cases(draw, small=False):
    qd, kd = draw(st.sampled_from(DTYPE_PAIRS))
    B = draw(emptied(B=draw(st.integers(1, 4) if small else batches)))["B"]
    M = draw(st.integers(1, 12) if small else pools)
    D = draw(st.integers(1, 8) if small else dims)
    if M * D > 30_000:
        D = min(D, 16)
    k = draw(ks(M))
    metric = draw(st.sampled_from(rt.METRICS))
    kind = draw(st.sampled_from(["normal", "integers", "duplicates", "zeros"]))
    seed = draw(seeds)
    q = make_tensor((B, D), qd, draw(layouts(2)), seed, fill(kind))
    keys = make_tensor((M, D), kd, draw(layouts(2)), seed + 1, fill(kind))
    return q, keys, k, metric, kind


def true_scores(q, keys, idx, metric):
    """Float64 scores of the selected rows of the inputs as given (their rounding is not the backend's error)."""
    return rt.score_rows(q.detach().double(), keys.detach().double(), idx, metric)


def run_backend(name, q, keys, k, metric):
    with use_backend(name, op=OP):
        return retrieve(q, keys, k, metric=metric)


def tie_limited(name, all_sorted, k):
    """Rows where backend ``name`` must return the reference's indices exactly, given exact scores: all rows,
    except for faiss, which picks among more than TIE_SLACK keys tied at the k-th place arbitrarily (documented)."""
    if name != "faiss":
        return torch.ones(all_sorted.shape[0], dtype=torch.bool)
    kth = all_sorted[:, k - 1:k]
    return (all_sorted == kth).sum(1) <= rt.FaissBackend.TIE_SLACK


@budget(1.0)
@given(case=cases(small=True) | cases())  # small half the time: the Triton interpreter joins those
@counted
def test_every_backend_returns_the_best_k(case):
    q, keys, k, metric, kind = case
    B, M = q.shape[0], keys.shape[0]
    inputs = rt._validate(q, keys, k, metric, True)
    names = claiming(OP, inputs, tiny=is_tiny(B, M, q.shape[1]))
    assert "reference" in names
    ref_all, ref_order = rt.reference(q.detach().double(), keys.detach().double(), M, metric)
    best, ref_idx = ref_all[:, :k], ref_order[:, :k]
    dt = torch.promote_types(q.dtype, keys.dtype)
    low = next((d for d in (torch.bfloat16, torch.float16) if d in (q.dtype, keys.dtype)), dt)
    mag = magnitude(best)
    ds = torch.randn(B, k, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dt)
    for name in names:
        cls = _dispatch.backends(OP)[name]
        tol = cls.ATOL[low] * mag
        qq, kk = leaves([q, keys])
        snap = snapshot([qq, kk])
        s, i = run_backend(name, qq, kk, k, metric)
        assert s.dtype == dt and i.dtype == torch.int64 and s.shape == i.shape == (B, k), name
        if B:
            assert int(i.min()) >= 0 and int(i.max()) < M, name
        assert all(len(set(row)) == k for row in i.tolist()), f"{name}: an index twice in a row"
        assert_unchanged(snap)
        if name == "reference" and low != torch.float64 and low != torch.float32:
            # at 16 bits the reference is stock PyTorch at that dtype (the peer of STYLE.md §8), with its own
            # limits (F.normalize's eps 1e-12 is 0 in float16): the structure above is what it is held to
            continue
        chosen = true_scores(q, keys, i, metric)
        assert (chosen - best).abs().max().item() <= tol if B else True, f"{name}: not the best k"
        assert (s.double() - chosen).abs().max().item() <= tol if B else True, f"{name}: scores"
        if kind == "integers" and metric != "cosine":
            # exact scores: the reference's indices, ties to the lower index (cosines of distinct keys may tie
            # exactly yet round apart)
            rows = tie_limited(name, ref_all, k)
            assert torch.equal(i[rows], ref_idx[rows]), f"{name}: ties not by index"
        if kind == "duplicates" and keys.stride(0) != 0:
            # copies of a key (rows 2m, 2m+1) score alike: when both are chosen, the lower index comes first
            for row in i.tolist():
                assert all(row.index(j) < row.index(j + 1) for j in row if j % 2 == 0 and j + 1 in row), name
        if B:
            g = torch.autograd.grad(s, (qq, kk), ds)
            q64, k64 = (t.detach().double().requires_grad_() for t in (q, keys))
            gr = torch.autograd.grad(rt.score_rows(q64, k64, i, metric), (q64, k64), ds.double())
            for what, a, r in zip(("query", "keys"), g, gr):
                assert a.dtype == (q.dtype if what == "query" else keys.dtype) and a.shape == r.shape
                assert_close(a, r, cls.GRAD_ATOL[low], f"{name} d{what}")


@st.composite
def poisoned_cases(draw):
    qd, kd = draw(st.sampled_from(DTYPE_PAIRS[:2]))
    B, M, D = draw(st.integers(1, 4)), draw(st.integers(1, 12)), draw(st.integers(1, 8))
    k, metric = draw(ks(M)), draw(st.sampled_from(rt.METRICS))
    seed = draw(seeds)
    q = make_tensor((B, D), qd, ("contiguous", None), seed, small_integers)
    keys = make_tensor((M, D), kd, ("contiguous", None), seed + 1, small_integers)
    target = draw(st.sampled_from(["query", "keys"]))
    t = q if target == "query" else keys
    t[draw(st.integers(0, t.shape[0] - 1)), draw(st.integers(0, D - 1))] = draw(
        st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    return q, keys, k, metric


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on NaN/Inf
@budget(1.0)
@given(case=poisoned_cases())
# found by this property: a NaN score came back as -inf from the C++, torch, faiss and Triton backends
@example(case=(torch.tensor([[float("nan")]]), torch.tensor([[-2.0]]), 1, "cosine"))
@counted
def test_nan_and_inf_rank_and_score_as_the_reference(case):
    """On small-integer data (exact scores, so the order is defined): a NaN/Inf entry in a query or a key gives
    the reference's indices (a NaN score ranks last, ties by index) and its scores, NaN where it has NaN."""
    q, keys, k, metric = case
    inputs = rt._validate(q, keys, k, metric, True)
    _, i_ref = rt.reference(q.double(), keys.double(), k, metric)
    ref_all = rt.reference(q.double(), keys.double(), keys.shape[0], metric)[0]
    for name in claiming(OP, inputs, tiny=True):
        cls = _dispatch.backends(OP)[name]
        s, i = run_backend(name, q, keys, k, metric)
        rows = tie_limited(name, rt.rank_key(ref_all), k)
        if metric != "cosine":  # cosines of distinct keys may tie exactly yet round apart
            assert torch.equal(i[rows], i_ref[rows]), f"{name}: indices {i.tolist()} != {i_ref.tolist()}"
        assert_close(s, true_scores(q, keys, i, metric), cls.ATOL[q.dtype], f"{name} scores")


SPEC = {"query": "B D", "keys": "M D"}


INVALID = ["shape", "dtype", "int", "not_tensor", "k", "metric", "exact"]
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def invalid_calls(kind, args, data):
    """Changed copies of the valid ``args`` that retrieve must reject: (args, exception, names it may quote, whether
    the C++ kernel takes that argument too)."""
    q, keys, M = args["query"], args["keys"], args["keys"].shape[0]
    if kind == "shape":
        name, shape, names = data.draw(shape_mutations(SPEC, args))
        bad = {**args, name: torch.randn(shape).to(args[name].dtype)}
        if bad["keys"].dim() == 2 and args["k"] > bad["keys"].shape[0]:
            names = names | {"k"}
        return [(bad, ValueError, names, True)]
    if kind == "dtype":
        return [({**args, "query": q.to(a), "keys": keys.to(b)}, TypeError, {"keys"}, True)
                for a in FLOAT_DTYPES for b in FLOAT_DTYPES if (a, b) not in DTYPE_PAIRS]
    if kind in ("int", "not_tensor"):
        return [({**args, n: args[n].to(torch.int64) if kind == "int" else args[n].tolist()}, TypeError, {n}, True)
                for n in ("query", "keys")]
    if kind == "k":
        return [({**args, "k": k}, ValueError if type(k) is int else TypeError, {"k"}, type(k) is int)
                for k in (0, -1, M + 1, 2 ** 31, True, 1.0, "1", None, torch.tensor(1))]
    if kind == "metric":
        return [({**args, "metric": m}, ValueError, {"metric"}, isinstance(m, str)) for m in ("cos", "L2", "", None, 1)]
    return [({**args, "exact": e}, TypeError, {"exact"}, False) for e in (1, "yes", None)]


def valid(args) -> bool:
    """The spec of retrieve's shapes, written here independently of the op's checks."""
    qs, ks_ = args["query"].shape, args["keys"].shape
    return len(qs) == 2 == len(ks_) and qs[1] == ks_[1] >= 1 and 1 <= args["k"] <= ks_[0]


@pytest.mark.parametrize("kind", INVALID)
@budget(1.0)
@given(case=cases(small=True), data=st.data())
@counted
def test_invalid_input_raises_naming_the_argument(kind, case, data):
    """Each kind of invalid input (every value, for the dtype pairs and the scalar arguments) raises
    ValueError/TypeError naming the argument; a changed shape that is still valid runs. The C++ kernel called
    directly with the same input raises."""
    q, keys, k, metric, _ = case
    args = dict(query=q, keys=keys, k=k, metric=metric, exact=True)
    for bad, exc, names, kernel in invalid_calls(kind, args, data):
        if kind == "shape" and valid(bad):
            _, i = retrieve(bad["query"], bad["keys"], k, metric=metric)
            assert i.shape == (bad["query"].shape[0], k)
            continue
        assert_rejected(lambda: retrieve(bad["query"], bad["keys"], bad["k"], metric=bad["metric"],
                                         exact=bad["exact"]), exc, names, "retrieve:")
        if HAS_KERNEL and kernel:
            assert_kernel_rejects(torch.ops._clfast_C.retrieve_topk, bad["query"], bad["keys"], bad["k"],
                                  bad["metric"])


@st.composite
def index_cases(draw):
    D = draw(st.integers(1, 12))
    metric = draw(st.sampled_from(rt.METRICS))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    exact = draw(st.booleans())
    index_type = draw(st.sampled_from(["hnsw", "ivf"]))
    chunks = draw(st.lists(st.integers(0, 25), min_size=1, max_size=4).filter(lambda c: sum(c) > 0))
    B = draw(st.integers(0, 5))
    k = draw(st.integers(1, sum(chunks)))
    return D, metric, dtype, exact, index_type, chunks, B, k, draw(seeds)


@budget(1.0)
@given(case=index_cases())
# found by this property: an empty first add made an untrained IVF index train on no rows (a faiss RuntimeError)
@example(case=(1, "cosine", torch.float32, False, "ivf", [0, 1], 0, 1, 0))
@counted
def test_key_index_equals_retrieve_over_its_keys(case):
    D, metric, dtype, exact, index_type, chunks, B, k, seed = case
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(sum(chunks), D, generator=g)
    q = torch.randn(B, D, generator=g)
    index = KeyIndex(D, metric, exact, dtype=dtype, index_type=index_type)
    start = 0
    for n in chunks:
        ids = index.add(keys[start:start + n])
        assert ids.tolist() == list(range(start, start + n))
        start += n
    assert len(index) == index.ntotal == keys.shape[0]
    stored = keys.to(dtype)
    s, i = index.search(q, k)
    assert s.shape == i.shape == (B, k)
    if exact:
        es, ei = retrieve(q, stored, k, metric=metric)
        assert torch.equal(i, ei) and torch.equal(s, es)
    elif B:
        assert all(len(set(row)) == k for row in i.tolist()) and 0 <= int(i.min()) <= int(i.max()) < start
        assert torch.equal(s, rt.score_rows(q, stored, i, metric)), "approximate scores are not the selected keys'"
        assert bool((s[:, :-1] >= s[:, 1:]).all()), "approximate results out of order"
    buf = io.BytesIO()
    torch.save(index.state_dict(), buf)
    buf.seek(0)
    fresh = KeyIndex(D, metric, exact, dtype=dtype, index_type=index_type)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    s2, i2 = fresh.search(q, k)
    assert torch.equal(s, s2) and torch.equal(i, i2), "the state_dict round trip changed the results"
    assert_rejected(lambda: index.search(q, start + 1), ValueError, {"k"}, "KeyIndex.search:")
    if not exact and index_type == "ivf":  # fewer training rows than IVF lists
        few = KeyIndex(D, metric, False, index_type="ivf", nlist=start + 1)
        assert_rejected(lambda: few.train(keys), ValueError, {"sample"}, "KeyIndex.train:")
        assert_rejected(lambda: few.add(keys), ValueError, {"sample"}, "KeyIndex.train:")
    assert_rejected(lambda: index.add(torch.randn(2, D + 1)), ValueError, {"keys"}, "KeyIndex.add:")


@st.composite
def kmeans_cases(draw):
    N, D = draw(st.integers(1, 40)), draw(st.integers(1, 8))
    K = draw(st.sampled_from([1, N]) | st.integers(1, N))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    return N, D, K, dtype, draw(st.integers(1, 4)), draw(st.booleans()), draw(seeds)


@budget(1.0)
@given(case=kmeans_cases())
@counted
def test_kmeans_assigns_a_nearest_centroid_and_is_deterministic(case):
    N, D, K, dtype, n_iter, spherical, seed = case
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(seed)).to(dtype)
    c, a = kmeans(x, K, n_iter=n_iter, seed=seed % 1000, spherical=spherical)
    assert c.shape == (K, D) and c.dtype == dtype and a.shape == (N,) and a.dtype == torch.int64
    assert 0 <= int(a.min()) and int(a.max()) < K
    metric = "ip" if spherical else "l2"
    pts, cen = x.double(), c.double()
    s = rt.pair_scores(pts[:, None, :], cen[None], metric)  # (N, K): float64 scores of every centroid
    got = s.gather(1, a[:, None])[:, 0]
    # assignments are computed in float32 (then the centroids are cast to x's dtype): nearest up to that rounding
    tol = 1e-4 * magnitude(s) if dtype != torch.bfloat16 else 2e-2 * magnitude(s)
    assert (s.max(1).values - got).max().item() <= tol
    c2, a2 = kmeans(x, K, n_iter=n_iter, seed=seed % 1000, spherical=spherical)
    assert torch.equal(c, c2) and torch.equal(a, a2)
    for bad, exc, name in ((0, ValueError, "n_clusters"), (N + 1, ValueError, "n_clusters"),
                           (True, ValueError, "n_clusters")):
        assert_rejected(lambda: kmeans(x, bad), exc, {name}, "kmeans:")
    assert_rejected(lambda: kmeans(x, K, n_iter=0), ValueError, {"n_iter"}, "kmeans:")
    assert_rejected(lambda: kmeans(x, K, seed=1.5), TypeError, {"seed"}, "kmeans:")
