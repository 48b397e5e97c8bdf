"""clfast.ops.retrieve: the reference against independent oracles (brute force in float64, FAISS's exact flat
index), every backend against the float64 reference (scores, indices, gradients; at 16 bits against stock
PyTorch's own error, computed by code written here), ties and NaN, registration (opcheck of every registered op,
torch.compile), bad input."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clfast.ops import _dispatch, retrieve, use_backend
from clfast.ops import retrieval as rt
from tests.ops._util import (CUDA, INTERPRETED, assert_compiles_like_eager, assert_within_2x_of_pytorch, forced,
                             magnitude, max_err, opcheck, poisoned_view, runnable_backends,
                             triton_kernels_in_compiled_graph)

OP = "retrieve"
METRICS = rt.METRICS
BACKENDS = runnable_backends(OP)
IN_OP = [n for n in BACKENDS if getattr(_dispatch.backends(OP)[n], "IN_OP", False)]


@functools.lru_cache(maxsize=1)
def _randn_case(B, M, D, seed):
    g = torch.Generator().manual_seed(seed + 7 * B + 13 * M + D)
    return torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(M, D, generator=g, dtype=torch.float64)


def make_case(B, M, D, *, dtype=torch.float64, key_dtype=None, noncontig=False, requires_grad=True, seed=0):
    q, k = (t.clone() for t in _randn_case(B, M, D, seed))  # the backends of one case share its inputs
    key_dtype = key_dtype or dtype
    q, k = q.to(dtype), k.to(key_dtype)
    if noncontig:
        qv, kv = poisoned_view((B, D), dtype), poisoned_view((M, D), key_dtype)
        qv.copy_(q), kv.copy_(k)
        q, k = qv, kv
    return q.requires_grad_(requires_grad), k.requires_grad_(requires_grad)


def run(name, q, k, kk, metric):
    return forced(OP, name, retrieve)(q, k, kk, metric=metric)


def true_scores(q, k, idx, metric):
    """Float64 scores of the chosen rows (what the selection is worth, whatever rounded it)."""
    return rt.score_rows(q.detach().double(), k.detach().double(), idx, metric)


def full_scores(q, k, metric):
    """Every float64 score of each row, sorted descending."""
    s, _ = rt.reference(q.detach().double(), k.detach().double(), k.shape[0], metric)
    return s


_REF64: dict = {}


def ref64(key, q, k, kk, metric):
    """(top-k scores, indices, all scores sorted) of the float64 reference, cached per case: the backends of
    one parametrised case share the same inputs."""
    key = (*key, kk, metric)
    if key not in _REF64:
        s_all, order = rt.reference(q.detach().double(), k.detach().double(), k.shape[0], metric)
        _REF64.clear()  # one case at a time: M = 100,001 rows of float64 are not small
        _REF64[key] = (s_all[:, :kk], order[:, :kk], s_all)
    return _REF64[key]


def separated(sorted_scores, kk, gap):
    """Rows whose k+1 best float64 scores are at least ``gap`` apart: there, every backend must return the
    reference's indices exactly (elsewhere near-ties may swap by rounding)."""
    top = sorted_scores[:, : kk + 1]
    if top.shape[1] == 1:
        return torch.ones(top.shape[0], dtype=torch.bool)
    return (top[:, :-1] - top[:, 1:]).min(dim=1).values > gap


# --------------------------------------------------------------------------------------------------
# The reference is the spec: check it against independent computations in float64
# --------------------------------------------------------------------------------------------------


def _oracle(q, k, metric):
    """Pairwise loops in float64, written without matmul."""
    B, M = q.shape[0], k.shape[0]
    s = torch.empty(B, M, dtype=torch.float64)
    for b in range(B):
        for m in range(M):
            if metric == "cosine":
                s[b, m] = (q[b] * k[m]).sum() / (max(q[b].norm().item(), 1e-12) * max(k[m].norm().item(), 1e-12))
            elif metric == "ip":
                s[b, m] = (q[b] * k[m]).sum()
            else:
                s[b, m] = -((q[b] - k[m]) ** 2).sum()
    # numpy's lexsort: by score descending, then index ascending
    order = np.stack([np.lexsort((np.arange(M), -row)) for row in s.numpy()])
    return s, torch.from_numpy(order)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("B,M,D,kk", [(1, 1, 59, 1), (3, 5, 59, 5), (2, 40, 7, 3)])
