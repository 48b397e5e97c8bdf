"""The frozen open_clip towers' self-attention the way the official codes run it, for the peers that use them.

clfast's open_clip models run their ``nn.MultiheadAttention`` as :class:`clfast.ops.FusedMultiheadAttention`
(clfast's op); a peer swaps in one of these for its step with :func:`attention_as`:

- :class:`WrittenOutAttention`: ALBEF's ViT and BERT self-attention (CluMo's official code): one qkv matrix
  product on the batch-first tokens, then ``q kᵀ``, mask, softmax, ``· v``;
- :class:`SeqFirstAttention`: OpenAI's ``clip`` package (STAR-Prompt's official code): PyTorch's
  ``multi_head_attention_forward`` on the tokens laid out ``(L, B, D)`` (OpenAI's model permutes once for the whole
  stack; here each block transposes, one copy of its input).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn


def _self_attention_only(query: Tensor, key: Tensor, value: Tensor, key_padding_mask) -> None:
    if not (query is key and key is value) or key_padding_mask is not None:
        raise ValueError("peer towers: the towers' attention is self-attention without a key padding mask")


class WrittenOutAttention(nn.MultiheadAttention):
    """A tower's ``nn.MultiheadAttention`` computed as ALBEF's ViT / BERT self-attention."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask=None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True, is_causal: bool = False):
        _self_attention_only(query, key, value, key_padding_mask)
        B, L, D = query.shape
        H = self.num_heads
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-2, -1)) * (D // H) ** -0.5
        if attn_mask is not None:   # open_clip's text tower: an additive float causal mask
            s = s + attn_mask.to(s.dtype)
        out = s.softmax(-1) @ v
        return F.linear(out.transpose(1, 2).reshape(B, L, D), self.out_proj.weight, self.out_proj.bias), None


class SeqFirstAttention(nn.MultiheadAttention):
    """A tower's ``nn.MultiheadAttention`` as OpenAI's CLIP calls it: PyTorch's functional form on ``(L, B, D)``."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask=None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True, is_causal: bool = False):
        _self_attention_only(query, key, value, key_padding_mask)
        x = query.transpose(0, 1).contiguous()
        out, _ = F.multi_head_attention_forward(
            x, x, x, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias, None, None, False,
            0.0, self.out_proj.weight, self.out_proj.bias, training=False, need_weights=False, attn_mask=attn_mask)
        return out.transpose(0, 1), None


@contextlib.contextmanager
def attention_as(model: nn.Module, cls: type):
    """Every ``nn.MultiheadAttention`` of ``model`` computed as ``cls`` inside the block (classes restored after)."""
    mods = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    classes = [type(m) for m in mods]
    for m in mods:
        m.__class__ = cls
    try:
        yield
    finally:
        for m, c in zip(mods, classes):
            m.__class__ = c
