"""``clumo``: Cluster-based Modality Fusion Prompt (Cai & Rostami, arXiv 2408.11742; code ``YuliangCai2022/CLUMO``).

Continual VQA on the clfast VLM (frozen open_clip towers + fusion encoder + answer head, loaded from a
``vlm_checkpoint`` and frozen except the head). Per task τ (spec ``methods/clumo.md``)::

    stage 1   (begin_task) pooled image-patch features h^v and pooled question input embeddings h^t of the task's
              training data (eval transform, ≤ kmeans_samples rows, gathered over ranks) → 3 visual and 3 textual
              keys by faiss K-means (nearest assignment; ``farthest_assignment``: the code's 50 mini-batch Lloyd
              steps of 32 samples to the farthest key, from U(−1, 1))
    train     per sample i = argmax cos(h^v, K^v_τ), j' = argmax cos(h^t, K^t_τ), idx = 3·j' + i,
              Π = [G_τ ; P_τ[idx]] (20 × D_f) as the prefix of every fusion layer's cross-attention memory;
              L = soft-target CE over the answers + λ_kd·[t > 0]·mean (z − z_prev)², z_prev from the head as it
              was at the end of the previous task, on the same fused state
    test      τ̂ = argmax_τ max_i cos(h^v, K^v_τ,i) + max_j cos(h^t, K^t_τ,j) over the seen tasks, per sample
              (``task_aware_test``: the given task, as the code), then the same selection inside τ̂

Trainable: the current task's P_τ (only the selected rows receive gradient) and G_τ, and the answer head; the
towers, the fusion encoder, every key and the other tasks' pools are frozen (old rows by ``freeze_rows``).
``score`` adds ``task_acc`` (the pool used is the sample's task). Options reproducing the released code (§7):
``farthest_assignment``, ``key_pooling: official`` (mean in stage 1, max at selection), ``train_prompts: false``
(the prompts never train), ``task_aware_test``, ``hflip``, ``answer_mode: rank``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .base import Method, MethodConfig, StepOutput, TaskContext, register_method
from .common import QueryCache, check_cache_mb, eval_image_tokens
from .cluster_prompts import KEY_POOLINGS, ClusterPromptPool, Selection, pooling_modes, stage1_keys
from .vqa_losses import PreviousHead, head_distillation, soft_target_ce

__all__ = ["CluMoConfig", "CluMo"]


@dataclass
class CluMoConfig(MethodConfig):
    # the VLM (its architecture must match vlm_checkpoint's)
    vlm_checkpoint: Optional[str] = None     # required: a vlm_finetune run (directory) or checkpoint file
    clip_model: str = "clip_tiny_synth"      # open_clip name (paper presets: "ViT-B-16")
    clip_pretrained: Any = None              # open_clip tag ("openai") or a file; None: clip_tiny_synth's weights
    clip_checkpoint: Optional[str] = None    # a local CLIP weights file (overrides clip_pretrained)
    fusion_depth: Optional[int] = None       # None: the VLM's default for the CLIP (ViT-B-16: 6 x 768 x 12)
    fusion_width: Optional[int] = None
    fusion_heads: Optional[int] = None
    mlp_ratio: float = 4.0
    image_size: Optional[int] = None         # image-tower input size (paper presets: 384)
    answer_mode: str = "classify"            # or "rank": <W h, e_a> against the text tower's answer embeddings
    # the pools (spec §2)
    n_image_keys: int = 3
    n_text_keys: int = 3
    prompt_length: int = 10
    general_length: int = 10
    # stage 1 (spec §4)
    kmeans_samples: int = 10000
    kmeans_iters: int = 50
    farthest_assignment: bool = False        # the code's mini-batch Lloyd steps with farthest assignment
    lloyd_batch: int = 32
    key_pooling: str = "mean"                # mean | max | official (mean in stage 1, max at selection)
    # training and test
    kd_weight: float = 1.0                   # λ_kd
    train_prompts: bool = True               # false: the code's prompts, never registered, never trained
    task_aware_test: bool = False            # true: the ground-truth task's pool at test (the code)
    hflip: bool = False                      # the code's horizontal flip (a flip changes left/right answers)
    image_token_cache_mb: int = 2048         # test items' image tokens kept for later evaluations (0: off)

    def __post_init__(self):
        super().__post_init__()
        if self.key_pooling not in KEY_POOLINGS:
            raise ValueError(f"clumo: key_pooling must be one of {KEY_POOLINGS}, got {self.key_pooling!r}")
        if self.answer_mode not in ("classify", "rank"):
            raise ValueError(f"clumo: answer_mode must be 'classify' or 'rank', got {self.answer_mode!r}")
        for key in ("n_image_keys", "n_text_keys", "prompt_length", "kmeans_samples", "kmeans_iters", "lloyd_batch"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"clumo: {key} must be an int >= 1, got {v!r}")
        if isinstance(self.general_length, bool) or not isinstance(self.general_length, int) or self.general_length < 0:
            raise ValueError(f"clumo: general_length must be an int >= 0, got {self.general_length!r}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"clumo: mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        check_cache_mb("clumo", self.image_token_cache_mb)
        if self.kd_weight < 0:
            raise ValueError(f"clumo: kd_weight must be >= 0, got {self.kd_weight!r}")
        for key in ("fusion_depth", "fusion_width", "fusion_heads", "image_size"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"clumo: {key} must be a positive int or null, got {v!r}")


@register_method("clumo")
class CluMo(Method):
    Config = CluMoConfig
    supports = ("vqa",)
    score_names = ("task_acc",)

    @classmethod
    def build_backbone(cls, run_cfg: Any):
        """The VLM of ``method_args`` (CLIP, fusion shape, image_size, answer_mode) without its head; ``__init__``
        builds the head for the run's answers and loads ``vlm_checkpoint`` (required) into fusion and head."""
        from ..backbones.vlm import create_vlm

        cfg = run_cfg.method_config()
        if not cfg.vlm_checkpoint:
            raise ValueError("clumo: method_args.vlm_checkpoint is required: a vlm_finetune run directory or "
                             "checkpoint file whose fusion encoder and answer head were trained on VQA data disjoint "
                             "from the continual tasks (e.g. `clfast train --method vlm_finetune --dataset vqav2`, "
                             "or synth-vqa-pretrain for synth-vqa)")
        return create_vlm(cfg.clip_model, pretrained=cfg.clip_pretrained, checkpoint_path=cfg.clip_checkpoint,
                          depth=cfg.fusion_depth, width=cfg.fusion_width, heads=cfg.fusion_heads,
                          mlp_ratio=cfg.mlp_ratio, image_size=cfg.image_size, answer_mode=cfg.answer_mode)

    def __init__(self, backbone, num_classes, num_tasks, cfg: CluMoConfig):
        super().__init__(backbone, num_classes, num_tasks, cfg)
        from ..backbones.vlm import VLM, load_vlm_checkpoint

        if not isinstance(backbone, VLM):
            raise TypeError(f"clumo: the backbone must be a clfast VLM (CluMo.build_backbone or "
                            f"clfast.backbones.create_vlm), got {type(backbone).__name__}")
        if backbone.head is None:
            backbone.build_head(self.num_classes)
        elif backbone.num_answers != self.num_classes:
            raise ValueError(f"clumo: the VLM's head scores {backbone.num_answers} answers, the dataset has "
                             f"{self.num_classes}")
        # path, sha256 and source of the trained fusion encoder and head (shapes, settings, vocabulary checked)
        self.vlm_record = load_vlm_checkpoint(backbone, cfg.vlm_checkpoint) if cfg.vlm_checkpoint else None
        self.tokenizer = backbone.tokenizer       # the engine tokenizes each split's questions with it, once
        towers = backbone.towers
        self.pool = ClusterPromptPool(num_tasks, int(towers.image_width), int(towers.text_width), int(backbone.width),
                                      n_image_keys=cfg.n_image_keys, n_text_keys=cfg.n_text_keys,
                                      length=cfg.prompt_length, general_length=cfg.general_length)
        self.prev_head = PreviousHead(backbone.head)
        self.stage1_pooling, self.select_pooling = pooling_modes(cfg.key_pooling)
        # the task being trained, a Python int (begin_task sets it, also on resume) read by the frozen-row hooks
        self.current_task = 0
        if cfg.train_prompts:
            for p in (self.pool.prompts, self.pool.general):
                self.freeze_rows(p, stop=lambda: self.current_task)
        self._set_trainable()
        self._last_eval: Optional[tuple] = None
        self.token_cache = QueryCache(dtype=None, max_bytes=cfg.image_token_cache_mb << 20)

    @property
    def vlm(self):
        return self.backbone

    def _set_trainable(self) -> None:
        """Only the answer head and (``train_prompts``) the pools require grad; ``freeze_rows`` keeps the other
        tasks' rows of the pools fixed, and only the selected rows of P_τ receive gradient."""
        for p in self.parameters():
            p.requires_grad_(False)
        for p in self.vlm.head.parameters():
            p.requires_grad_(True)
        if self.cfg.train_prompts:
            self.pool.prompts.requires_grad_(True)
            self.pool.general.requires_grad_(True)

    # features and selection ------------------------------------------------------------------------
    def key_features(self, images: Tensor, tokens: Tensor, mode: str, image_tokens: Optional[Tensor] = None
                     ) -> tuple[Tensor, Tensor]:
        """(h^v (B, D_v), h^t (B, D_w)) float32: ``pool_tokens`` of the image tower's patch tokens and of the text
        tower's input embeddings (token + position) over the non-padding tokens (spec §2 "Key embeddings")."""
        from ..backbones.vlm import pool_tokens

        towers = self.vlm.towers
        with torch.no_grad():
            img = towers.image_tokens(images) if image_tokens is None else image_tokens
            emb = towers.text_input_embeddings(tokens)
            mask, _ = towers.padding_mask(tokens)
            return pool_tokens(img[:, 1:].float(), None, mode), pool_tokens(emb.float(), mask, mode)

    def select(self, batch: dict, ctx: TaskContext, given: Optional[Tensor], encoded) -> Selection:
        h_v, h_t = self.key_features(batch["image"], batch["question"], self.select_pooling, encoded.image)
        return self.pool.select(h_v, h_t, ctx.task + 1, given)

    def answer_logits(self, encoded, sel: Selection) -> tuple[Tensor, Tensor]:
        """(fused state h (B, D_f), answer logits z (B, n_A)) with Π = [G_τ ; P_τ[idx]] in every fusion layer."""
        h = self.vlm.fuse(encoded, prefix=self.pool.prompt(sel.task, sel.index))
        return h, self.vlm.head(h)

    # stage 1 ---------------------------------------------------------------------------------------
    def begin_task(self, ctx: TaskContext) -> None:
        self.current_task = int(ctx.task)
        if self.vlm.answers is None and ctx.class_names:      # checked against a loaded vocabulary
            if len(ctx.class_names) != self.num_classes:
                raise ValueError(f"clumo: the scenario names {len(ctx.class_names)} answers for {self.num_classes} "
                                 f"labels")
            self.vlm.set_answers(ctx.class_names)
        if self.vlm.answer_mode == "rank" and bool(self.prev_head.taken) and self.vlm.answers is not None:
            # the copy's answer embeddings are not saved (they follow from the towers and the answers)
            self.prev_head.head.set_answer_embeddings(self.vlm.head.answer_embeddings)
        if not bool(self.pool.fitted[ctx.task]):     # a run resumed inside the task has its keys already
            if ctx.task_loader is None:
                raise ValueError("clumo: begin_task needs ctx.task_loader for stage 1 (the task's K-means keys)")
            self.fit_task_keys(ctx.task_loader(augment=False), ctx)
        self._set_trainable()

    def begin_stage(self, stage, ctx: TaskContext) -> None:
        self._set_trainable()

    @torch.no_grad()
    def fit_task_keys(self, loader, ctx: TaskContext) -> None:
        """Stage 1 (spec §4): pooled features (the stage-1 pooling) of the task's training data, then
        :func:`stage1_keys` (gathered over ranks, capped at ``kmeans_samples``, K-means or the farthest Lloyd steps)."""
        cfg, dev = self.cfg, ctx.device
        feats, index = [], []
        with ctx.autocast():
            for batch in loader:
                h_v, h_t = self.key_features(batch["image"].to(dev), batch["question"].to(dev), self.stage1_pooling)
                feats.append(torch.cat([h_v, h_t], 1))
                index.append(batch["index"].to(dev) if "index" in batch else
                             torch.full((h_v.shape[0],), -1, dtype=torch.long, device=dev))
        h = torch.cat(feats)
        D_v = self.pool.keys_v.shape[-1]
        kv, kt = stage1_keys(h[:, :D_v], h[:, D_v:], torch.cat(index), ctx, n_image_keys=cfg.n_image_keys,
                             n_text_keys=cfg.n_text_keys, max_samples=cfg.kmeans_samples, n_iter=cfg.kmeans_iters,
                             farthest=cfg.farthest_assignment, batch_size=cfg.lloyd_batch)
        self.pool.set_keys(ctx.task, kv, kt)

    # training --------------------------------------------------------------------------------------
    def training_step(self, batch: dict, ctx: TaskContext) -> StepOutput:
        enc = self.vlm.encode(batch["image"], batch["question"])
        task = torch.full((batch["image"].shape[0],), ctx.task, dtype=torch.long, device=batch["image"].device)
        sel = self.select(batch, ctx, task, enc)
        h, z = self.answer_logits(enc, sel)
        ce = soft_target_ce(z, batch["answer_scores"])
        loss, logs = ce, {"ce": ce.detach()}
        if ctx.task > 0 and self.cfg.kd_weight > 0:
            kd = head_distillation(z, self.prev_head(h))
            loss = loss + self.cfg.kd_weight * kd
            logs["kd"] = kd.detach()
        return StepOutput(loss, logs)

    def end_task(self, ctx: TaskContext, loader) -> None:
        self.prev_head.take(self.vlm.head)          # the code's update_prev_cls

    # evaluation ------------------------------------------------------------------------------------
    def predict(self, batch: dict, ctx: TaskContext) -> Tensor:
        enc = self.vlm.encode(batch["image"], batch["question"],
                              image_tokens=eval_image_tokens(self.token_cache, self.vlm, batch, ctx))
        given = batch["task"].to(batch["image"].device).long() if self.cfg.task_aware_test else None
        sel = self.select(batch, ctx, given, enc)
        _, z = self.answer_logits(enc, sel)
        self._last_eval = (batch["image"], sel.task)
        return z

    def score(self, batch: dict, logits: Tensor, ctx: TaskContext) -> dict[str, Tensor]:
        """Per sample: ``credit`` (the engine's VQA credit of the predicted answer) and ``task_acc`` (the pool used
        is the sample's own task: always 1 with ``task_aware_test``)."""
        last = self._last_eval
        if last is not None and last[0] is batch["image"]:
            task = last[1]
        else:
            enc = self.vlm.encode(batch["image"], batch["question"])
            given = batch["task"].long() if self.cfg.task_aware_test else None
            task = self.select(batch, ctx, given, enc).task
        self._last_eval = None
        credit = super().score(batch, logits, ctx)
        return {"credit": credit, "task_acc": (task == batch["task"].to(task.device)).float()}

    # optimisation and the run record ---------------------------------------------------------------
    def param_groups(self, stage) -> list[dict]:
        """The engine's groups (``lr_scales``), each split in two: AdamW's weight decay on the head's weight
        matrices only, not on biases, LayerNorms (spec §4) or the prompt pools (so rows a step did not select stay
        bitwise as they were)."""
        no_decay = {id(p) for n, p in self.named_parameters() if n.startswith("pool.") or p.dim() < 2}
        out = []
        for g in super().param_groups(stage):
            rest = {k: v for k, v in g.items() if k != "params"}
            decay = [p for p in g["params"] if id(p) not in no_decay]
            plain = [p for p in g["params"] if id(p) in no_decay]
            if decay:
                out.append({"params": decay, **rest})
            if plain:
                out.append({"params": plain, **rest, "weight_decay": 0.0})
        return out

    def transform_args(self) -> dict:
        """The whole image resized to the towers' size in training and test (``crop: none``; crops cut objects out
        of position questions), no flip unless ``hflip`` (the code's; a flip swaps left and right answers)."""
        return {"crop": "none", "hflip": 0.5 if self.cfg.hflip else 0.0}

    def compile_for_training(self, **options) -> None:
        self.vlm.fusion.compile(**options)

    def record(self) -> dict:
        cfg = self.cfg
        return {"vlm_checkpoint": self.vlm_record, "vlm": dict(self.vlm.config),
                "task_inference": "given task (task_aware_test)" if cfg.task_aware_test else "keys, per sample",
                "key_pooling": cfg.key_pooling, "farthest_assignment": cfg.farthest_assignment,
                "train_prompts": cfg.train_prompts, "hflip": cfg.hflip, "answer_mode": cfg.answer_mode,
                "kd_weight": cfg.kd_weight, "keys_fitted": int(self.pool.fitted.sum()),
                "prompt_weight_decay": False, "unfair_evaluation": cfg.task_aware_test,
                "unfair_evaluation_reasons": {"task_aware_test": "each test sample uses its true task's pool (oracle "
                                              "task identity, the released code)"} if cfg.task_aware_test else {}}
