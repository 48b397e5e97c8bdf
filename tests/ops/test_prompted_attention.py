"""PromptedAttention: a drop-in for timm's Attention that takes prefixes through a PromptContext."""

import pytest
import torch

from timm.models.vision_transformer import Attention

from clfast.ops import PromptContext, PromptedAttention, use_backend
from clfast.ops import attention as pa_mod


def _attn(dim=48, heads=3, qkv_bias=True):
    torch.manual_seed(0)
    return Attention(dim, num_heads=heads, qkv_bias=qkv_bias).eval()


def test_equals_timm_without_prefix():
    attn = _attn()
    x = torch.randn(2, 7, 48)
    wrapped = PromptedAttention(attn, layer=0)
    assert torch.allclose(wrapped(x), attn(x), atol=1e-5)


def test_prefix_matches_explicit_math_and_reuses_weights():
    attn = _attn()
    ctx = PromptContext()
    wrapped = PromptedAttention(attn, layer=2, context=ctx)
    assert wrapped.qkv is attn.qkv and wrapped.proj is attn.proj
    x = torch.randn(2, 7, 48)
    pk, pv = torch.randn(2, 4, 48), torch.randn(2, 4, 48)  # (B, P, C)
    with ctx.prompts({2: (pk, pv)}):
        got = wrapped(x)
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, 3, 16).permute(2, 0, 3, 1, 4)
    heads = lambda t: t.reshape(B, 4, 3, 16).transpose(1, 2)  # noqa: E731
    out = pa_mod.reference(q, k, v, heads(pk), heads(pv), scale=16 ** -0.5)
    expected = attn.proj(out.transpose(1, 2).reshape(B, N, C))
    assert torch.allclose(got, expected, atol=1e-5)
    # the context is per forward: outside the block the layer is unprompted again
    assert torch.allclose(wrapped(x), attn(x), atol=1e-5)


def test_other_layers_are_not_prompted_and_shared_prefix_works():
    attn = _attn()
    ctx = PromptContext()
    wrapped = PromptedAttention(attn, layer=1, context=ctx)
    x = torch.randn(2, 5, 48)
    with ctx.prompts({0: (torch.randn(3, 48), torch.randn(3, 48))}):
        assert torch.allclose(wrapped(x), attn(x), atol=1e-5)
    shared = (torch.randn(3, 2, 16), torch.randn(3, 2, 16))  # (H, P, d)
    with ctx.prompts({1: shared}):
        a = wrapped(x)
    with ctx.prompts({1: tuple(t.expand(2, -1, -1, -1) for t in shared)}):
        b = wrapped(x)
    assert torch.allclose(a, b, atol=1e-6)


def test_gradients_reach_prefix_and_agree_across_backends():
    attn = _attn()
    ctx = PromptContext()
    wrapped = PromptedAttention(attn, layer=0, context=ctx)
    x = torch.randn(2, 6, 48)
    pk = torch.randn(2, 3, 48, requires_grad=True)
    pv = torch.randn(2, 3, 48, requires_grad=True)
    results = {}
    for name in ("reference", "torch", "cpu"):
        with use_backend(name, op="prefix_attention"), ctx.prompts({0: (pk, pv)}):
            wrapped(x).square().sum().backward()
        results[name] = (pk.grad.clone(), pv.grad.clone())
        pk.grad = pv.grad = None
    for name in ("torch", "cpu"):
        for a, b in zip(results[name], results["reference"]):
            assert torch.allclose(a, b, atol=1e-4)
            assert a.abs().sum() > 0


def test_rejects_non_attention_and_bad_prefix_width():
    with pytest.raises(TypeError, match="must look like timm's Attention"):
        PromptedAttention(torch.nn.Linear(3, 3))
    ctx = PromptContext()
    wrapped = PromptedAttention(_attn(), context=ctx)
    with ctx.prompts({0: (torch.randn(2, 3, 47), torch.randn(2, 3, 47))}):
        with pytest.raises(ValueError, match="prefix_k must have width 48"):
            wrapped(torch.randn(2, 5, 48))
