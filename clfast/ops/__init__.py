"""The fused operators of clfast. Each op module holds its reference (the spec), its backends, its
torch.library registration and its public function / nn.Module.

    clfast.ops.prefix_attention(q, k, v, prefix_k, prefix_v, kv_mask=..., scale=...)
    clfast.ops.PromptedAttention(timm_attention, layer, context)
    clfast.ops.fuse_self_attention(model)   (nn.MultiheadAttention self-attention -> the fused op, in place)
    clfast.ops.mahalanobis(x, means, prec_chol), clfast.ops.gaussian_kl(mu, log_var, prior_mean, prec_chol)
    clfast.ops.GaussianStats(dim, num_groups)
    clfast.ops.prompt_conv(embeddings, weight, bias, prompt_weights), clfast.ops.PromptConv(...)
    clfast.ops.retrieve(query, keys, k, metric=..., exact=...) -> (scores, indices)
    clfast.ops.KeyIndex(dim, metric, exact)   clfast.ops.kmeans(x, n_clusters, n_iter, seed)
    clfast.ops.class_select(query, modulators, keys, values, scale=..., confidence=..., strict_grad=...)
        -> (prompts, indices, scores);  clfast.ops.modulated_cosine(query, modulators, keys, scale=...)
    clfast.ops.cpu_phases()   (context manager: where the compiled CPU kernels' time goes, phase by phase)

Backends are picked per call (``clfast info`` lists them, ``backend_summary()`` returns the same as data);
``use_backend(name)`` or ``CLFAST_BACKEND`` forces one.
"""

from clfast.ops._dispatch import backend_summary, backends, forced_backend, ops as list_ops, select, use_backend
from clfast.ops.attention import (FusedMultiheadAttention, PromptContext, PromptedAttention, fuse_self_attention,
                                  prefix_attention)
from clfast.ops.clustering import kmeans
from clfast.ops.conv import PromptConv, prompt_conv
from clfast.ops.gaussian import gaussian_kl, mahalanobis
from clfast.ops.gaussian_stats import GaussianStats
from clfast.ops.key_index import KeyIndex
from clfast.ops.phases import PhaseTime, cpu_phases
from clfast.ops.retrieval import retrieve
from clfast.ops.selection import class_select, modulated_cosine

__all__ = [
    "prefix_attention",
    "PromptedAttention",
    "PromptContext",
    "FusedMultiheadAttention",
    "fuse_self_attention",
    "mahalanobis",
    "gaussian_kl",
    "GaussianStats",
    "prompt_conv",
    "PromptConv",
    "retrieve",
    "KeyIndex",
    "kmeans",
    "class_select",
    "modulated_cosine",
    "use_backend",
    "backends",
    "forced_backend",
    "list_ops",
    "select",
    "backend_summary",
    "cpu_phases",
    "PhaseTime",
]