def test_reference_matches_pairwise_oracle(metric, B, M, D, kk):
    q, k = make_case(B, M, D, requires_grad=False)
    k[-1] = k[0]  # an exact tie (index 0 must come first)
    s, i = rt.reference(q, k, kk, metric)
    s_all, order = _oracle(q, k, metric)
    assert torch.equal(i, order[:, :kk])
    assert max_err(s, s_all.gather(1, order[:, :kk])) < 1e-12


@pytest.mark.parametrize("metric", METRICS)
def test_reference_matches_faiss_exact_flat_index(metric):
    """M = 100,001 keys, D = 59: FAISS IndexFlatIP / IndexFlatL2 (on normalised copies for cosine)."""
    import faiss
    q, k = make_case(3, 100_001, 59, requires_grad=False)
    s, i = rt.reference(q, k, 5, metric)
    qf, kf = q.float(), k.float()
    if metric == "cosine":
        qf, kf = F.normalize(qf, dim=-1), F.normalize(kf, dim=-1)
    index = faiss.IndexFlatL2(59) if metric == "l2" else faiss.IndexFlatIP(59)
    index.add(kf.numpy())
    dist, idx = index.search(qf.contiguous().numpy(), 5)
    fscore = -torch.from_numpy(dist).double() if metric == "l2" else torch.from_numpy(dist).double()
    assert max_err(s, fscore) < 1e-4 * magnitude(s)
    sep = separated(full_scores(q, k, metric), 5, 1e-4 * magnitude(s))
    assert sep.any()
    assert torch.equal(i[sep], torch.from_numpy(idx)[sep])


@pytest.mark.parametrize("metric", METRICS)
def test_reference_gradcheck(metric):
    q, k = make_case(2, 6, 5)
    assert torch.autograd.gradcheck(lambda a, b: rt.reference(a, b, 3, metric)[0], (q, k))
    assert torch.autograd.gradcheck(lambda a, b: retrieve(a, b, 3, metric=metric)[0], (q, k))


def test_score_rows_gradcheck():
    """The differentiable half of the fast backends (a zero key is excluded: F.normalize's gradient jumps
    there; that its gradient stays finite is tested below)."""
    q, k = make_case(2, 6, 5)
    idx = torch.tensor([[2, 0, 1], [5, 2, 3]])
    for metric in METRICS:
        assert torch.autograd.gradcheck(lambda a, b: rt.score_rows(a, b, idx, metric), (q, k))


# --------------------------------------------------------------------------------------------------
# Every backend against the float64 reference
# --------------------------------------------------------------------------------------------------

# (B, M, D, k, noncontig)
CASES = [
    (1, 1, 59, 1, False),     # M = 1
    (3, 5, 59, 5, False),     # M = k
    (4, 37, 16, 3, True),     # non-contiguous query and keys, NaN around them
    (17, 300, 64, 8, False),  # several tiles / blocks / splits
]
BIG = [(2, 100_001, 59, 5, False), (130, 3_000, 33, 16, False), (1, 4_000, 768, 1, True)]
LOWP_BIG = (40, 1_500, 33, 16, False)


def _ids(c):
    B, M, D, kk, nc = c
    return f"B{B}M{M}D{D}k{kk}" + ("-noncontig" if nc else "")


def _grid():
    # case-major, so that the backends of one case run one after another and share its float64 reference
    for c in CASES + BIG:
        for metric in METRICS:
            for name in BACKENDS:
                # the reference is checked against the oracles above; the interpreter is too slow for big
                # shapes, and at M > 40 runs cosine only
                if c in BIG and (name in INTERPRETED or name == "reference"):
                    continue
                if name in INTERPRETED and metric != "cosine" and c[1] > 40:
                    continue
                yield pytest.param(name, c, metric, id=f"{name}-{_ids(c)}-{metric}")


