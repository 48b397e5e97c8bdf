"""Losses of VQA as classification over a closed answer vocabulary (spec ``methods/clumo.md`` §3).

    loss = soft_target_ce(z, answer_scores)                       # −(1/B) Σ_b Σ_a w_{b,a} log softmax(z_b)_a
    prev = PreviousHead(vlm.head); ...; prev.take(vlm.head)       # frozen copy at the end of a task
    loss = loss + λ_kd · head_distillation(z, prev(h))            # mean_{b,a} (z − z_prev)², tasks t > 0
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["soft_target_ce", "head_distillation", "PreviousHead"]


def _check_pair(fn: str, a_name: str, a, b_name: str, b) -> None:
    for name, t in ((a_name, a), (b_name, b)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"{fn}: {a_name} and {b_name} must both have shape (B,A), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


def soft_target_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """``−(1/B) Σ_b Σ_a w_{b,a} · log softmax(z_b)_a`` in float32 (the targets are not renormalised: a record whose
    answers fell outside the vocabulary weighs less, as in the code's weighted NLL).

    Args:
        logits: (B, A) answer logits z.
        targets: (B, A) answer weights w (``answer_scores``), >= 0.
    """
    _check_pair("soft_target_ce", "logits", logits, "targets", targets)
    logp = F.log_softmax(logits.float(), dim=1)
    return -(targets.float() * logp).sum(1).mean()


def head_distillation(logits: Tensor, prev_logits: Tensor) -> Tensor:
    """``mean_{b,a} (z_{b,a} − z^prev_{b,a})²`` in float32; ``prev_logits`` is detached (no gradient reaches the
    previous head)."""
    _check_pair("head_distillation", "logits", logits, "prev_logits", prev_logits)
    return (logits.float() - prev_logits.detach().float()).pow(2).mean()


class PreviousHead(nn.Module):
    """A frozen copy of an answer head, taken at the end of a task (the code's ``update_prev_cls``).

    The copy is a submodule whose parameters never require grad (so optimizers and DDP ignore it) and are saved
    with the method, so a run resumed at a task boundary distils against the same head. ``taken`` (a buffer)
    says whether :meth:`take` has run; calling the copy before that raises.
    """

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = self._frozen_copy(head)
        self.register_buffer("taken", torch.zeros((), dtype=torch.bool))

    @staticmethod
    def _frozen_copy(head: nn.Module) -> nn.Module:
        out = copy.deepcopy(head)
        for p in out.parameters():
            p.requires_grad_(False)
        return out.eval()

    @torch.no_grad()
    def take(self, head: nn.Module) -> None:
        """Copy ``head`` as it is now: parameters, buffers (non-persistent ones too, e.g. a rank head's answer
        embeddings) and plain attributes."""
        self.head = self._frozen_copy(head)
        self.taken.fill_(True)

    def train(self, mode: bool = True) -> "PreviousHead":
        super().train(mode)
        self.head.eval()        # a frozen copy: dropout and the like stay off
        return self

    def forward(self, h: Tensor) -> Tensor:
        if not bool(self.taken):
            raise RuntimeError("PreviousHead: no head copied yet (take() runs at the end of a task)")
        with torch.no_grad():
            return self.head(h)
