"""clfast.ops.prefix_attention: the reference against an independent oracle, every backend against the
float64 reference (outputs and all five gradients; at 16 bits against stock PyTorch's own error, computed by a
composition other than the backend's), registration (opcheck of every registered op, torch.compile), bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import clfast
from clfast.ops import _dispatch, prefix_attention, use_backend
from clfast.ops import attention as pa_mod
from tests.ops._util import (CUDA, INTERPRETED, assert_compiles_like_eager, assert_low_precision,
                             backward_op, fused_backends, magnitude, max_err, opcheck, poisoned_view,
                             runnable_backends, triton_kernels_in_compiled_graph)

OP = "prefix_attention"
BACKENDS = runnable_backends(OP)
FUSED = fused_backends(OP)


def make_case(B, H, Nq, Nk, P, d, *, shared=False, mask=None, dtype=torch.float64, noncontig=False,
              requires_grad=True):
    """Random inputs in float64 (cast per test). mask: None, "some" (random keys off) or "empty_row"
    (sample 0 has every key masked)."""
    g = torch.Generator().manual_seed(1000 * B + 100 * Nq + 10 * (P or 0) + d)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k, v = rnd(B, H, Nq, d), rnd(B, H, Nk, d), rnd(B, H, Nk, d)
    pk = pv = None
    if P is not None:
        pshape = (H, P, d) if shared else (B, H, P, d)
        pk, pv = rnd(*pshape), rnd(*pshape)
    kv_mask = None
    if mask is not None:
        kv_mask = torch.rand(B, Nk, generator=g) > 0.3
        kv_mask[:, -1] = True
        if mask == "empty_row":
            kv_mask[0] = False
    tensors = [q, k, v, pk, pv]
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        t = t.to(dtype)
        if noncontig:
            t = poisoned_view(t.shape, dtype)
        out.append(t.requires_grad_(requires_grad))
    return (*out, kv_mask)


def grads(fn, inputs, dout):
    tensors = [t for t in inputs[:5] if t is not None]
    for t in tensors:
        t.grad = None
    out = fn(*inputs[:5], kv_mask=inputs[5])
    out.backward(dout)
    # a zero-size prefix (P=0) may get no gradient at all from autograd: that is an empty gradient
    return out.detach(), [t.grad.detach().clone() if t.grad is not None or t.numel() else torch.zeros_like(t)
                          for t in tensors]


def cast(inputs, dtype):
    out = []
    for t in inputs[:5]:
        out.append(None if t is None else t.detach().to(dtype).requires_grad_(True))
    return (*out, inputs[5])


def ref64(inputs, dout):
    x = cast(inputs, torch.float64)
    return grads(pa_mod.reference, x, dout.double())


# --------------------------------------------------------------------------------------------------
# The reference is the spec: check it against independent computations in float64
# --------------------------------------------------------------------------------------------------


def test_reference_matches_sdpa_on_concatenation():
    q, k, v, pk, pv, m = make_case(2, 3, 11, 13, 4, 16, mask="some", requires_grad=False)
    kc, vc = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    full = torch.cat([torch.ones(2, 4, dtype=torch.bool), m], 1)[:, None, None, :]
    oracle = F.scaled_dot_product_attention(q, kc, vc, attn_mask=full)
    assert max_err(pa_mod.reference(q, k, v, pk, pv, m), oracle) < 1e-12


def test_reference_matches_per_head_loop_with_shared_prefix_and_custom_scale():
    q, k, v, pk, pv, _ = make_case(2, 2, 3, 5, 2, 7, shared=True, requires_grad=False)
    out = pa_mod.reference(q, k, v, pk, pv, scale=0.3)
    for b in range(2):
        for h in range(2):
            keys = torch.cat([pk[h], k[b, h]])
            vals = torch.cat([pv[h], v[b, h]])
            s = (q[b, h] @ keys.T) * 0.3
            w = torch.exp(s - s.max(-1, keepdim=True).values)
            w = w / w.sum(-1, keepdim=True)
            assert max_err(out[b, h], w @ vals) < 1e-12


def test_reference_empty_rows_are_zero_with_finite_grads():
    q, k, v, _, _, m = make_case(2, 1, 3, 4, None, 5, mask="empty_row")
    out = pa_mod.reference(q, k, v, kv_mask=m)
    assert torch.all(out[0] == 0)
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[0] == 0) and torch.all(k.grad[0] == 0)


@pytest.mark.parametrize("shared", [False, True])
def test_reference_gradcheck(shared):
    q, k, v, pk, pv, m = make_case(2, 2, 3, 4, 2, 3, shared=shared, mask="some")
    assert torch.autograd.gradcheck(lambda *t: pa_mod.reference(*t, kv_mask=m), (q, k, v, pk, pv))


# --------------------------------------------------------------------------------------------------
# Every backend against the float64 reference
# --------------------------------------------------------------------------------------------------

# (B, H, Nq, Nk, P, d, shared, mask, noncontig)
CASES = [
    (1, 1, 1, 1, 1, 8, False, None, False),
    (2, 3, 5, 7, 0, 59, False, None, False),
    (2, 3, 5, 7, 1, 59, True, None, False),
    (1, 2, 9, 4, None, 64, False, "some", False),
    (3, 2, 6, 17, 3, 32, False, "empty_row", True),
    (2, 2, 33, 70, 5, 16, True, "empty_row", False),
    (2, 2, 7, 7, None, 24, False, "empty_row", False),  # no prefix + empty row: zeros, not NaN
]
BIG = [(2, 3, 197, 197, 20, 64, False, None, False),  # ViT-B/16 shape
       (2, 2, 197, 150, 30, 64, True, "some", True)]


def _ids(c):
    B, H, Nq, Nk, P, d, shared, mask, nc = c
    return f"B{B}H{H}q{Nq}k{Nk}P{P}d{d}" + ("-shared" if shared else "") + (f"-{mask}" if mask else "") + (
        "-noncontig" if nc else "")


def _grid():
    for name in BACKENDS:
        # The Triton interpreter runs ~1000x slower than torch: big shapes are checked on GPUs only.
        cases = CASES if name in INTERPRETED else CASES + BIG
        for c in cases:
            yield pytest.param(name, c, id=f"{name}-{_ids(c)}")


def _run_backend(name, inputs):
    with use_backend(name, op=OP):
        return prefix_attention(*inputs[:5], kv_mask=inputs[5])


@pytest.mark.parametrize("name,case", list(_grid()))
def test_backend_fp32_matches_float64_reference(name, case):
    B, H, Nq, Nk, P, d, shared, mask, nc = case
    x = make_case(B, H, Nq, Nk, P, d, shared=shared, mask=mask, dtype=torch.float32, noncontig=nc)
    cls = _dispatch.backends(OP)[name]
    dout = torch.randn(B, H, Nq, d, dtype=torch.float32)
    ref_out, ref_grads = ref64(x, dout)
    out, got = grads(lambda *a, **kw: _run_backend(name, (*a, kw["kv_mask"])), x, dout)
    assert out.dtype == torch.float32 and out.shape == (B, H, Nq, d)
    assert torch.isfinite(out).all()
    assert max_err(out, ref_out) <= cls.ATOL[torch.float32], name
    for g, r in zip(got, ref_grads):
        assert g.shape == r.shape
        assert torch.isfinite(g).all()
        assert max_err(g, r) <= cls.GRAD_ATOL[torch.float32] * magnitude(r)


LOWP_CASES = [CASES[1], CASES[4], CASES[5]]


def _lowp_grid():
    for name in BACKENDS:
        cls = _dispatch.backends(OP)[name]
        for dtype in (torch.bfloat16, torch.float16):
            if dtype not in cls.DTYPES:
                continue
            cases = LOWP_CASES if name in INTERPRETED else LOWP_CASES + BIG[:1]
            for c in cases:
                yield pytest.param(name, dtype, c, id=f"{name}-{str(dtype)[6:]}-{_ids(c)}")


def naive_attention(q, k, v, prefix_k, prefix_v, kv_mask=None):
    """The same computation in stock PyTorch (STYLE.md §8; the L2P/DualPrompt codes' attention): explicit scores
    and softmax on the concatenation, in the inputs' dtype. Written here, independently of clfast, so that the
    reference backend at 16 bits is not measured against itself. (F.scaled_dot_product_attention, which accumulates
    in fp32, is up to about 2.6x more accurate in bf16 than this composition, and so than the reference.)"""
    B, P = q.shape[0], 0
    if prefix_k is not None:
        if prefix_k.dim() == 3:
            prefix_k, prefix_v = prefix_k.expand(B, -1, -1, -1), prefix_v.expand(B, -1, -1, -1)
        P = prefix_k.shape[2]
        k, v = torch.cat([prefix_k, k], 2), torch.cat([prefix_v, v], 2)
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if kv_mask is not None:
        keep = torch.cat([kv_mask.new_ones(B, P), kv_mask], 1)
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    return s.softmax(-1).nan_to_num(0.0) @ v  # a row with nothing to attend: zeros


@pytest.mark.parametrize("name,dtype,case", list(_lowp_grid()))
def test_backend_low_precision_within_2x_of_pytorch_error(name, dtype, case):
    """bf16/fp16 error vs the float64 reference is within the backend's tolerance and at most twice what stock
    PyTorch makes at that dtype (:func:`naive_attention` in bf16/fp16), plus a small absolute slack for tiny
    errors."""
    B, H, Nq, Nk, P, d, shared, mask, nc = case
    cls = _dispatch.backends(OP)[name]
    x = make_case(B, H, Nq, Nk, P, d, shared=shared, mask=mask, dtype=dtype, noncontig=nc)
    dout = torch.randn(B, H, Nq, d).to(dtype)
    peer = grads(naive_attention, cast(x, dtype), dout)
    result = grads(lambda *a, **kw: _run_backend(name, (*a, kw["kv_mask"])), cast(x, dtype), dout)
    assert_low_precision(cls, dtype, result, ref64(x, dout), peer, out_scale=1.0)


def test_low_precision_peer_matches_the_float64_reference():
    """The composition the 16-bit errors are measured against computes the op (checked in float64)."""
    x = make_case(3, 2, 6, 17, 3, 32, mask="empty_row", requires_grad=False)
    assert max_err(naive_attention(*x[:5], kv_mask=x[5]), pa_mod.reference(*x[:5], kv_mask=x[5])) < 1e-12
    x = make_case(2, 3, 5, 7, 1, 59, shared=True, requires_grad=False)
    assert max_err(naive_attention(*x[:5]), pa_mod.reference(*x[:5])) < 1e-12


@pytest.mark.parametrize("name", FUSED)
def test_fused_backend_is_deterministic(name):
    x = make_case(2, 2, 9, 11, 3, 16, mask="some", dtype=torch.float32)
    dout = torch.randn(2, 2, 9, 16)
    run = lambda *a, **kw: _run_backend(name, (*a, kw["kv_mask"]))  # noqa: E731
    o1, g1 = grads(run, x, dout)
    o2, g2 = grads(run, x, dout)
    assert torch.equal(o1, o2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_float64_dispatches_to_a_backend_that_supports_it():
    q, k, v, pk, pv, _ = make_case(1, 2, 3, 4, 2, 8, requires_grad=False)
    inputs = pa_mod._validate(q, k, v, pk, pv, None, None)
    chosen = _dispatch.select(OP, inputs)
    assert torch.float64 in chosen.DTYPES
    assert max_err(prefix_attention(q, k, v, pk, pv), pa_mod.reference(q, k, v, pk, pv)) < 1e-12


def test_cpu_backend_is_the_default_on_cpu():
    if "cpu" not in BACKENDS:
        pytest.fail(f"the C++ backend is not available: {_dispatch.backends(OP)['cpu'].unavailable_reason()}")
    q, k, v, pk, pv, _ = make_case(1, 2, 3, 4, 2, 8, dtype=torch.float32, requires_grad=False)
    assert _dispatch.select(OP, pa_mod._validate(q, k, v, pk, pv, None, None)).NAME == "cpu"


# --------------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("shared,mask", [(False, None), (True, "some"), (False, "empty_row")])
def test_opcheck(name, shared, mask):
    """The backend's registered op and its backward op (under the Triton interpreter, the parts that run there)."""
    q, k, v, pk, pv, m = make_case(2, 2, 5, 6, 3, 8, shared=shared, mask=mask, dtype=torch.float32)
    op = _dispatch.backends(OP)[name].registered
    interpreted = name in INTERPRETED
    for prefix in ((pk, pv), (None, None)):
        args = (q, k, v, *prefix, m, 0.35)
        opcheck(op.default, args, interpreted=interpreted)
        with torch.no_grad():
            out, lse = op(*args)
        dout = torch.randn_like(out)
        opcheck(backward_op(op), (dout, *(t.detach() if t is not None else None for t in args[:6]), out, lse, 0.35),
                interpreted=interpreted)


class _TinyPrompted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)
        self.prompt = torch.nn.Parameter(torch.randn(2, 2, 3, 8))  # (k/v, H, P, d), shared

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.proj(x).reshape(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        return prefix_attention(q, k, v, self.prompt[0], self.prompt[1]).sum()


@pytest.mark.parametrize("name", [n for n in BACKENDS if n not in INTERPRETED])
def test_torch_compile_fullgraph_no_graph_break(name):
    model = _TinyPrompted()
    assert_compiles_like_eager(model, list(model.parameters()), torch.randn(2, 5, 16), backend=name, op=OP)


@pytest.mark.skipif(not CUDA, reason="compiling through a triton_op needs a GPU: under the Triton interpreter "
                                     "its FakeTensor trace launches kernels on tensors without data")
def test_torch_compile_sees_the_triton_kernels():
    """On CUDA, torch.compile(fullgraph=True) traces into clfast::prefix_attention_triton: the graph holds the
    forward and backward Triton kernels (not an opaque op), and loss and gradients match eager."""
    model = _TinyPrompted().cuda()
    launched = triton_kernels_in_compiled_graph(model, list(model.parameters()), torch.randn(2, 5, 16).cuda(),
                                                backend="triton", op=OP)
    assert {"_fwd_kernel", "_bwd_kv_kernel", "_bwd_q_kernel"} <= launched


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def _good():
    return make_case(2, 3, 4, 5, 2, 8, dtype=torch.float32, requires_grad=False)


@pytest.mark.parametrize("mutate,exc,needle", [
    (lambda a: {**a, "q": a["q"][0]}, ValueError, "q must have shape (B,H,N,d)"),
    (lambda a: {**a, "k": a["k"][:1]}, ValueError, "k must have shape"),
    (lambda a: {**a, "k": a["k"][:, :2]}, ValueError, "k must have shape"),
    (lambda a: {**a, "v": a["v"][..., :4]}, ValueError, "v must have the shape of k"),
    (lambda a: {**a, "prefix_v": None}, ValueError, "prefix_k and prefix_v must be given together"),
    (lambda a: {**a, "prefix_k": a["prefix_k"][:, :, :, :4]}, ValueError, "prefix_k must have shape"),
    (lambda a: {**a, "prefix_v": a["prefix_v"][:, :, :1]}, ValueError, "prefix_v must have the shape"),
    (lambda a: {**a, "q": a["q"].long()}, TypeError, "q must be float32"),
    (lambda a: {**a, "v": a["v"].double()}, TypeError, "v must have q's dtype"),
    (lambda a: {**a, "q": a["q"].tolist()}, TypeError, "q must be a torch.Tensor"),
    (lambda a: {**a, "kv_mask": torch.ones(2, 5)}, TypeError, "kv_mask must be a bool tensor"),
    (lambda a: {**a, "kv_mask": torch.ones(2, 4, dtype=torch.bool)}, ValueError, "kv_mask must have shape (B,Nk)"),
    (lambda a: {**a, "scale": "big"}, TypeError, "scale must be a finite float"),
    (lambda a: {**a, "scale": float("nan")}, TypeError, "scale must be a finite float"),
])
def test_bad_input_names_the_argument(mutate, exc, needle):
    q, k, v, pk, pv, _ = _good()
    args = mutate(dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv, kv_mask=None, scale=None))
    with pytest.raises(exc) as info:
        prefix_attention(args["q"], args["k"], args["v"], args["prefix_k"], args["prefix_v"],
                         kv_mask=args["kv_mask"], scale=args["scale"])
    assert needle in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to put one input on it")
def test_mixed_devices_rejected():
    q, k, v, pk, pv, _ = _good()
    with pytest.raises(ValueError, match="k must be on q's device"):
        prefix_attention(q, k.cuda(), v, pk, pv)


def test_mixed_devices_rejected_on_meta():
    q, k, v, pk, pv, _ = _good()
    with pytest.raises(ValueError, match="prefix_k must be on q's device"):
        prefix_attention(q, k, v, pk.to("meta"), pv.to("meta"))


def test_c_kernel_checks_its_own_preconditions():
    """The Python layer validates first, but calling the kernel directly must raise, not crash."""
    if "cpu" not in BACKENDS:
        pytest.fail("the C++ backend is not available")
    q, k, v, pk, pv, _ = _good()
    with pytest.raises(RuntimeError, match="prefix_k"):
        torch.ops._clfast_C.prefix_attention_fwd(q, k, v, pk[:, :, :, :3], pv, None, 0.3)
    with pytest.raises(RuntimeError):
        torch.ops._clfast_C.prefix_attention_fwd(q, k[:, :2], v, pk, pv, None, 0.3)


def test_extension_reports_build_info():
    assert "cuda=" in clfast._ext.build_info()
