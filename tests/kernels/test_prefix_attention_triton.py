"""Direct tests of the prefix-attention Triton launchers (kernels/prefix_attention.py) against a float64
reference: forward and backward, per-sample and shared prefixes, P = 0 and no prefix, masks with a fully
masked row, d = 59, Nq != Nk, non-contiguous inputs, determinism. Without a GPU the kernels run under
the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), at small shapes with 16-wide tiles
so that every loop crosses block boundaries."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before the kernels import triton (the conftest normally did it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from clfast.kernels import prefix_attention as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not K.INTERPRETED,
                                reason="no CUDA device and the kernels were not built for the interpreter")


def make_inputs(B, H, Nq, Nk, P, d, *, shared=False, mask=None, noncontig=False, seed=0):
    """float64 CPU inputs: (q, k, v, prefix_k, prefix_v, kv_mask, dout). P=None: no prefix. mask: None,
    "some" or "empty_row" (sample 0 attends to no sequence key). noncontig: q, k and dout are strided
    views inside NaN-filled buffers (any read out of bounds would show)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k, v, dout = rnd(B, H, Nq, d), rnd(B, H, Nk, d), rnd(B, H, Nk, d), rnd(B, H, Nq, d)
    if noncontig:
        q, k, dout = (_poisoned(t) for t in (q, k, dout))
    pk = pv = None
    if P is not None:
        pshape = (H, P, d) if shared else (B, H, P, d)
        pk, pv = rnd(*pshape), rnd(*pshape)
    kv_mask = None
    if mask is not None:
        kv_mask = torch.rand(B, Nk, generator=g) > 0.3
        if mask == "empty_row":
            kv_mask[0] = False
    return q, k, v, pk, pv, kv_mask, dout


def _poisoned(t):
    """t's values in a (B, Nq, H, 2d+1) NaN buffer, viewed as (B,H,Nq,d) with strides in every dim."""
    B, H, N, d = t.shape
    buf = torch.full((B, N, H, 2 * d + 1), float("nan"), dtype=t.dtype, device=t.device)
    view = buf.permute(0, 2, 1, 3)[..., 1::2]
    view.copy_(t)
    return view


def reference(q, k, v, pk, pv, kv_mask, scale):
    """(out, lse) of softmax(scale·q[pk;k]ᵀ)[pv;v] in the inputs' dtype; rows with nothing to attend give
    out = 0, lse = −inf."""
    B, P = q.shape[0], 0
    if pk is not None:
        if pk.dim() == 3:
            pk, pv = pk.expand(B, *pk.shape), pv.expand(B, *pv.shape)
        P = pk.shape[2]
        k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    s = (q @ k.transpose(-1, -2)) * scale
    if kv_mask is not None:
        keep = torch.cat([kv_mask.new_ones(B, P), kv_mask], 1)
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s.double(), -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v, lse


def ref_grads(inputs, scale, dtype=torch.float64):
    """(out, lse, [dq, dk, dv, dpk, dpv]) of the reference computed in ``dtype`` by autograd."""
    q, k, v, pk, pv, kv_mask, dout = inputs
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (q, k, v, pk, pv)]
    out, lse = reference(*leaves, kv_mask, scale)
    out.backward(dout.to(dtype))
    return out.detach(), lse, [None if t is None else t.grad for t in leaves]


def run_kernels(inputs, scale, dtype):
    q, k, v, pk, pv, kv_mask, dout = inputs

    def dev(t):  # a non-contiguous input stays a poisoned view on the device
        if t is None:
            return None
        return t.to(DEVICE, dtype) if t.is_contiguous() else _poisoned(t.to(DEVICE, dtype))

    q, k, v, pk, pv, dout = (dev(t) for t in (q, k, v, pk, pv, dout))
    m = None if kv_mask is None else kv_mask.to(DEVICE)
    out, lse = K.prefix_attention_fwd(q, k, v, pk, pv, m, scale)
    grads = K.prefix_attention_bwd(dout, q, k, v, pk, pv, m, out, lse, scale)
    return out, lse, grads


def max_err(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item() if a.numel() else 0.0


def mag(t):
    """Scale for gradient tolerances: max |t|, at least 1."""
    return max(1.0, t.abs().max().item()) if t.numel() else 1.0


# B, H, Nq, Nk, P, d, shared, mask, noncontig
CASES = [
    (2, 2, 20, 37, 5, 59, False, "empty_row", False),  # per-sample prefix, a row whose keys are all masked
    (2, 3, 33, 17, 7, 32, True, "some", False),  # shared prefix, Nq > Nk
    (1, 2, 17, 40, 0, 24, False, None, False),  # P = 0 (empty prefix tensors)
    (2, 1, 9, 21, None, 59, False, "empty_row", False),  # no prefix: row 0 attends to nothing
    (2, 2, 18, 19, 1, 16, True, "some", True),  # non-contiguous q, k, dout in NaN buffers; P = 1
]


def _id(c):
    B, H, Nq, Nk, P, d, shared, mask, nc = c
    return (f"B{B}H{H}q{Nq}k{Nk}P{P}{'s' if shared else ''}d{d}" + (f"-{mask}" if mask else "")
            + ("-nc" if nc else ""))


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_fp32_matches_float64_reference(case):
    B, H, Nq, Nk, P, d, shared, mask, nc = case
    inputs = make_inputs(B, H, Nq, Nk, P, d, shared=shared, mask=mask, noncontig=nc, seed=len(_id(case)))
    scale = d ** -0.5
    ref_out, ref_lse, refs = ref_grads(inputs, scale)
    out, lse, grads = run_kernels(inputs, scale, torch.float32)

    assert out.shape == (B, H, Nq, d) and out.dtype == torch.float32 and out.is_contiguous()
    assert lse.shape == (B, H, Nq) and lse.dtype == torch.float32
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse).cpu(), empty)
    assert max_err(lse.cpu()[~empty], ref_lse[~empty]) <= 1e-5
    assert max_err(out, ref_out) <= 1e-5
    for name, g, r, x in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, refs, inputs[:5]):
        if x is None:
            assert g.numel() == 0 and g.dtype == torch.float32, name
            continue
        assert g.shape == x.shape and g.dtype == torch.float32, name
        assert torch.isfinite(g).all(), name
        assert max_err(g, r) <= 1e-5 * mag(r), name
    if mask is not None:  # masked keys get exactly zero gradient
        off = ~inputs[5]
        assert (grads[1].cpu()[off.nonzero(as_tuple=True)[0], :, off.nonzero(as_tuple=True)[1]] == 0).all()
        assert (grads[2].cpu()[off.nonzero(as_tuple=True)[0], :, off.nonzero(as_tuple=True)[1]] == 0).all()
    if mask == "empty_row" and P is None:  # nothing to attend: zeros, never NaN
        assert (out[0] == 0).all() and (grads[0][0] == 0).all()


