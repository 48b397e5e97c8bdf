"""clfast.ops.mahalanobis, gaussian_kl and GaussianStats: the references against independent oracles (scipy's
Mahalanobis distance, torch.distributions' KL of MultivariateNormals), every backend against the float64
reference (outputs and every gradient; at 16 bits against stock PyTorch's own error, computed by code written
here), registration (opcheck of every registered op, torch.compile), bad input, and the streaming statistics
(chunking, groups, shrinkage, the precision factor, a 2-process all-reduce)."""

from __future__ import annotations

import datetime
import math
import os

import pytest
import torch
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from clfast.ops import GaussianStats, _dispatch, gaussian_kl, mahalanobis, use_backend
from clfast.ops import gaussian as g_mod
from tests.ops._util import (CUDA, INTERPRETED, assert_compiles_like_eager, assert_low_precision,
                             backward_op, cast, forced, free_port, fused_backends, grads, magnitude, max_err, opcheck,
                             run_processes, runnable_backends, triton_kernels_in_compiled_graph)

MAHA, KL = "mahalanobis", "gaussian_kl"


def make_chol(D, *, diagonal=False, seed=0, dtype=torch.float64):
    """A well-conditioned lower factor with a positive diagonal (or a positive vector)."""
    g = torch.Generator().manual_seed(seed)
    if diagonal:
        return (torch.rand(D, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    L = torch.randn(D, D, generator=g, dtype=torch.float64).tril(-1) / math.sqrt(D)
    L.diagonal().copy_(torch.rand(D, generator=g, dtype=torch.float64) + 0.5)
    return L.to(dtype)


def make_maha(B, K, D, *, diagonal=False, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(100 * B + 10 * K + D + seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) + offset
    means = torch.randn(K, D, generator=g, dtype=torch.float64) + offset
    return x, means, make_chol(D, diagonal=diagonal, seed=seed + D)


def make_kl(B, D, *, diagonal=False, shared_prior=False, seed=0):
    g = torch.Generator().manual_seed(1000 + 10 * B + D + seed)
    mu = torch.randn(B, D, generator=g, dtype=torch.float64)
    log_var = 0.5 * torch.randn(B, D, generator=g, dtype=torch.float64)
    prior = torch.randn(*(() if shared_prior else (B,)), D, generator=g, dtype=torch.float64)
    return mu, log_var, prior, make_chol(D, diagonal=diagonal, seed=seed + D)


def _prep(tensors, dtype, noncontig=False):
    return cast(tensors, dtype, noncontig=noncontig, min_dim=2)  # matrices as poisoned views, vectors as they are


# --------------------------------------------------------------------------------------------------
# The references against independent oracles
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("diagonal", [False, True])
def test_mahalanobis_reference_matches_scipy(diagonal):
    x, means, L = make_maha(4, 3, 7, diagonal=diagonal)
    P = torch.diag(L ** 2) if diagonal else L @ L.T
    out = g_mod.mahalanobis_reference(x, means, L)
    for b in range(4):
        for k in range(3):
            d = scipy_mahalanobis(x[b].numpy(), means[k].numpy(), P.numpy())
            assert abs(out[b, k].item() - d * d) < 1e-12 * max(1.0, d * d)


@pytest.mark.parametrize("diagonal,shared", [(False, False), (False, True), (True, False)])
def test_gaussian_kl_reference_matches_torch_distributions(diagonal, shared):
    from torch.distributions import MultivariateNormal, kl_divergence

    mu, log_var, prior, L = make_kl(3, 6, diagonal=diagonal, shared_prior=shared)
    P = torch.diag(L ** 2) if diagonal else L @ L.T
    q = MultivariateNormal(mu, scale_tril=torch.diag_embed((0.5 * log_var).exp()))
    p = MultivariateNormal(prior.expand_as(mu), precision_matrix=P)
    oracle = kl_divergence(q, p)
    assert max_err(g_mod.gaussian_kl_reference(mu, log_var, prior, L), oracle) < 1e-10


def test_gaussian_kl_is_zero_at_the_prior_and_positive_elsewhere():
    D = 5
    S = torch.rand(D, dtype=torch.float64) + 0.5  # diagonal prior covariance
    l = S.rsqrt()
    m = torch.randn(D, dtype=torch.float64)
    kl = g_mod.gaussian_kl_reference(m[None], S.log()[None], m, l)
    assert abs(kl.item()) < 1e-12
    mu, log_var, prior, L = make_kl(6, D)
    assert (g_mod.gaussian_kl_reference(mu, log_var, prior, L) > 0).all()


@pytest.mark.parametrize("diagonal", [False, True])
def test_reference_gradcheck(diagonal):
    x, means, L = make_maha(3, 2, 4, diagonal=diagonal)
    assert torch.autograd.gradcheck(g_mod.mahalanobis_reference,
                                    [t.clone().requires_grad_() for t in (x, means, L)])
    args = [t.clone().requires_grad_() for t in make_kl(3, 4, diagonal=diagonal)]
    assert torch.autograd.gradcheck(g_mod.gaussian_kl_reference, args)


# --------------------------------------------------------------------------------------------------
# Every backend against the float64 reference
# --------------------------------------------------------------------------------------------------

# (B, K, D, diagonal, noncontig); D = 300 crosses the C++ triangular block size, B + K <= 8 the few-row loops,
# B + K = 160 splits the row-parallel GEMMs over two threads with x and mean rows in one task.
MAHA_CASES = [(1, 1, 8, False, False), (5, 7, 59, False, False), (3, 2, 59, True, True), (2, 3, 300, False, False),
              (20, 30, 300, False, True), (33, 1, 16, True, False), (70, 90, 300, False, False)]
MAHA_INTERP = [(1, 1, 8, False, False), (5, 7, 59, False, False), (3, 2, 20, True, True), (17, 18, 40, False, True)]


def _maha_grid():
    for name in runnable_backends(MAHA):
        for c in (MAHA_INTERP if name in INTERPRETED else MAHA_CASES):
            B, K, D, diag, nc = c
            yield pytest.param(name, c, id=f"{name}-B{B}K{K}D{D}" + ("-diag" if diag else "") + ("-nc" if nc else ""))


@pytest.mark.parametrize("name,case", list(_maha_grid()))
def test_mahalanobis_backend_fp32_matches_float64_reference(name, case):
    B, K, D, diagonal, noncontig = case
    cls = _dispatch.backends(MAHA)[name]
    tensors = make_maha(B, K, D, diagonal=diagonal)
    dout = torch.randn(B, K, dtype=torch.float64)
    ref, ref_g = grads(g_mod.mahalanobis_reference, tensors, dout)
    out, got = grads(forced(MAHA, name, mahalanobis), _prep(tensors, torch.float32, noncontig), dout.float())
    assert out.dtype == torch.float32 and out.shape == (B, K)
    assert (out >= 0).all()
    assert max_err(out, ref) <= cls.ATOL[torch.float32] * magnitude(ref)
    for gg, r in zip(got, ref_g):
        assert gg.shape == r.shape and torch.isfinite(gg).all()
        assert max_err(gg, r) <= cls.GRAD_ATOL[torch.float32] * magnitude(r)
    if not diagonal:
        assert torch.all(got[2].triu(1) == 0)  # the factor's gradient stays lower-triangular


@pytest.mark.parametrize("name", [n for n in runnable_backends(MAHA) if n != "reference"])
def test_mahalanobis_far_from_origin_keeps_fp32_accuracy(name):
    """Features with a large shared offset (real embeddings): the fast backends centre on the means first, so
    the expansion ‖y‖² − 2y·m + ‖m‖² does not cancel away the distances."""
    tensors = make_maha(6, 5, 32, offset=300.0)
    ref = g_mod.mahalanobis_reference(*tensors)
    with use_backend(name, op=MAHA):
        out = mahalanobis(*_prep(tensors, torch.float32))
    assert max_err(out, ref) <= 1e-4 * magnitude(ref)


@pytest.mark.parametrize("name", [n for n in runnable_backends(MAHA) if n not in {"reference"} | INTERPRETED])
def test_mahalanobis_memory_is_o_bk_not_o_bkd(name):
    """Fast backends never hold a (B,K,D) tensor: the largest allocation of forward + backward stays far below
    it (the reference, which forms the differences, is the control)."""
    from torch.profiler import profile

    B, K, D = 64, 64, 256
    x, means, L = (t.float().requires_grad_() for t in make_maha(B, K, D))

    def peak_alloc(backend):
        with profile(profile_memory=True) as prof:
            with use_backend(backend, op=MAHA):
                out = mahalanobis(x, means, L)
            torch.autograd.grad(out, (x, means, L), torch.ones_like(out))
        return max(e.cpu_memory_usage for e in prof.events())

    bkd = B * K * D * 4
    assert peak_alloc("reference") >= bkd
    assert peak_alloc(name) < bkd / 4


def test_mahalanobis_of_a_point_to_itself_is_zero():
    x, _, L = make_maha(4, 1, 16)
    for name in runnable_backends(MAHA):
        with use_backend(name, op=MAHA):
            d = mahalanobis(x.float(), x.float(), L.float())
        assert (torch.diagonal(d) <= 1e-4).all() and (torch.diagonal(d) >= 0).all(), name


KL_CASES = [(1, 8, False, False, False), (5, 59, False, True, False), (4, 59, True, False, True),
            (12, 300, False, False, True), (2, 300, False, True, False), (9, 17, True, True, False),
            (150, 300, False, False, False)]
KL_INTERP = [(1, 8, False, False, False), (5, 40, False, True, False), (4, 20, True, False, True),
             (17, 33, False, False, True)]


def _kl_grid():
    for name in runnable_backends(KL):
        for c in (KL_INTERP if name in INTERPRETED else KL_CASES):
            B, D, diag, shared, nc = c
            yield pytest.param(name, c, id=f"{name}-B{B}D{D}" + ("-diag" if diag else "") + (
                "-shared" if shared else "") + ("-nc" if nc else ""))


@pytest.mark.parametrize("name,case", list(_kl_grid()))
def test_gaussian_kl_backend_fp32_matches_float64_reference(name, case):
    B, D, diagonal, shared, noncontig = case
    cls = _dispatch.backends(KL)[name]
    tensors = make_kl(B, D, diagonal=diagonal, shared_prior=shared)
    dout = torch.randn(B, dtype=torch.float64)
    ref, ref_g = grads(g_mod.gaussian_kl_reference, tensors, dout)
    out, got = grads(forced(KL, name, gaussian_kl), _prep(tensors, torch.float32, noncontig), dout.float())
    assert out.dtype == torch.float32 and out.shape == (B,)
    assert max_err(out, ref) <= cls.ATOL[torch.float32] * magnitude(ref)
    for gg, r in zip(got, ref_g):
        assert gg.shape == r.shape and torch.isfinite(gg).all()
        assert max_err(gg, r) <= cls.GRAD_ATOL[torch.float32] * magnitude(r)


def _lowp_grid(op, cases):
    for name in runnable_backends(op):
        cls = _dispatch.backends(op)[name]
        for dtype in (torch.bfloat16, torch.float16):
            if dtype in cls.DTYPES:
                for i, c in enumerate(cases):
                    yield pytest.param(name, dtype, c, id=f"{name}-{str(dtype)[6:]}-{i}")


def naive_mahalanobis(x, means, prec_chol):
    """The same computation in stock PyTorch (STYLE.md §8): explicit differences times the factor, in the inputs'
    dtype. Written here, independently of clfast, so that the reference backend at 16 bits is not measured against
    itself."""
    L = torch.diag(prec_chol) if prec_chol.dim() == 1 else torch.tril(prec_chol)
    return ((x.unsqueeze(1) - means.unsqueeze(0)) @ L).square().sum(-1)


def naive_gaussian_kl(mu, log_var, prior_mean, prec_chol):
    """The closed form in stock PyTorch, in the inputs' dtype (written here, as :func:`naive_mahalanobis`)."""
    L = torch.diag(prec_chol) if prec_chol.dim() == 1 else torch.tril(prec_chol)
    diag_p = L.square().sum(1)
    quad = ((prior_mean - mu) @ L).square().sum(-1)
    log_det_p = 2 * torch.diagonal(L).log().sum()
    return 0.5 * ((diag_p * log_var.exp()).sum(-1) + quad - mu.shape[-1] - log_det_p - log_var.sum(-1))


def _assert_low_precision(name, cls, dtype, fn, peer, tensors, dout):
    reference = g_mod.mahalanobis_reference if cls.OP == MAHA else g_mod.gaussian_kl_reference
    low = _prep(tensors, dtype)
    assert_low_precision(cls, dtype, grads(forced(cls.OP, name, fn), low, dout.to(dtype)),
                         grads(reference, tensors, dout), grads(peer, low, dout.to(dtype)))


@pytest.mark.parametrize("name,dtype,case", list(_lowp_grid(MAHA, [(5, 7, 40, False), (6, 3, 24, True)])))
def test_mahalanobis_low_precision_within_2x_of_pytorch_error(name, dtype, case):
    """bf16/fp16 error vs the float64 reference is within the backend's tolerance and at most twice what stock
    PyTorch (:func:`naive_mahalanobis` in that dtype) makes, plus a small slack relative to the distances."""
    B, K, D, diagonal = case
    _assert_low_precision(name, _dispatch.backends(MAHA)[name], dtype, mahalanobis, naive_mahalanobis,
                          make_maha(B, K, D, diagonal=diagonal), torch.randn(B, K, dtype=torch.float64))


@pytest.mark.parametrize("name,dtype,case", list(_lowp_grid(KL, [(5, 40, False, True), (4, 24, True, False)])))
def test_gaussian_kl_low_precision_within_2x_of_pytorch_error(name, dtype, case):
    B, D, diagonal, shared = case
    _assert_low_precision(name, _dispatch.backends(KL)[name], dtype, gaussian_kl, naive_gaussian_kl,
                          make_kl(B, D, diagonal=diagonal, shared_prior=shared), torch.randn(B, dtype=torch.float64))


@pytest.mark.parametrize("diagonal", [False, True])
def test_low_precision_peers_match_the_float64_references(diagonal):
    x, means, L = make_maha(5, 7, 13, diagonal=diagonal)
    assert max_err(naive_mahalanobis(x, means, L), g_mod.mahalanobis_reference(x, means, L)) < 1e-10
    tensors = make_kl(4, 13, diagonal=diagonal, shared_prior=diagonal)
    assert max_err(naive_gaussian_kl(*tensors), g_mod.gaussian_kl_reference(*tensors)) < 1e-10


def test_float64_runs_on_the_default_backend_and_cpu_is_the_default():
    x, means, L = make_maha(3, 4, 10)
    assert max_err(mahalanobis(x, means, L), g_mod.mahalanobis_reference(x, means, L)) < 1e-10
    if "cpu" not in runnable_backends(MAHA) or "cpu" not in runnable_backends(KL):
        pytest.fail(f"the C++ backend is not available: {_dispatch.backends(MAHA)['cpu'].unavailable_reason()}")
    assert _dispatch.select(MAHA, g_mod._validate_mahalanobis(x.float(), means.float(), L.float())).NAME == "cpu"
    mu, lv, pm, L = make_kl(2, 10)
    assert _dispatch.select(KL, g_mod._validate_kl(mu.float(), lv.float(), pm.float(), L.float())).NAME == "cpu"


@pytest.mark.parametrize("name", [n for n in fused_backends(MAHA) if n not in INTERPRETED])
def test_fused_backends_are_deterministic(name):
    tensors = make_maha(20, 30, 300)
    dout = torch.randn(20, 30)
    a = grads(forced(MAHA, name, mahalanobis), _prep(tensors, torch.float32), dout)
    b = grads(forced(MAHA, name, mahalanobis), _prep(tensors, torch.float32), dout)
    assert torch.equal(a[0], b[0]) and all(torch.equal(p, q) for p, q in zip(a[1], b[1]))


# --------------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", fused_backends(MAHA))
@pytest.mark.parametrize("diagonal", [False, True])
def test_opcheck(name, diagonal):
    """Both registered ops of the backend and their backward ops (under the Triton interpreter, the parts that run
    there)."""
    interpreted = name in INTERPRETED
    maha = (t.float().requires_grad_() for t in make_maha(3, 4, 9, diagonal=diagonal))
    kl = (t.float().requires_grad_() for t in make_kl(3, 9, diagonal=diagonal, shared_prior=diagonal))
    for op, args in ((_dispatch.backends(MAHA)[name].registered, tuple(maha)),
                     (_dispatch.backends(KL)[name].registered, tuple(kl))):
        opcheck(op.default, args, interpreted=interpreted)
        with torch.no_grad():
            out, proj = op(*args)
        opcheck(backward_op(op), (torch.randn_like(out), *(t.detach() for t in args), proj), interpreted=interpreted)


class _TinyGaussian(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6, 8)
        self.means = torch.nn.Parameter(torch.randn(3, 8))
        self.register_buffer("L", make_chol(8, dtype=torch.float32))

    def forward(self, x):
        z = self.proj(x)
        d = mahalanobis(z, self.means, self.L)
        kl = gaussian_kl(z, torch.zeros_like(z), self.means[0], self.L)
        return d.sum() + kl.sum()


@pytest.mark.parametrize("name", [n for n in runnable_backends(MAHA) if n not in INTERPRETED])
def test_torch_compile_fullgraph_no_graph_break(name):
    model = _TinyGaussian()
    # no op given: the backend is forced for mahalanobis and gaussian_kl alike
    assert_compiles_like_eager(model, list(model.parameters()), torch.randn(4, 6), backend=name, op=None,
                               atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="compiling through a triton_op needs a GPU: under the Triton interpreter "
                                     "its FakeTensor trace launches kernels on tensors without data")
def test_torch_compile_sees_the_triton_kernels():
    """On CUDA, torch.compile(fullgraph=True) traces into clfast::mahalanobis_triton and gaussian_kl_triton: the
    graphs launch their Triton kernels (no opaque op), and loss and gradients match eager."""
    model = _TinyGaussian().cuda()
    launched = triton_kernels_in_compiled_graph(model, list(model.parameters()), torch.randn(4, 6).cuda(),
                                                backend="triton", op=None)
    assert {"_mm_kernel", "_kl_rows_kernel"} <= launched


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def _bad_chol_zero_diag():
    L = make_chol(4, dtype=torch.float32)
    L[2, 2] = 0.0
    return L


def _bad_chol_upper():
    L = make_chol(4, dtype=torch.float32)
    return L + L.T  # a full matrix, e.g. the precision itself


@pytest.mark.parametrize("mutate,exc,needle", [
    (lambda a: {**a, "x": a["x"][0]}, ValueError, "x must have shape (B,D)"),
    (lambda a: {**a, "means": a["means"][:, :3]}, ValueError, "means must have shape (K,D) with D = 4"),
    (lambda a: {**a, "prec_chol": a["prec_chol"][:3, :3]}, ValueError, "prec_chol must have shape (D,D) or (D,)"),
    (lambda a: {**a, "prec_chol": a["prec_chol"][None]}, ValueError, "prec_chol must have shape (D,D)"),
    (lambda a: {**a, "prec_chol": _bad_chol_zero_diag()}, ValueError, "prec_chol must have a strictly positive diagonal"),
    (lambda a: {**a, "prec_chol": -torch.ones(4)}, ValueError, "prec_chol must have a strictly positive diagonal"),
    (lambda a: {**a, "prec_chol": _bad_chol_upper()}, ValueError, "prec_chol must be lower-triangular"),
    (lambda a: {**a, "x": a["x"].long()}, TypeError, "x must be float32"),
    (lambda a: {**a, "means": a["means"].double()}, TypeError, "means must have the dtype"),
    (lambda a: {**a, "prec_chol": a["prec_chol"].half()}, TypeError, "prec_chol must have the dtype"),
    (lambda a: {**a, "x": a["x"].tolist()}, TypeError, "x must be a torch.Tensor"),
    (lambda a: {**a, "means": a["means"].to("meta")}, ValueError, "means must be on x's device"),
])
def test_mahalanobis_bad_input_names_the_argument(mutate, exc, needle):
    x, means, L = (t.float() for t in make_maha(2, 3, 4))
    args = mutate(dict(x=x, means=means, prec_chol=L))
    with pytest.raises(exc) as info:
        mahalanobis(args["x"], args["means"], args["prec_chol"])
    assert needle in str(info.value)


@pytest.mark.parametrize("mutate,exc,needle", [
    (lambda a: {**a, "mu": a["mu"][0]}, ValueError, "mu must have shape (B,D)"),
    (lambda a: {**a, "log_var": a["log_var"][:, :3]}, ValueError, "log_var must have the shape of mu"),
    (lambda a: {**a, "prior_mean": a["prior_mean"][:, :3]}, ValueError, "prior_mean must have shape (B,D)"),
    (lambda a: {**a, "prec_chol": torch.ones(3)}, ValueError, "prec_chol must have shape (D,D) or (D,) with D = 4"),
    (lambda a: {**a, "prec_chol": _bad_chol_zero_diag()}, ValueError, "strictly positive diagonal"),
    (lambda a: {**a, "log_var": a["log_var"].double()}, TypeError, "log_var must have the dtype"),
    (lambda a: {**a, "mu": a["mu"].int()}, TypeError, "mu must be float32"),
])
def test_gaussian_kl_bad_input_names_the_argument(mutate, exc, needle):
    mu, lv, pm, L = (t.float() for t in make_kl(2, 4))
    args = mutate(dict(mu=mu, log_var=lv, prior_mean=pm, prec_chol=L))
    with pytest.raises(exc) as info:
        gaussian_kl(args["mu"], args["log_var"], args["prior_mean"], args["prec_chol"])
    assert needle in str(info.value)


def test_factor_check_is_cached_by_version_and_redone_after_a_change():
    x, means, L = (t.float() for t in make_maha(2, 3, 4))
    mahalanobis(x, means, L)
    assert getattr(L, "_clfast_checked_version", None) == L._version
    L[1, 1] = -1.0  # bumps the version counter: checked again
    with pytest.raises(ValueError, match="strictly positive diagonal"):
        mahalanobis(x, means, L)


def test_c_kernels_check_their_own_preconditions():
    if "cpu" not in runnable_backends(MAHA):
        pytest.fail("the C++ backend is not available")
    x, means, L = (t.float() for t in make_maha(2, 3, 4))
    with pytest.raises(RuntimeError, match="means"):
        torch.ops._clfast_C.mahalanobis_fwd(x, means[:, :3], L)
    with pytest.raises(RuntimeError, match="prec_chol"):
        torch.ops._clfast_C.mahalanobis_fwd(x, means, L[:3])
    mu, lv, pm, L = (t.float() for t in make_kl(2, 4))
    with pytest.raises(RuntimeError, match="prior_mean"):
        torch.ops._clfast_C.gaussian_kl_fwd(mu, lv, pm[:, :2], L)


# --------------------------------------------------------------------------------------------------
# GaussianStats
# --------------------------------------------------------------------------------------------------


def _data(n, D, groups=1, seed=0, offset=5.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, D, dtype=torch.float64)
    y = torch.randint(0, groups, (n,), generator=g)
    return x + offset + y[:, None].double(), y


def test_stats_chunked_equals_one_shot_and_torch_cov():
    x, _ = _data(103, 6)
    one = GaussianStats(6).update(x)
    chunked = GaussianStats(6)
    for part in x.split(17):
        chunked.update(part)
    assert one.total == chunked.total == 103
    assert torch.allclose(one.mean, chunked.mean, atol=1e-12) and torch.allclose(one.scatter, chunked.scatter, atol=1e-10)
    assert torch.allclose(one.mean[0], x.mean(0), atol=1e-12)
    assert torch.allclose(one.covariance(), torch.cov(x.T), atol=1e-12)  # γ = 0: the sample covariance


def test_stats_groups_give_the_pooled_within_group_covariance():
    x, y = _data(120, 5, groups=3)
    stats = GaussianStats(5, num_groups=3)
    for xs, ys in zip(x.split(25), y.split(25)):
        stats.update(xs, ys)
    stats.update(x[:0], y[:0])
    centred = torch.cat([x[y == c] - x[y == c].mean(0) for c in range(3)])
    expected = centred.T @ centred / (120 - 3)
    assert torch.allclose(stats.covariance(), expected, atol=1e-12)
    for c in range(3):
        assert torch.allclose(stats.mean[c], x[y == c].mean(0), atol=1e-12)
        assert stats.count[c] == (y == c).sum()
    single = GaussianStats(5, num_groups=3).update(x[y == 1], 1)
    assert torch.allclose(single.mean[1], x[y == 1].mean(0)) and single.count.tolist() == [0, (y == 1).sum(), 0]


def test_stats_merge_equals_update():
    x, y = _data(60, 4, groups=2, seed=3)
    a = GaussianStats(4, 2).update(x[:25], y[:25])
    b = GaussianStats(4, 2).update(x[25:], y[25:])
    full = GaussianStats(4, 2).update(x, y)
    a.merge(b)
    assert torch.allclose(a.mean, full.mean, atol=1e-12) and torch.allclose(a.scatter, full.scatter, atol=1e-10)


def test_stats_shrinkage_and_precision_factor():
    x, _ = _data(50, 8, seed=1)
    stats = GaussianStats(8).update(x)
    S0 = stats.covariance()
    S = stats.covariance(shrinkage=0.1)
    target = torch.trace(S0) / 8 * torch.eye(8, dtype=torch.float64)
    assert torch.allclose(S, 0.9 * S0 + 0.1 * target, atol=1e-12)
    L = stats.precision_cholesky(shrinkage=0.1)
    assert torch.equal(L, L.tril()) and (torch.diagonal(L) > 0).all()
    assert torch.allclose(L @ L.T, torch.linalg.inv(S), atol=1e-10)
    l = stats.precision_cholesky(shrinkage=0.1, diagonal=True, dtype=torch.float32)
    assert l.dtype == torch.float32 and torch.allclose(l.double(), torch.diagonal(S).rsqrt(), atol=1e-6)
    # the factor plugs straight into the ops: distances equal explicit (x−m)ᵀ S⁻¹ (x−m)
    d = mahalanobis(x[:3], stats.mean, L)
    diff = x[:3] - stats.mean
    assert torch.allclose(d[:, 0], (diff @ torch.linalg.inv(S) * diff).sum(1), atol=1e-9)


def test_stats_rejects_what_it_cannot_compute():
    stats = GaussianStats(6).update(torch.randn(4, 6))
    with pytest.raises(ValueError, match="not positive definite"):
        stats.precision_cholesky()  # 4 rows for D = 6, no shrinkage
    assert stats.precision_cholesky(shrinkage=0.5).shape == (6, 6)
    with pytest.raises(ValueError, match="shrinkage must be a float in"):
        stats.covariance(shrinkage=1.5)
    with pytest.raises(ValueError, match="x must have shape"):
        stats.update(torch.randn(3, 5))
    with pytest.raises(ValueError, match="groups must be in"):
        GaussianStats(6, 2).update(torch.randn(3, 6), torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="needs more rows"):
        GaussianStats(6).covariance()


def test_stats_state_dict_round_trip():
    x, y = _data(30, 4, groups=2)
    a = GaussianStats(4, 2).update(x, y)
    b = GaussianStats(4, 2).load_state_dict(a.state_dict())
    assert torch.equal(a.scatter, b.scatter) and torch.equal(a.mean, b.mean) and torch.equal(a.count, b.count)


def _all_reduce_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        x, y = _data(90, 5, groups=3, seed=7)
        mine = slice(0, 40) if rank == 0 else slice(40, 90)  # unequal shards, one group missing on a rank
        xs, ys = x[mine], y[mine]
        if rank == 1:
            xs, ys = xs[ys != 0], ys[ys != 0]
        stats = GaussianStats(5, 3).update(xs, ys)
        stats.all_reduce()
        torch.save(stats.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_stats_all_reduce_two_gloo_processes_equal_one_process(tmp_path):
    run_processes(_all_reduce_worker, (2, free_port(), str(tmp_path)), timeout=120)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x, y = _data(90, 5, groups=3, seed=7)
    keep = torch.ones(90, dtype=torch.bool)
    keep[40:] = y[40:] != 0
    expected = GaussianStats(5, 3).update(x[keep], y[keep])
    for st in states:
        assert torch.allclose(st["count"], expected.count)
        assert torch.allclose(st["mean"], expected.mean, atol=1e-12)
        assert torch.allclose(st["scatter"], expected.scatter, atol=1e-9)
