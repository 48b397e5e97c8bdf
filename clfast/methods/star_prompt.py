"""``star_prompt``: Semantic Residual Prompts (Menabue et al., ECCV 2024; code ``aimagelab/mammoth`` ``starprompt``).

Two levels on two frozen encoders, a CLIP (level 1, the query) and a ViT (level 2, the classifier). Per task ``t``
the stages run in mammoth's order (spec ``methods/star_prompt.md``)::

    stage1   level 1: a context vector v_c per class in the CLIP text encoder, "X {classname}." with X's token
             embedding replaced by v_c (ClassTextEncoder); key k_c = the normalised text feature. Logits
             exp(τ)·<q/|q|, k_c> for the CLIP image feature q, CE over the current classes (past ones masked)
             + λ1·mean_{c∈cur, c'∈past}(v_c·v_c')². SGD, no momentum: past keys never change, so they are
             computed once (after the task that trains them) and cached in ``keys``.
    align1   a diagonal MoG (K=5) per current class on its CLIP image features (float64 EM, ClassMixtures);
             256 L2-normalised samples per seen class; plain CE over every seen class; only current v_c move.
    stage2   level 2: in every block l a residual value prompt π_l = s·P_{l,c*}, with the class chosen by the
             modulated cosine s_{l,c} = 5·cos(q ⊙ softmax(A_{l,c}), k_c) over the seen classes (class_select:
             two GEMMs, the official straight-through gradient or the strict one). Residual mode adds π_l to
             every value vector of block l, which (attention rows sum to 1) is exactly the per-sample bias
             π_l·W_Oᵀ after the out-projection: the backbone's ``attn_out`` site adds that, and the sequence
             does not grow. Concat mode: π_l (10·D) splits into K and V prefixes of 5 tokens (prefix_attention).
             CE over the current classes + λ2·L_orth2 (t > 0); Adam with mammoth's per-epoch cosine
             lr·cos(99π·e / (200(K−1))), re-created every task.
    align2   a MoG per current class on the prompted final-norm [CLS] features (eval mode, ``mc_passes`` augmented
             passes; every task). For t > 0 a copy of the head (``aligned_head``) is trained on 256 samples per
             seen class with the logit-normalised CE z / (0.1·(|z| + 1e-7)); evaluation after task t uses it, and
             the next task trains on from the un-aligned ``head`` (mammoth's ``backup`` and ``recall``).

Options that reproduce the released code: ``stage2_schedule: constant`` (mammoth HEAD's un-stepped scheduler),
``gmm_torch_density`` (the √var E-step), ``clip_fp16`` (CLIP's weights in fp16). ``score`` reports, per test
image, the share of blocks whose selected class is the true one (``eval_select_acc``) and whether level 1's own
prediction argmax_c <q, k_c> over the seen classes is right (``eval_stage1_acc``).

Deviations from the code, each a decision of the spec: CLIP sees the run's transforms re-normalised with its own
mean/std (resized to its input size when that differs), in stage 1 and evaluation the deterministic one, in
stage 2 the same augmented image as the ViT; stage-1 features are computed once, not repeated per MC pass; the
MoG initialisation is FAISS's K-means (50 restarts) on min-max-normalised features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import class_select
from .base import Method, MethodConfig, OptimConfig, ScheduleConfig, Stage, StepOutput, TaskContext, register_method
from .common import QueryCache
from .mog import ClassMixtures

__all__ = ["StarPromptConfig", "StarPrompt", "StarPromptStage1", "orth_loss_stage1", "orth_loss_stage2",
           "logit_norm_ce", "stage2_lr_factor"]

PROMPT_MODES = ("residual", "concat")


@dataclass
class StarPromptConfig(MethodConfig):
    # level 1: the CLIP and its class-wise context vectors
    clip_model: str = "clip_tiny_synth"      # open_clip name (paper: "ViT-L-14")
    clip_pretrained: Optional[str] = None    # open_clip tag ("openai") or file; None: the shipped weights
    clip_checkpoint: Optional[str] = None    # a local weights file (overrides clip_pretrained)
    clip_fp16: bool = False                  # the code's fp16 CLIP weights (default: fp32 under the run's autocast)
    template: str = "X {}."                  # the text of a class; "X" is replaced by the class's context vector
    placeholder: str = "X"
    class_name_map: dict = field(default_factory=dict)   # class name -> text the CLIP tokenizer knows
    stage1_epochs: float = 20
    stage1_lr: float = 0.002                 # SGD, no momentum, no weight decay
    stage1_batch_size: int = 128
    lambda_ortho1: float = 10.0              # λ1
    # the MoG replays
    mog_components: int = 5
    mog_restarts: int = 50                   # K-means restarts of the initialisation
    gmm_torch_density: bool = False          # the code's E-step (each component evaluated with variance √var)
    align_samples: int = 256                 # samples per seen class
    align_batch_size: int = 128
    align1_epochs: int = 10                  # E1
    align1_lr: float = 0.05
    align1_em_iters: int = 200
    # level 2: prompts in the ViT
    prompt_mode: str = "residual"            # "residual" (value prompt, as a bias) or "concat" (K/V prefixes)
    prefix_length: int = 5                   # concat mode: tokens per K and per V prefix
    selection_scale: float = 5.0
    confidence_modulation: bool = True       # π = s·P (false: π = P, and the modulators get no gradient)
    strict_selection_grad: bool = False      # the clean argmax gradient (default: the code's straight-through one)
    lambda_ortho2: float = 2.0               # λ2
    stage2_schedule: str = "cosine"          # "cosine" stepped per epoch, or "constant" (mammoth HEAD's regression)
    align2: bool = True                      # the stage-2 head alignment
    align2_epochs: int = 10                  # E2; task t aligns for E2 + align2_epoch_step·t epochs
    align2_epoch_step: int = 5
    align2_lr: float = 1e-3
    align2_em_iters: int = 500
    mc_passes: int = 1                       # augmented feature passes for the stage-2 MoG
    cache_query: bool = True                 # cache CLIP features per image when the transform is deterministic
    mog_seed: int = 0                        # K-means seed (mixed with the class index)

    def __post_init__(self):
        super().__post_init__()
        if self.prompt_mode not in PROMPT_MODES:
            raise ValueError(f"star_prompt: prompt_mode must be one of {PROMPT_MODES}, got {self.prompt_mode!r}")
        if self.stage2_schedule not in ("cosine", "constant"):
            raise ValueError(f"star_prompt: stage2_schedule must be 'cosine' or 'constant', got {self.stage2_schedule!r}")
        for key in ("stage1_batch_size", "align_samples", "align_batch_size", "mog_components", "mog_restarts",
                    "align1_em_iters", "align2_em_iters", "mc_passes", "prefix_length"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"star_prompt: {key} must be an int >= 1, got {v!r}")
        for key in ("align1_epochs", "align2_epochs", "align2_epoch_step"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"star_prompt: {key} must be an int >= 0, got {v!r}")
        for key in ("stage1_epochs", "stage1_lr", "align1_lr", "align2_lr", "selection_scale"):
            if not float(getattr(self, key)) > 0:
                raise ValueError(f"star_prompt: {key} must be > 0, got {getattr(self, key)!r}")
        for key in ("lambda_ortho1", "lambda_ortho2"):
            if float(getattr(self, key)) < 0:
                raise ValueError(f"star_prompt: {key} must be >= 0, got {getattr(self, key)!r}")
        if "{}" not in self.template or self.placeholder not in self.template.split("{}")[0]:
            raise ValueError(f"star_prompt: template must hold the placeholder {self.placeholder!r} before '{{}}' "
                             f"(the class name), got {self.template!r}")
        if not isinstance(self.class_name_map, dict):
            raise TypeError(f"star_prompt: class_name_map must be a mapping name -> text, got "
                            f"{type(self.class_name_map).__name__}")


# --------------------------------------------------------------------------------------------------
# The losses and the schedule, as functions (tested on their own)


def orth_loss_stage1(context: Tensor, first: int, stop: int) -> Tensor:
    """``mean_{c∈[first,stop), c'<first} (v_c·v_c')²`` (past rows detached); 0 when there is no past class."""
    if first == 0:
        return context.new_zeros(())
    cur, past = context[first:stop].flatten(1), context[:first].detach().flatten(1)
    return (cur @ past.T).pow(2).mean()


def orth_loss_stage2(values: Tensor, first: int, stop: int) -> Tensor:
    """``(1/L) Σ_l [ mean_{c∈cur} (|P_{l,c}|² − 1)² + mean_{c∈cur, c'∈past} <P_{l,c}, P_{l,c'}>² ]`` for values
    (L, C, E), past rows detached; 0 at the first task (no past class: the code skips the whole term)."""
    if first == 0:
        return values.new_zeros(())
    cur, past = values[:, first:stop], values[:, :first].detach()
    norm = (cur.pow(2).sum(-1) - 1).pow(2).mean(-1)                       # (L,)
    cross = torch.bmm(cur, past.transpose(1, 2)).pow(2).flatten(1).mean(-1)
    return (norm + cross).mean()


def logit_norm_ce(logits: Tensor, labels: Tensor, temperature: float = 0.1, eps: float = 1e-7) -> Tensor:
    """The stage-2 alignment's CE of ``z / (temperature·(|z|₂ + eps))`` (LogitNorm)."""
    norms = logits.norm(p=2, dim=-1, keepdim=True) + eps
    return F.cross_entropy(logits / (norms * temperature), labels)


