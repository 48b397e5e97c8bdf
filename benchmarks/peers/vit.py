"""The ViT forward of the official prompt-CL codes (timm 0.6-era ``Attention``): every block's attention computed
naively (``q·kᵀ``, an explicit softmax, ``·v``), prompts concatenated onto the keys and values (prefix tuning) or
onto the token sequence (prompt tuning, inserted tokens). Runs the timm weights of a clfast
:class:`~clfast.backbones.ViTBackbone` without going through its ``PromptedAttention`` or any clfast op, so a peer
computes the same numbers by an independent path, at the official codes' cost.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

Prefix = Optional[tuple[Tensor, Tensor]]


def naive_attention(attn, x: Tensor, prefix: Prefix = None, value_add: Optional[Tensor] = None) -> Tensor:
    """One attention layer the official way: ``(B, N, C)`` → ``(B, N, C)``.

    ``attn`` holds timm's ``qkv``/``proj`` weights (a timm ``Attention`` or clfast's ``PromptedAttention``).
    ``prefix`` = ``(pk, pv)``, each ``(B, H, P, d)`` (or ``(H, P, d)``, shared), is concatenated in front of the
    keys and values (DualPrompt / CODA-Prompt / ConvPrompt prefix tuning; the spec's "cat onto k and v").
    ``value_add`` ``(B, H, 1, d)`` is added to every value vector (STAR-Prompt's residual prompt, ``V + π``).
    """
    B, N, C = x.shape
    H, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if value_add is not None:
        v = v + value_add
    if prefix is not None:
        pk, pv = prefix
        if pk.dim() == 3:
            pk, pv = pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1)
        k = torch.cat([pk.to(k.dtype), k], dim=2)
        v = torch.cat([pv.to(v.dtype), v], dim=2)
    a = (q * attn.scale) @ k.transpose(-2, -1)
    a = a.softmax(dim=-1)
    out = (a @ v).transpose(1, 2).reshape(B, N, H * d)
    out = getattr(attn, "norm", torch.nn.Identity())(out)
    return attn.proj(out)


def block_forward(block, x: Tensor, prefix: Prefix = None, value_add: Optional[Tensor] = None) -> Tensor:
    """timm's pre-norm ``Block`` with :func:`naive_attention` (no drop path: the frozen ViT is in eval mode)."""
    x = x + block.ls1(naive_attention(block.attn, block.norm1(x), prefix, value_add))
    return x + block.ls2(block.mlp(block.norm2(x)))


def embed(backbone, images: Tensor, normalized: bool = False, prompt_tokens: Optional[Tensor] = None) -> Tensor:
    """Patch and position embeddings (timm's own), with L2P-style ``prompt_tokens`` ``(B, L, C)`` inserted after the
    class token (after the position embeddings, so they get none: clfast's decision, at the same cost)."""
    vit = backbone.vit
    x = images if normalized else (images - backbone.mean) / backbone.std
    x = vit._pos_embed(vit.patch_embed(x))
    if prompt_tokens is not None:
        n = vit.num_prefix_tokens
        x = torch.cat([x[:, :n], prompt_tokens.to(x.dtype), x[:, n:]], dim=1)
    return vit.norm_pre(x)


def forward(backbone, images: Tensor, *, normalized: bool = False, prompt_tokens: Optional[Tensor] = None,
            prefix_fn: Optional[Callable[[int, Tensor], Prefix]] = None,
            insert_fn: Optional[Callable[[int, Tensor], Optional[Tensor]]] = None,
            value_fn: Optional[Callable[[int], Optional[Tensor]]] = None) -> Tensor:
    """The final-norm tokens ``(B, N', C)`` of the ViT run block by block, the official way.

    Per block ``l`` with input ``x`` ``(B, N', C)``: ``prefix_fn(l, x)`` gives a K/V prefix (or None);
    ``insert_fn(l, x)`` gives ``(B, P, C)`` tokens run through the block between the class token and the patches
    and dropped after it (GPLS / DAP's inserted prompts: they pay attention and MLP rows); ``value_fn(l)`` gives
    ``(B, H, 1, d)`` added to the block's values (STAR-Prompt).
    """
    x = embed(backbone, images, normalized, prompt_tokens)
    n = backbone.vit.num_prefix_tokens
    for i, block in enumerate(backbone.vit.blocks):
        prefix = prefix_fn(i, x) if prefix_fn is not None else None
        value = value_fn(i) if value_fn is not None else None
        tokens = insert_fn(i, x) if insert_fn is not None else None
        if tokens is None:
            x = block_forward(block, x, prefix, value)
        else:
            P = tokens.shape[1]
            y = block_forward(block, torch.cat([x[:, :n], tokens.to(x.dtype), x[:, n:]], dim=1), prefix, value)
            x = torch.cat([y[:, :n], y[:, n + P:]], dim=1)
    return backbone.vit.norm(x)


def query(backbone, images: Tensor, normalized: bool = False) -> Tensor:
    """The frozen query: a whole second, unprompted forward without gradient, every step (the official codes keep
    a frozen copy of the ViT for it); the final-norm class token ``(B, C)``, fp32."""
    with torch.no_grad():
        return backbone.vit.fc_norm(forward(backbone, images, normalized=normalized)[:, 0]).float()
