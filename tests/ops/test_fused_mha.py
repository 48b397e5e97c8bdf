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
