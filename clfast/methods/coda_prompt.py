"""``coda_prompt``: CODA-Prompt (Smith et al., CVPR 2023).

A pool of ``pool_size`` prompt components per prompted block (``layers``, 0–4), each with a key and
an attention vector. Task ``t`` trains its own ``pool_size / num_tasks`` components; earlier ones are
frozen and later ones unused. For a query ``q`` (the frozen [CLS] feature) and component ``m``::

    alpha_m = cos(q ⊙ A_m, K_m)          P(q) = Σ_m alpha_m P_m      (length × C)

and ``P(q)`` is split into a key prefix (first half of the tokens) and a value prefix (second half),
applied by prefix tuning through the fused ``prefix_attention`` op. New components are initialised
orthogonal to the old ones (Gram–Schmidt on the flattened rows of K, A and P); ``ortho_weight`` adds
the penalty ``‖X Xᵀ − I‖²`` (mean over entries) for each of K, A and P of the active components.

Paper settings: 100 components of length 8 in blocks 0–4, Adam lr 0.001, batch 128, cosine schedule,
20 epochs (CIFAR-100) / 50 (ImageNet-R); the authors' configs set ``ortho_weight`` 0.0 (their
README: "with updated code, now can be 0"), the paper used 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MethodConfig, StepOutput, TaskContext, register_method
from .common import FrozenQueryMethod, orthogonal_rows


@dataclass
class CodaPromptConfig(MethodConfig):
    layer_fields = ("layers",)

    pool_size: int = 100
    length: int = 8
    layers: tuple[int, ...] = (0, 1, 2, 3, 4)
    ortho_weight: float = 0.0
    ortho_init: bool = True

    def __post_init__(self):
        super().__post_init__()
        self.layers = tuple(self.layers)
        if self.length < 2 or self.length % 2:
            raise ValueError(f"coda_prompt: length must be even and >= 2 (split into K and V halves), got {self.length}")
        if self.pool_size < 1:
            raise ValueError(f"coda_prompt: pool_size must be >= 1, got {self.pool_size}")

    def check_against(self, *, num_tasks=None, num_layers=None) -> None:
        super().check_against(num_tasks=num_tasks, num_layers=num_layers)
        if num_tasks is not None and self.pool_size % num_tasks:
            raise ValueError(f"method_args.pool_size={self.pool_size} must be a multiple of num_tasks={num_tasks}: "
                             f"coda_prompt gives each task pool_size / num_tasks components of its own")


@register_method("coda_prompt")
class CodaPrompt(FrozenQueryMethod):
    Config = CodaPromptConfig

    def __init__(self, backbone, num_classes, num_tasks, cfg: CodaPromptConfig):
        super().__init__(backbone, num_classes, num_tasks, cfg)
        C = self.embed_dim
        cfg.check_against(num_tasks=num_tasks, num_layers=int(backbone.num_layers))
        self.per_task = cfg.pool_size // num_tasks
        n = len(cfg.layers)
        self.keys = nn.Parameter(torch.zeros(n, cfg.pool_size, C))
        self.attn = nn.Parameter(torch.zeros(n, cfg.pool_size, C))
        self.prompts = nn.Parameter(torch.zeros(n, cfg.pool_size, cfg.length, C))
        self.register_buffer("_task", torch.zeros((), dtype=torch.long))
        for p in (self.prompts, self.keys, self.attn):  # earlier tasks' components (dim 1) stay fixed
            self.freeze_rows(p, stop=lambda: int(self._task) * self.per_task, dim=1)

    def begin_task(self, ctx: TaskContext) -> None:
        self._task.fill_(ctx.task)
        start, stop = ctx.task * self.per_task, (ctx.task + 1) * self.per_task
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        with torch.no_grad():
            for p in (self.keys, self.attn, self.prompts):
                for layer in range(p.shape[0]):
                    flat = p[layer].reshape(self.cfg.pool_size, -1)
                    if self.cfg.ortho_init and stop <= flat.shape[1]:
                        new = orthogonal_rows(flat, start, stop, gen)[start:stop]
                    else:  # more components than dimensions: plain random init
                        new = torch.randn(stop - start, flat.shape[1], generator=gen, dtype=torch.float64)
                        new = F.normalize(new, dim=1)
                    flat[start:stop] = new.to(flat)

    def _active(self, ctx: TaskContext) -> int:
        """Components in use: those of tasks 0..t (earlier ones held fixed by freeze_rows)."""
        return (ctx.task + 1) * self.per_task

    def _prefixes(self, q: Tensor, stop: int) -> dict[int, tuple[Tensor, Tensor]]:
        half = self.cfg.length // 2
        out = {}
        for i, layer in enumerate(self.cfg.layers):
            K, A, P = self.keys[i, :stop], self.attn[i, :stop], self.prompts[i, :stop]
            a_q = torch.einsum("bd,kd->bkd", q, A)                        # (B, k, C)
            alpha = torch.einsum("bkd,kd->bk", F.normalize(a_q, dim=2), F.normalize(K, dim=1))
            p = torch.einsum("bk,kld->bld", alpha, P)                     # (B, length, C)
            out[layer] = (p[:, :half], p[:, half:])
        return out

    def _logits(self, batch: dict, ctx: TaskContext) -> Tensor:
        q = self.query(batch, ctx)
        tokens = self.backbone(batch["image"], prefixes=self._prefixes(q, self._active(ctx)))
        return self.classify(tokens[:, 0])

    def ortho_penalty(self, stop: int) -> Tensor:
        total = self.keys.new_zeros(())
        for p in (self.keys, self.attn, self.prompts):
            x = p[:, :stop].reshape(p.shape[0], stop, -1)
            gram = x @ x.transpose(1, 2)
            eye = torch.eye(stop, device=x.device, dtype=x.dtype)
            total = total + ((gram - eye) ** 2).mean()
        return total

    def training_step(self, batch: dict, ctx: TaskContext) -> StepOutput:
        logits = self._logits(batch, ctx)
        ce = F.cross_entropy(self.train_logits(logits, ctx).float(), batch["label"])
        logs = {"ce": ce.detach()}
        loss = ce
        if self.cfg.ortho_weight:
            ortho = self.ortho_penalty(self._active(ctx))
            loss = loss + self.cfg.ortho_weight * ortho
            logs["ortho"] = ortho.detach()
        return StepOutput(loss, logs)

    def predict(self, batch: dict, ctx: TaskContext) -> Tensor:
        return self.predict_logits(self._logits(batch, ctx), ctx)
