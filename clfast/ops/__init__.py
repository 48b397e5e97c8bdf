"""The fused operators of clfast. Each op module holds its reference (the spec), its backends, its
torch.library registration and its public function / nn.Module.

    clfast.ops.prefix_attention(q, k, v, prefix_k, prefix_v, kv_mask=..., scale=...)
    clfast.ops.PromptedAttention(timm_attention, layer, context)

Backends are picked per call (``clfast info`` lists them); ``use_backend(name)`` or ``CLFAST_BACKEND`` forces one.
"""

from clfast.ops._dispatch import backends, forced_backend, ops as list_ops, select, use_backend
from clfast.ops.attention import PromptContext, PromptedAttention, prefix_attention

__all__ = [
    "prefix_attention",
    "PromptedAttention",
    "PromptContext",
    "use_backend",
    "backends",
    "forced_backend",
    "list_ops",
    "select",
]
