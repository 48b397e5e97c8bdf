"""L2P's training step the way the official code (``google-research/l2p``, its PyTorch port) computes it: the
frozen query as a whole second ViT forward every step, the full ``(B, M)`` cosine matrix and ``topk`` for the keys,
the selected prompts gathered by advanced indexing and concatenated into the token sequence, the ViT run with
naive attention over ``N + k·L`` tokens, fp32.

Numbers follow clfast's decisions where they differ from the code: prompt tokens get no position embedding, and
the selection is per sample (no batch vote), which are also clfast's defaults (``train_vote``,
``frequency_penalty`` off; the peer refuses them).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from . import vit
from .ops import retrieve_peer


def loss(method, batch: dict, ctx) -> Tensor:
    """``CE − pull_weight · mean_b Σ_k cos(q_b, key_{idx[b,k]})`` of :class:`clfast.methods.l2p.L2P`."""
    cfg = method.cfg
    if cfg.train_vote or cfg.frequency_penalty:
        raise ValueError("l2p peer: covers per-sample selection only (train_vote and frequency_penalty off)")
    images = batch["image"]
    q = vit.query(method.backbone, images)                                   # (B, C)
    scores, idx = retrieve_peer(q, method.keys.float(), cfg.top_k)           # (B, k) each
    B = q.shape[0]
    tokens = method.prompts[idx].reshape(B, cfg.top_k * cfg.length, -1)      # advanced indexing, as the code
    out = vit.forward(method.backbone, images, prompt_tokens=tokens)
    if cfg.head == "cls":
        feat = method.backbone.vit.fc_norm(out[:, 0])
    else:
        n = method.backbone.vit.num_prefix_tokens
        feat = out[:, n:n + tokens.shape[1]].mean(1)
    ce = F.cross_entropy(method.train_logits(method.head(feat), ctx).float(), batch["label"])
    return ce - cfg.pull_weight * scores.float().sum(1).mean()
