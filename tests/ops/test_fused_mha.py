"""FusedMultiheadAttention / fuse_self_attention: nn.MultiheadAttention's batch-first self-attention on the fused
op, checked against PyTorch's own module (in float64 where it is the reference) on random odd shapes, gradients
included, and the calls it leaves to PyTorch."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from clfast.ops import FusedMultiheadAttention, fuse_self_attention, use_backend

BACKENDS = ["reference", None]   # None: the default dispatch (the C++ backend on the CPU)


def pair(dim: int, heads: int, seed: int = 0, dtype=torch.float64, **kw):
    """(stock, fused) with the same weights."""
    torch.manual_seed(seed)
    stock = nn.MultiheadAttention(dim, heads, batch_first=True, **kw).to(dtype)
    fused = copy.deepcopy(stock)
    assert fuse_self_attention(fused) == 1
    return stock, fused


def causal(L: int, kind: str):
    if kind == "float":
        return torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)
    if kind == "bool":   # nn.MultiheadAttention: True = masked out
        return torch.ones(L, L, dtype=torch.bool).triu(1)
    g = torch.Generator().manual_seed(L)   # an arbitrary additive mask, finite
    return torch.randn(L, L, generator=g, dtype=torch.float64)


SHAPES = [(3, 7, 30, 5), (1, 13, 12, 1), (2, 1, 18, 3), (5, 11, 48, 4)]   # (B, L, D, H)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,L,D,H", SHAPES)
@pytest.mark.parametrize("mask", [None, "float", "bool", "random", "is_causal"])
def test_equals_torch_module_in_float64_with_gradients(backend, B, L, D, H, mask):
    stock, fused = pair(D, H, seed=B * L + D)
    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    xf = x.detach().clone().requires_grad_(True)
    kw = {"need_weights": False}
    if mask == "is_causal":
        kw.update(attn_mask=causal(L, "float"), is_causal=True)
    elif mask is not None:
        kw["attn_mask"] = causal(L, mask)
    with use_backend(backend) if backend else contextlib.nullcontext():
        got, w = fused(xf, xf, xf, **kw)
    want = stock(x, x, x, **kw)[0]
    assert w is None and got.shape == (B, L, D) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(want)
    (want * g).sum().backward()
    (got * g).sum().backward()
    torch.testing.assert_close(xf.grad, x.grad, rtol=1e-9, atol=1e-10)
    for (name, p), q in zip(stock.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mask", [None, "float"])
def test_float32_and_bf16_autocast_match_the_float64_module(mask):
    stock, fused = pair(64, 4, dtype=torch.float32)
    ref = copy.deepcopy(stock).double()
    x = torch.randn(2, 17, 64)
    m = causal(17, mask) if mask else None
    with torch.no_grad():
        want = ref(x.double(), x.double(), x.double(), need_weights=False, attn_mask=m)[0]
        got = fused(x, x, x, need_weights=False, attn_mask=m)[0]
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", torch.bfloat16):
            xb = x.bfloat16()   # a bf16 input under autocast: the frozen towers' case
            got = fused(xb, xb, xb, need_weights=False, attn_mask=m)[0]
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, rtol=0.05, atol=0.05)


def test_under_bf16_autocast_the_in_projection_is_one_matrix_product():
    """The reason the class exists: PyTorch's module with frozen weights runs this as a bmm against the weight
    expanded L times."""
    stock, fused = (m.requires_grad_(False) for m in pair(64, 4, dtype=torch.float32))
    x = torch.randn(2, 33, 64).bfloat16()

    def ops(mod):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), torch.profiler.profile() as prof:
            mod(x, x, x, need_weights=False)
        return {e.key for e in prof.key_averages()}

    assert "aten::bmm" in ops(stock)   # the slow path this test guards against (if PyTorch fixes it, drop this line)
    assert "aten::bmm" not in ops(fused)


def test_calls_it_does_not_cover_run_torch_forward():
    stock, fused = pair(24, 3)
    x, y = torch.randn(2, 5, 24, dtype=torch.float64), torch.randn(2, 7, 24, dtype=torch.float64)
    pad = torch.tensor([[False] * 4 + [True], [False] * 5])
    cases = [((x, y, y), {}),                                      # cross-attention
             ((x, x, x), {"need_weights": True}),                   # weights asked for
             ((x, x, x), {"need_weights": False, "key_padding_mask": pad})]
    for args, kw in cases:
        a, b = stock(*args, **kw), fused(*args, **kw)
        torch.testing.assert_close(b[0], a[0], rtol=0, atol=0)
        assert (a[1] is None) == (b[1] is None)
        if a[1] is not None:
            torch.testing.assert_close(b[1], a[1], rtol=0, atol=0)
    # attention dropout while training: PyTorch's forward (same random stream, so the same output)
    s, f = pair(24, 3, dropout=0.5)
    s.train(), f.train()
    torch.manual_seed(3)
    a = s(x, x, x, need_weights=False)[0]
    torch.manual_seed(3)
    b = f(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_fuse_keeps_modules_parameters_and_state_dict_keys():
    class Sub(nn.MultiheadAttention):
        pass

    model = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 8),
                          nn.Sequential(nn.MultiheadAttention(8, 1, batch_first=True)), Sub(8, 2))
    mods, params, keys = list(model.modules()), list(model.parameters()), list(model.state_dict())
    assert fuse_self_attention(model) == 2
    assert list(model.modules()) == mods and list(model.parameters()) == params and list(model.state_dict()) == keys
    assert type(model[0]) is FusedMultiheadAttention and type(model[2][0]) is FusedMultiheadAttention
    assert type(model[3]) is Sub   # a subclass's forward may differ: left alone
    assert fuse_self_attention(model) == 0   # twice is harmless
    restored = copy.deepcopy(model)
    assert type(restored[0]) is FusedMultiheadAttention
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fuse_self_attention("not a model")


# masked_attention: the masked self-attention of the CLIP text tower, explicit on the CPU in bf16

def _heads(B, H, L, d, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, d, generator=g, dtype=torch.float64) for _ in range(3)]


def _float_mask(L, kind):
    if kind == "causal_float":
        return causal(L, "float")
    if kind == "holes":     # -inf here and there, never a whole row
        g = torch.Generator().manual_seed(L)
        m = torch.randn(L, L, generator=g, dtype=torch.float64)
        m[torch.rand(L, L, generator=g) < 0.3] = float("-inf")
        m[:, 0] = 0.0
        return m
    return causal(L, "random")


def _sdpa_spy(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("B,H,L,d", [(3, 5, 13, 8), (1, 2, 77, 16), (2, 3, 1, 4), (4, 1, 31, 12)])
@pytest.mark.parametrize("mask", ["is_causal", "causal_float", "holes", "random"])
def test_masked_attention_in_bf16_on_the_cpu_runs_explicitly_and_matches_float64(monkeypatch, B, H, L, d, mask):
    """bf16 on the CPU: no SDPA call, and the output and the three input gradients within bf16 rounding of SDPA
    in float64 (the output measured at 1–2 % of its scale, as SDPA's own bf16 kernel)."""
    from clfast.ops.attention import masked_attention

    q, k, v = _heads(B, H, L, d, seed=B * L + d)
    m = None if mask == "is_causal" else _float_mask(L, mask)
    causal_ = mask == "is_causal"
    ref = [t.clone().requires_grad_(True) for t in (q, k, v)]
    want = torch.nn.functional.scaled_dot_product_attention(*ref, attn_mask=m, is_causal=causal_)
    g = torch.randn_like(want)
    want.backward(g)
    calls = _sdpa_spy(monkeypatch)
    got_in = [t.bfloat16().requires_grad_(True) for t in (q, k, v)]
    got = masked_attention(*got_in, None if m is None else m.bfloat16(), is_causal=causal_)
    got.backward(g.bfloat16())
    assert calls == [] and got.dtype == torch.bfloat16 and got.shape == want.shape
    scale = want.abs().max().item()
    torch.testing.assert_close(got.double(), want.detach(), rtol=0.02, atol=0.02 * scale)
    for name, a, b in zip("qkv", got_in, ref):
        err = (a.grad.double() - b.grad).abs().max().item() / max(b.grad.abs().max().item(), 1e-6)
        assert err < 0.03, f"d{name}: relative error {err:.3g}"    # (dk is 0 at L = 1: one key, no choice)


def test_masked_attention_leaves_fp32_and_long_scores_to_sdpa(monkeypatch):
    """SDPA where the explicit form is not measured faster (fp32) and where its scores would exceed
    EXPLICIT_MAX_SCORES."""
    from clfast.ops import attention
    from clfast.ops.attention import masked_attention

    calls = _sdpa_spy(monkeypatch)
    q, k, v = (t.float() for t in _heads(2, 3, 9, 4, seed=1))
    masked_attention(q, k, v, None, is_causal=True)
    assert len(calls) == 1 and calls[0]["is_causal"]
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    monkeypatch.setattr(attention, "EXPLICIT_MAX_SCORES", 2 * 3 * 9 * 9 - 1)
    masked_attention(qb, kb, vb, None, is_causal=True)
    assert len(calls) == 2
    monkeypatch.setattr(attention, "EXPLICIT_MAX_SCORES", 2 * 3 * 9 * 9)
    masked_attention(qb, kb, vb, None, is_causal=True)
    assert len(calls) == 2


def test_masked_attention_gives_keyless_rows_sdpas_zeros_and_zero_gradients(monkeypatch):
    """A row whose keys are all masked: zeros out and no gradient from it (SDPA's answer), not softmax's NaN; the
    other rows as SDPA's in float64; eager calls check for such rows, a compiled graph fills them without a branch
    on data (torch.compile traces it in one graph)."""
    from clfast.ops.attention import masked_attention

    q, k, v = _heads(2, 3, 9, 4, seed=2)
    m = torch.randn(9, 9, dtype=torch.float64)
    m[4] = float("-inf")
    ref = [t.clone().requires_grad_(True) for t in (q, k, v)]
    want = torch.nn.functional.scaled_dot_product_attention(*ref, attn_mask=m)
    g = torch.randn_like(want)
    want.backward(g)
    calls = _sdpa_spy(monkeypatch)
    got_in = [t.bfloat16().requires_grad_(True) for t in (q, k, v)]
    got = masked_attention(*got_in, m.bfloat16())
    got.backward(g.bfloat16())
    assert calls == [] and torch.equal(got[:, :, 4], torch.zeros_like(got[:, :, 4]))
    assert torch.equal(want[:, :, 4].detach(), torch.zeros_like(want[:, :, 4]))
    torch.testing.assert_close(got.double(), want.detach(), rtol=0.02, atol=0.02 * want.abs().max().item())
    assert torch.equal(got_in[0].grad[:, :, 4], torch.zeros_like(got_in[0].grad[:, :, 4]))
    for a, b in zip(got_in, ref):
        assert a.grad.isfinite().all()
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=0.03, atol=0.03 * b.grad.abs().max().item())
    torch._dynamo.reset()
    explained = torch._dynamo.explain(masked_attention)(*(t.detach() for t in got_in), m.bfloat16())
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_the_text_towers_causal_attention_under_bf16_autocast_skips_sdpa():
    """The case it was written for: a frozen CLIP text block (causal float mask) under bf16 autocast runs no SDPA
    kernel, and stays within bf16 rounding of the float64 module."""
    stock, fused = (m.requires_grad_(False) for m in pair(64, 4, dtype=torch.float32))
    ref = copy.deepcopy(stock).double()
    x = torch.randn(3, 21, 64)
    m = causal(21, "float")
    xb = x.bfloat16()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), torch.profiler.profile() as prof:
        got = fused(xb, xb, xb, need_weights=False, attn_mask=m.float())[0]
    keys = {e.key for e in prof.key_averages()}
    assert "aten::baddbmm" in keys and not any("scaled_dot_product" in key for key in keys)
    with torch.no_grad():
        want = ref(x.double(), x.double(), x.double(), need_weights=False, attn_mask=m)[0]
    torch.testing.assert_close(got.double(), want, rtol=0.05, atol=0.05)
