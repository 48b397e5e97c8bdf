"""The method API: what a continual-learning method implements and what the engine gives it.

A method is an ``nn.Module`` that owns its parameters and losses. The engine
(:class:`clfast.engine.Trainer`) owns the loop, devices, optimizers, schedules, checkpoints and
processes, and calls the hooks in this order for every task ``t``::

    method.begin_task(ctx)                      # e.g. K-means keys over ctx.task_loader()
    for stage in method.stages(ctx):            # one or more training stages
        method.begin_stage(stage, ctx)
        for epoch, batch in ...:                # the task's data, or method.stage_batches(...)
            out = method.training_step(batch, ctx)      # -> StepOutput(loss, logs)
            backward, clip, optimizer and schedule steps (the engine)
        method.end_stage(stage, ctx)
    method.end_task(ctx, loader)                # statistics passes (means, covariances, MoG)
    logits = method.predict(batch, ctx)         # evaluation on every seen task
    credit = method.score(batch, logits, ctx)   # per-sample credit (default: correct argmax / VQA score)

Around that loop a method may also override: ``build_backbone(run_cfg)`` (classmethod; default the timm
ViT of the run), ``extra_weights()`` (more pretrained weights for the run record), ``transform_args()``
(crop scale, flip, eval crop ratio), ``lr_factor(stage, pos, total)`` (a schedule no config
expresses), ``param_groups(stage)``, ``after_optimizer_step()`` (default: restore frozen rows),
``descriptor_source()`` (class descriptors in ``ctx.class_descriptors``),
``eval_protocol()`` (default: unseen classes masked, per-sample counts; the alternatives of
:class:`EvalProtocol` only reproduce released code, and ``record()`` must then flag the run). A
:class:`Stage` may set ``augment`` and, for generated data, ``steps_per_epoch``; ``ctx.generator()``
gives generated batches a stream per task, stage, epoch and rank; ``ctx.task_loader(augment=True)``
iterates the task's data with the train augmentation; ``ctx.class_names`` names the labels.

Two class-level answers change what the engine runs: ``trains_jointly`` (the engine trains the method on
the scenario's joint view, every task's data as one task, and evaluates each task's test split after it:
the ``joint`` upper bound) and ``resolve(settings)`` (classmethod; the class that runs with the run's
``method_args``, default the class itself; ``joint`` answers with its base method in joint mode, and
``presets_from`` names the method whose presets it starts from).

Batches are dicts of tensors: ``image`` (B, 3, H, W) float in [0, 1] (the backbone normalises),
``label`` (B,) int64 in the scenario's remapped label space, ``task`` (B,) int64 and ``index`` (B,)
int64 (position in the split, for per-image caches); VQA batches add ``question``,
``answer_scores`` (B, A) float soft targets and, where the dataset defines how answers are credited
(CLOVE), ``answer_credit`` (B, A) float: what each predicted answer earns at evaluation. ``question``
is (B, L) int64 tokens when the method has a ``tokenizer`` attribute (``list[str] -> (N, L) int64``,
e.g. open_clip's; the engine tokenizes each split once), else the list of B strings.

Everything a method needs about the run comes in the frozen :class:`TaskContext`; a method keeps no
global state. Per-task and per-prompt tensors are allocated densely at construction (``num_tasks`` is
known), so DDP never sees unused parameters; old slices are frozen with :meth:`Method.freeze_rows`
(zero gradient, and restored after every optimizer step, so persistent optimizers cannot move them).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Optional

import torch
from torch import Tensor, nn

from ..utils.seeding import derive_seed
from .params import FrozenRows, freeze_rows, masked_logits, scaled_param_groups  # noqa: F401 (the method API)

__all__ = [
    "OptimConfig", "ScheduleConfig", "Stage", "TaskContext", "StepOutput", "Method", "MethodConfig",
    "register_method", "create_method", "list_methods", "method_class", "freeze_rows", "masked_logits",
    "build_config", "check_fields", "scaled_param_groups", "FrozenRows", "EvalProtocol",
]


_SCALARS = {"int": int, "float": float, "bool": bool, "str": str}


def check_fields(obj) -> None:
    """Check scalar fields against their annotations (``int``, ``Optional[float]``, ...), naming the key.

    ints are accepted for floats; integral floats for ints; a bool is never an int here.
    """
    for f in dataclasses.fields(obj):
        ann = str(f.type).replace("typing.", "")
        optional = ann.startswith("Optional[")
        base = ann[len("Optional["):-1] if optional else ann
        if base not in _SCALARS:
            continue
        v = getattr(obj, f.name)
        if v is None:
            if optional:
                continue
            raise ValueError(f"{f.name} must be {base}, got null")
        want = _SCALARS[base]
        ok = (isinstance(v, want) and not (want is int and isinstance(v, bool))) or (
            want is float and isinstance(v, int) and not isinstance(v, bool))
        if want is int and isinstance(v, float) and v.is_integer():
            v, ok = int(v), True
        if not ok:
            raise ValueError(f"{f.name} must be {base}{' or null' if optional else ''}, got {v!r}")
        setattr(obj, f.name, want(v))


# --------------------------------------------------------------------------------------------------
# Optimisation settings (data; the engine turns them into torch objects)

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "warmup_linear", "warmup_constant")


@dataclass
class OptimConfig:
    """An optimizer as a paper states it.

    ``lr_ref_batch``: when set, the effective lr is ``lr × batch_size / lr_ref_batch`` (the
    "lr × batch/256" rule some official codes apply); ``None`` uses ``lr`` as given.
    """

    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9
    amsgrad: bool = False
    lr_ref_batch: Optional[int] = None

    def __post_init__(self):
        check_fields(self)
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got {self.name!r}")
        if not self.lr > 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2:
            raise ValueError(f"optimizer.betas must be two floats, got {self.betas}")


@dataclass
class ScheduleConfig:
    """A learning-rate schedule within one stage of one task.

    ``name``: ``constant``; ``cosine`` (to ``min_lr``); ``warmup_cosine`` / ``warmup_linear`` /
    ``warmup_constant`` (linear warm-up over ``warmup`` — a fraction of the stage if < 1, else a count
    of steps/epochs — then cosine or linear decay to ``min_lr``, or constant). ``per``: ``"epoch"`` or
    ``"step"``, how often it moves; ``every``: the schedule moves in stairs of that many positions.
    ``warmup_start``: the multiplier at position 0, rising linearly to 1 at the end of the warm-up
    (e.g. 0 for Hugging Face's ``get_linear_schedule_with_warmup``); None: ``(pos + 1) / (warmup + 1)``,
    which never spends a step at lr 0.
    """

    name: str = "constant"
    per: str = "epoch"
    warmup: float = 0.0
    min_lr: float = 0.0
    warmup_start: Optional[float] = None
    every: int = 1

    def __post_init__(self):
        check_fields(self)
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule.name must be one of {SCHEDULES}, got {self.name!r}")
        if self.per not in ("epoch", "step"):
            raise ValueError(f"schedule.per must be 'epoch' or 'step', got {self.per!r}")
        if self.warmup < 0 or self.min_lr < 0:
            raise ValueError("schedule.warmup and schedule.min_lr must be >= 0")
        if self.warmup_start is not None and not 0.0 <= self.warmup_start <= 1.0:
            raise ValueError(f"schedule.warmup_start must be in [0, 1] or null, got {self.warmup_start!r}")
        if self.every < 1:
            raise ValueError(f"schedule.every must be >= 1, got {self.every!r}")


@dataclass
class Stage:
    """One training stage of a task.

    Fields left ``None`` inherit the run's settings (``epochs``, ``batch_size``, ``optimizer``,
    ``schedule``, ``grad_clip``). ``data="task"`` iterates the task's training data; ``data="method"``
    iterates ``method.stage_batches(stage, ctx)`` (e.g. features sampled from fitted Gaussians for an
    alignment pass) once per epoch. ``persistent=True`` keeps this stage's optimizer (and its state)
    from task to task instead of re-creating it; ``params`` is passed to ``method.param_groups``.
    ``augment`` overrides the run's ``augment`` for this stage's task data. ``steps_per_epoch`` tells
    the engine how many batches a ``data="method"`` stage yields per epoch, so that per-step schedules
    and progress bars work there (task-data stages know their length). ``validate_every`` (in epochs,
    e.g. 0.25) evaluates the current task's held-out split (the run's ``val_fraction``) that often
    during a task-data stage and, with ``keep_best``, ends the stage with the trainable parameters of
    the best validation accuracy (best-checkpoint selection without the test set).
    """

    name: str = "train"
    epochs: Optional[float] = None
    batch_size: Optional[int] = None
    optimizer: Optional[OptimConfig] = None
    schedule: Optional[ScheduleConfig] = None
    grad_clip: Optional[float] = None
    persistent: Optional[bool] = None
    data: str = "task"
    params: str = "default"
    augment: Optional[bool] = None
    steps_per_epoch: Optional[int] = None
    validate_every: Optional[float] = None
    keep_best: bool = True

    def __post_init__(self):
        if self.data not in ("task", "method"):
            raise ValueError(f"Stage.data must be 'task' or 'method', got {self.data!r}")
        if self.steps_per_epoch is not None and (isinstance(self.steps_per_epoch, bool)
                                                 or int(self.steps_per_epoch) < 1):
            raise ValueError(f"Stage.steps_per_epoch must be a positive int or None, got {self.steps_per_epoch!r}")
        if self.validate_every is not None:
            if isinstance(self.validate_every, bool) or not float(self.validate_every) > 0:
                raise ValueError(f"Stage.validate_every must be > 0 (epochs) or None, got {self.validate_every!r}")
            if self.data != "task":
                raise ValueError("Stage.validate_every needs a task-data stage (data='task')")


# --------------------------------------------------------------------------------------------------
# What the engine hands to the hooks


@dataclass(frozen=True)
class TaskContext:
    """The run as a method sees it during task ``task`` (immutable; the engine makes a new one).

    Labels are in the scenario's remapped space: task ``t`` owns ``class_range`` = [start, stop) and
    labels ``[0, seen_classes)`` are the classes seen so far (class-incremental).
    """

    task: int
    num_tasks: int
    class_range: tuple[int, int]
    seen_classes: int
    num_classes: int
    task_ranges: tuple[tuple[int, int], ...]
    device: torch.device = torch.device("cpu")
    amp_dtype: Optional[torch.dtype] = None
    scenario: str = "class-incremental"
    rank: int = 0
    world_size: int = 1
    augment: bool = True
    stage: str = "train"
    epoch: int = 0
    split: str = "train"            # which data the current batch comes from: "train" or "test"
    cacheable: bool = False         # the current split's transform is deterministic (per-image caches ok)
    class_names: tuple[str, ...] = ()   # names of the labels 0..num_classes-1 (remapped order), if known
    # attribute phrases of each label (remapped order) when the method asks for descriptors (descriptor_source)
    class_descriptors: tuple[tuple[str, ...], ...] = ()
    seed: int = 0                   # the run's seed (see generator())
    batch_size: Optional[int] = None    # this rank's batch size in the current stage
    task_loader: Optional[Callable[..., Any]] = field(default=None, compare=False, repr=False)
    val_loader: Optional[Callable[..., Any]] = field(default=None, compare=False, repr=False)  # None: no val split

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def replace(self, **changes) -> "TaskContext":
        return dataclasses.replace(self, **changes)

    def autocast(self):
        """The run's autocast (``amp_dtype`` on ``device``; off when the run has none), for work a method does
        outside the engine's training step (statistics passes, caches), so it runs at the step's precision."""
        dev = self.device.type if isinstance(self.device, torch.device) else torch.device(self.device).type
        return torch.autocast(dev, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def generator(self, device: Any = "cpu", *salt: Any) -> torch.Generator:
        """A generator for this task, stage, epoch and rank (e.g. batches a method generates).

        Seeded from the run's seed and those coordinates (plus ``salt``), so ranks draw different
        samples, every epoch differs, and a resumed run draws the same ones again.
        """
        g = torch.Generator(device=device)
        g.manual_seed(derive_seed(self.seed, self.task, self.stage, self.epoch, self.rank, *salt))
        return g

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """Sum (or ``"mean"``/``"max"``) ``tensor`` over ranks in place; identity in one process."""
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist

        red = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        dist.all_reduce(tensor, op=red)
        if op == "mean":
            tensor /= self.world_size
        return tensor

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Concatenate ``tensor`` (n_r, ...) from every rank along dim 0 (sizes may differ)."""
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist

        n = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        pad = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
        pad[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(pad) for _ in range(self.world_size)]
        dist.all_gather(parts, pad)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])


