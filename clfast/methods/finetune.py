"""``finetune``: naive sequential fine-tuning, the lower bound of every continual-learning table.

The model of ``linear`` — the ViT's [CLS] feature after the final norm, one linear head over every class
(dense from the start, unseen classes masked), cross-entropy over the current task's classes
(``train_mask``) — but the backbone's weights are trained too, task after task, at the preset's learning
rate (``lr_scales: {backbone: ...}`` sets theirs against the head's), with nothing that protects earlier
tasks: no prompts, no frozen slices, no replay, no regularisation. What forgetting looks like.

``freeze_backbone=true`` is ``linear`` exactly: the same parameters and initialisation, the frozen
features from the same per-image cache, the same steps, so the same numbers bit for bit. With the
backbone trained, features are recomputed every step (no cache: the backbone moves) and every
checkpoint holds the backbone's weights (they no longer equal the pretrained ones, so they are not left
out as unchanged).

``train_mask`` keeps the class-incremental convention of every method here (the head trains only the
current task's logits): the "FT-seq" row of the L2P and DualPrompt papers and CODA-Prompt's "FT++".
``train_mask=false`` is mammoth's ``sgd`` and CODA-Prompt's "FT" (cross-entropy over every class seen
so far, so the head's old classes are pushed down as well).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import TaskContext, register_method
from .linear import Linear, LinearConfig


@dataclass
class FinetuneConfig(LinearConfig):
    freeze_backbone: bool = False     # true: the backbone stays frozen (this is then `linear`)


@register_method("finetune")
class Finetune(Linear):
    Config = FinetuneConfig

    def __init__(self, backbone, num_classes, num_tasks, cfg: FinetuneConfig):
        super().__init__(backbone, num_classes, num_tasks, cfg)
        if not cfg.freeze_backbone:
            setter = getattr(backbone, "set_trainable", None)
            if setter is None:
                raise ValueError(f"finetune: the backbone {type(backbone).__name__} cannot be trained (it has no "
                                 f"set_trainable()); use freeze_backbone=true or a ViT backbone")
            setter(True)

    def features(self, batch: dict, ctx: TaskContext) -> Tensor:
        """(B, C) features: the backbone's with gradient, or the cached frozen query when it is frozen."""
        if self.cfg.freeze_backbone:
            return self.query(batch, ctx)
        return self.backbone.features(batch["image"]).float()