@pytest.mark.parametrize("name,case,metric", list(_grid()))
def test_backend_fp32_matches_float64_reference(name, case, metric):
    B, M, D, kk, nc = case
    cls = _dispatch.backends(OP)[name]
    q, k = make_case(B, M, D, dtype=torch.float32, noncontig=nc)
    ref_s, ref_i, ref_all = ref64(("fp32", *case), q, k, kk, metric)
    s, i = run(name, q, k, kk, metric)
    assert s.dtype == torch.float32 and i.dtype == torch.int64 and s.shape == i.shape == (B, kk)
    mag = magnitude(ref_s)
    tol = cls.ATOL[torch.float32] * mag
    # what was chosen is worth as much as the best choice, in float64
    assert max_err(true_scores(q, k, i, metric), ref_s) <= tol
    assert max_err(s, ref_s) <= tol
    assert all(len(set(row)) == kk for row in i.tolist()) and int(i.min()) >= 0 and int(i.max()) < M
    sep = separated(ref_all, kk, 10 * tol)
    assert torch.equal(i[sep], ref_i[sep])
    # gradients (rows with the reference's indices; near-tie rows legitimately differ). The dense key
    # gradient of a 10^5-row pool costs more than the rest of the test: the big pools check values only.
    if bool(sep.all()) and M <= 5_000:
        ds = torch.randn(B, kk, dtype=torch.float64)
        g = torch.autograd.grad(s, (q, k), ds.float())
        qd, kd = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
        # the reference's scores are pair scores gathered at its indices: their gradient is this one's
        gr = torch.autograd.grad(rt.score_rows(qd, kd, ref_i, metric), (qd, kd), ds)
        for a, r in zip(g, gr):
            assert torch.isfinite(a).all()
            assert max_err(a, r) <= cls.GRAD_ATOL[torch.float32] * magnitude(r) * mag


LOWP = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.bfloat16)]


def _lowp_grid():
    for c in (CASES[2], CASES[3], LOWP_BIG):
        for qd, kd in LOWP:
            for name in BACKENDS:
                cls = _dispatch.backends(OP)[name]
                if kd not in cls.DTYPES or (name != "reference" and qd not in cls.QUERY_DTYPES.get(kd, (kd,))):
                    continue
                # the interpreter takes the smallest case
                if (name in INTERPRETED) != (c == CASES[2]):
                    continue
                yield pytest.param(name, qd, kd, c, id=f"{name}-q{str(qd)[6:]}-k{str(kd)[6:]}-{_ids(c)}")


def stock_topk(q, k, kk, metric):
    """The same selection in stock PyTorch (STYLE.md §8; the "Equivalent PyTorch" of :func:`retrieve`): the full
    score matrix by a matmul in the inputs' (promoted) dtype, then a stable sort. Written here, independently of
    clfast, so that the reference backend at 16 bits is not measured against itself."""
    dt = torch.promote_types(q.dtype, k.dtype)
    q, k = q.to(dt), k.to(dt)
    if metric == "cosine":
        s = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T
    elif metric == "ip":
        s = q @ k.T
    else:
        s = -(q.square().sum(-1, keepdim=True) - 2 * (q @ k.T) + k.square().sum(-1))
    order = torch.sort(s.nan_to_num(nan=float("-inf")), dim=1, descending=True, stable=True).indices[:, :kk]
    return s.gather(1, order), order


_PEER: dict = {}


def _peer(key, q, k, kk, metric):
    """(float64 best scores, stock PyTorch's 16-bit top-k scores and indices), cached per case."""
    key = (*key, metric)
    if key not in _PEER:
        _PEER.clear()
        best = rt.reference(q.detach().double(), k.detach().double(), kk, metric)[0]
        _PEER[key] = (best, *stock_topk(q.detach(), k.detach(), kk, metric))
    return _PEER[key]


@pytest.mark.parametrize("name,qd,kd,case", list(_lowp_grid()))
def test_backend_low_precision_within_2x_of_pytorch_error(name, qd, kd, case):
    """For 16-bit inputs, the float64 value of the chosen keys falls short of the best by at most twice what
    stock PyTorch (:func:`stock_topk` in that dtype) loses (plus a small slack), and the scores are as accurate.
    Judged on the 16-bit inputs themselves (their rounding is not the backend's error)."""
    B, M, D, kk, nc = case
    cls = _dispatch.backends(OP)[name]
    q, k = make_case(B, M, D, dtype=qd, key_dtype=kd, noncontig=nc)
    for metric in METRICS:
        best, peer_s, peer_i = _peer((qd, kd, *case), q, k, kk, metric)
        s, i = run(name, q, k, kk, metric)
        assert s.dtype == torch.promote_types(qd, kd) and i.dtype == torch.int64
        mag = magnitude(best)
        low = torch.bfloat16 if torch.bfloat16 in (qd, kd) else torch.float16
        loss, peer_loss = (max_err(true_scores(q, k, idx, metric), best) for idx in (i, peer_i))
        err, peer_err = max_err(s, true_scores(q, k, i, metric)), max_err(peer_s, true_scores(q, k, peer_i, metric))
        assert loss <= cls.ATOL[low] * mag and err <= cls.ATOL[low] * mag, metric
        assert_within_2x_of_pytorch(loss, peer_loss, low, mag, what=f"{metric} selection")
        assert_within_2x_of_pytorch(err, peer_err, low, mag, what=f"{metric} scores")
        g = torch.autograd.grad(s.float().sum(), (q, k), allow_unused=True)
        assert all(t is None or torch.isfinite(t).all() for t in g)