@dataclass(frozen=True)
class EvalProtocol:
    """How the engine turns a method's evaluation logits into accuracies (:meth:`Method.eval_protocol`).

    The defaults are clfast's protocol, the fair one: classes not seen yet are masked out of the logits,
    and a task's accuracy counts samples. The other settings exist only to reproduce released code whose
    numbers were computed that way (GPLS/DAP); a method that uses them says so in :meth:`Method.record`,
    so that ``record.json`` flags the run.

    Attributes:
        mask_unseen: set the logits of classes not seen yet to -inf before scoring (False: every
            class's logit competes, untrained future classes included).
        mean_of_batches: a task's accuracy is the mean of its evaluation batches' accuracies (each
            batch's credit / its size) instead of the per-sample count; the last batch of a task weighs as
            much as a full one. Under DDP the mean runs over every rank's batches.
    """

    mask_unseen: bool = True
    mean_of_batches: bool = False

    @property
    def fair(self) -> bool:
        return self.mask_unseen and not self.mean_of_batches


@dataclass
class StepOutput:
    """A training step's result: the loss to minimise and the named values to log (scalars)."""

    loss: Tensor
    logs: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Method base class and registry


@dataclass
class MethodConfig:
    """Settings shared by every method; each method subclasses this with its own fields.

    ``__post_init__`` checks each setting on its own; :meth:`check_against` checks them against the run
    (its number of tasks, the backbone's depth), which the engine calls before it builds anything.
    """

    #: fields holding block indices of the backbone (checked against its depth by check_against)
    layer_fields: ClassVar[tuple[str, ...]] = ()

    train_mask: bool = True          # train on the current task's logits only (class-incremental)
    head_bias: bool = True
    # learning-rate multipliers by parameter-name prefix, e.g. {head: 1.0, prompts: 0.2}: the longest
    # matching prefix ("prompts" matches "prompts" and "prompts.*") wins; unmatched parameters get 1.0
    lr_scales: dict = field(default_factory=dict)

    def __post_init__(self):
        check_fields(self)  # subclasses call super().__post_init__() first
        if not isinstance(self.lr_scales, dict):
            raise ValueError(f"lr_scales must be a mapping of parameter-name prefix to multiplier, "
                             f"got {self.lr_scales!r}")
        for key, value in self.lr_scales.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"lr_scales: keys must be parameter-name prefixes, got {key!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"lr_scales[{key!r}] must be a number >= 0, got {value!r}")
        self.lr_scales = {k: float(v) for k, v in self.lr_scales.items()}

    def check_against(self, *, num_tasks: Optional[int] = None, num_layers: Optional[int] = None) -> None:
        """ValueError naming the setting if it does not fit a run of ``num_tasks`` tasks on a backbone of
        ``num_layers`` blocks (either None: not checked). Default: every index in ``layer_fields`` lies
        in ``[0, num_layers)``; methods add their own (a pool smaller than the number of tasks, ...)."""
        if num_layers is None:
            return
        for key in self.layer_fields:
            layers = tuple(getattr(self, key))
            bad = [i for i in layers if not 0 <= i < num_layers]
            if bad:
                raise ValueError(f"method_args.{key}={list(layers)}: block(s) {bad} beyond the backbone's "
                                 f"{num_layers} blocks (indices 0..{num_layers - 1})")


