"""CODA-Prompt's training step the way the official code (``GT-RIPL/CODA-Prompt``) computes it: the frozen query
as a whole second ViT forward (under ``no_grad``) every step; per prompted block the ``(B, k, C)`` attended query,
normalise, two einsums for the component weights and the prompt, the old components concatenated in detached
(``torch.cat((K[:s].detach().clone(), K[s:f]))``); prefixes concatenated onto the keys and values (naive attention);
fp32. The code never freezes the ViT (its optimizer just leaves it out), so the backward computes the gradient of
every ViT weight too: the peer turns ``requires_grad`` on for the prompted forward, and the step drops those
gradients afterwards (the code lets them accumulate).

The orthogonality penalty is computed per layer as the code does; its scale is clfast's (the mean over layers,
where the code sums them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import vit


def _ortho(x: Tensor) -> Tensor:
    """``mean((X Xᵀ − I)²)`` of ``x`` (n, ...) flattened to rows."""
    x = x.reshape(x.shape[0], -1)
    return ((x @ x.T - torch.eye(x.shape[0], dtype=x.dtype)) ** 2).mean()


def loss(method, batch: dict, ctx) -> Tensor:
    """``CE (+ ortho_weight · penalty)`` of :class:`clfast.methods.coda_prompt.CodaPrompt`."""
    cfg = method.cfg
    images = batch["image"]
    q = vit.query(method.backbone, images)
    s, f = ctx.task * method.per_task, (ctx.task + 1) * method.per_task
    half, H = cfg.length // 2, method.backbone.num_heads
    slot = {layer: i for i, layer in enumerate(cfg.layers)}
    penalty = []

    def old_new(p: Tensor) -> Tensor:
        return torch.cat([p[:s].detach().clone(), p[s:f]], dim=0)

    def prefix_fn(layer: int, x: Tensor):
        i = slot.get(layer)
        if i is None:
            return None
        K, A, P = old_new(method.keys[i]), old_new(method.attn[i]), old_new(method.prompts[i])
        a_q = torch.einsum("bd,kd->bkd", q, A)
        alpha = torch.einsum("bkd,kd->bk", F.normalize(a_q, dim=2), F.normalize(K, dim=1))
        p = torch.einsum("bk,kld->bld", alpha, P)                              # (B, length, C)
        B, _, C = p.shape
        pk = p[:, :half].reshape(B, half, H, C // H).transpose(1, 2)
        pv = p[:, half:].reshape(B, -1, H, C // H).transpose(1, 2)
        if cfg.ortho_weight:
            # the code's penalty reads the parameters themselves (old rows included, not detached)
            penalty.append(_ortho(method.keys[i, :f]) + _ortho(method.attn[i, :f]) + _ortho(method.prompts[i, :f]))
        return pk, pv

    vit_params = [p for p in method.backbone.vit.parameters() if not p.requires_grad]
    for p in vit_params:                       # the code's ViT is never frozen: its weight gradients are computed
        p.requires_grad_(True)
    try:
        out = vit.forward(method.backbone, images, prefix_fn=prefix_fn)
    finally:
        for p in vit_params:
            p.requires_grad_(False)
    ce = F.cross_entropy(method.train_logits(method.head(out[:, 0]), ctx).float(), batch["label"])
    if cfg.ortho_weight:
        return ce + cfg.ortho_weight * torch.stack(penalty).mean()
    return ce