LOWP_CASES = [CASES[0], CASES[1]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", LOWP_CASES, ids=_id)
def test_low_precision_within_2x_of_pytorch(case, dtype):
    """Error vs float64 at most twice that of the same math in stock PyTorch at that dtype (matmuls,
    softmax, autograd in bf16/fp16), plus a small slack for near-zero errors."""
    B, H, Nq, Nk, P, d, shared, mask, nc = case
    inputs = make_inputs(B, H, Nq, Nk, P, d, shared=shared, mask=mask, noncontig=nc, seed=7)
    inputs = tuple(t if t is None or t.dtype == torch.bool else t.to(dtype).double() for t in inputs)
    scale = d ** -0.5
    ref_out, _, refs = ref_grads(inputs, scale)
    peer_out, _, peers = ref_grads(inputs, scale, dtype)
    out, _, grads = run_kernels(inputs, scale, dtype)
    slack = 2e-3 if dtype == torch.bfloat16 else 3e-4
    assert out.dtype == dtype
    assert max_err(out, ref_out) <= 2 * max_err(peer_out, ref_out) + slack
    for name, g, r, p in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, refs, peers):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert max_err(g, r) <= 2 * max_err(p, r) + slack * mag(r), name


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter tile sizes only")
@pytest.mark.parametrize("tiles", [(32, 16), (16, 32)], ids=["m32n16", "m16n32"])
def test_unequal_query_and_key_tiles(tiles, monkeypatch):
    """The interpreter's default tiles are square (16×16); the GPU's are not."""
    cfg = K.Config(*tiles, 4, 1)
    monkeypatch.setattr(K, "_launch_config", lambda kernel, bd, dtype: cfg)
    inputs = make_inputs(2, 2, 45, 38, 20, 40, shared=tiles[0] == 32, mask="some", seed=5)
    ref_out, _, refs = ref_grads(inputs, 0.2)
    out, _, grads = run_kernels(inputs, 0.2, torch.float32)
    assert max_err(out, ref_out) <= 1e-5
    for g, r in zip(grads, refs):
        assert max_err(g, r) <= 1e-5 * mag(r)


def test_backward_is_deterministic():
    inputs = make_inputs(2, 2, 20, 37, 5, 16, shared=True, mask="some", seed=3)
    a = run_kernels(inputs, 0.25, torch.float32)
    b = run_kernels(inputs, 0.25, torch.float32)
    for x, y in zip((a[0], a[1], *a[2]), (b[0], b[1], *b[2])):
        assert torch.equal(x, y)


def test_empty_query_and_key_sets():
    q = torch.randn(1, 2, 0, 16, device=DEVICE)
    k = torch.randn(1, 2, 5, 16, device=DEVICE)
    out, lse = K.prefix_attention_fwd(q, k, k, None, None, None, 1.0)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)
    dq, dk, dv, dpk, dpv = K.prefix_attention_bwd(out, q, k, k, None, None, None, out, lse, 1.0)
    assert dq.shape == q.shape and (dk == 0).all() and (dv == 0).all() and dpk.numel() == 0
    # no keys and no prefix: every row attends to nothing
    q = torch.randn(1, 1, 3, 16, device=DEVICE)
    k0 = torch.randn(1, 1, 0, 16, device=DEVICE)
    out, lse = K.prefix_attention_fwd(q, k0, k0, None, None, None, 1.0)
    assert (out == 0).all() and torch.isneginf(lse).all()
    dq, *_ = K.prefix_attention_bwd(torch.ones_like(out), q, k0, k0, None, None, None, out, lse, 1.0)
    assert (dq == 0).all()


def test_block_config_covers_head_dims():
    for d in (1, 16, 59, 64, 65, 128, 200, 256):
        bd = K.block_d(d)
        assert bd >= max(d, 16) and bd & (bd - 1) == 0
        for kern in ("fwd", "bwd_kv", "bwd_q"):
            for dtype in (torch.float32, torch.bfloat16):
                cfg = K.config(kern, bd, dtype)
                assert cfg.block_m >= 16 and cfg.block_n >= 16
