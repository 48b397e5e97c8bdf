"""CluMo's training step the way the official code (``clumo``, on ALBEF) computes it, on the clfast VLM: the
frozen towers' self-attention as ALBEF's ViT and BERT write it (one qkv matrix product on the batch-first tokens,
then ``q kᵀ``, mask, softmax, ``· v``; not clfast's fused op, not PyTorch's ``nn.MultiheadAttention``); the key
selection in Python loops, one cosine per sample and key; the prompt Π = [G_τ ; P_τ[idx]]
gathered per sample and **concatenated** onto the image memory of every fusion layer before the key/value
projection, attention written out (``q kᵀ``, mask, softmax, ``· v``); the previous head's forward for the
distillation; fp32.

The numbers are clfast's (the spec's decisions: nearest key, one pooling, prompts trained, the fusion encoder's
prefix instead of a decoder memory): the peer refuses the quirk options (``farthest_assignment`` only changes
stage 1, which is not timed; ``key_pooling: official``, ``train_prompts: false`` change the step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clfast.backbones.vlm import pool_tokens
from clfast.methods.vqa_losses import head_distillation, soft_target_ce

from .towers import WrittenOutAttention, attention_as


def _attention(attn, x: Tensor, memory: Tensor, mask) -> Tensor:
    """``attn`` (a :class:`~clfast.backbones.vlm.PromptedCrossAttention`) from ``x`` over ``memory`` (the prompt
    already concatenated in front), explicit softmax; ``mask`` (B, Nk) bool, True = attend, or None."""
    B, Nq, _ = x.shape
    H, d = attn.heads, attn.head_dim
    q = attn.q(x).view(B, Nq, H, d).transpose(1, 2)
    k, v = attn.kv(memory).view(B, memory.shape[1], 2, H, d).permute(2, 0, 3, 1, 4)
    s = (q @ k.transpose(-2, -1)) * d ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = s.softmax(-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(B, Nq, -1))


def _fuse(fusion, text: Tensor, text_mask: Tensor, image: Tensor, prompt: Tensor) -> Tensor:
    x = fusion.text_proj(text)
    mem = torch.cat([prompt, fusion.image_proj(image)], dim=1)       # the code's cat onto the memory
    for layer in fusion.layers:
        h = layer.ln1(x)
        x = x + _attention(layer.self_attn, h, h, text_mask)
        x = x + _attention(layer.cross_attn, layer.ln2(x), mem, None)
        x = x + layer.mlp(layer.ln3(x))
    return fusion.ln_final(x)


def _select(h_v: Tensor, h_t: Tensor, keys_v: Tensor, keys_t: Tensor) -> list[int]:
    """The code's loops: per sample, per key, one cosine; the nearest image key i and text key j, idx = n_v·j + i."""
    out = []
    for b in range(h_v.shape[0]):
        sv = [float(F.cosine_similarity(h_v[b], keys_v[k], dim=0)) for k in range(keys_v.shape[0])]
        st = [float(F.cosine_similarity(h_t[b], keys_t[k], dim=0)) for k in range(keys_t.shape[0])]
        i, j = max(range(len(sv)), key=lambda k: (sv[k], -k)), max(range(len(st)), key=lambda k: (st[k], -k))
        out.append(keys_v.shape[0] * j + i)
    return out


def loss(method, batch: dict, ctx) -> Tensor:
    """``CE_soft + λ_kd · ‖z − z_prev‖²`` of :class:`clfast.methods.clumo.CluMo`, task ``ctx.task`` given."""
    cfg = method.cfg
    if cfg.key_pooling != "mean" or not cfg.train_prompts:
        raise ValueError("clumo peer: covers key_pooling=mean with trained prompts")
    vlm, pool, tau = method.vlm, method.pool, int(ctx.task)
    towers = vlm.towers
    with attention_as(towers, WrittenOutAttention):
        image = towers.image_tokens(batch["image"])
        text, text_mask, eot = towers.text_tokens(batch["question"])
    emb = towers.text_input_embeddings(batch["question"])
    pad, _ = towers.padding_mask(batch["question"])
    h_v = pool_tokens(image[:, 1:].float(), None, "mean")
    h_t = pool_tokens(emb.float(), pad, "mean")
    idx = _select(h_v, h_t, pool.keys_v[tau], pool.keys_t[tau])
    prompt = torch.stack([torch.cat([pool.general[tau], pool.prompts[tau, i]], 0) for i in idx])
    x = _fuse(vlm.fusion, text.float(), text_mask, image.float(), prompt)
    h = x[torch.arange(x.shape[0], device=x.device), eot]
    z = vlm.head(h)
    out = soft_target_ce(z, batch["answer_scores"])
    if tau > 0 and cfg.kd_weight > 0:
        out = out + cfg.kd_weight * head_distillation(z, method.prev_head(h))
    return out
