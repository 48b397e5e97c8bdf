"""Property-based tests of clfast.ops.mahalanobis, gaussian_kl and GaussianStats (hypothesis; profiles in
tests/conftest.py).

Properties: every backend that claims an input (dtype, shapes with empty and size-1 dims, the matrix and the
diagonal factor, a shared or per-row prior, layouts) gives the float64 reference's output and every gradient
within its tolerances, the factor's gradient lower-triangular, and writes nothing into its inputs; a NaN or
Inf entry makes exactly the reference's outputs non-finite (never a finite number where the reference has
none); invalid input raises ValueError/TypeError naming the argument (a factor with a diagonal entry <= 0 or
NaN, or anything above its diagonal, included) and the C++ kernels called directly with it raise; streaming
GaussianStats in any chunks and groups equals the one-shot float64 statistics, and merge equals update."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from clfast.ops import GaussianStats, _dispatch, gaussian_kl, mahalanobis, use_backend
from clfast.ops import gaussian as g_mod
from tests.ops._fuzz import (FLOATS, as_float64, assert_close, assert_kernel_rejects, assert_rejected,
                             assert_unchanged, budget, claiming, counted, dtypes, emptied, grads_of, is_tiny, layouts,
                             leaves, make_tensor, normal, seeds, shape_mutations, snapshot, uniform)
from tests.ops._util import runnable_backends

MAHA, KL = "mahalanobis", "gaussian_kl"
HAS_KERNEL = "cpu" in runnable_backends(MAHA)
sizes = st.one_of(st.integers(1, 9), st.sampled_from([16, 17, 33]))
# crossing the C++ few-row loops (B + K <= 8) and its triangular block (128)
dims = st.one_of(st.integers(1, 12), st.sampled_from([0, 31, 32, 33, 127, 128, 129, 257]))


def make_factor(D, diagonal, dtype, layout, seed):
    """A well-conditioned factor: a positive vector, or lower-triangular with a positive diagonal (stored in the
    drawn layout: a permuted layout stores it transposed, i.e. as an upper-triangular matrix's view)."""
    if diagonal:
        return make_tensor((D,), dtype, layout, seed, uniform(0.5, 1.5))

    def lower(shape, g):
        L = torch.randn(shape, generator=g, dtype=torch.float64).tril(-1) / math.sqrt(max(D, 1))
        if shape[0] == shape[1]:
            L.diagonal().copy_(torch.rand(shape[0], generator=g, dtype=torch.float64) + 0.5)
        return L

    if layout[0] == "expanded":  # a broadcast matrix cannot be triangular with a positive diagonal
        layout = ("contiguous", None)
    return make_tensor((D, D), dtype, layout, seed, lower)


@st.composite
def maha_cases(draw, small=False):
    dtype = draw(dtypes())
    B, K = draw(emptied(B=draw(st.integers(1, 4) if small else sizes),
                        K=draw(st.integers(1, 4) if small else sizes))).values()
    D = draw(st.integers(1, 6) if small else dims)
    diagonal = draw(st.booleans())
    seed = draw(seeds)
    offset = draw(st.sampled_from([0.0, 0.0, 30.0]))  # features far from the origin (the fast paths centre)
    x = make_tensor((B, D), dtype, draw(layouts(2)), seed, lambda s, g: torch.randn(s, generator=g,
                                                                                     dtype=torch.float64) + offset)
    means = make_tensor((K, D), dtype, draw(layouts(2)), seed + 1, lambda s, g: torch.randn(
        s, generator=g, dtype=torch.float64) + offset)
    L = make_factor(D, diagonal, dtype, draw(layouts(1 if diagonal else 2)), seed + 2)
    return [x, means, L], dtype


@st.composite
def kl_cases(draw, small=False):
    dtype = draw(dtypes())
    B, D = draw(emptied(B=draw(st.integers(1, 4) if small else sizes)))["B"], draw(st.integers(1, 6) if small else dims)
    diagonal, shared = draw(st.booleans()), draw(st.booleans())
    seed = draw(seeds)
    mu = make_tensor((B, D), dtype, draw(layouts(2)), seed)
    log_var = make_tensor((B, D), dtype, draw(layouts(2)), seed + 1, normal(0.5))
    prior = make_tensor((D,) if shared else (B, D), dtype, draw(layouts(1 if shared else 2)), seed + 2)
    L = make_factor(D, diagonal, dtype, draw(layouts(1 if diagonal else 2)), seed + 3)
    return [mu, log_var, prior, L], dtype


def check_backends(op, fn, reference, tensors, dtype, out_shape, inputs):
    g = torch.Generator().manual_seed(3)
    dout = torch.randn(out_shape, generator=g, dtype=torch.float64).to(dtype)
    x64 = as_float64(tensors)
    ref = reference(*x64)
    ref_grads = grads_of(ref, x64, dout.double())
    tiny = is_tiny(*(s for t in tensors for s in t.shape))
    names = claiming(op, inputs, tiny=tiny)
    assert "reference" in names
    # Below float64 the reference backend is stock PyTorch at that dtype: its errors are the peer's (STYLE.md §8).
    peer = [None] * (1 + len(tensors))
    for name in names:
        cls = _dispatch.backends(op)[name]
        x = leaves(tensors)
        snap = snapshot(x)
        with use_backend(name, op=op):
            out = fn(*x)
        assert out.dtype == dtype and out.shape == out_shape, name
        got = grads_of(out, x, dout)
        if name == "reference" and dtype != torch.float64:
            peer = [out, *got]
        assert_close(out, ref, cls.ATOL[dtype], f"{name} out", peer=peer[0])
        for i, (gr, r, p) in enumerate(zip(got, ref_grads, peer[1:])):
            assert gr.dtype == dtype, (name, i)
            assert_close(gr, r, cls.GRAD_ATOL[dtype], f"{name} gradient {i}", peer=p)
        if tensors[-1].dim() == 2:
            assert bool((got[-1].triu(1) == 0).all()), f"{name}: the factor's gradient is not lower-triangular"
        assert_unchanged(snap)


@budget(1.0)
@given(case=maha_cases(small=True) | maha_cases())  # small: the Triton interpreter joins
# found by this property: with no means (K = 0) the torch backend centred on their NaN mean: NaN gradients of x
@example(case=([torch.randn(3, 4), torch.randn(0, 4), torch.eye(4)], torch.float32))
@counted
def test_mahalanobis_every_backend_matches_the_float64_reference(case):
    (x, means, L), dtype = case
    inputs = g_mod._validate_mahalanobis(x, means, L)
    check_backends(MAHA, mahalanobis, g_mod.mahalanobis_reference, [x, means, L], dtype,
                   (x.shape[0], means.shape[0]), inputs)


@budget(1.0)
@given(case=kl_cases(small=True) | kl_cases())  # small: the Triton interpreter joins
@counted
def test_gaussian_kl_every_backend_matches_the_float64_reference(case):
    tensors, dtype = case
    inputs = g_mod._validate_kl(*tensors)
    check_backends(KL, gaussian_kl, g_mod.gaussian_kl_reference, tensors, dtype, (tensors[0].shape[0],), inputs)


@st.composite
def poisoned(draw, op):
    """A small float32/float64 case of ``op`` with one entry of one input (not the factor, whose values are
    checked) set to NaN, +Inf or -Inf."""
    tensors, _ = draw((maha_cases if op == MAHA else kl_cases)(small=True))
    dtype = draw(dtypes((torch.float32, torch.float64)))
    tensors = [t.detach().to(dtype, copy=True).contiguous() for t in tensors]
    candidates = [i for i, t in enumerate(tensors[:-1]) if t.numel()]
    if candidates:
        i = draw(st.sampled_from(candidates))
        pos = tuple(draw(st.integers(0, s - 1)) for s in tensors[i].shape)
        tensors[i][pos] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    return tensors


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on NaN/Inf
@budget(1.0)
@given(maha=poisoned(MAHA), kl=poisoned(KL))
# found by this property: the C++ and Triton epilogues clamped a NaN distance to 0; a NaN mean reached every distance
# through the centring (torch backend) or became 0 (C++, Triton)
@example(maha=[torch.tensor([[1.0, 2.0], [float("nan"), 0.0]]), torch.randn(2, 2), torch.eye(2)],
         kl=[torch.randn(1, 2), torch.randn(1, 2), torch.randn(2), torch.eye(2)])
@example(maha=[torch.randn(2, 2) + 30, torch.tensor([[float("nan"), 30.0], [31.0, 29.0]]), torch.eye(2)],
         kl=[torch.randn(1, 2), torch.randn(1, 2), torch.randn(2), torch.eye(2)])
@counted
def test_nan_and_inf_reach_exactly_the_reference_outputs(maha, kl):
    """Where the reference's result is non-finite the backend's is too, and finite where it is finite. (The kind of
    non-finite may differ: the reference's 0 · Inf in a projection gives NaN where a fused one gives Inf.)"""
    for op, fn, ref_fn, tensors, validate in ((MAHA, mahalanobis, g_mod.mahalanobis_reference, maha,
                                               g_mod._validate_mahalanobis),
                                              (KL, gaussian_kl, g_mod.gaussian_kl_reference, kl, g_mod._validate_kl)):
        inputs = validate(*tensors)
        ref = ref_fn(*as_float64(tensors)).detach()
        for name in claiming(op, inputs, tiny=True):
            cls = _dispatch.backends(op)[name]
            with use_backend(name, op=op):
                out = fn(*tensors)
            assert_close(out, ref, cls.ATOL[tensors[0].dtype], f"{name} {op}", same_nan=False)


def maha_valid(shapes):
    x, m, L = shapes["x"], shapes["means"], shapes["prec_chol"]
    return len(x) == 2 and len(m) == 2 and m[1] == x[1] and L in ((x[1],), (x[1], x[1]))


def kl_valid(shapes):
    mu, lv, pm, L = shapes["mu"], shapes["log_var"], shapes["prior_mean"], shapes["prec_chol"]
    return len(mu) == 2 and lv == mu and pm in (mu, mu[1:]) and L in (mu[1:], (mu[1], mu[1]))


ARGS = {MAHA: ["x", "means", "prec_chol"], KL: ["mu", "log_var", "prior_mean", "prec_chol"]}
INVALID = ["shape", "dtype", "int", "not_tensor", "factor_values"]


def invalid_calls(op, kind, args, dtype, data):
    """Changed copies of the valid ``args`` that ``op`` must reject: (args, exception, names it may quote)."""
    names_, L = ARGS[op], args["prec_chol"]
    D = L.shape[0]
    if kind == "shape":
        factor = "D D" if L.dim() == 2 else "D"
        spec = ({"x": "B D", "means": "K D", "prec_chol": factor} if op == MAHA else
                {"mu": "B D", "log_var": "B D", "prior_mean": "D" if args["prior_mean"].dim() == 1 else "B D",
                 "prec_chol": factor})
        name, shape, names = data.draw(shape_mutations(spec, args))
        new = torch.randn(shape).to(dtype)
        if name == "prec_chol":  # valid values, so that only the shape is wrong
            new = (torch.eye(shape[0]) + torch.randn(shape).tril(-1)).to(dtype) if (
                len(shape) == 2 and shape[0] == shape[1]) else torch.ones(shape, dtype=dtype)
        return [({**args, name: new}, ValueError, names)]
    if kind == "dtype":
        other = data.draw(st.sampled_from([d for d in FLOATS if d != dtype]))
        return [({**args, n: args[n].to(other)}, TypeError, {n} | ({names_[1]} if n == names_[0] else set()))
                for n in names_]
    if kind in ("int", "not_tensor"):
        return [({**args, n: args[n].to(torch.int64) if kind == "int" else args[n].tolist()}, TypeError, {n})
                for n in names_]
    out = []
    i = data.draw(st.integers(0, D - 1))
    for value in (0.0, -1.0, float("nan"), "upper"):
        bad = L.detach().clone()
        if value == "upper":
            if L.dim() == 1 or D == 1:
                continue
            bad[0, D - 1] = 0.5
        else:
            (bad if bad.dim() == 1 else bad.diagonal())[i] = value
        out.append(({**args, "prec_chol": bad}, ValueError, {"prec_chol"}))
    return out


@pytest.mark.parametrize("kind", INVALID)
@pytest.mark.parametrize("op", [MAHA, KL])
@budget(1.0)
@given(data=st.data())
@counted
def test_invalid_input_raises_naming_the_argument(op, kind, data):
    """Each kind of invalid input (for every argument; every bad factor value) raises ValueError/TypeError naming
    the argument; a changed shape that is still valid (a factor of the other form, a shared prior) is left to the
    tests above. The C++ kernels called directly with a bad shape or dtype raise (the factor's values are the op's
    to check)."""
    tensors, dtype = data.draw(maha_cases(small=True) if op == MAHA else kl_cases(small=True))
    args = dict(zip(ARGS[op], tensors))
    fn = mahalanobis if op == MAHA else gaussian_kl
    kernel = torch.ops._clfast_C.mahalanobis_fwd if op == MAHA else torch.ops._clfast_C.gaussian_kl_fwd
    for bad, exc, names in invalid_calls(op, kind, args, dtype, data):
        call = [bad[n] for n in ARGS[op]]
        if kind == "shape" and (maha_valid if op == MAHA else kl_valid)({n: tuple(t.shape) for n, t in bad.items()}):
            continue
        assert_rejected(lambda: fn(*call), exc, names, f"{op}:")
        if HAS_KERNEL and kind != "factor_values":
            assert_kernel_rejects(kernel, *call)


@st.composite
def stats_cases(draw):
    D, G = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    chunks = draw(st.lists(st.integers(0, 12), min_size=1, max_size=5))
    per_row = draw(st.booleans())
    dtype = draw(dtypes())
    return D, G, chunks, per_row, dtype, draw(seeds)


@budget(2.0)
@given(case=stats_cases())
@counted
def test_gaussian_stats_streaming_equals_one_shot(case):
    """Rows added in any chunks (empty ones too), to groups given per chunk or per row, give the float64 one-shot
    per-group means and pooled within-group scatter; merging two halves equals adding everything to one."""
    D, G, chunks, per_row, dtype, seed = case
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(n, D, generator=g, dtype=torch.float64) * 3 + 5).to(dtype) for n in chunks]
    groups = [torch.randint(0, G, (n,), generator=g) if per_row else int(torch.randint(0, G, (), generator=g))
              for n in chunks]
    stats, a, b = GaussianStats(D, G), GaussianStats(D, G), GaussianStats(D, G)
    for i, (x, grp) in enumerate(zip(xs, groups)):
        stats.update(x, grp)
        (a if i % 2 else b).update(x, grp)
    rows = torch.cat([x.double() for x in xs]) if xs else torch.zeros(0, D, dtype=torch.float64)
    labels = torch.cat([grp if isinstance(grp, torch.Tensor) else torch.full((x.shape[0],), grp)
                        for x, grp in zip(xs, groups)])
    count = torch.bincount(labels, minlength=G).double()
    mean = torch.zeros(G, D, dtype=torch.float64).index_add_(0, labels, rows) / count.clamp_min(1)[:, None]
    centred = rows - mean[labels]
    scatter = centred.T @ centred
    scale = max(1.0, float(rows.abs().max()) if rows.numel() else 1.0) ** 2 * max(1, rows.shape[0])
    assert torch.equal(stats.count, count)
    assert (stats.mean - mean).abs().max().item() <= 1e-12 * scale
    assert (stats.scatter - scatter).abs().max().item() <= 1e-12 * scale
    merged = a.merge(b)
    assert torch.equal(merged.count, count)
    assert (merged.mean - mean).abs().max().item() <= 1e-12 * scale
    assert (merged.scatter - scatter).abs().max().item() <= 1e-12 * scale
    if rows.shape[0]:
        bad = torch.full((1,), G, dtype=torch.int64)
        assert_rejected(lambda: stats.update(xs[0][:1] if xs[0].shape[0] else rows[:1], bad), ValueError, {"groups"},
                        "GaussianStats.update:")
    assert_rejected(lambda: stats.update(torch.randn(2, D + 1)), ValueError, {"x"}, "GaussianStats.update:")
