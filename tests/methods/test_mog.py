"""Per-class diagonal Gaussian mixtures (clfast.methods.mog): the batched EM against scikit-learn's
GaussianMixture from the same initial parameters, recovery of a planted mixture, monotone log-likelihood, the
official code's √var density, sampling moments, determinism, checkpoints and argument checks."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from clfast.methods.mog import ClassMixtures, batched_em, mixture_log_prob

sklearn_mixture = pytest.importorskip("sklearn.mixture")

F64 = torch.float64


def _classes(counts, D, seed=0, spread=1.0):
    """Features (N, D) float64 of len(counts) classes (class c: counts[c] samples from 3 blobs), labels (N,)."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c, n in enumerate(counts):
        centres = spread * torch.randn(3, D, generator=g, dtype=F64) + c
        pick = torch.randint(0, 3, (n,), generator=g)
        scale = 0.3 + torch.rand(D, generator=g, dtype=F64)
        xs.append(centres[pick] + scale * torch.randn(n, D, generator=g, dtype=F64))
        ys.append(torch.full((n,), c))
    return torch.cat(xs), torch.cat(ys)


def _random_init(x, valid, K, seed=1):
    """Arbitrary valid initial parameters: K of each mixture's samples (+ noise), positive variances, weights."""
    g = torch.Generator().manual_seed(seed)
    G, _, D = x.shape
    means, variances = torch.empty(G, K, D, dtype=F64), torch.empty(G, K, D, dtype=F64)
    for i in range(G):
        xi = x[i][valid[i]]
        means[i] = xi[torch.randperm(len(xi), generator=g)[:K]] + 0.1 * torch.randn(K, D, generator=g, dtype=F64)
        variances[i] = xi.var(0) * (0.5 + torch.rand(K, D, generator=g, dtype=F64))
    w = torch.rand(G, K, generator=g, dtype=F64) + 0.2
    return means, variances, (w / w.sum(1, keepdim=True)).log()


def _padded(features, labels, fill=math.nan):
    """(x (G, N_max, D) with ``fill`` in the padding, valid (G, N_max)) by hand, for batched_em."""
    G = int(labels.max()) + 1
    n_max = int(torch.bincount(labels).max())
    x = torch.full((G, n_max, features.shape[1]), fill, dtype=F64)
    valid = torch.zeros(G, n_max, dtype=torch.bool)
    for c in range(G):
        xc = features[labels == c]
        x[c, :len(xc)], valid[c, :len(xc)] = xc, True
    return x, valid


