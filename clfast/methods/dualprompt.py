"""``dualprompt``: DualPrompt (Wang et al., ECCV 2022).

Two kinds of prompts, both applied by prefix tuning (prepended to the keys and values of a block's
self-attention through the fused ``prefix_attention`` op):

- a G(eneral)-prompt shared by all tasks, ``g_length`` tokens, in blocks ``g_layers`` (0–1);
- E(xpert)-prompts, a pool of ``pool_size`` (one per task by default), ``e_length`` tokens, in blocks
  ``e_layers`` (2–4), each with a learnable key. Training uses the current task's E-prompt and pulls
  its key towards the frozen [CLS] queries (weight ``pull_weight``); at test time each sample takes
  the top-1 key by cosine among the seen tasks' keys (per sample; the ``retrieve`` op).

K and V prefixes are separate tensors of the stated length each. The classifier reads the prompted
[CLS] token. Paper settings: Adam lr 0.005, batch 128, constant lr, 5 epochs (CIFAR-100) / 50
(ImageNet-R); prompts and keys initialised uniform in [-1, 1].
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
class DualPromptConfig(MethodConfig):
    layer_fields = ("g_layers", "e_layers")

    g_length: int = 5
    g_layers: tuple[int, ...] = (0, 1)
    e_length: int = 20
    e_layers: tuple[int, ...] = (2, 3, 4)
    pool_size: int = 0               # 0: one E-prompt per task
    pull_weight: float = 1.0
    copy_previous: bool = True       # a new task's E-prompt starts from the previous one

    def __post_init__(self):
        super().__post_init__()
        self.g_layers, self.e_layers = tuple(self.g_layers), tuple(self.e_layers)
        if self.g_length < 0 or self.e_length < 1:
            raise ValueError("dualprompt: g_length must be >= 0 and e_length >= 1")
        if self.pool_size < 0:
            raise ValueError(f"dualprompt: pool_size must be >= 0, got {self.pool_size}")

    def check_against(self, *, num_tasks=None, num_layers=None) -> None:
        super().check_against(num_tasks=num_tasks, num_layers=num_layers)
        if num_tasks is not None and self.pool_size and self.pool_size < num_tasks:
            raise ValueError(f"method_args.pool_size={self.pool_size} is smaller than num_tasks={num_tasks}: dualprompt "
                             f"keeps one E-prompt per task (set pool_size >= {num_tasks}, or 0 for one per task)")


@register_method("dualprompt")
class DualPrompt(FrozenQueryMethod):
    Config = DualPromptConfig

    def __init__(self, backbone, num_classes, num_tasks, cfg: DualPromptConfig):
        super().__init__(backbone, num_classes, num_tasks, cfg)
        C = self.embed_dim
        cfg.check_against(num_tasks=num_tasks, num_layers=int(backbone.num_layers))
        self.pool = cfg.pool_size or num_tasks
        # (layers, 2 = K/V, length, C) and (layers, 2, pool, length, C)
        self.g_prompt = nn.Parameter(torch.empty(len(cfg.g_layers), 2, cfg.g_length, C).uniform_(-1, 1))
        self.e_prompt = nn.Parameter(torch.empty(len(cfg.e_layers), 2, self.pool, cfg.e_length, C).uniform_(-1, 1))
        self.e_keys = nn.Parameter(torch.empty(self.pool, C).uniform_(-1, 1))

    def begin_task(self, ctx: TaskContext) -> None:
        # Training touches only the current task's E-prompt and key, so earlier ones get exactly zero
        # gradient (and, with the per-task optimizer of the presets, never move).
        if ctx.task > 0 and self.cfg.copy_previous:  # dualprompt-pytorch's shared_prompt_pool
            with torch.no_grad():
                self.e_prompt[:, :, ctx.task] = self.e_prompt[:, :, ctx.task - 1]

    def _prefixes(self, e_idx: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
        B = e_idx.shape[0]
        out: dict[int, list[list[Tensor]]] = {}
        for i, layer in enumerate(self.cfg.g_layers):
            if self.cfg.g_length:
                out.setdefault(layer, [[], []])
                out[layer][0].append(self.g_prompt[i, 0].expand(B, -1, -1))
                out[layer][1].append(self.g_prompt[i, 1].expand(B, -1, -1))
        for i, layer in enumerate(self.cfg.e_layers):
            e = self.e_prompt[i].index_select(1, e_idx)         # (2, B, length, C); deterministic backward
            out.setdefault(layer, [[], []])
            out[layer][0].append(e[0])
            out[layer][1].append(e[1])
        return {l: (torch.cat(k, 1), torch.cat(v, 1)) for l, (k, v) in out.items()}

    def _logits(self, images: Tensor, e_idx: Tensor) -> Tensor:
        tokens = self.backbone(images, prefixes=self._prefixes(e_idx))
        return self.classify(tokens[:, 0])

    def training_step(self, batch: dict, ctx: TaskContext) -> StepOutput:
        q = self.query(batch, ctx)
        e_idx = torch.full((q.shape[0],), ctx.task, dtype=torch.long, device=q.device)
        logits = self._logits(batch["image"], e_idx)
        ce = F.cross_entropy(self.train_logits(logits, ctx).float(), batch["label"])
        cos = F.cosine_similarity(q, self.e_keys[ctx.task].float().unsqueeze(0), dim=-1).mean()
        loss = ce + self.cfg.pull_weight * (1.0 - cos)
        return StepOutput(loss, {"ce": ce.detach(), "key_cos": cos.detach()})

    def select(self, batch: dict, ctx: TaskContext) -> Tensor:
        """Per-sample E-prompt index (B,): top-1 cosine over the keys of tasks seen so far."""
        q = self.query(batch, ctx)
        _, idx = retrieve(q, self.e_keys[: ctx.task + 1].detach().float(), 1, metric="cosine")
        return idx[:, 0]

    def predict(self, batch: dict, ctx: TaskContext) -> Tensor:
        return self.predict_logits(self._logits(batch["image"], self.select(batch, ctx)), ctx)
