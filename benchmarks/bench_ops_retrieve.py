"""retrieve: every backend side by side against the "peer" way the official codes select keys.

peer (L2P / DualPrompt / CODA-Prompt / CluMo): ``F.normalize(query) @ F.normalize(keys).T`` then ``topk``,
which writes a normalised copy of the keys and the full ``(B, M)`` score matrix. Shapes: a ViT-B/16 batch
(B = 128, D = 768, cosine) against pools of M = 10 (a prompt pool) to 10^6 keys (class prototypes at
ImageNet-21k scale), k = 1 and 5, and M = 200,000 at k = 5; plus fwd+bwd on prompt-pool sizes (the pull
constraint differentiates the scores), a bf16 pool, and B = 8 at M = 10^6, where a search is bound by reading
the keys once (at B = 128 it is bound by the GEMM: 2·B·M·D flops).

Memory is recorded with every figure (``extra_info``): ``rss_growth_mb``, the largest growth of the process's
peak resident memory over one timed call (VmHWM, reset through /proc/self/clear_refs before each call: pages
actually written, whatever the allocator; memory an allocator kept from an earlier call is not counted), and
``largest_intermediate_mb``, the size of the big temporaries the implementation allocates, by construction.
Wall-clock figures need an otherwise idle machine: on a shared 2-core machine, an OpenMP region whose second
thread is descheduled stalls for a scheduler tick, which dominates the sub-millisecond cases.

Run with the other suites by ``clfast bench ops`` (or ``pytest benchmarks/bench_ops_retrieve.py
--benchmark-enable --benchmark-only``); ``--quick`` skips M = 10^6.
"""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks.harness import DTYPES, available, device, implementation, step, time_case
from benchmarks.peers import retrieve_peer
from clfast.ops import retrieval as rt
from clfast.ops import retrieve

D = 768
IMPLS = ["peer", "torch", "cpu", "faiss", "triton"]


# (B, M, k, dtype, mode)
FULL = [(128, m, k, "fp32", "fwd") for m in (10, 1_000, 100_000, 1_000_000) for k in (1, 5)]
FULL += [(128, 200_000, 5, "fp32", "fwd"), (128, 10, 5, "fp32", "fwd+bwd"), (128, 1_000, 5, "fp32", "fwd+bwd"),
         (128, 100_000, 5, "bf16", "fwd"), (8, 1_000_000, 5, "fp32", "fwd")]
QUICK = [c for c in FULL if c[1] < 1_000_000 and c[2] == 5]


def pytest_generate_tests(metafunc):
    if "rt_case" in metafunc.fixturenames:
        quick = metafunc.config.getoption("--quick")
        cases = [(*c, impl) for c in (QUICK if quick else FULL) for impl in IMPLS if available("retrieve", impl)]
        ids = [f"B{B}M{M}k{k}-{dt}-{mode}-{impl}" for B, M, k, dt, mode, impl in cases]
        metafunc.parametrize("rt_case", cases, ids=ids)


class _Keys:
    """One key pool per (M, dtype), generated once for the module: 10^6 x 768 float32 is 3 GB."""

    def __init__(self):
        self.pools = {}

    def get(self, M, dtype, dev):
        key = (M, dtype)
        if key not in self.pools:
            self.pools.clear()  # one big pool at a time
            g = torch.Generator(device="cpu").manual_seed(M)
            keys = torch.empty(M, D, dtype=torch.float32)
            for j in range(0, M, 1 << 17):  # chunked, so no second 3 GB buffer
                keys[j:j + (1 << 17)] = torch.randn(min(1 << 17, M - j), D, generator=g)
            self.pools[key] = keys.to(dev, dtype)
        return self.pools[key]


@pytest.fixture(scope="module")
def pools():
    return _Keys()


def _rss_kb():
    s = open("/proc/self/status").read()
    return (int(re.search(r"VmRSS:\s+(\d+)", s).group(1)), int(re.search(r"VmHWM:\s+(\d+)", s).group(1)))


class _RssGrowth:
    """Wraps a function; records the largest growth of peak resident memory over one call, in MB (None where
    /proc/self/clear_refs is missing, e.g. not Linux)."""

    def __init__(self, fn):
        self.fn, self.mb = fn, None

    def __call__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current VmRSS
        except OSError:
            return self.fn()
        before, _ = _rss_kb()
        out = self.fn()
        _, peak = _rss_kb()
        self.mb = max(self.mb or 0.0, round((peak - before) / 1024, 1))
        return out


def _largest_intermediate_mb(impl, B, M, k, dtype, mode):
    """The big temporaries each implementation allocates, by construction (MB)."""
    es = torch.finfo(dtype).bits // 8
    threads = torch.get_num_threads()
    if impl == "peer":
        total = M * D * es + B * M * es  # normalised keys + (B, M) scores
    elif impl == "torch":
        chunk = rt.TorchBackend.CHUNK_ELEMS // B
        if dtype != torch.float32:
            chunk = min(chunk, rt.TorchBackend.CHUNK_ELEMS // D)
        n = min(M, max(k, chunk))
        # scores of a chunk and its NaN mask (+ the float32 copy of a 16-bit chunk)
        total = B * n * 5 + (n * D * 4 if dtype != torch.float32 else 0)
    elif impl == "cpu":
        tile = max(32, min(M, (1536 * 1024) // (4 * D) // 32 * 32))
        total = threads * (min(B, 256) * tile * 4 + tile * D * 4)  # per thread: score tile + key tile
    elif impl == "faiss":
        n = min(M, rt.FaissBackend.CHUNK_ROWS)
        total = threads * (n * D * 4 + B * 1024 * 4)  # normalised chunk + FAISS's distance block
    else:  # triton: per split candidates
        total = B * 4 * k * 12
    if mode == "fwd+bwd":
        total += M * D * 4  # the dense gradient of the keys (every implementation)
    return round(total / 2 ** 20, 1)


def test_retrieve(benchmark, rt_case, pools):
    B, M, k, dt, mode, impl = rt_case
    dtype, dev = DTYPES[dt], device()
    keys = pools.get(M, dtype, dev)
    g = torch.Generator(device="cpu").manual_seed(1)
    query = torch.randn(B, D, generator=g).to(dev, dtype)
    if mode == "fwd+bwd":
        keys = keys.detach().clone().requires_grad_(True)
        query = query.requires_grad_(True)
    run = implementation("retrieve", impl, retrieve, peer=lambda q, keys, k, metric: retrieve_peer(q, keys, k))
    fn = step(lambda: run(query, keys, k, metric="cosine")[0], mode, (query, keys))  # fwd+bwd: d(sum of scores)
    rounds, warmup = (3, 0) if M >= 1_000_000 else (5, 1) if M >= 100_000 else (30, 2)
    timed = time_case(benchmark, fn, group=f"retrieve B{B} M{M} D{D} k{k} {dt} {mode}", rounds=rounds,
                      warmup=warmup, measure=_RssGrowth if dev == "cpu" else None)
    benchmark.extra_info.update(
        op="retrieve", impl=impl, dtype=dt, mode=mode, shape=dict(B=B, M=M, D=D, k=k), metric="cosine",
        rss_growth_mb=getattr(timed, "mb", None),
        largest_intermediate_mb=_largest_intermediate_mb(impl, B, M, k, dtype, mode),
        key_bytes=M * D * torch.finfo(dtype).bits // 8)