# --------------------------------------------------------------------------------------------------
# Ties, NaN, zero norms, determinism, empty batches
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_ties_go_to_the_lower_index_on_every_backend(metric):
    """Duplicated keys and small-integer data: many exactly equal scores. Inner products and squared
    distances of small integers are exact in float32, so every backend returns the reference's indices.
    Cosines of distinct keys can be equal in exact arithmetic yet round apart differently per backend, so for
    cosine only the copies of one key are checked: whenever two made the list, they have equal scores and the
    lower index comes first."""
    g = torch.Generator().manual_seed(3)
    base = torch.randint(-2, 3, (40, 16), generator=g).float()
    keys = torch.cat([base, base, base[:7]])  # every key has a copy 40 rows later
    q = torch.randint(-2, 3, (5, 16), generator=g).float()
    ref_s, ref_i = rt.reference(q.double(), keys.double(), 12, metric)
    for name in BACKENDS:
        s, i = run(name, q, keys, 12, metric)
        assert max_err(s, ref_s) < 1e-5 * magnitude(ref_s), name
        if metric != "cosine":
            assert torch.equal(i, ref_i), name
        for row, srow in zip(i.tolist(), s.tolist()):
            for a in row:
                b = a + 40 if a + 40 in row else a + 80 if a + 80 in row else None
                if b is not None:
                    assert row.index(a) < row.index(b) and srow[row.index(a)] == srow[row.index(b)], name


def test_tie_straddling_the_kth_place():
    """More equal keys than places left: the lowest indices win, on every backend."""
    keys = torch.zeros(50, 4)
    keys[:, 0] = 1.0
    keys[10] = torch.tensor([2.0, 0, 0, 0])
    q = torch.tensor([[1.0, 0, 0, 0]])
    for name in BACKENDS:
        s, i = run(name, q, keys, 4, "ip")
        assert i.tolist() == [[10, 0, 1, 2]], name
        assert s.tolist() == [[2.0, 1.0, 1.0, 1.0]], name


def test_nan_keys_rank_last_and_zero_keys_are_defined():
    q, k = make_case(3, 30, 8, dtype=torch.float32, requires_grad=False)
    k[4] = float("nan")
    k[7] = 0.0
    for name in BACKENDS:
        for metric in METRICS:
            _, i = run(name, q, k, 30, metric)
            assert (i[:, -1] == 4).all(), (name, metric)
            _, i = run(name, q, k, 29, metric)
            assert not (i == 4).any(), (name, metric)
        s, i = run(name, q, k, 30, "cosine")
        assert (s[i == 7] == 0).all(), name


def test_zero_norm_key_gradient_is_finite():
    q, k = make_case(2, 5, 6, dtype=torch.float32)
    with torch.no_grad():
        k[1] = 0.0
    for name in BACKENDS:
        s, _ = run(name, q, k, 5, "cosine")
        gq, gk = torch.autograd.grad(s.sum(), (q, k))
        assert torch.isfinite(gq).all() and torch.isfinite(gk).all(), name


@pytest.mark.parametrize("name", IN_OP)
def test_backend_is_deterministic(name):
    q, k = make_case(9, 100 if name in INTERPRETED else 5000, 24, dtype=torch.float32)
    s1, i1 = run(name, q, k, 7, "cosine")
    s2, i2 = run(name, q, k, 7, "cosine")
    assert torch.equal(s1, s2) and torch.equal(i1, i2)


