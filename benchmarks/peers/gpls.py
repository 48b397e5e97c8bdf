"""GPLS's training step the way the official code (``Hifipsysta/GPLS``, a DAP fork) computes it (spec
``methods/gpls.md`` §6): the frozen query as a whole second ViT forward every step; in every block the generator's
``Np`` tokens ``z = μ + σ⊙ε`` inserted between the class token and the patches, so they run through the block's
attention (naive, over ``1 + Np + 196`` tokens) and MLP and are dropped after it; the ε generator as LayerNorm +
GEMM; and per block the code's ELBO term, an SVD pseudo-inverse of the ``(B, D)`` σ rows read back with
``.item()`` (12 SVDs and 12 host syncs per forward, no gradient); fp32.

Numbers follow clfast's decisions (the spec's §7): the noise ξ is drawn as clfast draws it (same generator, same
order: one ``(B, Np, D)`` normal per block, at the block), σ is clfast's ``sigma_param``, and the loss adds clfast's
differentiable KL to the feature prior (``β·mean_l KL_l``, written here in closed form from the stored Cholesky
factor) where the code's SVD value is only computed and thrown away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import vit
from .ops import gaussian_kl_gpls_svd_peer


def _mean_scale(g, e: Tensor, sigma_param: str) -> tuple[Tensor, Tensor]:
    """``(μ, σ)`` ``(R, D)``: the task embedding through the two linears, each divided by its detached norm."""
    mu = F.linear(e, g.mu.weight, g.mu.bias)
    s = F.linear(e, g.sigma.weight, g.sigma.bias)
    if sigma_param == "softplus":
        s = F.softplus(s)
    return mu / mu.norm(dim=-1, keepdim=True).detach(), s / s.norm(dim=-1, keepdim=True).detach()


def kl_closed_form(mu: Tensor, sigma: Tensor, mean: Tensor, chol: Tensor) -> Tensor:
    """``KL(N(μ, diag σ²) ‖ N(m, S))`` ``(R,)`` with ``L Lᵀ = S⁻¹`` (the spec's §3 formula):
    ``½[Σ ρ σ² + ‖Lᵀ(μ−m)‖² − D + log|S| − Σ log σ²]``, with ``ρ = diag S⁻¹`` the squared row norms of L and
    ``log|S| = −2 Σ log diag L``. μ, σ ``(R, D)``, m ``(D,)``, L ``(D, D)``."""
    D = mu.shape[-1]
    rho = chol.pow(2).sum(1)
    logdet_s = -2.0 * chol.diagonal().log().sum()
    var = sigma.pow(2).clamp_min(1e-30)
    maha = ((mu - mean) @ chol).pow(2).sum(-1)
    return 0.5 * ((var * rho).sum(-1) + maha - D + logdet_s - var.log().sum(-1))


def loss(method, batch: dict, ctx) -> Tensor:
    """``CE − λ_sim·mean_b cos(K[t], q_b) + β·mean_l KL_l`` of :class:`clfast.methods.gpls.GPLS`."""
    cfg = method.cfg
    images = batch["image"]
    q = vit.query(method.backbone, images)
    B, t = q.shape[0], ctx.task
    e = method.task_embed[torch.full((B,), t, dtype=torch.long)]              # (B, E)
    slot = {layer: j for j, layer in enumerate(method.layers)}
    elbo_values = []

    def insert_fn(layer: int, h: Tensor):
        j = slot.get(layer)
        if j is None:
            return None
        g = method.generators[j]
        mu, sigma = _mean_scale(g, e, cfg.sigma_param)                         # (B, D) each
        n = F.layer_norm(h, g.norm.normalized_shape, g.norm.weight, g.norm.bias, g.norm.eps)
        # ε: the code's GEMM over the token axis, (B·D × N) @ (N × Np), then back to (B, Np, D)
        eps = (n.transpose(1, 2).reshape(-1, n.shape[1]) @ g.eps_weight.T).reshape(B, -1, g.eps_weight.shape[0])
        eps = eps.transpose(1, 2) + g.eps_bias[:, None]
        if cfg.sample_noise:                                               # clfast: drawn in training steps
            eps = eps + torch.randn(B, g.eps_weight.shape[0], h.shape[-1], device=h.device)
        elbo_values.append(gaussian_kl_gpls_svd_peer(sigma.detach(), eps[:, 0].detach()))   # SVD + .item()
        return mu[:, None, :] + sigma[:, None, :] * eps

    out = vit.forward(method.backbone, images, insert_fn=insert_fn)
    logits = method.head(out[:, 0])
    ce = F.cross_entropy(method.train_logits(logits, ctx).float(), batch["label"])
    cos = F.cosine_similarity(q, method.keys[t].float()[None], dim=-1).mean()
    total = ce - cfg.pull_weight * cos
    if cfg.elbo_weight:
        e1 = method.task_embed[t:t + 1]
        kls = []
        for g, prior in zip(method.generators, method.priors):
            mu, sigma = _mean_scale(g, e1, cfg.sigma_param)
            kls.append(kl_closed_form(mu, sigma, prior.mean[t].float(), prior.chol))
        total = total + cfg.elbo_weight * torch.cat(kls).mean()
    return total
