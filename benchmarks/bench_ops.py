"""Side-by-side timings of every op's backends against the "peer" way the official codes compute it.

Run with `make bench` (or `clfast bench ops [--quick]`); `benchmarks/report.py` turns the saved JSON into
the ratio tables of BENCHMARKS.md. Each case is one pytest-benchmark group; the figures that matter are
the ratios of medians within a group, never absolute times across machines.
"""

from __future__ import annotations

import torch

from benchmarks.harness import DTYPES, available, device, implementation, step, time_case
from benchmarks.peers import prefix_attention_peer
from clfast.ops import prefix_attention
from clfast.ops.attention import masked_attention

# ---------------------------------------------------------------- prefix_attention
# (B, H, N, d, P): ViT-B/16 shapes; the acceptance shape is B=16, P=20. P=0: a block without prompts (the
# frozen query pass, the unprompted blocks), where `torch` is plain SDPA.
PA_SHAPES = [(16, 12, 197, 64, 20), (32, 12, 197, 64, 5), (32, 12, 197, 64, 20), (16, 12, 197, 64, 0)]
PA_QUICK = [(4, 3, 65, 64, 5), (16, 12, 197, 64, 20)]
PA_IMPLS = ["peer", "torch", "cpu", "triton"]


def _pa_cases(quick):
    shapes = PA_QUICK if quick else [PA_QUICK[0]] + PA_SHAPES
    for shape in shapes:
        for dt in DTYPES:
            for mode in ("fwd", "fwd+bwd"):
                for impl in PA_IMPLS:
                    yield shape, dt, mode, impl


# ---------------------------------------------------------------- masked attention (FusedMultiheadAttention)
# (B, H, L, d): CLIP text towers' causal self-attention — STAR-Prompt's 10 classes of a task at ViT-L/14's text width
# (12 heads of 64, 77 tokens) and 100 classes (the official code's every seen class) — and a ViT-B length. `torch`:
# SDPA with the mask, the call FusedMultiheadAttention made before; `clfast`: masked_attention (explicit in bf16 on
# the CPU, SDPA elsewhere: fp32 ties).
MA_SHAPES = [(10, 12, 77, 64), (100, 12, 77, 64), (16, 12, 197, 64)]
MA_QUICK = [(4, 4, 77, 64)]


def _ma_cases(quick):
    for shape in MA_QUICK if quick else MA_SHAPES:
        for dt in DTYPES:
            for mode in ("fwd", "fwd+bwd"):
                for impl in ("torch", "clfast"):
                    yield shape, dt, mode, impl


def test_masked_attention(benchmark, ma_case):
    (B, H, L, d), dt, mode, impl = ma_case
    dtype, dev = DTYPES[dt], device()
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(dev, dtype).requires_grad_(mode != "fwd")  # noqa: E731
    q, k, v = mk(B, H, L, d), mk(B, H, L, d), mk(B, H, L, d)
    mask = torch.full((L, L), float("-inf"), device=dev, dtype=dtype).triu(1)
    dout = torch.randn(B, H, L, d, generator=g).to(dev, dtype)
    if impl == "torch":
        fwd = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    else:
        fwd = lambda: masked_attention(q, k, v, mask)  # noqa: E731
    time_case(benchmark, step(fwd, mode, (q, k, v), dout), group=f"masked_attention B{B} H{H} L{L} d{d} causal {dt} "
              f"{mode}", rounds=11, op="masked_attention", impl=impl, dtype=dt, mode=mode,
              shape=dict(B=B, H=H, L=L, d=d))


def pytest_generate_tests(metafunc):
    if "ma_case" in metafunc.fixturenames:
        cases = list(_ma_cases(metafunc.config.getoption("--quick")))
        ids = [f"B{s[0]}H{s[1]}L{s[2]}d{s[3]}-{dt}-{mode}-{impl}" for s, dt, mode, impl in cases]
        metafunc.parametrize("ma_case", cases, ids=ids)
    if "pa_case" in metafunc.fixturenames:
        quick = metafunc.config.getoption("--quick")
        cases = [c for c in _pa_cases(quick) if available("prefix_attention", c[3])]
        ids = [f"B{s[0]}H{s[1]}N{s[2]}d{s[3]}P{s[4]}-{dt}-{mode}-{impl}" for s, dt, mode, impl in cases]
        metafunc.parametrize("pa_case", cases, ids=ids)


def test_prefix_attention(benchmark, pa_case):
    (B, H, N, d, P), dt, mode, impl = pa_case
    dtype, dev = DTYPES[dt], device()
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(dev, dtype).requires_grad_(mode != "fwd")  # noqa: E731
    q, k, v, pk, pv = mk(B, H, N, d), mk(B, H, N, d), mk(B, H, N, d), mk(B, H, P, d), mk(B, H, P, d)
    dout = torch.randn(B, H, N, d, generator=g).to(dev, dtype)
    scale = d ** -0.5
    run = implementation("prefix_attention", impl, prefix_attention,
                         peer=lambda *a, scale: prefix_attention_peer(*a, scale))
    fn = step(lambda: run(q, k, v, pk, pv, scale=scale), mode, (q, k, v, pk, pv), dout)
    time_case(benchmark, fn, group=f"prefix_attention B{B} H{H} N{N} d{d} P{P} {dt} {mode}",
              rounds=11 if B >= 16 else 21, op="prefix_attention", impl=impl, dtype=dt, mode=mode,
              shape=dict(B=B, H=H, N=N, d=d, P=P))
