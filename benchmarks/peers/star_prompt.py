"""STAR-Prompt's training steps the way the official code (``aimagelab/mammoth`` ``starprompt``) computes them
(spec ``methods/star_prompt.md`` §6), fp32.

The CLIP towers' attention is PyTorch's on ``(L, B, D)`` tokens, as OpenAI's ``clip`` package runs it
(:class:`.towers.SeqFirstAttention`), not clfast's fused op.

- Stage 1 (level 1): the keys of **every** seen class recomputed by the CLIP text encoder each step, the past ones
  under ``no_grad`` (clfast computes them once per task and caches them), logits over all seen classes with the past
  ones set to −inf.
- Stage 2 (level 2): the CLIP query of the augmented batch; per block the explicit ``(L, B, C, D_c)`` modulated
  query, normalised and contracted with the keys, the argmax mask written into the scores in place under
  ``no_grad`` and the masked scores multiplied by P (the official straight-through gradient); the residual prompt
  added to every value vector inside a naive attention (``V + π``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import vit
from .towers import SeqFirstAttention, attention_as


def _clip_query(method, images: Tensor) -> Tensor:
    with torch.no_grad(), attention_as(method.clip, SeqFirstAttention):   # OpenAI's clip package
        return method.clip.encode_image(method.clip_images(images)).float()


def _select(method, q: Tensor, first: int, stop: int) -> Tensor:
    """π ``(L, B, E)``: the released selection (explicit tensor, in-place no_grad argmax mask)."""
    cfg = method.cfg
    A = torch.cat([method.modulators[:, :first].detach(), method.modulators[:, first:stop]], 1)
    P = torch.cat([method.values[:, :first].detach(), method.values[:, first:stop]], 1)
    a = torch.softmax(A, dim=-1)                                                     # (L, C, Dc)
    mq = F.normalize(q[None, :, None, :] * a[:, None], dim=-1)                        # (L, B, C, Dc)
    s = cfg.selection_scale * torch.einsum("lbcd,cd->lbc", mq, method.keys[:stop])
    masked = s.clone()
    with torch.no_grad():
        masked[~F.one_hot(s.argmax(-1), s.shape[-1]).bool()] = 0
    return masked @ P                                                                # (L, B, E)


def _orth2(values: Tensor, first: int, stop: int) -> Tensor:
    if first == 0:
        return values.new_zeros(())
    terms = []
    for l in range(values.shape[0]):
        cur, past = values[l, first:stop], values[l, :first].detach()
        terms.append(((cur.pow(2).sum(-1) - 1) ** 2).mean() + ((cur @ past.T) ** 2).mean())
    return torch.stack(terms).mean()


def stage2_loss(method, batch: dict, ctx) -> Tensor:
    """``CE(current classes) + λ2·L_orth2`` of :class:`clfast.methods.star_prompt.StarPrompt`'s stage 2."""
    cfg = method.cfg
    if cfg.prompt_mode != "residual" or cfg.strict_selection_grad or not cfg.confidence_modulation:
        raise ValueError("star_prompt peer: covers prompt_mode 'residual' with confidence modulation and the "
                         "official gradient (the defaults)")
    first, stop = ctx.class_range
    images = batch["image"]
    q = _clip_query(method, images)
    prompts = _select(method, q, first, stop)
    B, H = images.shape[0], method.backbone.num_heads
    out = vit.forward(method.backbone, images, value_fn=lambda l: prompts[l].reshape(B, H, 1, -1))
    logits = method.head(method.backbone.vit.fc_norm(out[:, 0]))
    ce = F.cross_entropy(logits[:, first:stop].float(), batch["label"] - first)
    return ce + cfg.lambda_ortho2 * _orth2(method.values, first, stop)


def stage1_loss(method, batch: dict, ctx) -> Tensor:
    """``CE(z with past classes at −inf) + λ1·L_orth1`` of stage 1, every seen class's key recomputed."""
    first, stop = ctx.class_range
    q = _clip_query(method, batch["image"])
    enc = method._text_encoder
    with attention_as(method.clip, SeqFirstAttention):           # OpenAI's clip package
        with torch.no_grad():                                    # the past keys, recomputed every step
            past = (enc(method.context[:first], torch.arange(0, first, device=q.device)).float() if first
                    else q.new_zeros(0, q.shape[1]))
        current = enc(method.context[first:stop], torch.arange(first, stop, device=q.device)).float()
    keys = torch.cat([past, current])
    logits = method.clip.logit_scale.detach().float().exp() * F.normalize(q, dim=-1) @ keys.T
    logits = torch.cat([torch.full_like(logits[:, :first], float("-inf")), logits[:, first:]], 1)
    ce = F.cross_entropy(logits, batch["label"])
    orth = (method.context[first:stop] @ method.context[:first].detach().T).pow(2).mean() if first else 0.0
    return ce + method.cfg.lambda_ortho1 * orth


def loss(method, batch: dict, ctx) -> Tensor:
    if ctx.stage == "stage1":
        return stage1_loss(method, batch, ctx)
    if ctx.stage == "stage2":
        return stage2_loss(method, batch, ctx)
    raise ValueError(f"star_prompt peer: stage {ctx.stage!r} has no peer (stage1 and stage2 have)")
