"""Peers: how the official prompt-CL codes compute things, written here from the method specs (never copied from
their repositories), for the benchmarks' ``peer`` columns and the tests that check a peer computes the same method.

- :mod:`.ops`: single ops (prefix attention by concatenation, retrieval by the full similarity matrix, the
  textbook Mahalanobis and KL, GPLS's SVD ELBO, ConvPrompt's per-prompt convolution loop);
- :mod:`.vit`: the ViT forward of the official codes (naive attention, prompts concatenated);
- :mod:`.towers`: the frozen open_clip towers' self-attention as the official codes run it;
- one module per method (``linear``, ``l2p``, ``dualprompt``, ``coda_prompt``, ``gpls``, ``convprompt``,
  ``star_prompt``, ``clumo``), each with ``loss(method, batch, ctx)``: the training loss of a clfast method object
  computed the way the official code computes it, on the method's own parameters (so the two can be compared exactly).
  Where the official code computes a different loss (a quirk clfast fixed), the numbers follow clfast and the cost
  the official code; each module's docstring says where.

:func:`step` runs one official-style training step (fp32, no autocast, every op the peer's own).
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch
from torch import Tensor

from .ops import (gaussian_kl_gpls_svd_peer, gaussian_kl_peer, mahalanobis_peer, prefix_attention_peer,  # noqa: F401
                  prompt_conv_peer, retrieve_peer)

__all__ = ["prefix_attention_peer", "retrieve_peer", "mahalanobis_peer", "gaussian_kl_peer",
           "gaussian_kl_gpls_svd_peer", "prompt_conv_peer", "METHODS", "loss_fn", "step"]

#: registered method name -> the module holding its peer
METHODS = {"linear": "linear", "l2p": "l2p", "dualprompt": "dualprompt", "coda_prompt": "coda_prompt",
           "gpls": "gpls", "convprompt": "convprompt", "star_prompt": "star_prompt",
           "star_prompt_stage1": "star_prompt", "clumo": "clumo"}


def loss_fn(method) -> Callable[[object, dict, object], Tensor]:
    """The peer ``loss(method, batch, ctx)`` of a clfast method object (by its registered name)."""
    name = getattr(method, "name", None)
    if name not in METHODS:
        raise ValueError(f"peers: no peer for method {name!r}; peers exist for {sorted(METHODS)}")
    return importlib.import_module(f"{__name__}.{METHODS[name]}").loss


def step(method, opt: torch.optim.Optimizer, batch: dict, ctx, amp_dtype: Optional[torch.dtype] = None) -> float:
    """One training step the official way: zero the gradients, the peer's loss in fp32 (autocast off; with
    ``amp_dtype``, under ``torch.autocast`` to it, wrapped around the official step by hand), backward,
    ``opt.step()``, the method's frozen rows restored (as the engine does); gradients left on parameters outside the
    optimizer (CODA-Prompt's unfrozen ViT) are dropped. Returns the loss."""
    fn = loss_fn(method)
    opt.zero_grad(set_to_none=True)
    dev = batch["image"].device.type
    with torch.autocast(dev, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss = fn(method, batch, ctx)
    loss.backward()
    opt.step()
    method.after_optimizer_step()
    for p in method.parameters():
        if not p.requires_grad:
            p.grad = None
    return float(loss.detach())