def stage2_lr_factor(epoch: float, epochs: int) -> float:
    """mammoth's stage-2 cosine ``cos(99π·e / (200(K−1)))`` at epoch ``e`` of ``K`` (1.0 for K = 1)."""
    if epochs <= 1:
        return 1.0
    return math.cos(99.0 * math.pi * epoch / (200.0 * (epochs - 1)))


def _orthogonal(*shape: int, generator: torch.Generator) -> Tensor:
    """``nn.init.orthogonal_`` of a fresh ``shape`` tensor from ``generator`` (rows of the (shape[0], rest)
    matrix orthonormal while shape[0] <= rest)."""
    return nn.init.orthogonal_(torch.empty(*shape), generator=generator)


# --------------------------------------------------------------------------------------------------
# The method


@register_method("star_prompt")
class StarPrompt(Method):
    """STAR-Prompt (see the module docstring). Parameters: ``context`` (C, D_w) level 1; ``modulators``
    (L, C, D_c), ``values`` (L, C, E) with E = D (residual) or 2·prefix_length·D (concat), and ``head`` level 2."""

    Config = StarPromptConfig
    supports = ("class-incremental",)
    score_names = ("select_acc", "stage1_acc")

    def __init__(self, backbone, num_classes, num_tasks, cfg: StarPromptConfig):
        super().__init__(backbone, num_classes, num_tasks, cfg)
        for attr in ("num_layers", "embed_dim", "num_heads", "head_dim", "prompt_layers"):
            if not hasattr(backbone, attr):
                raise TypeError(f"star_prompt: the backbone must be a ViTBackbone (it lacks .{attr})")
        from ..backbones import create_clip

        clip, _, tokenizer, weights = create_clip(cfg.clip_model, pretrained=cfg.clip_pretrained,
                                                  checkpoint_path=cfg.clip_checkpoint)
        clip.requires_grad_(False).eval()
        if cfg.clip_fp16:
            clip.half()
        self.clip = clip
        self.clip_tokenizer, self.clip_weights = tokenizer, weights
        import open_clip

        pre = open_clip.get_model_preprocess_cfg(clip)
        size = pre.get("size", 224)
        self.clip_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        self.register_buffer("clip_mean", torch.tensor(pre.get("mean", open_clip.OPENAI_DATASET_MEAN),
                                                        dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(pre.get("std", open_clip.OPENAI_DATASET_STD),
                                                       dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        # the ClassTextEncoder, built once the class names are known (begin_task); kept out of the module tree, as
        # it holds nothing to save (its tokens follow from the class names, its weights are CLIP's)
        self._text_encoder: Optional[nn.Module] = None
        from ..backbones.clip_text import text_tower

        width = int(text_tower(clip).token_embedding.embedding_dim)
        clip_dim = getattr(clip.visual, "output_dim", None)
        if clip_dim is None:   # an image tower that does not say (a timm trunk): one forward tells
            with torch.no_grad():
                clip_dim = clip.encode_image(torch.zeros(1, 3, *self.clip_size, dtype=next(clip.parameters()).dtype))
            clip_dim = clip_dim.shape[-1]
        clip_dim = int(clip_dim)
        C, L, D = self.num_classes, int(backbone.num_layers), int(backbone.embed_dim)
        if cfg.prompt_mode == "concat":
            missing = [i for i in range(L) if i not in backbone.prompt_layers]
            if missing:
                raise ValueError(f"star_prompt: prompt_mode 'concat' prefixes every block, but blocks {missing} are "
                                 f"not promptable (prompt_layers={backbone.prompt_layers})")
        self.num_layers, self.embed_dim, self.clip_dim, self.text_width = L, D, clip_dim, width
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        self.context = nn.Parameter(torch.randn(C, width, generator=gen) * 0.02)
        self.modulators = nn.Parameter(torch.stack([_orthogonal(C, clip_dim, generator=gen) for _ in range(L)]))
        if cfg.prompt_mode == "residual":   # slice [:, 0] of a (C, 3, D) orthogonal tensor: rows not unit-norm
            values = [_orthogonal(C, 3, D, generator=gen)[:, 0] for _ in range(L)]
        else:
            values = [_orthogonal(C, 2 * cfg.prefix_length, D, generator=gen).flatten(1) for _ in range(L)]
        self.values = nn.Parameter(torch.stack(values).contiguous())
        self.head = nn.Linear(D, C)
        # the aligned copy of the head (stage-2 alignment), used by evaluation after the task it was aligned in;
        # training goes on from ``head`` (mammoth's backup and recall)
        self.aligned_head = nn.Linear(D, C)
        self.aligned_head.load_state_dict(self.head.state_dict())
        # level-1 keys of the classes whose stage 1 is done (written once per task, then fixed)
        self.register_buffer("keys", torch.zeros(C, clip_dim))
        self.register_buffer("keys_ready", torch.zeros(C, dtype=torch.bool))
        self.register_buffer("aligned_task", torch.full((), -1, dtype=torch.long))
        mog = dict(n_components=cfg.mog_components, n_init_redo=cfg.mog_restarts,
                   gmm_torch_density=cfg.gmm_torch_density, seed=cfg.mog_seed)
        self.mog_clip = ClassMixtures(C, clip_dim, max_iter=cfg.align1_em_iters, **mog)
        self.mog_vit = ClassMixtures(C, D, max_iter=cfg.align2_em_iters, **mog)
        self.query_cache = QueryCache()
        self.first_class, self.seen = 0, 0
        self.freeze_rows(self.context, stop=lambda: self.first_class)
        for p in (self.modulators, self.values):
            self.freeze_rows(p, stop=lambda: self.first_class, dim=1)
        self._last_eval: Optional[tuple] = None

    # level 1 ---------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "StarPrompt":
        super().train(mode)
        self.clip.eval()     # frozen: never dropout / batch statistics
        return self

    def build_text_encoder(self, class_names) -> nn.Module:
        """The :class:`~clfast.backbones.ClassTextEncoder` for ``class_names`` (label order)."""
        from ..backbones.clip_text import ClassTextEncoder

        if not class_names or len(class_names) != self.num_classes:
            raise ValueError(f"star_prompt: level 1 needs the names of all {self.num_classes} classes; the dataset "
                             f"gave {len(class_names or ())}")
        enc = ClassTextEncoder(self.clip, self.clip_tokenizer, list(class_names), template=self.cfg.template,
                               placeholder=self.cfg.placeholder, name_map=self.cfg.class_name_map or None)
        return enc.to(self.keys.device)

    def class_keys(self, first: int, stop: int) -> Tensor:
        """Level-1 keys of classes ``[first, stop)`` from their context vectors (differentiable), (n, D_c) fp32."""
        if self._text_encoder is None:
            raise RuntimeError("star_prompt: the class keys need the class names (begin_task builds the text encoder)")
        classes = torch.arange(first, stop, device=self.context.device)
        return self._text_encoder(self.context[first:stop], classes).float()

    def clip_images(self, images: Tensor) -> Tensor:
        """The run's [0, 1] images resized to CLIP's input and normalised with CLIP's mean/std."""
        if tuple(images.shape[-2:]) != self.clip_size:
            images = F.interpolate(images.float(), size=self.clip_size, mode="bicubic", align_corners=False)
        x = (images - self.clip_mean) / self.clip_std
        return x.to(next(self.clip.parameters()).dtype)

    def clip_query(self, batch: dict, ctx: TaskContext) -> Tensor:
        """CLIP image features (B, D_c), fp32, no gradient, computed under the run's autocast; cached per image
        when ``ctx`` allows."""
        images = batch["image"]

        def compute(mask: Optional[Tensor] = None) -> Tensor:
            # always under the run's autocast (also outside a step), so a feature is the same whoever computes it
            x = images if mask is None else images[mask.to(images.device)]
            with torch.no_grad(), ctx.autocast():
                return self.clip.encode_image(self.clip_images(x)).float()

        if self.cfg.cache_query and getattr(ctx, "cacheable", False) and "index" in batch:
            return self.query_cache(ctx.split, batch["index"], compute)
        return compute()

    def stage1_logits(self, q: Tensor, keys: Tensor) -> Tensor:
        """``exp(τ)·<q/|q|, k_c>`` (B, n) for keys (n, D_c) (unit rows)."""
        return self.logit_scale() * F.normalize(q.float(), dim=-1) @ keys.float().T

    def logit_scale(self) -> Tensor:
        return self.clip.logit_scale.detach().float().exp()

    # level 2 ---------------------------------------------------------------------------------------
    def select(self, q: Tensor, stop: int, first: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """Per block: prompts (L, B, E) and chosen classes (L, B) among classes ``[0, stop)``; rows before
        ``first`` (past classes) enter detached."""
        A, P = self.modulators[:, :stop], self.values[:, :stop]
        if first:
            A = torch.cat([A[:, :first].detach(), A[:, first:]], 1)
            P = torch.cat([P[:, :first].detach(), P[:, first:]], 1)
        prompts, idx, _ = class_select(q.float(), A, self.keys[:stop], P, scale=self.cfg.selection_scale,
                                       confidence=self.cfg.confidence_modulation,
                                       strict_grad=self.cfg.strict_selection_grad)
        return prompts, idx

    def prompted_features(self, images: Tensor, prompts: Tensor) -> Tensor:
        """Final-norm [CLS] features (B, D) of the ViT with the per-block prompts (L, B, E)."""
        bb = self.backbone
        if self.cfg.prompt_mode == "residual":
            blocks = bb.vit.blocks

            def attn_out(layer: int, a: Tensor) -> Tensor:   # V + π  ==  SDPA + π  ->  + π·W_Oᵀ after the proj
                w = blocks[layer].attn.proj.weight
                return a + (prompts[layer].to(a.dtype) @ w.to(a.dtype).T)[:, None, :]

            return bb.features(images, site_fns={"attn_out": attn_out})
        B, Lp, D = images.shape[0], self.cfg.prefix_length, self.embed_dim
        pre = prompts.reshape(self.num_layers, B, 2, Lp, D)
        return bb.features(images, prefixes={l: (pre[l, :, 0], pre[l, :, 1]) for l in range(self.num_layers)})

    def level2_logits(self, batch: dict, ctx: TaskContext, q: Tensor, train: bool) -> tuple[Tensor, Tensor]:
        stop = ctx.seen_classes
        prompts, idx = self.select(q, stop, first=ctx.class_range[0] if train else None)
        head = self.head if train else self.eval_head(ctx)
        return head(self.prompted_features(batch["image"], prompts)), idx

    # stages ----------------------------------------------------------------------------------------
    def stages(self, ctx: TaskContext) -> list[Stage]:
        cfg = self.cfg
        sgd = dict(name="sgd", momentum=0.0, weight_decay=0.0)
        n_align = math.ceil(self.cfg.align_samples * ctx.seen_classes / cfg.align_batch_size)
        out = [Stage(name="stage1", epochs=cfg.stage1_epochs, batch_size=cfg.stage1_batch_size, params="text",
                     optimizer=OptimConfig(lr=cfg.stage1_lr, **sgd), schedule=ScheduleConfig(), augment=False,
                     persistent=False)]
        if cfg.align1_epochs:
            out.append(Stage(name="align1", data="method", epochs=cfg.align1_epochs, batch_size=cfg.align_batch_size,
                             params="text", optimizer=OptimConfig(lr=cfg.align1_lr, **sgd), schedule=ScheduleConfig(),
                             persistent=False, steps_per_epoch=n_align))
        out.append(Stage(name="stage2", params="prompts", schedule=ScheduleConfig(per="epoch"), persistent=False))
        epochs2 = cfg.align2_epochs + cfg.align2_epoch_step * ctx.task
        if cfg.align2 and ctx.task > 0 and epochs2 > 0:
            out.append(Stage(name="align2", data="method", epochs=epochs2, batch_size=cfg.align_batch_size,
                             params="head", optimizer=OptimConfig(lr=cfg.align2_lr, **sgd), schedule=ScheduleConfig(),
                             persistent=False, steps_per_epoch=n_align))
        return out

    def lr_factor(self, stage: Stage, pos: float, total: float) -> Optional[float]:
        if stage.name == "stage2":
            return 1.0 if self.cfg.stage2_schedule == "constant" else stage2_lr_factor(pos, int(total))
        return None

    def param_groups(self, stage: Stage) -> list[dict]:
        names = {"text": ["context"], "prompts": ["modulators", "values", "head"], "head": ["aligned_head"]}[stage.params]
        params = dict(self.named_parameters())
        return [{"params": [p for n, p in params.items() if n.split(".")[0] in names]}]

    def begin_task(self, ctx: TaskContext) -> None:
        if self._text_encoder is None:
            object.__setattr__(self, "_text_encoder", self.build_text_encoder(ctx.class_names))
        self.first_class, self.seen = int(ctx.class_range[0]), int(ctx.seen_classes)

    def begin_stage(self, stage: Stage, ctx: TaskContext) -> None:
        trains = {"stage1": ("context",), "align1": ("context",), "stage2": ("modulators", "values", "head"),
                  "align2": ("aligned_head",)}[stage.name]
        for name, p in self.named_parameters():     # CLIP's and the ViT's too: neither is in any stage's list
            p.requires_grad_(name.split(".")[0] in trains)
        if stage.name == "align1":
            self.fit_clip_mixtures(ctx)
        elif stage.name == "stage2":
            self.write_keys(ctx)
        elif stage.name == "align2":
            self.start_alignment(ctx.task)

    def end_stage(self, stage: Stage, ctx: TaskContext) -> None:
        if stage.name == "stage1" and not self.cfg.align1_epochs:
            self.fit_clip_mixtures(ctx)
        if stage.name == "stage2":
            self.fit_vit_mixtures(ctx)

    # the statistics passes -------------------------------------------------------------------------
    def _gather(self, ctx: TaskContext, feats: list[Tensor], labels: list[Tensor]) -> tuple[Tensor, Tensor]:
        x, y = torch.cat(feats), torch.cat(labels)
        if ctx.distributed:
            x, y = ctx.all_gather(x), ctx.all_gather(y)
        return x, y

    @torch.no_grad()
    def fit_clip_mixtures(self, ctx: TaskContext) -> None:
        """MoG per current class on the CLIP features of all its training images (deterministic transform)."""
        feats, labels = [], []
        sctx = ctx.replace(split="train", cacheable=True)
        for batch in ctx.task_loader(augment=False):
            batch = {k: v.to(self.keys.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            feats.append(self.clip_query(batch, sctx).double())
            labels.append(batch["label"])
        x, y = self._gather(ctx, feats, labels)
        self.mog_clip.fit(x, y, list(range(*ctx.class_range)))

    @torch.no_grad()
    def fit_vit_mixtures(self, ctx: TaskContext) -> None:
        """MoG per current class on the prompted [CLS] features, eval mode, ``mc_passes`` augmented passes."""
        was = self.training
        self.eval()
        feats, labels = [], []
        loader = ctx.task_loader(augment=True)
        with ctx.autocast():
            for _ in range(self.cfg.mc_passes):
                for batch in loader:
                    images = batch["image"].to(self.keys.device)
                    q = self.clip_query({"image": images}, ctx.replace(cacheable=False))
                    prompts, _ = self.select(q, ctx.seen_classes)
                    feats.append(self.prompted_features(images, prompts).double())
                    labels.append(batch["label"].to(self.keys.device))
        self.train(was)
        x, y = self._gather(ctx, feats, labels)
        self.mog_vit.fit(x, y, list(range(*ctx.class_range)))

    @torch.no_grad()
    def write_keys(self, ctx: TaskContext) -> None:
        """Level-1 keys of the current classes, once their stage 1 (and alignment) is done; fixed from then on
        (past context vectors never move), under the run's autocast like the training steps."""
        first, stop = ctx.class_range
        with ctx.autocast():
            self.keys[first:stop] = self.class_keys(first, stop)
        self.keys_ready[first:stop] = True

    @torch.no_grad()
    def start_alignment(self, task: int) -> None:
        """The aligned head starts from the trained one (mammoth's ``backup``: ``head`` itself is what the next
        task trains on, its ``recall``); evaluation after task ``task`` reads the aligned one."""
        self.aligned_head.load_state_dict(self.head.state_dict())
        self.aligned_task.fill_(task)

    def eval_head(self, ctx: TaskContext) -> nn.Linear:
        """The head evaluation uses: the aligned copy after the task it was aligned in, else the trained one."""
        return self.aligned_head if int(self.aligned_task) == ctx.task else self.head

    def stage_batches(self, stage: Stage, ctx: TaskContext) -> Iterator[dict]:
        """An epoch of MoG samples: ``align_samples`` per seen class, shuffled, in batches of the stage's size."""
        mog = self.mog_clip if stage.name == "align1" else self.mog_vit
        gen = ctx.generator()
        x, y = mog.sample(list(range(ctx.seen_classes)), self.cfg.align_samples, gen)
        order = torch.randperm(x.shape[0], generator=gen).to(x.device)
        x, y = x[order], y[order]
        bs = ctx.batch_size or self.cfg.align_batch_size
        for i in range(0, x.shape[0], bs):
            yield {"feature": x[i:i + bs], "label": y[i:i + bs]}

    # steps -----------------------------------------------------------------------------------------
    def training_step(self, batch: dict, ctx: TaskContext) -> StepOutput:
        first, stop = ctx.class_range
        if ctx.stage == "stage1":
            q = self.clip_query(batch, ctx)
            logits = self.stage1_logits(q, self.class_keys(first, stop))
            ce = F.cross_entropy(logits, batch["label"] - first)
            orth = orth_loss_stage1(self.context, first, stop)
            return StepOutput(ce + self.cfg.lambda_ortho1 * orth, {"ce": ce.detach(), "orth": orth.detach()})
        if ctx.stage == "align1":
            keys = torch.cat([self.keys[:first], self.class_keys(first, stop)])
            logits = self.stage1_logits(batch["feature"], keys)
            loss = F.cross_entropy(logits, batch["label"])
            return StepOutput(loss, {"ce": loss.detach()})
        if ctx.stage == "stage2":
            q = self.clip_query(batch, ctx)
            logits, _ = self.level2_logits(batch, ctx, q, train=True)
            ce = F.cross_entropy(logits[:, first:stop].float(), batch["label"] - first)
            orth = orth_loss_stage2(self.values, first, stop)
            return StepOutput(ce + self.cfg.lambda_ortho2 * orth, {"ce": ce.detach(), "orth": orth.detach()})
        if ctx.stage == "align2":
            logits = self.aligned_head(batch["feature"].to(self.head.weight.dtype))[:, :ctx.seen_classes]
            loss = logit_norm_ce(logits.float(), batch["label"])
            return StepOutput(loss, {"ce": loss.detach()})
        raise ValueError(f"star_prompt: unknown stage {ctx.stage!r}")

    def predict(self, batch: dict, ctx: TaskContext) -> Tensor:
        q = self.clip_query(batch, ctx)
        logits, idx = self.level2_logits(batch, ctx, q, train=False)
        stage1 = self.stage1_logits(q, self.keys[:ctx.seen_classes]).argmax(1)
        self._last_eval = (batch["image"], idx, stage1)
        return logits

    def score(self, batch: dict, logits: Tensor, ctx: TaskContext) -> dict[str, Tensor]:
        """Per sample: ``credit`` (correct argmax), ``select_acc`` (share of blocks whose selected class is the
        true one) and ``stage1_acc`` (level 1's own prediction is right)."""
        last = self._last_eval
        if last is None or last[0] is not batch["image"]:
            q = self.clip_query(batch, ctx)
            _, idx = self.select(q, ctx.seen_classes)
            stage1 = self.stage1_logits(q, self.keys[:ctx.seen_classes]).argmax(1)
        else:
            idx, stage1 = last[1], last[2]
        self._last_eval = None
        label = batch["label"].to(idx.device)
        return {"credit": (logits.argmax(1) == label).float(),
                "select_acc": (idx == label[None]).float().mean(0),
                "stage1_acc": (stage1 == label).float()}

    def extra_weights(self) -> list[dict]:
        w = self.clip_weights
        return [{"name": w.name, "role": "level-1 CLIP (queries and class keys)", "source": w.source,
                 "sha256": w.sha256}]

    def record(self) -> dict:
        cfg = self.cfg
        return {"clip_model": cfg.clip_model, "prompt_mode": cfg.prompt_mode, "stage2_schedule": cfg.stage2_schedule,
                "strict_selection_grad": cfg.strict_selection_grad, "gmm_torch_density": cfg.gmm_torch_density,
                "clip_fp16": cfg.clip_fp16, "confidence_modulation": cfg.confidence_modulation,
                "keys_written": int(self.keys_ready.sum())}


@register_method("star_prompt_stage1")
class StarPromptStage1(StarPrompt):
    """Level 1 alone (mammoth's ``first_stage_starprompt``): stage 1 and its MoG alignment per task; predictions
    are the CLIP zero-shot-style logits ``exp(τ)·<q/|q|, k_c>`` against the learned keys."""

    presets_from = "star_prompt"
    score_names = ("stage1_acc",)

    def stages(self, ctx: TaskContext) -> list[Stage]:
        return [s for s in super().stages(ctx) if s.name in ("stage1", "align1")]

    def end_stage(self, stage: Stage, ctx: TaskContext) -> None:
        super().end_stage(stage, ctx)
        last = "align1" if self.cfg.align1_epochs else "stage1"
        if stage.name == last:
            self.write_keys(ctx)

    def predict(self, batch: dict, ctx: TaskContext) -> Tensor:
        q = self.clip_query(batch, ctx)
        logits = q.new_full((q.shape[0], self.num_classes), float("-inf"))
        logits[:, :ctx.seen_classes] = self.stage1_logits(q, self.keys[:ctx.seen_classes])
        return logits

    def score(self, batch: dict, logits: Tensor, ctx: TaskContext) -> dict[str, Tensor]:
        correct = (logits.argmax(1) == batch["label"].to(logits.device)).float()
        return {"credit": correct, "stage1_acc": correct}
