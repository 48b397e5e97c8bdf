"""``l2p``: Learning to Prompt (Wang et al., CVPR 2022).

A pool of ``pool_size`` prompts (each ``length`` tokens of width C) with one learnable key each. For
every image, the frozen backbone's [CLS] feature is the query; the ``top_k`` keys nearest by cosine
(the ``retrieve`` op, per sample — never a batch vote) select their prompts, which are inserted as
tokens after [CLS] (prompt tuning). The classifier reads the mean of the prompt tokens' outputs (the
paper's "prompt" head, ``head="prompt"``) or the prompted [CLS] output (``head="cls"``, the official
code's ``head_type="token"``). Loss: cross-entropy over the current task's classes minus
``pull_weight`` × the mean summed cosine between queries and their selected keys (the surrogate loss
that pulls keys towards their queries). Keys only get gradient from that surrogate, so under Adam
``pull_weight`` barely matters for them and their learning rate (``lr_scales: {keys: ...}``) sets how
fast each key settles on the queries of the tasks that pick it.

Paper settings: pool 10, length 5, top-5, pull weight 0.1, keys and prompts initialised uniform in
[-1, 1], Adam lr 0.03, batch 128, constant lr, 5 epochs (CIFAR-100). The paper's optional
prompt-frequency penalty and train-time batch-wise prompt selection are not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import retrieve
from .base import MethodConfig, StepOutput, TaskContext, register_method
from .common import FrozenQueryMethod


@dataclass
class L2PConfig(MethodConfig):
    pool_size: int = 10
    length: int = 5
    top_k: int = 5
    pull_weight: float = 0.1
    init: str = "uniform"          # prompts: "uniform" in [-1, 1] (the official code) or "zero"; keys uniform
    head: str = "prompt"           # features for the classifier: mean of the prompt tokens, or "cls"

    def __post_init__(self):
        super().__post_init__()
        if self.pool_size < 1 or self.length < 1:
            raise ValueError("l2p: pool_size and length must be >= 1")
        if not 1 <= self.top_k <= self.pool_size:
            raise ValueError(f"l2p: top_k must be in [1, pool_size={self.pool_size}], got {self.top_k}")
        if self.init not in ("uniform", "zero"):
            raise ValueError(f"l2p: init must be 'uniform' or 'zero', got {self.init!r}")
        if self.head not in ("prompt", "cls"):
            raise ValueError(f"l2p: head must be 'prompt' or 'cls', got {self.head!r}")


@register_method("l2p")
class L2P(FrozenQueryMethod):
    Config = L2PConfig

    def __init__(self, backbone, num_classes, num_tasks, cfg: L2PConfig):
        super().__init__(backbone, num_classes, num_tasks, cfg)
        C = self.embed_dim
        self.keys = nn.Parameter(torch.empty(cfg.pool_size, C))
        self.prompts = nn.Parameter(torch.empty(cfg.pool_size, cfg.length, C))
        nn.init.uniform_(self.keys, -1.0, 1.0)  # zero keys would tie every cosine: one prompt for all
        if cfg.init == "uniform":
            nn.init.uniform_(self.prompts, -1.0, 1.0)
        else:
            nn.init.zeros_(self.prompts)

    def _forward(self, batch: dict, ctx: TaskContext) -> tuple[Tensor, Tensor]:
        q = self.query(batch, ctx)                                         # (B, C)
        scores, idx = retrieve(q, self.keys, self.cfg.top_k, metric="cosine")  # (B, k)
        B = q.shape[0]
        tokens = self.prompts[idx].reshape(B, self.cfg.top_k * self.cfg.length, self.embed_dim)
        out = self.backbone(batch["image"], prompt_tokens=tokens)             # (B, N + kL, C)
        if self.cfg.head == "cls":
            feat = self.backbone.vit.fc_norm(self.backbone.cls(out))
        else:
            n_prefix = getattr(self.backbone, "num_prefix_tokens", 1)
            feat = out[:, n_prefix: n_prefix + tokens.shape[1]].mean(1)
        return self.classify(feat), scores

    def training_step(self, batch: dict, ctx: TaskContext) -> StepOutput:
        logits, scores = self._forward(batch, ctx)
        ce = F.cross_entropy(self.train_logits(logits, ctx).float(), batch["label"])
        pull = scores.float().sum(1).mean()
        loss = ce - self.cfg.pull_weight * pull
        return StepOutput(loss, {"ce": ce.detach(), "key_cos": pull.detach() / self.cfg.top_k})

    def predict(self, batch: dict, ctx: TaskContext) -> Tensor:
        logits, _ = self._forward(batch, ctx)
        return self.predict_logits(logits, ctx)