@pytest.mark.parametrize("name", BACKENDS)
def test_empty_batch(name):
    q, k = torch.randn(0, 8), torch.randn(5, 8)
    s, i = run(name, q, k, 2, "l2")
    assert s.shape == i.shape == (0, 2)


def test_thread_count_does_not_change_results():
    if "cpu" not in BACKENDS:
        pytest.fail("the C++ backend is not built (make setup builds it)")
    q, k = make_case(5, 3000, 40, dtype=torch.float32, requires_grad=False)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run("cpu", q, k, 6, "l2")
    finally:
        torch.set_num_threads(n)
    two = run("cpu", q, k, 6, "l2")
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def _peak_rss_growth_mb(fn):
    """Growth of peak resident memory over fn() (Linux: VmHWM reset through /proc/self/clear_refs)."""
    def status(key):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(key)).split()[1]) / 1024

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs /proc/self/clear_refs (Linux)")
    before = status("VmRSS:")
    fn()
    return status("VmHWM:") - before


def test_cpu_backend_never_holds_the_score_matrix():
    """B = 128 queries over M = 200,000 keys: a (B, M) float32 matrix would be 98 MB; the C++ scan keeps
    per-thread tiles and lists only."""
    if "cpu" not in BACKENDS:
        pytest.fail("the C++ backend is not built (make setup builds it)")
    g = torch.Generator().manual_seed(5)
    keys = torch.rand(200_000, 64, generator=g)
    q = torch.rand(128, 64, generator=g)
    run("cpu", q, keys, 5, "cosine")  # warm up (thread pools, allocator)
    assert _peak_rss_growth_mb(lambda: run("cpu", q, keys, 5, "cosine")) < 20


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


def test_cpu_backend_is_the_default_on_cpu():
    if "cpu" not in BACKENDS:
        pytest.fail(f"the C++ backend is not available: {_dispatch.backends(OP)['cpu'].unavailable_reason()}")
    q, k = make_case(2, 100, 8, dtype=torch.float32, requires_grad=False)
    assert _dispatch.select(OP, rt._validate(q, k, 3, "cosine", True)).NAME == "cpu"


def test_float64_goes_to_a_float64_backend():
    q, k = make_case(2, 10, 8, requires_grad=False)
    chosen = _dispatch.select(OP, rt._validate(q, k, 3, "cosine", True))
    assert torch.float64 in chosen.DTYPES
    s, i = retrieve(q, k, 3)
    rs, ri = rt.reference(q, k, 3)
    assert torch.equal(i, ri) and max_err(s, rs) < 1e-12


def test_faiss_threshold_and_forcing():
    cls = _dispatch.backends(OP)["faiss"]
    q, k = make_case(1, 10, 4, dtype=torch.float32, requires_grad=False)
    inputs = rt._validate(q, k, 1, "cosine", True)
    assert any("CLFAST_FAISS_MIN_KEYS" in r for r in cls.extra_reasons(inputs))
    with use_backend("faiss", op=OP):
        assert not any("CLFAST_FAISS_MIN_KEYS" in r for r in cls.extra_reasons(inputs))
    old = rt.faiss_min_keys()
    try:
        rt.set_faiss_min_keys(5)
        assert not cls.extra_reasons(inputs)
    finally:
        rt.set_faiss_min_keys(old)


# --------------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", IN_OP)
@pytest.mark.parametrize("metric", METRICS)
def test_opcheck(name, metric):
    """The registered op the backend selects in: clfast::retrieve (by name) or clfast::retrieve_triton (under the
    Triton interpreter, the parts that run there)."""
    q, k = make_case(3, 50, 8, dtype=torch.float32)
    if getattr(_dispatch.backends(OP)[name], "SHARED_OP", False):
        opcheck(torch.ops.clfast.retrieve.default, (q, k, 4, metric, name))
    else:
        opcheck(torch.ops.clfast.retrieve_triton.default, (q, k, 4, metric), interpreted=name in INTERPRETED)


def test_shared_op_refuses_a_backend_with_an_op_of_its_own():
    q, k = make_case(3, 50, 8, dtype=torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="backend 'triton' does not run inside the op"):
        torch.ops.clfast.retrieve(q, k, 4, "cosine", "triton")


