"""Timings of mahalanobis and gaussian_kl: every backend against the peers (explicit (B,K,D) differences times
the precision; per-sample MultivariateNormal KL; GPLS's released per-layer SVD pseudo-inverse term).

Same conventions as bench_ops.py: one pytest-benchmark group per case, ratios of medians within a group. The
acceptance case is mahalanobis at B=128, K=200, D=768 fwd+bwd: the fused backend ≥ 10× the peer, with
memory O(B·K) (the peer's (B,K,D) tensor is recorded in extra_info for comparison).
"""

from __future__ import annotations

import torch

from benchmarks.bench_ops import DTYPES, _available, _device, _run
from benchmarks.peers import gaussian_kl_gpls_svd_peer, gaussian_kl_peer, mahalanobis_peer
from clfast.ops import gaussian_kl, mahalanobis, use_backend

# (B, K, D)
MAHA_SHAPES = [(128, 10, 768), (128, 200, 768), (128, 1000, 768)]
MAHA_QUICK = [(16, 10, 64), (128, 200, 768)]
# (B, D): GPLS has one KL row per layer per step (B small); a batch of rows for the general case.
KL_SHAPES = [(12, 768), (128, 768)]
KL_QUICK = [(4, 64), (128, 768)]
IMPLS = ["peer", "torch", "cpu", "triton"]


def _run_peer(benchmark, fn):
    """The peers take up to seconds per call: one warm-up, three rounds."""
    def once():
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    benchmark.pedantic(once, rounds=3, warmup_rounds=1, iterations=1)


def _chol(D, dev, dtype, g):
    L = torch.randn(D, D, generator=g).tril(-1) / D ** 0.5
    L.diagonal().copy_(torch.rand(D, generator=g) + 0.5)
    return L.to(dev, dtype)


def pytest_generate_tests(metafunc):
    quick = metafunc.config.getoption("--quick")
    if "maha_case" in metafunc.fixturenames:
        cases = [(s, dt, mode, impl) for s in (MAHA_QUICK if quick else MAHA_SHAPES) for dt in ("fp32",)
                 for mode in ("fwd", "fwd+bwd") for impl in IMPLS
                 if impl == "peer" or _available("mahalanobis", impl)]
        metafunc.parametrize("maha_case", cases, ids=[f"B{s[0]}K{s[1]}D{s[2]}-{dt}-{m}-{i}" for s, dt, m, i in cases])
    if "kl_case" in metafunc.fixturenames:
        cases = [(s, dt, mode, impl) for s in (KL_QUICK if quick else KL_SHAPES) for dt in ("fp32",)
                 for mode in ("fwd", "fwd+bwd") for impl in IMPLS + ["peer_svd"]
                 if impl.startswith("peer") and not (impl == "peer_svd" and mode != "fwd")
                 or _available("gaussian_kl", impl)]
        metafunc.parametrize("kl_case", cases, ids=[f"B{s[0]}D{s[1]}-{dt}-{m}-{i}" for s, dt, m, i in cases])


def test_mahalanobis(benchmark, maha_case):
    (B, K, D), dt, mode, impl = maha_case
    dtype, dev = DTYPES[dt], _device()
    g = torch.Generator().manual_seed(0)
    grad = mode != "fwd"
    x = torch.randn(B, D, generator=g).to(dev, dtype).requires_grad_(grad)
    means = torch.randn(K, D, generator=g).to(dev, dtype).requires_grad_(grad)
    L = _chol(D, dev, dtype, g).requires_grad_(grad)
    dout = torch.randn(B, K, generator=g).to(dev, dtype)
    if impl == "peer":
        P = (L @ L.T).detach().requires_grad_(grad)  # the peer holds the precision matrix itself
        inputs = (x, means, P)
        forward = lambda: mahalanobis_peer(x, means, P)  # noqa: E731
    else:
        inputs = (x, means, L)

        def forward():
            with use_backend(impl, op="mahalanobis"):
                return mahalanobis(x, means, L)
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                forward()
    else:
        def fn():
            torch.autograd.grad(forward(), inputs, dout)
    benchmark.group = f"mahalanobis B{B} K{K} D{D} {dt} {mode}"
    benchmark.extra_info.update(op="mahalanobis", impl=impl, dtype=dt, mode=mode, shape=dict(B=B, K=K, D=D),
                                device=dev, peer_bkd_bytes=B * K * D * x.element_size())
    _run_peer(benchmark, fn) if impl == "peer" else _run(benchmark, fn, rounds=10)


def test_gaussian_kl(benchmark, kl_case):
    (B, D), dt, mode, impl = kl_case
    dtype, dev = DTYPES[dt], _device()
    g = torch.Generator().manual_seed(0)
    grad = mode != "fwd"
    mu = torch.randn(B, D, generator=g).to(dev, dtype).requires_grad_(grad)
    log_var = (0.3 * torch.randn(B, D, generator=g)).to(dev, dtype).requires_grad_(grad)
    prior = torch.randn(D, generator=g).to(dev, dtype).requires_grad_(grad)
    L = _chol(D, dev, dtype, g).requires_grad_(grad)
    dout = torch.randn(B, generator=g).to(dev, dtype)
    if impl == "peer":
        P = (L @ L.T).detach().requires_grad_(grad)
        inputs = (mu, log_var, prior, P)
        forward = lambda: gaussian_kl_peer(mu, log_var, prior, P)  # noqa: E731
    elif impl == "peer_svd":
        sigma, eps = (0.5 * log_var).exp().detach(), torch.randn(B, D, generator=g).to(dev, dtype)
        inputs = ()
        forward = lambda: gaussian_kl_gpls_svd_peer(sigma, eps)  # noqa: E731
    else:
        inputs = (mu, log_var, prior, L)

        def forward():
            with use_backend(impl, op="gaussian_kl"):
                return gaussian_kl(mu, log_var, prior, L)
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                forward()
    else:
        def fn():
            torch.autograd.grad(forward(), inputs, dout)
    benchmark.group = f"gaussian_kl B{B} D{D} {dt} {mode}"
    benchmark.extra_info.update(op="gaussian_kl", impl=impl, dtype=dt, mode=mode, shape=dict(B=B, D=D), device=dev)
    _run_peer(benchmark, fn) if impl.startswith("peer") else _run(benchmark, fn, rounds=10)
