"""Timings of mahalanobis and gaussian_kl: every backend against the peers (explicit (B,K,D) differences times
the precision; per-sample MultivariateNormal KL; GPLS's released per-layer SVD pseudo-inverse term).

Same conventions as bench_ops.py: one pytest-benchmark group per case, ratios of medians within a group. The
acceptance case is mahalanobis at B=128, K=200, D=768 fwd+bwd: the fused backend ≥ 10× the peer, with
memory O(B·K) (the peer's (B,K,D) tensor is recorded in extra_info for comparison).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.harness import DTYPES, available, device, implementation, step, time_case
from benchmarks.peers import gaussian_kl_gpls_svd_peer, gaussian_kl_peer, mahalanobis_peer
from clfast.ops import gaussian_kl, mahalanobis

# (B, K, D)
MAHA_SHAPES = [(128, 10, 768), (128, 200, 768), (128, 1000, 768)]
MAHA_QUICK = [(16, 10, 64), (128, 200, 768)]
# (B, D): GPLS has one KL row per layer per step (B small); a batch of rows for the general case.
KL_SHAPES = [(12, 768), (128, 768)]
# quick: GPLS's own shape (12 rows of D 768); the 128-row case's torch.distributions peer was a third of the whole
# `make bench-quick` (one MultivariateNormal per row)
KL_QUICK = [(4, 64), (12, 768)]
IMPLS = ["peer", "torch", "cpu", "triton"]


# The peers take up to seconds per call: one warm-up, three rounds.
PEER_ROUNDS = dict(rounds=3, warmup=1)
ROUNDS = dict(rounds=10, warmup=2)


def _chol(D, dev, dtype, g):
    L = torch.randn(D, D, generator=g).tril(-1) / D ** 0.5
    L.diagonal().copy_(torch.rand(D, generator=g) + 0.5)
    return L.to(dev, dtype)


def pytest_generate_tests(metafunc):
    quick = metafunc.config.getoption("--quick")
    if "maha_case" in metafunc.fixturenames:
        cases = [(s, dt, mode, impl) for s in (MAHA_QUICK if quick else MAHA_SHAPES) for dt in ("fp32",)
                 for mode in ("fwd", "fwd+bwd") for impl in IMPLS
                 if available("mahalanobis", impl)]
        metafunc.parametrize("maha_case", cases, ids=[f"B{s[0]}K{s[1]}D{s[2]}-{dt}-{m}-{i}" for s, dt, m, i in cases])
    if "kl_case" in metafunc.fixturenames:
        cases = [(s, dt, mode, impl) for s in (KL_QUICK if quick else KL_SHAPES) for dt in ("fp32",)
                 for mode in ("fwd", "fwd+bwd") for impl in IMPLS + ["peer_svd"]
                 if available("gaussian_kl", impl) and not (impl == "peer_svd" and mode != "fwd")]
        metafunc.parametrize("kl_case", cases, ids=[f"B{s[0]}D{s[1]}-{dt}-{m}-{i}" for s, dt, m, i in cases])


def test_mahalanobis(benchmark, maha_case):
    (B, K, D), dt, mode, impl = maha_case
    dtype, dev = DTYPES[dt], device()
    g = torch.Generator().manual_seed(0)
    grad = mode != "fwd"
    x = torch.randn(B, D, generator=g).to(dev, dtype).requires_grad_(grad)
    means = torch.randn(K, D, generator=g).to(dev, dtype).requires_grad_(grad)
    L = _chol(D, dev, dtype, g).requires_grad_(grad)
    dout = torch.randn(B, K, generator=g).to(dev, dtype)
    if impl == "peer":
        L = (L @ L.T).detach().requires_grad_(grad)  # the peer holds the precision matrix itself
    run = implementation("mahalanobis", impl, mahalanobis, peer=mahalanobis_peer)
    time_case(benchmark, step(lambda: run(x, means, L), mode, (x, means, L), dout),
              group=f"mahalanobis B{B} K{K} D{D} {dt} {mode}", **(PEER_ROUNDS if impl == "peer" else ROUNDS),
              op="mahalanobis", impl=impl, dtype=dt, mode=mode, shape=dict(B=B, K=K, D=D),
              peer_bkd_bytes=B * K * D * x.element_size())


def test_gaussian_kl(benchmark, kl_case):
    (B, D), dt, mode, impl = kl_case
    dtype, dev = DTYPES[dt], device()
    g = torch.Generator().manual_seed(0)
    grad = mode != "fwd"
    mu = torch.randn(B, D, generator=g).to(dev, dtype).requires_grad_(grad)
    log_var = (0.3 * torch.randn(B, D, generator=g)).to(dev, dtype).requires_grad_(grad)
    prior = torch.randn(D, generator=g).to(dev, dtype).requires_grad_(grad)
    L = _chol(D, dev, dtype, g).requires_grad_(grad)
    dout = torch.randn(B, generator=g).to(dev, dtype)
    if impl == "peer":
        L = (L @ L.T).detach().requires_grad_(grad)  # the precision matrix
    inputs = (mu, log_var, prior, L)
    run = implementation("gaussian_kl", impl, gaussian_kl, peer=gaussian_kl_peer)
    if impl == "peer_svd":
        sigma, eps = (0.5 * log_var).exp().detach(), torch.randn(B, D, generator=g).to(dev, dtype)
        inputs = ()
        run = lambda *_: gaussian_kl_gpls_svd_peer(sigma, eps)  # noqa: E731
    time_case(benchmark, step(lambda: run(mu, log_var, prior, L), mode, inputs, dout),
              group=f"gaussian_kl B{B} D{D} {dt} {mode}", **(PEER_ROUNDS if impl.startswith("peer") else ROUNDS),
              op="gaussian_kl", impl=impl, dtype=dt, mode=mode, shape=dict(B=B, D=D))


def _kl_batched_over_layers(mu, log_var, prior, chols):
    """The closed form for L layers, each with its own prior, as one batched torch composition: (L, D) -> (L,)."""
    tril = chols.tril()                                                         # (L, D, D)
    diag_p = tril.pow(2).sum(-1)                                                # P_dd = Σ_j L_dj²
    quad = torch.bmm((prior - mu)[:, None, :], tril).squeeze(1).pow(2).sum(-1)  # ‖(m − μ)·L‖²
    logdet = 2.0 * torch.diagonal(tril, dim1=1, dim2=2).log().sum(-1)
    return 0.5 * ((diag_p * log_var.exp()).sum(-1) + quad - mu.shape[-1] - logdet - log_var.sum(-1))


@pytest.mark.parametrize("impl", ["per-layer calls", "one batched call"])
def test_gaussian_kl_over_layers(benchmark, quick, impl):
    """GPLS's KL: one row per prompted layer, each layer against its own prior (its own Cholesky factor).
    ``kl()`` calls gaussian_kl once per layer; is one batched call over layers worth it? Both in float32,
    forward and backward, at ViT-B's 12 layers × 768 (``--quick``: 6 × 192, vit_tiny_synth)."""
    L, D = (6, 192) if quick else (12, 768)
    dev, g = device(), torch.Generator().manual_seed(0)
    mu = torch.randn(L, D, generator=g).to(dev).requires_grad_()
    log_var = (0.3 * torch.randn(L, D, generator=g)).to(dev).requires_grad_()
    prior = torch.randn(L, D, generator=g).to(dev)
    factors = [_chol(D, dev, torch.float32, g) for _ in range(L)]   # one buffer per layer, as GPLS holds them
    chols = torch.stack(factors)
    if impl == "per-layer calls":
        run = lambda: torch.cat([gaussian_kl(mu[i:i + 1], log_var[i:i + 1], prior[i], factors[i])  # noqa: E731
                                 for i in range(L)])
    else:
        run = lambda: _kl_batched_over_layers(mu, log_var, prior, chols)  # noqa: E731
    torch.testing.assert_close(run(), torch.cat([gaussian_kl(mu[i:i + 1], log_var[i:i + 1], prior[i], factors[i])
                                                 for i in range(L)]), rtol=1e-4, atol=1e-3)
    time_case(benchmark, step(lambda: run(), "fwd+bwd", (mu, log_var), torch.ones(L, device=dev)),
              group=f"gaussian_kl over layers L{L} D{D} fp32 fwd+bwd", **ROUNDS,
              op="gaussian_kl", impl=impl, dtype="fp32", mode="fwd+bwd", shape=dict(L=L, D=D))
