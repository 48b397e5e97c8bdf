"""How the official prompt-CL codes compute each op ("peer" implementations), written here from their
descriptions in the method specs. Shared by the op benchmarks, the method peers of this package and the tests."""

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


def retrieve_peer(query, keys, k):
    """How the official codes (L2P, DualPrompt, CODA-Prompt, CluMo) select keys: normalise both, the full
    (B, M) similarity matrix, topk."""
    s = torch.nn.functional.normalize(query, dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).T
    return s.topk(k, dim=1)


# ---------------------------------------------------------------------------------------------------
# mahalanobis / gaussian_kl
# ---------------------------------------------------------------------------------------------------


def mahalanobis_peer(x, means, precision):
    """The textbook way: explicit (B,K,D) differences times the precision matrix, (x−μ)ᵀ P (x−μ) per pair."""
    diff = x[:, None, :] - means[None, :, :]
    return ((diff @ precision) * diff).sum(-1)


def gaussian_kl_peer(mu, log_var, prior_mean, precision):
    """Per-sample KL with torch.distributions: one diagonal MultivariateNormal per row against the prior given by
    its precision matrix (torch factorises it and solves per row)."""
    from torch.distributions import MultivariateNormal, kl_divergence

    q = MultivariateNormal(mu, scale_tril=torch.diag_embed((0.5 * log_var).exp()))
    p = MultivariateNormal(prior_mean.expand_as(mu), precision_matrix=precision)
    return kl_divergence(q, p)


def gaussian_kl_gpls_svd_peer(sigma, eps):
    """GPLS's released per-layer ELBO term, as its method spec describes it: the pseudo-inverse (via SVD) of the
    (B, D) matrix of σ rows, combined with Δ = σ⊙ε into −½·mahal − ½·logdet and read back with ``.item()`` (a host
    sync, no gradient). One layer's worth; the released code runs it for each of the 12 layers every forward."""
    with torch.no_grad():
        U, S, Vh = torch.linalg.svd(sigma, full_matrices=False)
        keep = S > S.max() * max(sigma.shape) * torch.finfo(sigma.dtype).eps
        pinv = (Vh.T[:, keep] / S[keep]) @ U[:, keep].T  # (D, B)
        delta = sigma * eps
        mahal = torch.einsum("bd,db->", delta, pinv)
        logdet = S[keep].log().sum()
        return (-0.5 * mahal - 0.5 * logdet).item()


# ---------------------------------------------------------------------------------------------------
# prompt_conv
# ---------------------------------------------------------------------------------------------------


def prompt_conv_peer(embeddings, weight, bias, prompt_weights):
    """ConvPrompt's released prompt generation for one layer: a single-channel ``Conv2d`` per (K/V stream × head,
    prompt) applied to B repeated copies of that head's embedding, scaled by the prompt's per-sample weight and
    summed in place. embeddings (G,Lin,Din), weight (G,F,kh,kw), bias (G,F), prompt_weights (B,F) → (B,G,Lout,Dout)."""
    G, Lin, Din = embeddings.shape
    B, num_prompts = prompt_weights.shape
    kh, kw = weight.shape[-2:]
    out = embeddings.new_zeros(B, G, Lin - kh + 1, Din - kw + 1)
    for g in range(G):
        x = embeddings[g][None, None].repeat(B, 1, 1, 1)  # B identical copies, as the released code
        for f in range(num_prompts):
            c = torch.nn.functional.conv2d(x, weight[g, f][None, None], bias[g, f][None])
            out[:, g] += prompt_weights[:, f, None, None] * c[:, 0]
    return out
