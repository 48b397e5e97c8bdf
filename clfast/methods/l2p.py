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
[-1, 1], Adam lr 0.03, batch 128, constant lr, 5 epochs (CIFAR-100).

``frequency_penalty`` is the paper's optional diversified selection (its Sec. 4.2), for training only,
where the task boundaries are known: while training task t > 0 each sample takes the ``top_k``
prompts of smallest ``(1 - cos(q, k_i)) * (h_i + 1e-3)``, with ``h`` the normalised frequency with
which each prompt was selected while training tasks 0..t-1, so a new task is pushed towards prompts
that earlier tasks used little and leaves theirs alone. The counts are a buffer (saved in checkpoints,
all-reduced over ranks at the end of each task). ``train_vote`` is the official code's batch-wise
selection, for training only: every sample of a training batch takes the ``top_k`` prompts that the
batch's samples select most often (counted over the global batch under DDP; ties to the lower index),
so a task trains only a few prompts. Evaluation always selects per sample by cosine alone (the test-time
majority vote is an unfair evaluation and is not offered).
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
    frequency_penalty: bool = False  # train-time selection penalised by earlier tasks' prompt usage
    train_vote: bool = False         # train-time selection by the batch's majority (never at test)

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
        # how often each prompt was selected: while training earlier tasks / the current one
        self.register_buffer("usage", torch.zeros(cfg.pool_size, dtype=torch.float64))
        self.register_buffer("task_usage", torch.zeros(cfg.pool_size, dtype=torch.float64))

    def begin_task(self, ctx: TaskContext) -> None:
        self.task_usage.zero_()

    def end_task(self, ctx: TaskContext, loader) -> None:
        self.usage += ctx.all_reduce(self.task_usage.clone())
        self.task_usage.zero_()

    def _select(self, q: Tensor, training: bool, ctx: TaskContext | None = None) -> tuple[Tensor, Tensor]:
        """(scores, idx), both (B, top_k): the cosines of the selected keys and their indices."""
        k = self.cfg.top_k
        if training:
            penalised = self.cfg.frequency_penalty and bool(self.usage.sum() > 0)
            if penalised:
                cos = F.normalize(q.float(), dim=-1) @ F.normalize(self.keys.float(), dim=-1).T  # (B, M)
                h = (self.usage / self.usage.sum()).to(cos.dtype) + 1e-3
                idx = ((1.0 - cos.detach()) * h).topk(k, dim=1, largest=False).indices
                scores = cos.gather(1, idx)
            else:
                scores, idx = retrieve(q, self.keys, k, metric="cosine")
            if self.cfg.train_vote:
                votes = torch.bincount(idx.flatten(), minlength=self.cfg.pool_size).double()
                if ctx is not None:
                    votes = ctx.all_reduce(votes)
                # most votes first, ties to the lower index (stable sort of the negated counts)
                chosen = torch.sort(-votes, stable=True).indices[:k].to(idx.device)
                idx = chosen.expand(q.shape[0], k)
                cos = F.normalize(q.float(), dim=-1) @ F.normalize(self.keys.index_select(0, chosen).float(), dim=-1).T
                scores = cos                                                   # (B, k)
            with torch.no_grad():
                self.task_usage += torch.bincount(idx.flatten(), minlength=self.cfg.pool_size).to(self.task_usage)
            return scores, idx
        return retrieve(q, self.keys, k, metric="cosine")

    def _forward(self, batch: dict, ctx: TaskContext, training: bool = False) -> tuple[Tensor, Tensor]:
        q = self.query(batch, ctx)                                         # (B, C)
        scores, idx = self._select(q, training, ctx)                       # (B, k)
        B = q.shape[0]
        # index_select, not prompts[idx]: its backward (index_add_) is deterministic on the CPU, while
        # advanced indexing's (index_put_ with accumulate) adds atomically across threads
        tokens = self.prompts.index_select(0, idx.flatten()).reshape(B, self.cfg.top_k * self.cfg.length, self.embed_dim)
        out = self.backbone(batch["image"], prompt_tokens=tokens)             # (B, N + kL, C)
        if self.cfg.head == "cls":
            feat = self.backbone.vit.fc_norm(self.backbone.cls(out))
        else:
            n_prefix = getattr(self.backbone, "num_prefix_tokens", 1)
            feat = out[:, n_prefix: n_prefix + tokens.shape[1]].mean(1)
        return self.classify(feat), scores

    def training_step(self, batch: dict, ctx: TaskContext) -> StepOutput:
        logits, scores = self._forward(batch, ctx, training=True)
        ce = F.cross_entropy(self.train_logits(logits, ctx).float(), batch["label"])
        pull = scores.float().sum(1).mean()
        loss = ce - self.cfg.pull_weight * pull
        return StepOutput(loss, {"ce": ce.detach(), "key_cos": pull.detach() / self.cfg.top_k})

    def record(self) -> dict:
        # the run record flags every batch-level selection: none at test time, the vote only in training
        return {"test_time_batch_vote": False, "train_vote": self.cfg.train_vote,
                "frequency_penalty": self.cfg.frequency_penalty}

    def predict(self, batch: dict, ctx: TaskContext) -> Tensor:
        logits, _ = self._forward(batch, ctx)
        return self.predict_logits(logits, ctx)
