"""How the official prompt-CL codes compute each op ("peer" implementations), written here from their
descriptions in the method specs. Shared by the benchmarks and, where useful, the tests."""

from __future__ import annotations

import torch


def prefix_attention_peer(q, k, v, prefix_k, prefix_v, scale):
    """L2P/DualPrompt/CODA-Prompt style: concatenate the prefix onto k and v, explicit softmax attention."""
    B = q.shape[0]
    if prefix_k.dim() == 3:
        prefix_k = prefix_k.expand(B, -1, -1, -1)
        prefix_v = prefix_v.expand(B, -1, -1, -1)
    k = torch.cat([prefix_k, k], dim=2)
    v = torch.cat([prefix_v, v], dim=2)
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    return attn @ v
