"""``vlm_finetune``: train the clfast VLM's fusion encoder and answer head on VQA, the CLIP towers frozen.

Two uses (methods/clumo.md §2, "Checkpoint"; issue 16):

- **The VLM warm-up.** The fusion encoder and head do not exist in open_clip, so CluMo and ATLAS start from a
  VLM trained here on VQA data disjoint from their continual tasks (VQAv2 for CluMo; not for ATLAS, where
  VQAv2 is an upstream task). The run's end-of-task checkpoint holds the VLM (``backbone.fusion.*``,
  ``backbone.head.*``, the answer vocabulary as ``backbone.answer_digests`` and the VLM's settings as
  ``backbone.config_json``); CluMo and ATLAS load it with ``vlm_checkpoint=<run dir or file>``
  (:func:`~clfast.backbones.vlm.load_vlm_checkpoint`: shapes, settings, vocabulary and content hash
  checked; path and sha256 recorded) or the engine's ``init_from=``.
- **The forgetting baselines on a task sequence.** Run on CLOVE (or ``synth-vqa``) it continues naively from
  task to task: sequential fine-tuning of fusion and head, nothing protecting earlier tasks.
  ``task_heads=true`` is the frozen-VLM baseline instead: the fusion encoder stays frozen (load a warm-up
  checkpoint with ``vlm_checkpoint``), each task trains a new head of its own (all allocated at start), and
  each test sample is answered by its task's head (task-aware).

Loss (methods/clumo.md §3): the soft-target cross-entropy ``-(1/B) Σ_b Σ_a w_{b,a} log softmax(z_b)_a`` over
the answer vocabulary, ``w`` the batch's ``answer_scores``. Question tokens come from the CLIP's tokenizer
(the engine tokenizes each split once). The image transform keeps the whole image, unflipped: crops and flips
change the answers of position and relation questions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..backbones.vlm import ANSWER_MODES, VLM, AnswerHead, create_vlm, load_vlm_checkpoint
from .base import Method, MethodConfig, Stage, StepOutput, TaskContext, register_method
from .common import QueryCache, check_cache_mb, eval_image_tokens
from .vqa_losses import soft_target_ce


@dataclass
class VLMFinetuneConfig(MethodConfig):
    clip_model: str = "clip_tiny_synth"     # open_clip name (paper presets: "ViT-B-16")
    clip_pretrained: Any = None             # open_clip tag ("openai") or file; None: clip_tiny_synth's shipped weights
    clip_checkpoint: Optional[str] = None   # a local CLIP weights file (overrides clip_pretrained)
    fusion_depth: Optional[int] = None      # None: fusion_defaults(clip_model) (ViT-B-16: 6 x 768 x 12)
    fusion_width: Optional[int] = None
    fusion_heads: Optional[int] = None
    mlp_ratio: float = 4.0
    image_size: Optional[int] = None        # image-tower input size (384 in the paper presets: 577 tokens)
    answer_mode: str = "classify"           # or "rank": <W h, e_a> over the CLIP text embeddings of the answers
    vlm_checkpoint: Optional[str] = None    # start from this run's (or file's) trained fusion encoder and head
    task_heads: bool = False                # frozen fusion, one new head per task, each task tested with its own
    decay_1d: bool = False                  # weight decay on biases and LayerNorms too (default: not, as BERT)
    image_token_cache_mb: int = 2048        # test items' image tokens kept for later evaluations (0: off)

    def __post_init__(self):
        super().__post_init__()
        if self.answer_mode not in ANSWER_MODES:
            raise ValueError(f"answer_mode must be one of {ANSWER_MODES}, got {self.answer_mode!r}")
        for key in ("fusion_depth", "fusion_width", "fusion_heads", "image_size"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ValueError(f"{key} must be a positive int or null, got {v!r}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        check_cache_mb("vlm_finetune", self.image_token_cache_mb)


@register_method("vlm_finetune")
class VLMFinetune(Method):
    """The fusion encoder and the answer head of a :class:`~clfast.backbones.VLM` trained with the towers frozen
    (or, with ``task_heads``, one head per task over the frozen VLM)."""

    Config = VLMFinetuneConfig
    supports = ("vqa",)

    @classmethod
    def build_backbone(cls, run_cfg: Any) -> VLM:
        """The VLM of ``method_args`` (clip_model, fusion shape, image_size, answer_mode), without its head:
        ``__init__`` builds it once the number of answers is known."""
        cfg = run_cfg.method_config()
        return create_vlm(cfg.clip_model, pretrained=cfg.clip_pretrained, checkpoint_path=cfg.clip_checkpoint,
                          depth=cfg.fusion_depth, width=cfg.fusion_width, heads=cfg.fusion_heads,
                          mlp_ratio=cfg.mlp_ratio, image_size=cfg.image_size, answer_mode=cfg.answer_mode)

    def __init__(self, backbone: VLM, num_classes: int, num_tasks: int, cfg: VLMFinetuneConfig):
        super().__init__(backbone, num_classes, num_tasks, cfg)
        if not isinstance(backbone, VLM):
            raise TypeError(f"vlm_finetune: the backbone must be a clfast VLM (build_backbone), got "
                            f"{type(backbone).__name__}")
        if backbone.head is None or backbone.num_answers != num_classes:
            backbone.build_head(num_classes)
        self.tokenizer = backbone.tokenizer
        self.vlm_record = load_vlm_checkpoint(backbone, cfg.vlm_checkpoint) if cfg.vlm_checkpoint else None
        if cfg.task_heads:
            mode, dim = backbone.answer_mode, backbone.towers.embed_dim
            self.task_heads = nn.ModuleList(
                AnswerHead(backbone.width, num_classes, backbone.head.hidden, mode=mode,
                           answer_dim=dim if mode == "rank" else None) for _ in range(num_tasks))
        self.backbone.requires_grad_(False)
        self.token_cache = QueryCache(dtype=None, max_bytes=cfg.image_token_cache_mb << 20)

    @property
    def vlm(self) -> VLM:
        return self.backbone

    def heads(self) -> list[AnswerHead]:
        return list(self.task_heads) if self.cfg.task_heads else [self.vlm.head]

    # hooks ----------------------------------------------------------------------------------------
    def begin_task(self, ctx: TaskContext) -> None:
        """Name the answers from the scenario's labels (checked against a loaded vocabulary) the first time."""
        if self.vlm.answers is None:
            if len(ctx.class_names) != self.num_classes:
                raise ValueError(f"vlm_finetune: the scenario names {len(ctx.class_names)} answers for "
                                 f"{self.num_classes} labels")
            self.vlm.set_answers(ctx.class_names)
            if self.cfg.task_heads and self.vlm.answer_mode == "rank":
                for head in self.task_heads:
                    head.set_answer_embeddings(self.vlm.head.answer_embeddings)

    def begin_stage(self, stage: Stage, ctx: TaskContext) -> None:
        self.requires_grad_(False)
        if self.cfg.task_heads:
            self.task_heads[ctx.task].requires_grad_(True)
        else:
            self.vlm.fusion.requires_grad_(True)
            self.vlm.head.requires_grad_(True)

    def param_groups(self, stage: Stage) -> list[dict]:
        """The default groups, each split into weights (decayed) and biases/LayerNorm parameters (1-D, not
        decayed, as BERT and ALBEF train) unless ``decay_1d``."""
        groups = super().param_groups(stage)
        if self.cfg.decay_1d:
            return groups
        out = []
        for g in groups:
            rest = {k: v for k, v in g.items() if k != "params"}
            decay = [p for p in g["params"] if p.dim() >= 2]
            flat = [p for p in g["params"] if p.dim() < 2]
            out += [{"params": decay, **rest}] if decay else []
            out += [{"params": flat, "weight_decay": 0.0, **rest}] if flat else []
        return out

    def fused(self, batch: dict, ctx: Optional[TaskContext] = None) -> Tensor:
        """``(B, width)`` the fused state at each question's EOT (``ctx`` given: test image tokens cached)."""
        tokens = None if ctx is None else eval_image_tokens(self.token_cache, self.vlm, batch, ctx)
        return self.vlm.fuse(self.vlm.encode(batch["image"], batch["question"], image_tokens=tokens))

    def training_step(self, batch: dict, ctx: TaskContext) -> StepOutput:
        head = self.task_heads[ctx.task] if self.cfg.task_heads else self.vlm.head
        loss = soft_target_ce(head(self.fused(batch)), batch["answer_scores"])
        return StepOutput(loss, {"vqa_ce": loss.detach()})

    def predict(self, batch: dict, ctx: TaskContext) -> Tensor:
        h = self.fused(batch, ctx)
        if not self.cfg.task_heads:
            return self.vlm.head(h)
        task = batch["task"]
        out = None
        for t in torch.unique(task).tolist():   # each sample answered by its own task's head
            rows = task == t
            z = self.task_heads[int(t)](h[rows])
            out = z.new_zeros(h.shape[0], z.shape[1]) if out is None else out
            out[rows] = z
        return out

    def compile_for_training(self, **options) -> None:
        """``compile: true`` compiles the fusion encoder (the towers run under no_grad outside it)."""
        self.vlm.fusion.compile(**options)

    def transform_args(self) -> dict:
        """The whole image, unflipped, in training and evaluation (``crop="none"``: a resize to the input size, as
        ALBEF's ``Resize((384, 384))``): a crop can cut out the object a question asks about and a flip swaps
        left and right answers (clumo.md section 7)."""
        return {"crop": "none", "hflip": 0.0}

    def record(self) -> dict:
        return {"vlm": {k: v for k, v in self.vlm.config.items()}, "answers": list(self.vlm.answers or []),
                "task_heads": self.cfg.task_heads, "vlm_checkpoint": self.vlm_record}
