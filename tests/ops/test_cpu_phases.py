"""clfast.ops.cpu_phases: the compiled CPU kernels' phase counters (csrc/common/phases.h) as prefix_attention's
kernel fills them. The work counted per phase is exact (a GEMM's multiply-adds, the softmax's elements), so the
tests pin it to the problem's arithmetic: the forward multiplies every query with every attended key twice, the
backward five times, and masked keys cost nothing."""

from __future__ import annotations

import pytest
import torch

from clfast import _ext
from clfast.ops import cpu_phases, phases as phases_mod, prefix_attention, use_backend

pytestmark = pytest.mark.skipif(_ext.missing_op_reason("cpu_phase_counters") is not None,
                                reason="needs the compiled extension clfast._C (its phase counters)")

NAMED = ("gemm", "pack", "elementwise", "store")


def _inputs(B, H, Nq, Nk, P, d, dtype=torch.float32, shared=False):
    g = torch.Generator().manual_seed(7)
    r = [torch.randn(B, H, n, d, generator=g).to(dtype).requires_grad_() for n in (Nq, Nk, Nk)]
    pshape = (H, P, d) if shared else (B, H, P, d)
    r += [torch.randn(*pshape, generator=g).to(dtype).requires_grad_() for _ in range(2)]
    return r


# (B, H, Nq, Nk, P, d): one key tile, and keys over several tiles and queries over several blocks (odd sizes)
SHAPES = [(2, 3, 37, 29, 5, 16), (1, 2, 300, 401, 7, 24)]


@pytest.mark.parametrize("shape", SHAPES, ids=["one_tile", "tiles"])
def test_forward_and_backward_count_the_problems_arithmetic(shape):
    B, H, Nq, Nk, P, d = shape
    q, k, v, pk, pv = _inputs(*shape)
    L = P + Nk
    with use_backend("cpu"), cpu_phases() as fwd:
        out = prefix_attention(q, k, v, pk, pv)
    assert fwd["gemm"].work == B * H * 2 * Nq * L * d                    # S = q K^T and P V
    assert fwd["elementwise"].work == B * H * Nq * L                     # one exponential per score
    assert fwd["store"].work == B * H * Nq * d
    for name in ("gemm", "elementwise", "store", "task"):
        assert fwd[name].sections > 0 and fwd[name].seconds > 0, name
    with use_backend("cpu"), cpu_phases() as bwd:
        out.backward(torch.randn_like(out))
    assert bwd["gemm"].work == B * H * 5 * Nq * L * d                    # S^T, dP^T, dV, dK, dQ
    assert bwd["elementwise"].work == B * H * Nq * (L + d)               # P and dS per score; Di per query
    for name in ("gemm", "pack", "elementwise", "store", "task"):
        assert bwd[name].sections > 0 and bwd[name].seconds > 0, name


def test_masked_keys_cost_no_work():
    B, H, Nq, Nk, P, d = 3, 2, 21, 40, 4, 8
    q, k, v, pk, pv = _inputs(B, H, Nq, Nk, P, d)
    mask = torch.zeros(B, Nk, dtype=torch.bool)
    kept = [40, 13, 0]                       # every key, some, none (sample 2 attends to its prefix only)
    for b, n in enumerate(kept):
        mask[b, :n] = True
    with use_backend("cpu"), cpu_phases() as fwd:
        out = prefix_attention(q, k, v, pk, pv, kv_mask=mask)
    keys = sum(P + n for n in kept)
    assert fwd["gemm"].work == H * 2 * Nq * keys * d
    assert fwd["elementwise"].work == H * Nq * keys
    with use_backend("cpu"), cpu_phases() as bwd:
        out.sum().backward()
    assert bwd["gemm"].work == H * 5 * Nq * keys * d


@pytest.mark.parametrize("threads", [1, 2])
def test_named_phases_lie_inside_the_tasks(threads):
    """Each thread's sections nest in its task's body: summed over threads, the tasks hold every named phase."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v, pk, pv = _inputs(2, 4, 150, 150, 10, 32, shared=True)
        with use_backend("cpu"), cpu_phases() as ph:
            out = prefix_attention(q, k, v, pk, pv)
            out.sum().backward()
    finally:
        torch.set_num_threads(prev)
    named = sum(ph[n].seconds for n in NAMED)
    assert 0 < named <= ph["task"].seconds * 1.0001 + 1e-6
    assert ph["task"].sections >= 2                                          # a forward and a backward region


def test_counters_reset_per_block_and_stay_off_outside():
    q, k, v, pk, pv = _inputs(1, 2, 17, 19, 3, 8)
    raw = torch.ops._clfast_C.cpu_phase_counters
    with use_backend("cpu"):
        with cpu_phases() as first:
            prefix_attention(q, k, v, pk, pv)
        prefix_attention(q, k, v, pk, pv)                                     # outside: not counted
        assert int(raw().abs().sum()) == 0
        with cpu_phases() as second:
            prefix_attention(q, k, v, pk, pv)
            prefix_attention(q, k, v, pk, pv)
    assert second["gemm"].work == 2 * first["gemm"].work > 0
    assert torch.ops._clfast_C.cpu_phase_names()[0] == "gemm"


def test_bad_use_is_refused(monkeypatch):
    with cpu_phases():
        with pytest.raises(RuntimeError, match="do not nest"):
            with cpu_phases():
                pass
    monkeypatch.setattr(phases_mod._ext, "missing_op_reason", lambda name: "compiled extension clfast._C not loaded")
    with pytest.raises(RuntimeError, match="cpu_phases: needs the compiled kernels' counters: compiled extension"):
        with cpu_phases():
            pass