def _sklearn_fit(X, means, variances, log_weights, *, max_iter, tol, reg_covar=1e-6):
    """scikit-learn's diagonal GaussianMixture from the given initial parameters (init_params is irrelevant:
    all three initial parameters are given, so its random responsibilities are overwritten)."""
    gm = sklearn_mixture.GaussianMixture(
        means.shape[0], covariance_type="diag", max_iter=max_iter, tol=tol, reg_covar=reg_covar,
        init_params="random", random_state=0, means_init=means.numpy(), weights_init=log_weights.exp().numpy(),
        precisions_init=(1.0 / variances).numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # ConvergenceWarning when max_iter stops it
        gm.fit(X.numpy())
    return gm


def _assert_same_fit(gm, X, means, variances, log_weights, log_likelihood, rtol=1e-9):
    t = lambda a: torch.as_tensor(a, dtype=F64)  # noqa: E731
    torch.testing.assert_close(means, t(gm.means_), rtol=rtol, atol=1e-10)
    torch.testing.assert_close(variances, t(gm.covariances_), rtol=rtol, atol=1e-12)
    torch.testing.assert_close(log_weights.exp(), t(gm.weights_), rtol=rtol, atol=1e-12)
    torch.testing.assert_close(log_likelihood, t(gm.score(X.numpy())), rtol=rtol, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# The EM against scikit-learn.
# ---------------------------------------------------------------------------------------------------------


def test_batched_em_equals_sklearn_for_a_fixed_number_of_iterations():
    """Same data and initial parameters, both running exactly 12 EM iterations (sklearn: tol = 0 never stops it,
    since it tests |change| < tol; batched_em: tol = -inf) → same parameters, same log-likelihood after each
    iteration. Three classes of 11, 29 and 52 samples in one padded batch, NaN in the padding."""
    K, D, it = 3, 13, 12
    feats, labels = _classes([11, 29, 52], D)
    x, valid = _padded(feats, labels)
    init = _random_init(x, valid, K)
    res = batched_em(x, valid, *init, max_iter=it, tol=-math.inf)
    assert res.iterations.tolist() == [it] * 3 and not res.converged.any() and res.finite.all()
    for c in range(3):
        X = feats[labels == c]
        gm = _sklearn_fit(X, *(t[c] for t in init), max_iter=it, tol=0.0)
        assert gm.n_iter_ == it
        _assert_same_fit(gm, X, res.means[c], res.variances[c], res.log_weights[c], res.log_likelihood[c])
        # sklearn's lower bound i is the log-likelihood before the M-step of iteration i + 1
        torch.testing.assert_close(res.history[c, :it], torch.tensor(gm.lower_bounds_, dtype=F64), rtol=1e-10, atol=0)


@pytest.mark.parametrize("max_batch_bytes", [2 ** 31, 1], ids=["one-batch", "batch-per-class"])
def test_fit_equals_sklearn_to_convergence(max_batch_bytes):
    """The module end to end: its own K-means initialisation (read back with max_iter=0) given to sklearn too;
    with the default tol = 1e-3 both stop after the same number of iterations with the same parameters,
    whether the classes are fitted as one batch or one by one."""
    K, D = 4, 11
    feats, labels = _classes([9, 30, 47, 64], D, seed=3, spread=2.0)
    labels = 3 - labels   # classes listed in an order other than their sizes
    init_mog = ClassMixtures(4, D, K, max_batch_bytes=max_batch_bytes)
    init_mog.fit(feats, labels, max_iter=0)
    mog = ClassMixtures(4, D, K, max_iter=500, max_batch_bytes=max_batch_bytes)
    out = mog.fit(feats, labels)
    assert out["classes"].tolist() == [0, 1, 2, 3] and out["converged"].all() and (out["refits"] == 0).all()
    assert mog.fitted.all()
    for c in range(4):
        X = feats[labels == c]
        gm = _sklearn_fit(X, init_mog.means[c], init_mog.variances[c], init_mog.log_weights[c], max_iter=500, tol=1e-3)
        assert gm.converged_ and out["iterations"][c] == gm.n_iter_ > 1
        _assert_same_fit(gm, X, mog.means[c], mog.variances[c], mog.log_weights[c], out["log_likelihood"][c], rtol=1e-8)


def test_initialisation_is_kmeans_with_hard_assignment_statistics():
    """max_iter=0 leaves the documented initialisation: weights n_k / n, variances about the means over each
    cluster + reg_covar; the means are K-means centres (every sample nearest to its own component's mean)."""
    K, D = 3, 7
    feats, labels = _classes([60], D, seed=5, spread=4.0)
    mog = ClassMixtures(1, D, K, reg_covar=1e-3)
    mog.fit(feats, labels, max_iter=0)
    means, variances = mog.means[0], mog.variances[0]
    assign = torch.cdist(feats, means).argmin(1)
    n_k = torch.bincount(assign, minlength=K).double()
    assert (n_k >= 2).all()
    torch.testing.assert_close(mog.log_weights[0].exp(), n_k / 60)
    for k in range(K):
        dev2 = (feats[assign == k] - means[k]) ** 2
        torch.testing.assert_close(variances[k], dev2.mean(0) + 1e-3, rtol=1e-5, atol=1e-6)  # FAISS centres: float32
        torch.testing.assert_close(means[k], feats[assign == k].mean(0), rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# EM properties.
# ---------------------------------------------------------------------------------------------------------


def _planted(n, D, K=5, seed=0):
    """A well-separated K-component diagonal mixture: samples (n, D) float32, their components (n,), the true
    means, variances and weights."""
    g = torch.Generator().manual_seed(seed)
    means = 12.0 * torch.randn(K, D, generator=g, dtype=F64)
    variances = 0.5 + 1.5 * torch.rand(K, D, generator=g, dtype=F64)
    weights = torch.tensor([0.1, 0.15, 0.2, 0.25, 0.3], dtype=F64)[:K]
    comp = torch.multinomial(weights, n, replacement=True, generator=g)
    x = means[comp] + variances[comp].sqrt() * torch.randn(n, D, generator=g, dtype=F64)
    return x.float(), comp, means, variances, weights


@pytest.mark.parametrize("minmax", ["global", "per_dim"])
def test_em_recovers_a_planted_mixture(minmax):
    """Components ≥ 12σ apart: EM finds each one (every true mean has its own fitted component), its fit equals
    the statistics of the samples the component generated (responsibilities are 0 or 1 to round-off), and
    those lie within sampling error of the truth."""
    D = 17
    planted = [_planted(3000, D, seed=1), _planted(2000, D, seed=2)]
    feats = torch.cat([p[0] for p in planted])
    labels = torch.cat([torch.full((len(p[0]),), c) for c, p in enumerate(planted)])
    mog = ClassMixtures(2, D, 5, minmax=minmax)
    out = mog.fit(feats, labels)
    assert out["converged"].all()
    for c, (x, comp, m, v, w) in enumerate(planted):
        match = torch.cdist(m, mog.means[c]).argmin(1)              # true component -> fitted component
        assert sorted(match.tolist()) == [0, 1, 2, 3, 4]
        x = x.double()
        n_k = torch.bincount(comp, minlength=5).double()
        mean_k = torch.stack([x[comp == k].mean(0) for k in range(5)])
        var_k = torch.stack([x[comp == k].var(0, unbiased=False) for k in range(5)]) + 1e-6
        torch.testing.assert_close(mog.means[c][match], mean_k, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(mog.variances[c][match], var_k, rtol=1e-8, atol=1e-9)
        torch.testing.assert_close(mog.log_weights[c][match].exp(), n_k / len(x), rtol=1e-9, atol=1e-12)
        assert ((mean_k - m).abs() < 5 * (v / n_k[:, None]).sqrt()).all()
        assert ((var_k / v - 1).abs() < 5 * (2 / n_k[:, None]).sqrt()).all()
        assert ((n_k / len(x) - w).abs() < 5 * (w * (1 - w) / len(x)).sqrt()).all()


@pytest.mark.parametrize("n", [7, 60])
def test_log_likelihood_never_decreases(n):
    """Every EM iteration of the correct density raises the log-likelihood (up to round-off); overlapping blobs
    and a poor initialisation so it takes many iterations."""
    feats, labels = _classes([n, n + 50, 3 * n], 9, seed=7, spread=0.7)
    x, valid = _padded(feats, labels)
    res = batched_em(x, valid, *_random_init(x, valid, 3, seed=2), max_iter=40, tol=-math.inf)
    h = res.history
    assert h.isfinite().all() and (h[:, -1] > h[:, 0] + 1e-3).all()
    assert (h.diff(dim=1) >= -1e-12 * h[:, 1:].abs()).all(), h.diff(dim=1).min(1).values


def test_mixtures_in_a_batch_are_independent():
    """Each mixture of a batch ends exactly as when fitted alone, though they stop at different iterations
    (5, 19, 21 and 31 here: the first is frozen for 14 iterations while the rest run, then the batch shrinks
    twice)."""
    feats, labels = _classes([15, 40, 90, 33], 6, seed=0, spread=0.8)
    x, valid = _padded(feats, labels)
    init = _random_init(x, valid, 3, seed=0)
    res = batched_em(x, valid, *init, max_iter=300, tol=1e-4)
    assert res.iterations.tolist() == [5, 19, 31, 21] and res.converged.all()
    for c in range(4):
        n = int(valid[c].sum())
        solo = batched_em(x[c:c + 1, :n], valid[c:c + 1, :n], *(t[c:c + 1] for t in init), max_iter=300, tol=1e-4)
        assert solo.iterations[0] == res.iterations[c]
        for name in ("means", "variances", "log_weights", "log_likelihood"):
            torch.testing.assert_close(getattr(res, name)[c], getattr(solo, name)[0], rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(res.history[c], solo.history[0], rtol=1e-11, atol=1e-12, equal_nan=True)


def test_mixture_log_prob_equals_torch_distributions():
    g = torch.Generator().manual_seed(0)
    C, K, D, B = 3, 4, 19, 10
    means = torch.randn(C, K, D, generator=g, dtype=F64)
    variances = 0.2 + torch.rand(C, K, D, generator=g, dtype=F64)
    log_w = torch.randn(C, K, generator=g, dtype=F64).log_softmax(-1)
    x = torch.randn(B, D, generator=g, dtype=F64)
    D_ = torch.distributions
    mix = D_.MixtureSameFamily(D_.Categorical(logits=log_w), D_.Independent(D_.Normal(means, variances.sqrt()), 1))
    want = mix.log_prob(x[:, None, :])                                              # (B, C)
    torch.testing.assert_close(mixture_log_prob(x, means, variances, log_w), want, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(mixture_log_prob(x.float(), means, variances, log_w), mixture_log_prob(
        x.float().double(), means, variances, log_w), rtol=0, atol=0)


def _quirk_component_log_prob(x, means, variances):
    """The official (gmm-torch) diagonal E-step, written out: (N, D), (K, D) → (N, K)."""
    D = x.shape[1]
    sq = ((x[:, None, :] - means[None]) ** 2 / variances.sqrt()[None]).sum(-1)
    return -0.5 * (D * math.log(2 * math.pi) + sq + 0.5 * variances.log().sum(-1))


def test_gmm_torch_density_is_the_sqrt_var_formula():
    g = torch.Generator().manual_seed(0)
    K, D = 3, 6
    feats, labels = _classes([25, 40], D, seed=4)
    x, valid = _padded(feats, labels)
    means, variances, log_w = _random_init(x, valid, K)
    variances = variances * 3.0   # far from 1, where √var and var differ

    # the density itself
    q = torch.randn(8, D, generator=g, dtype=F64)
    want = torch.stack([(_quirk_component_log_prob(q, means[c], variances[c]) + log_w[c]).logsumexp(-1)
                        for c in range(2)], dim=1)
    torch.testing.assert_close(mixture_log_prob(q, means, variances, log_w, gmm_torch_density=True), want,
                               rtol=1e-12, atol=1e-10)
    mog = ClassMixtures(2, D, K, gmm_torch_density=True)
    mog.load_state_dict(dict(means=means, variances=variances, log_weights=log_w,
                             fitted=torch.ones(2, dtype=torch.bool)))
    torch.testing.assert_close(mog.log_prob(q, [0, 1]), want, rtol=1e-12, atol=1e-10)

    # one EM iteration: responsibilities from it, the M-step with the true variance
    res = batched_em(x, valid, means, variances, log_w, max_iter=1, gmm_torch_density=True, reg_covar=1e-6)
    for c in range(2):
        X = feats[labels == c]
        lp = _quirk_component_log_prob(X, means[c], variances[c]) + log_w[c]
        resp = (lp - lp.logsumexp(-1, keepdim=True)).exp()                         # (n, K)
        nk = resp.sum(0)
        mu = resp.T @ X / nk[:, None]
        var = (resp[:, :, None] * (X[:, None, :] - mu[None]) ** 2).sum(0) / nk[:, None] + 1e-6
        torch.testing.assert_close(res.means[c], mu, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(res.variances[c], var, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(res.log_weights[c].exp(), nk / len(X), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res.history[c, 0], lp.logsumexp(-1).mean(), rtol=1e-12, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# Sampling, determinism, checkpoints.
# ---------------------------------------------------------------------------------------------------------


def _loaded(C, K, D, seed=0, **kw):
    """A ClassMixtures with chosen, well-separated parameters loaded through its state_dict."""
    g = torch.Generator().manual_seed(seed)
    means = 20.0 * torch.randn(C, K, D, generator=g, dtype=F64)
    variances = 0.3 + 2 * torch.rand(C, K, D, generator=g, dtype=F64)
    log_w = (torch.rand(C, K, generator=g, dtype=F64) + 0.3).log().log_softmax(-1)
    mog = ClassMixtures(C, D, K, **kw)
    mog.load_state_dict(dict(means=means, variances=variances, log_weights=log_w,
                             fitted=torch.ones(C, dtype=torch.bool)))
    return mog


def test_sample_moments_match_the_mixture():
    C, K, D, n = 3, 5, 7, 20_000
    mog = _loaded(C, K, D)
    x, y = mog.sample([2, 0], n, torch.Generator().manual_seed(0))
    assert x.shape == (2 * n, D) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [2] * n + [0] * n
    for i, c in enumerate([2, 0]):
        xs = x[i * n:(i + 1) * n].double()
        m, v, w = mog.means[c], mog.variances[c], mog.log_weights[c].exp()
        mean = (w[:, None] * m).sum(0)
        var = (w[:, None] * (v + m * m)).sum(0) - mean ** 2
        assert ((xs.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all()
        assert ((xs.var(0) / var - 1).abs() < 0.05).all()
        comp = torch.cdist(xs, m).argmin(1)        # components 20σ apart: the nearest mean is the source
        freq = torch.bincount(comp, minlength=K).double() / n
        assert ((freq - w).abs() < 5 * (w * (1 - w) / n).sqrt()).all()
        for k in range(K):                          # each component: its own mean and variance
            xk = xs[comp == k]
            assert ((xk.mean(0) - m[k]).abs() < 6 * (v[k] / len(xk)).sqrt()).all()
            assert ((xk.var(0) / v[k] - 1).abs() < 0.15).all()


def test_sampling_uses_the_true_variance_under_gmm_torch_density():
    mog = _loaded(1, 1, 5, gmm_torch_density=True)
    xs = mog.sample([0], 20_000, torch.Generator().manual_seed(1))[0].double()
    assert ((xs.var(0) / mog.variances[0, 0] - 1).abs() < 0.06).all()


def test_fit_and_sample_are_deterministic():
    feats, labels = _classes([40, 33], 10, seed=2)
    a, b = ClassMixtures(2, 10, 3, seed=4), ClassMixtures(2, 10, 3, seed=4)
    ra, rb = a.fit(feats, labels), b.fit(feats, labels)
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name
    assert all(torch.equal(ra[k], rb[k]) for k in ra)
    sa = a.sample([1, 0], 50, torch.Generator().manual_seed(9))
    sb = b.sample([1, 0], 50, torch.Generator().manual_seed(9))
    assert torch.equal(sa[0], sb[0]) and torch.equal(sa[1], sb[1])
    assert not torch.equal(sa[0], a.sample([1, 0], 50, torch.Generator().manual_seed(10))[0])


def test_state_dict_round_trip():
    feats, labels = _classes([30, 30, 30], 6, seed=1)
    mog = ClassMixtures(5, 6, 2)
    mog.fit(feats, labels, classes=[2, 0])
    assert mog.fitted.tolist() == [True, False, True, False, False]
    buf = io.BytesIO()
    torch.save(mog.state_dict(), buf)
    buf.seek(0)
    back = ClassMixtures(5, 6, 2)
    back.load_state_dict(torch.load(buf, weights_only=True))
    for name, t in mog.state_dict().items():
        assert torch.equal(t, back.state_dict()[name]) and t.dtype == back.state_dict()[name].dtype, name
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(mog.sample([0, 2], 7, g1)[0], back.sample([0, 2], 7, g2)[0])
    assert torch.equal(mog.log_prob(feats, [2]), back.log_prob(feats, [2]))
    with pytest.raises(ValueError, match=r"classes \[1\] have not been fitted"):
        back.sample([0, 1], 4, g1)


def test_fit_replaces_only_the_listed_classes():
    feats, labels = _classes([20, 20, 20], 5, seed=3)
    mog = ClassMixtures(3, 5, 2)
    mog.fit(feats, labels)
    before = mog.means.clone()
    out = mog.fit(feats[labels == 1] + 100, labels[labels == 1])
    assert out["classes"].tolist() == [1]
    assert torch.equal(mog.means[[0, 2]], before[[0, 2]]) and (mog.means[1] > 50).all()


def test_non_finite_log_likelihood_refits_then_raises():
    """reg_covar = 0 with a constant feature: every initialisation has a zero variance, so each fit's
    log-likelihood is NaN; after 10 refits fit gives up and names the class."""
    feats, labels = _classes([20, 20], 4, seed=0)
    feats[labels == 1, 2] = 3.0
    mog = ClassMixtures(2, 4, 2, reg_covar=0.0)
    with pytest.raises(RuntimeError, match="class 1 stayed non-finite after 10 refits"):
        mog.fit(feats, labels)
    out = ClassMixtures(2, 4, 2).fit(feats, labels)                  # reg_covar > 0: fine
    assert (out["refits"] == 0).all() and out["log_likelihood"].isfinite().all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fit_equals_cpu_fit():
    feats, labels = _classes([50, 80, 31], 24, seed=6)
    cpu = ClassMixtures(3, 24, 5)
    gpu = ClassMixtures(3, 24, 5).cuda()
    rc, rg = cpu.fit(feats, labels), gpu.fit(feats.cuda(), labels.cuda())
    assert torch.equal(rc["iterations"], rg["iterations"])
    for name, t in cpu.state_dict().items():
        torch.testing.assert_close(gpu.state_dict()[name].cpu(), t, rtol=1e-9, atol=1e-9)
    x, y = gpu.sample([0, 2], 16, torch.Generator("cuda").manual_seed(0))
    assert x.is_cuda and y.is_cuda and x.shape == (32, 24)
    assert gpu.sample([1], 3, torch.Generator().manual_seed(0))[0].is_cuda   # CPU generator, CUDA buffers


# ---------------------------------------------------------------------------------------------------------
# Argument checks.
# ---------------------------------------------------------------------------------------------------------


def _bad_calls():
    f, y = torch.randn(12, 4), torch.tensor([0] * 6 + [1] * 6)
    m = ClassMixtures(3, 4, 2)
    g = torch.Generator()
    return [
        (lambda: m.fit(f[:, :3], y), ValueError, r"features must have shape \(N, D\) = \(N, 4\)"),
        (lambda: m.fit(f[None], y), ValueError, "features must have shape"),
        (lambda: m.fit(f.long(), y), TypeError, "features must be float16, bfloat16, float32 or float64"),
        (lambda: m.fit(f.numpy(), y), TypeError, "features must be a torch.Tensor"),
        (lambda: m.fit(f, y.float()), TypeError, "labels must be an integer tensor"),
        (lambda: m.fit(f, y[:5]), ValueError, r"labels must have shape \(N,\) = \(12,\)"),
        (lambda: m.fit(f, y + 2), ValueError, r"labels must lie in \[0, num_classes\) = \[0, 3\)"),
        (lambda: m.fit(f, y - 1), ValueError, "labels must lie in"),
        (lambda: m.fit(f, torch.tensor([0] * 11 + [1])), ValueError,
         "class 1 has 1 samples in labels, fewer than n_components = 2"),
        (lambda: m.fit(f, y, classes=[2]), ValueError, "class 2 has 0 samples"),
        (lambda: m.fit(f, y, classes=[0, 0]), ValueError, "classes must not repeat"),
        (lambda: m.fit(f, y, classes=[0.5]), TypeError, "classes must be a sequence of ints"),
        (lambda: m.fit(torch.full((12, 4), math.nan), y), ValueError, "features must be finite"),
        (lambda: m.fit(f, y, max_iter=-1), ValueError, "max_iter must be an int >= 0"),
        (lambda: m.sample([0], 4, g), ValueError, r"classes \[0\] have not been fitted"),
        (lambda: m.sample([3], 4, g), ValueError, r"classes must lie in \[0, num_classes\) = \[0, 3\)"),
        (lambda: m.sample([], 4, g), ValueError, "classes must not be empty"),
        (lambda: m.log_prob(f[:, :2], [0]), ValueError, r"x must have shape \(N, D\) = \(N, 4\)"),
        (lambda: ClassMixtures(3, 0), ValueError, "dim must be an int >= 1"),
        (lambda: ClassMixtures(3, 4, 0), ValueError, "n_components must be an int >= 1"),
        (lambda: ClassMixtures(3, 4, reg_covar=-1.0), ValueError, "reg_covar must be a float >= 0"),
        (lambda: ClassMixtures(3, 4, minmax="l2"), ValueError, "minmax must be 'global' or 'per_dim'"),
        (lambda: batched_em(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), None, None, None),
         ValueError, r"x must have shape \(G,N,D\)"),
        (lambda: batched_em(torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 2, 4),
                            torch.ones(2, 2, 5), torch.zeros(2, 2)),
         ValueError, r"variances must have shape \(2, 2, 4\)"),
        (lambda: batched_em(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 2, 4),
                            torch.ones(2, 2, 4), torch.zeros(2, 2)), ValueError, "at least one sample per mixture"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_names_the_argument(case):
    call, exc, match = _bad_calls()[case]
    with pytest.raises(exc, match=match):
        call()


def test_sample_rejects_bad_count_and_generator():
    mog = _loaded(2, 2, 3)
    with pytest.raises(ValueError, match="n_per_class must be an int >= 1"):
        mog.sample([0], 0, torch.Generator())
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        mog.sample([0], 3, 0)