class _TinyPool(torch.nn.Module):
    """L2P-style: a query projection, a key pool, top-k prompts and the pull constraint on the scores."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(12, 16)
        self.keys = torch.nn.Parameter(torch.randn(10, 16))
        self.prompts = torch.nn.Parameter(torch.randn(10, 3))

    def forward(self, x):
        s, i = retrieve(self.proj(x), self.keys, 3, metric="cosine")
        return (self.prompts[i].sum() - s.sum()) * 0.5


@pytest.mark.parametrize("name", [n for n in BACKENDS if n not in INTERPRETED])
def test_torch_compile_fullgraph_no_graph_break(name):
    model = _TinyPool()
    assert_compiles_like_eager(model, list(model.parameters()), torch.randn(4, 12), backend=name, op=OP)


@pytest.mark.skipif(not CUDA, reason="compiling through a triton_op needs a GPU: under the Triton interpreter "
                                     "its FakeTensor trace launches kernels on tensors without data")
def test_torch_compile_sees_the_triton_kernel():
    """On CUDA, torch.compile(fullgraph=True) traces into clfast::retrieve_triton: the graph launches the top-k
    kernel (no opaque op), and loss and gradients match eager."""
    model = _TinyPool().cuda()
    launched = triton_kernels_in_compiled_graph(model, list(model.parameters()), torch.randn(4, 12).cuda(),
                                                backend="triton", op=OP)
    assert "_retrieve_topk_kernel" in launched


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mutate,exc,needle", [
    (lambda a: {**a, "k": 0}, ValueError, "k must be in [1, M] = [1, 6]"),
    (lambda a: {**a, "k": 7}, ValueError, "k must be in [1, M] = [1, 6]"),
    (lambda a: {**a, "k": 2.0}, TypeError, "k must be an int"),
    (lambda a: {**a, "k": True}, TypeError, "k must be an int"),
    (lambda a: {**a, "query": a["query"][0]}, ValueError, "query must have shape (B,D)"),
    (lambda a: {**a, "keys": a["keys"][None]}, ValueError, "keys must have shape (M,D) = (M,8)"),
    (lambda a: {**a, "keys": a["keys"][:, :5]}, ValueError, "keys must have shape (M,D) = (M,8) to match query"),
    (lambda a: {**a, "query": a["query"].long()}, TypeError, "query must be float32"),
    (lambda a: {**a, "keys": a["keys"].int()}, TypeError, "keys must be float32"),
    (lambda a: {**a, "keys": a["keys"].double()}, TypeError, "keys must have query's dtype"),
    (lambda a: {**a, "query": a["query"].bfloat16()}, TypeError, "keys must have query's dtype"),
    (lambda a: {**a, "query": a["query"].tolist()}, TypeError, "query must be a torch.Tensor"),
    (lambda a: {**a, "keys": None}, TypeError, "keys must be a torch.Tensor"),
    (lambda a: {**a, "metric": "dot"}, ValueError, "metric must be one of cosine, ip, l2"),
    (lambda a: {**a, "exact": 1}, TypeError, "exact must be a bool"),
    (lambda a: {**a, "keys": a["keys"].to("meta")}, ValueError, "keys must be on query's device"),
    (lambda a: {**a, "query": a["query"][:, :0], "keys": a["keys"][:, :0]}, ValueError, "D >= 1"),
])
def test_bad_input_names_the_argument(mutate, exc, needle):
    a = mutate(dict(query=torch.randn(2, 8), keys=torch.randn(6, 8), k=2, metric="cosine", exact=True))
    with pytest.raises(exc) as info:
        retrieve(a["query"], a["keys"], a["k"], metric=a["metric"], exact=a["exact"])
    assert needle in str(info.value)


def test_c_kernel_checks_its_own_preconditions():
    """The Python layer validates first, but calling the kernel directly must raise, not crash."""
    if "cpu" not in BACKENDS:
        pytest.fail("the C++ backend is not built (make setup builds it)")
    q, k = torch.randn(2, 8), torch.randn(6, 8)
    kern = torch.ops._clfast_C.retrieve_topk
    with pytest.raises(RuntimeError, match="k must be in"):
        kern(q, k, 7, "cosine")
    with pytest.raises(RuntimeError, match="keys must have shape"):
        kern(q, k[:, :3], 1, "cosine")
    with pytest.raises(RuntimeError, match="metric must be"):
        kern(q, k, 1, "dot")
    with pytest.raises(RuntimeError, match="keys must be float32"):
        kern(q.double(), k.double(), 1, "ip")
