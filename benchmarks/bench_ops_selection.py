"""Timings of class_select: the two-GEMM registered op (``torch``) against the official code's explicit form
(``peer``: ``clfast.ops.selection.reference``, the ``(L, B, C, Dc)`` modulated queries normalised and contracted
with the keys, the argmax mask written in place, ``masked_s @ P``), at STAR-Prompt's shapes: 12 prompted layers,
C = 200 seen classes (ImageNet-R / CUB after the last task), Dc = 768 (CLIP ViT-L/14), E = 768 (residual
prompts); B = 16 (ImageNet-R's batch) and B = 128 (the other datasets').

Modes: ``fwd`` (inference, no autograd), ``fwd+bwd`` (the official straight-through gradient into the modulators
and the value prompts, the trainable inputs of stage 2; query and keys are frozen) and ``fwd+bwd-strict``.
Same conventions as bench_ops.py; ``largest_intermediate_mb`` in extra_info is the biggest temporary each
implementation allocates, by construction. ``--quick``: B = 16 only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.harness import DTYPES, available, device, implementation, step, time_case
from clfast.ops import class_select
from clfast.ops import selection as sel

L, C, DC, E = 12, 200, 768, 768
BATCHES = [16, 128]
QUICK_BATCHES = [16]
MODES = ["fwd", "fwd+bwd", "fwd+bwd-strict"]
IMPLS = ["peer", "torch"]


def pytest_generate_tests(metafunc):
    if "sel_case" in metafunc.fixturenames:
        batches = QUICK_BATCHES if metafunc.config.getoption("--quick") else BATCHES
        cases = [(B, "fp32", mode, impl) for B in batches for mode in MODES for impl in IMPLS
                 if available("class_select", impl)]
        metafunc.parametrize("sel_case", cases, ids=[f"B{B}-{dt}-{m}-{i}" for B, dt, m, i in cases])


def test_class_select(benchmark, sel_case):
    B, dt, mode, impl = sel_case
    dtype, dev = DTYPES[dt], device()
    g = torch.Generator().manual_seed(0)
    grad = mode != "fwd"
    strict = mode.endswith("strict")
    q = (3.0 * torch.randn(B, DC, generator=g)).to(dev, dtype)
    A = torch.randn(L, C, DC, generator=g).to(dev, dtype).requires_grad_(grad)
    k = F.normalize(torch.randn(C, DC, generator=g), dim=-1).to(dev, dtype)
    P = torch.randn(L, C, E, generator=g).to(dev, dtype).requires_grad_(grad)
    dout = torch.randn(L, B, E, generator=g).to(dev, dtype) if grad else None
    forward = implementation("class_select", impl,
                             lambda: class_select(q, A, k, P, strict_grad=strict)[0],
                             peer=lambda: sel.reference(q, A, k, P, strict_grad=strict)[0])
    fn = step(forward, "fwd" if not grad else "fwd+bwd", (A, P), dout)
    elem = torch.tensor([], dtype=dtype).element_size()
    # peer: the (L, B, C, Dc) modulated queries (and their normalised copy); torch: the (L, C, Dc) products a ⊙ k
    largest = (L * B * C * DC if impl == "peer" else L * C * DC) * elem / 2 ** 20
    time_case(benchmark, fn, group=f"class_select L{L} B{B} C{C} Dc{DC} E{E} {dt} {mode}", rounds=5,
              op="class_select", impl=impl, dtype=dt, mode=mode,
              largest_intermediate_mb=round(largest, 1), shape=dict(L=L, B=B, C=C, Dc=DC, E=E))