class Method(nn.Module):
    """Base class of every continual-learning method (see the module docstring for the hook order).

    Subclasses set ``Config`` to a :class:`MethodConfig` subclass, build their parameters in
    ``__init__(backbone, num_classes, num_tasks, cfg)`` and implement :meth:`training_step` and
    :meth:`predict`. ``backbone`` is a frozen :class:`clfast.backbones.ViTBackbone` (or another
    module a method documents).
    """

    Config: ClassVar[type] = MethodConfig
    name: ClassVar[str] = "method"
    supports: ClassVar[tuple[str, ...]] = ("class-incremental", "task-incremental", "domain-incremental")
    #: train on the scenario's joint view (:class:`clfast.data.JointScenario`): one task holding every task's
    #: training data and classes, then each task's test split evaluated (one column of the accuracy matrix)
    trains_jointly: ClassVar[bool] = False
    #: the method whose presets (``clfast/configs/<name>/``) a run of this one starts from (None: its own)
    presets_from: ClassVar[Optional[str]] = None

    @classmethod
    def resolve(cls, settings: dict) -> type["Method"]:
        """The class that runs with ``settings`` (a run's ``method_args``): ``cls`` itself, unless the
        registered name stands for a family (``joint`` answers with its ``base`` method's joint class)."""
        return cls

    def __init__(self, backbone: nn.Module, num_classes: int, num_tasks: int, cfg: MethodConfig):
        super().__init__()
        if not isinstance(cfg, self.Config):
            raise TypeError(f"cfg must be a {self.Config.__name__}, got {type(cfg).__name__}")
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.num_tasks = int(num_tasks)
        self.cfg = cfg
        self._frozen_rows: list[FrozenRows] = []

    # hooks ----------------------------------------------------------------------------------------
    def stages(self, ctx: TaskContext) -> list[Stage]:
        """The training stages of task ``ctx.task`` (default: one stage with the run's settings)."""
        return [Stage()]

    def begin_task(self, ctx: TaskContext) -> None:
        """Before training task ``ctx.task``; ``ctx.task_loader()`` iterates its training data."""

    def begin_stage(self, stage: Stage, ctx: TaskContext) -> None:
        """Before ``stage``; set ``requires_grad`` of what this stage trains here."""

    def training_step(self, batch: dict, ctx: TaskContext) -> StepOutput:
        raise NotImplementedError

    def end_stage(self, stage: Stage, ctx: TaskContext) -> None:
        """After ``stage``."""

    def end_task(self, ctx: TaskContext, loader: Iterable[dict]) -> None:
        """After training task ``ctx.task``; ``loader`` is its training data without augmentation,
        sharded over ranks (all-reduce statistics with ``ctx.all_reduce``)."""

    def predict(self, batch: dict, ctx: TaskContext) -> Tensor:
        """Logits ``(B, num_classes)`` for evaluation; the engine ignores unseen classes (unless
        :meth:`eval_protocol` says otherwise)."""
        raise NotImplementedError

    def eval_protocol(self) -> EvalProtocol:
        """How the engine scores this method's predictions (default: the fair protocol, unseen classes
        masked, per-sample counts). Override only to reproduce released code; see :class:`EvalProtocol`."""
        return EvalProtocol()

    def stage_batches(self, stage: Stage, ctx: TaskContext) -> Iterable[dict]:
        """Batches of one epoch of a ``Stage(data="method")`` stage.

        Draw their randomness from ``ctx.generator()`` (a stream per task, stage, epoch and rank), not
        from the global generator: a run resumed inside such an epoch re-draws and discards the batches
        already trained on, which repeats them exactly only from that stream.
        """
        raise NotImplementedError(f"{type(self).__name__} has a data='method' stage "
                                  f"{stage.name!r} but no stage_batches()")

    def param_groups(self, stage: Stage) -> list[dict]:
        """Optimizer parameter groups for ``stage`` (dicts may set their own ``lr``/``lr_scale``).

        Default: the parameters with ``requires_grad``, one group per multiplier of the config's
        ``lr_scales`` (one group when it is empty). An override that builds its own groups should start
        from :func:`scaled_param_groups` of a sub-module, so that ``lr_scales`` keeps working.
        """
        return scaled_param_groups(self, self.cfg.lr_scales)

    @classmethod
    def backbone_depth(cls, run_cfg: Any) -> Optional[int]:
        """The number of blocks of the backbone :meth:`build_backbone` would return, found without building
        it or loading weights (None: not known before it is built). Default: the timm ViT named by
        ``run_cfg.backbone``, built on the meta device; None for a class that overrides ``build_backbone``
        without overriding this too."""
        if cls.build_backbone.__func__ is not Method.build_backbone.__func__:
            return None
        from ..backbones.vit import vit_depth

        return vit_depth(run_cfg.backbone)

    @classmethod
    def build_backbone(cls, run_cfg: Any) -> nn.Module:
        """The backbone for a run (default: the timm ViT named by ``run_cfg.backbone``, with its
        ``pretrained``/``checkpoint_path``). Override for other backbones (CLIP, a VLM); the engine
        reads ``data_config`` (input size, crop, interpolation) and ``weights`` (for the run record)
        from what this returns."""
        from ..backbones.vit import create_vit

        return create_vit(run_cfg.backbone, pretrained=run_cfg.pretrained, checkpoint_path=run_cfg.checkpoint_path)

    def extra_weights(self) -> list[dict]:
        """Provenance (name, source, sha256) of pretrained weights besides ``backbone.weights``, for
        the run record: a second encoder, a text model (default: none)."""
        return []

    def record(self) -> dict:
        """The method's own facts for ``record.json`` (``method_record``), e.g. evaluation options that
        change what the numbers mean, such as batch-wise prompt voting (default: none)."""
        return {}

    def transform_args(self) -> dict:
        """Changes to the image transforms: ``scale`` (area range of the train RandomResizedCrop, default
        (0.08, 1.0)), ``hflip`` (probability, default 0.5), ``extra`` (more random ops after the flip, e.g.
        ``[torchvision.transforms.v2.RandAugment()]``) and ``crop_pct`` (the deterministic transform resizes
        to ``int(size / crop_pct)`` and centre-crops ``size``; default the backbone's, e.g. 0.875 for
        resize 256 / crop 224) and ``crop`` (``"none"``: both transforms resize the whole image, no crop,
        for VQA, where crops and flips change position answers; return it with ``hflip: 0``)."""
        return {}

    def descriptor_source(self) -> Optional[str]:
        """Class descriptors (class name → attribute phrases) this method reads from
        ``ctx.class_descriptors``: None (default) for none; ``"auto"`` for the file that ships for the run's
        dataset, if one does (else none); or the path of a JSON file whose keys are the dataset's class names
        in class-index order (checked by the engine)."""
        return None

    def lr_factor(self, stage: Stage, pos: float, total: float) -> Optional[float]:
        """The lr multiplier at ``pos`` of ``total`` (epochs or steps, as the stage's schedule moves);
        None (default) uses the stage's :class:`ScheduleConfig`. Override for schedules no config
        expresses."""
        return None

    #: names of the extra per-sample values :meth:`score` returns (e.g. ``("task_id_correct",)``)
    score_names: ClassVar[tuple[str, ...]] = ()

    def score(self, batch: dict, logits: Tensor, ctx: TaskContext) -> Tensor | dict[str, Tensor]:
        """Credit per sample (B,) float for evaluation, from ``logits`` already restricted to the seen
        classes (and to each sample's task when task-incremental). Default: 1 for a correct argmax; in
        VQA batches, the predicted answer's ``answer_credit`` (CLOVE: exact match against the first
        answer, or the VQA accuracy with ``vqa_score``) or, without it, its ``answer_scores``.

        A method with :attr:`score_names` returns a dict instead: ``"credit"`` plus one (B,) tensor per
        name (e.g. whether the task was inferred right); the engine averages each over every evaluated
        task, logs them with the accuracies and puts the final ones in the summary as ``eval_<name>``.
        """
        pred = logits.argmax(1)
        if "answer_credit" in batch:
            return batch["answer_credit"].float().gather(1, pred[:, None]).squeeze(1)
        if "answer_scores" in batch:
            return batch["answer_scores"].float().gather(1, pred[:, None]).squeeze(1)
        return (pred == batch["label"]).float()

    def after_optimizer_step(self) -> None:
        """Called by the engine after every optimizer step (default: restore the frozen rows)."""
        for record in self._frozen_rows:
            record.restore()

    def compile_for_training(self, **options) -> None:
        """Called when the run sets ``compile: true``: compile the hot forward (default: the backbone)."""
        self.backbone.compile(**options)

    # helpers --------------------------------------------------------------------------------------
    def freeze_rows(self, param: Tensor, stop: Callable[[], int] | int, start: Callable[[], int] | int = 0,
                    dim: int = 0) -> FrozenRows:
        """:func:`freeze_rows`, registered so that :meth:`after_optimizer_step` restores the rows."""
        record = freeze_rows(param, stop, start, dim)
        self._frozen_rows.append(record)
        return record

    def train_logits(self, logits: Tensor, ctx: TaskContext) -> Tensor:
        """Class-incremental training: keep only the current task's logits when ``train_mask``."""
        return masked_logits(logits, ctx.class_range if self.cfg.train_mask else (0, ctx.seen_classes))


_METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator registering a :class:`Method` subclass as ``name``."""
    def deco(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register_method({name!r}) must decorate a Method subclass")
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__qualname__}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


# the methods that ship with clfast, imported (registered) on the first registry lookup, so that
# importing the config or the method API does not load the ops and their kernels
_BUILTIN = ("linear", "l2p", "dualprompt", "coda_prompt", "gpls", "convprompt", "finetune", "joint", "star_prompt",
            "vlm_finetune", "clumo")


def _load_builtin() -> None:
    import importlib

    for m in _BUILTIN:
        importlib.import_module(f"{__package__}.{m}")


def list_methods() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    _load_builtin()
    if name not in _METHODS:
        close = difflib.get_close_matches(str(name), list(_METHODS), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown method {name!r}.{hint} Available: {', '.join(list_methods())}")
    return _METHODS[name]


def build_config(cls: type, values: dict, where: str):
    """Instantiate dataclass ``cls`` from ``values``; unknown keys raise with close matches."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        msgs = []
        for k in unknown:
            close = difflib.get_close_matches(k, names, n=3, cutoff=0.6)
            msgs.append(f"{k!r}" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""))
        raise ValueError(f"unknown {where} setting(s): {', '.join(msgs)}. Valid: {', '.join(names)}")
    return cls(**values)


def create_method(name: "str | type[Method]", backbone: nn.Module, num_classes: int, num_tasks: int,
                  **cfg) -> Method:
    """Build registered method ``name`` (or a :class:`Method` class already looked up); ``cfg`` are its
    ``Config`` fields (unknown keys raise); the class is :meth:`Method.resolve` d with them."""
    cls = (method_class(name) if isinstance(name, str) else name).resolve(cfg)
    return cls(backbone, num_classes, num_tasks, build_config(cls.Config, cfg, f"method {cls.name!r}"))
