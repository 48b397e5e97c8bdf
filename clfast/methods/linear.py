"""``linear``: the frozen backbone with a growing linear head and no prompts.

The honest lower bound every prompt method is compared with: the same frozen [CLS] feature the
prompt methods use as their query, the same head, the same class-incremental logit masking
(``train_mask``), no prompts. Its features come from the per-image query cache, so with augmentation
off an epoch after the first costs only the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from .base import MethodConfig, StepOutput, TaskContext, register_method
from .common import FrozenQueryMethod


@dataclass
class LinearConfig(MethodConfig):
    pass


@register_method("linear")
class Linear(FrozenQueryMethod):
    Config = LinearConfig

    def features(self, batch: dict, ctx: TaskContext) -> Tensor:
        """(B, C) what the head reads: the frozen (cached) query feature."""
        return self.query(batch, ctx)

    def training_step(self, batch: dict, ctx: TaskContext) -> StepOutput:
        logits = self.train_logits(self.classify(self.features(batch, ctx)), ctx)
        loss = F.cross_entropy(logits.float(), batch["label"])
        return StepOutput(loss, {"ce": loss.detach()})

    def predict(self, batch: dict, ctx: TaskContext) -> Tensor:
        return self.predict_logits(self.classify(self.features(batch, ctx)), ctx)
