"""Timings of prompt_conv: every backend against ConvPrompt's released per-prompt loop, over 7 prompted layers'
worth of calls (each layer: 2 streams (K, V) × 12 heads = 24 embeddings of 36×80, F kernels of 17×17 per
embedding, a (B, F) weight matrix), forward and forward+backward (gradients of all four inputs of every layer).

Same conventions as bench_ops.py. The acceptance case is B=8, F=5 fwd+bwd: the fused backend ≥ 100× the peer
and ≥ 2× ``torch``. The peer runs 168·F single-channel convolutions on B copies each, so it is timed only
where one round stays under about half a minute on the 2-core machine (B·F ≤ 640 forward, the acceptance
case forward+backward); the other rows quote fused vs ``torch``.
"""

from __future__ import annotations

import torch

from benchmarks.harness import DTYPES, available, device, implementation, step, time_case
from benchmarks.peers import prompt_conv_peer
from clfast.ops import prompt_conv

LAYERS, HEADS, LIN, DIN, KERNEL = 7, 2 * 12, 36, 80, 17
# (B, F)
PC_SHAPES = [(8, 5), (24, 5), (24, 18), (24, 50), (128, 5), (128, 18), (128, 50)]
PC_QUICK = [(8, 5)]
IMPLS = ["peer", "torch", "cpu", "triton"]


def _peer_feasible(B, F, mode, quick):
    if quick:
        return False  # a quick run never waits for the loop
    return B * F <= 640 if mode == "fwd" else B * F <= 40


def pytest_generate_tests(metafunc):
    if "pc_case" in metafunc.fixturenames:
        quick = metafunc.config.getoption("--quick")
        cases = [(s, "fp32", mode, impl) for s in (PC_QUICK if quick else PC_SHAPES) for mode in ("fwd", "fwd+bwd")
                 for impl in IMPLS
                 if available("prompt_conv", impl) and (impl != "peer" or _peer_feasible(*s, mode, quick))]
        metafunc.parametrize("pc_case", cases, ids=[f"B{s[0]}F{s[1]}-{dt}-{m}-{i}" for s, dt, m, i in cases])


def test_prompt_conv(benchmark, pc_case):
    (B, F), dt, mode, impl = pc_case
    dtype, dev = DTYPES[dt], device()
    g = torch.Generator().manual_seed(0)
    grad = mode != "fwd"
    bound = 1.0 / KERNEL

    def mk(*shape, scale=1.0):
        return ((torch.rand(*shape, generator=g) * 2 - 1) * scale).to(dev, dtype).requires_grad_(grad)

    layers = [(mk(HEADS, LIN, DIN), mk(HEADS, F, KERNEL, KERNEL, scale=bound), mk(HEADS, F, scale=bound), mk(B, F))
              for _ in range(LAYERS)]
    inputs = [t for layer in layers for t in layer]
    douts = None
    if grad:
        douts = [torch.randn(B, HEADS, LIN - KERNEL + 1, DIN - KERNEL + 1, generator=g).to(dev, dtype)
                 for _ in range(LAYERS)]
    forward = implementation("prompt_conv", impl, lambda: [prompt_conv(*layer) for layer in layers],
                             peer=lambda: [prompt_conv_peer(*layer) for layer in layers])
    fn = step(forward, mode, inputs, douts)
    # the peer takes seconds per round: one round, no warm-up
    time_case(benchmark, fn, group=f"prompt_conv {LAYERS}x(H{HEADS} {LIN}x{DIN} k{KERNEL}) B{B} F{F} {dt} {mode}",
              **(dict(rounds=1, warmup=0) if impl == "peer" else dict(rounds=5)),
              op="prompt_conv", impl=impl, dtype=dt, mode=mode,
              shape=dict(layers=LAYERS, H=HEADS, Lin=LIN, Din=DIN, k=KERNEL, B=B, F=F))
