"""DualPrompt's training step the way the official code (``google-research/l2p`` / ``dualprompt-pytorch``)
computes it: the frozen query as a whole second ViT forward every step, the G- and the current task's E-prompt
concatenated onto the keys and values of their blocks (naive attention in every block), fp32.

The code's pull term is ``−cos`` where clfast writes ``1 − cos``: the same gradient; the peer's loss is clfast's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import vit


def _heads(p: Tensor, H: int) -> Tensor:
    """``(B, P, C)`` → ``(B, H, P, d)``."""
    B, P, C = p.shape
    return p.reshape(B, P, H, C // H).transpose(1, 2)


def loss(method, batch: dict, ctx) -> Tensor:
    """``CE + pull_weight·(1 − mean_b cos(q_b, key_t))`` of :class:`clfast.methods.dualprompt.DualPrompt`."""
    cfg = method.cfg
    images = batch["image"]
    q = vit.query(method.backbone, images)
    B, H, t = q.shape[0], method.backbone.num_heads, ctx.task
    prefixes: dict[int, tuple[list, list]] = {}
    if cfg.g_length:
        for i, layer in enumerate(cfg.g_layers):
            prefixes.setdefault(layer, ([], []))
            prefixes[layer][0].append(method.g_prompt[i, 0].expand(B, -1, -1))
            prefixes[layer][1].append(method.g_prompt[i, 1].expand(B, -1, -1))
    for i, layer in enumerate(cfg.e_layers):
        e = method.e_prompt[i, :, t]                                          # (2, length, C): the task's prompt
        prefixes.setdefault(layer, ([], []))
        prefixes[layer][0].append(e[0].expand(B, -1, -1))
        prefixes[layer][1].append(e[1].expand(B, -1, -1))
    kv = {l: (_heads(torch.cat(k, 1), H), _heads(torch.cat(v, 1), H)) for l, (k, v) in prefixes.items()}
    out = vit.forward(method.backbone, images, prefix_fn=lambda layer, x: kv.get(layer))
    ce = F.cross_entropy(method.train_logits(method.head(out[:, 0]), ctx).float(), batch["label"])
    key = F.normalize(method.e_keys[t].float(), dim=-1)
    cos = (F.normalize(q, dim=-1) @ key).mean()
    return ce + cfg.pull_weight * (1.0 - cos)
