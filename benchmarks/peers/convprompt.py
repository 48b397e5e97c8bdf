"""ConvPrompt's training step the way the official code (``CVIR/ConvPrompt``) computes it (spec
``methods/convprompt.md`` §6): per prompted block the query MLP on the block's input class token and the raw
cosines to the keys (old keys detached), then the prompts by one single-channel ``Conv2d`` per (K/V, head,
prompt) applied to B identical copies of the shared embedding, scaled by the prompt's weight and summed in place
(:func:`~benchmarks.peers.ops.prompt_conv_peer`: 2H·f convolutions per block), the one-step cross-layer residual,
the prefix concatenated onto the keys and values (naive attention); the L1 drift terms as two full reductions;
fp32. ConvPrompt has no separate query pass (its weights come from the hidden state).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import vit
from .ops import prompt_conv_peer


def loss(method, batch: dict, ctx) -> Tensor:
    """``CE(current task's head) + λ·[t>0]·(Σ_g ‖θ−θ_old‖₁ + ‖E−E_old‖₁)`` of
    :class:`clfast.methods.convprompt.ConvPrompt`."""
    cfg = method.cfg
    s, f = method.prompt_range(ctx.task)
    H = method.num_heads
    slot = {layer: i for i, layer in enumerate(method.layers)}
    previous: dict[int, Tensor] = {}

    def prefix_fn(layer: int, x: Tensor):
        i = slot.get(layer)
        if i is None:
            return None
        keys = torch.cat([method.keys[:s].detach(), method.keys[s:f]])
        w = F.normalize(method.query(x[:, 0].float()), dim=1) @ F.normalize(keys, dim=1).T       # (B, f)
        E, W, b = method.conv_inputs(i, f)                  # the released layout, viewed (2H, L+k−1, d+k−1)
        P = prompt_conv_peer(E, W, b, w)                                                        # (B, 2H, L, d)
        mixed = P + previous[layer - 1] if layer - 1 in previous else P
        previous[layer] = P
        k, v = mixed.unflatten(1, (2, H)).unbind(1)
        return k, v

    out = vit.forward(method.backbone, batch["image"], normalized=cfg.input_norm == "none", prefix_fn=prefix_fn)
    logits = method.heads(out[:, 0], ctx.task_ranges)
    total = F.cross_entropy(method.train_logits(logits, ctx).float(), batch["label"])
    if ctx.task > 0 and cfg.drift_weight:
        snap = method.snapshot
        drift = sum((p.float() - getattr(snap, name.replace(".", "__")).float()).abs().sum()
                    for name, p in snap._params.items())
        total = total + cfg.drift_weight * drift
    return total
