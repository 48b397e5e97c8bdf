"""``linear``'s step the plain way: the frozen ViT's unprompted forward every step (no per-image cache: with
augmentation on there is none to use anyway), a linear head, cross-entropy over the current task's classes."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from . import vit


def loss(method, batch: dict, ctx) -> Tensor:
    """The training loss of :class:`clfast.methods.linear.Linear` on ``batch``: ``CE(head(q) masked to the current
    task, y)`` with ``q`` the frozen final-norm class token."""
    q = vit.query(method.backbone, batch["image"])
    logits = method.train_logits(method.head(q), ctx)
    return F.cross_entropy(logits.float(), batch["label"])
