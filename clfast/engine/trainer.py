"""The continual-learning loop: tasks → stages → epochs → steps, evaluation, checkpoints, DDP.

    cfg = load_config("l2p", "synth-shapes")
    summary = Trainer(cfg, out="runs/l2p-demo").fit()

The trainer owns devices, processes, optimizers, schedules, AMP, checkpoints and logging; the method
(:mod:`clfast.methods`) owns parameters and losses. Launched under ``torchrun`` it runs DDP (gloo on
the CPU, NCCL on GPUs): each rank trains on its share of every global batch, statistics are
all-reduced by the method through ``ctx``, evaluation is sharded without duplicates and the counts
all-reduced, rank 0 writes every file.

A run directory holds ``config.yaml``, ``record.json``, ``metrics.jsonl``, ``acc_matrix.csv``,
``summary.json``, ``acc_matrix.png``, ``accuracy_curve.png``, ``train.log`` and ``checkpoints/``
(after every task, and on Ctrl-C at the next step boundary). ``Trainer.resume(run_dir)`` continues
from the newest checkpoint and, on the CPU, ends with the same numbers as an uninterrupted run.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import signal
import threading
import time
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn

from ..methods.base import Method, Stage, TaskContext, create_method, method_class
from ..utils.seeding import derive_seed, seed_everything
from . import io as rio
from .checkpoint import Checkpointing, Position, init_from
from .evaluation import Evaluating
from .config import RunConfig, resolve_amp
from .data_views import RunData, to_device
from .distributed import Processes
from .faults import crash_point
from .preflight import check_run
from .loggers import RunLogger
from .metrics import AccuracyMatrix
from .optim import build_optimizer, lr_factor, set_lr
from .progress import get_logger, progress
from .record import format_summary, run_record
from .reproducibility import deterministic_cpu
from .sampling import EpochSampler

__all__ = ["Trainer", "Position", "Interrupted", "format_summary"]


class Interrupted(Exception):
    """Raised out of :meth:`Trainer.fit` after a Ctrl-C (or ``stop_after_steps``) checkpoint."""

    def __init__(self, path: str):
        super().__init__(f"interrupted; checkpoint saved to {path}; continue with --resume")
        self.path = path


class _StepModule(nn.Module):
    """What DDP wraps: forward = the method's training step (so DDP's gradient hooks see it)."""

    def __init__(self, method: Method):
        super().__init__()
        self.method = method

    def forward(self, batch: dict, ctx: TaskContext):
        out = self.method.training_step(batch, ctx)
        return out.loss, out.logs


@dataclass
class _StageRun:
    """A running stage: what every epoch of it needs."""

    task: int
    si: int                 # the stage's index among the task's stages
    stage: Stage
    settings: dict          # Trainer._stage_settings: epochs, batch, optim, sched, clip, persistent
    ctx: TaskContext
    opt: torch.optim.Optimizer
    key: str                # the optimizer's key in checkpoints ("<stage name>/<index>")
    module: nn.Module       # what a step calls (the method, DDP-wrapped under torchrun)
    n_epochs: int


def eager_hooks():
    """A context in which torch.compile is off (``torch.compiler.set_stance("force_eager")``): the method's task
    and stage hooks run in it. ``compile: true`` compiles the forward that training steps and evaluation run;
    a hook's one-off pass over the data through the same forward (GPLS's statistics pass, whose per-block record
    has a data-dependent ``bincount``) would otherwise break a graph inside the backbone's block loop, and dynamo
    then skips that code object for every later call, the steps' included."""
    return torch.compiler.set_stance("force_eager")


def _scalar(v) -> Any:
    if torch.is_tensor(v):
        return float(v.detach().float().mean())
    return v


class Trainer(Checkpointing, Evaluating):
    """Runs one continual-learning experiment described by a :class:`RunConfig`.

    Args:
        cfg: the resolved configuration.
        out: run directory (default ``runs/<name>``); created if missing.
        method, scenario: pre-built objects (tests, notebooks); built from ``cfg`` when None.
        command: the command line that started the run, for ``record.json``.
    """

    def __init__(self, cfg: RunConfig, out: Optional[str] = None, *, method: Optional[Method] = None,
                 scenario=None, command: Optional[str] = None, _resume: bool = False):
        self.cfg = cfg
        self.command = command
        self.procs = Processes(cfg.device, timeout_s=cfg.dist_timeout_s)
        self.rank, self.world = self.procs.rank, self.procs.world
        self.device = self.procs.device(cfg.device)
        self.amp_note = None
        if cfg.amp == "auto":   # resolved once: config.yaml holds the choice, so a resume elsewhere keeps it
            amp, why = resolve_amp(self.device)
            cfg = self.cfg = dataclasses.replace(cfg, amp=amp)
            self.amp_note = f"amp auto -> {amp}: {why}"
        check_run(cfg, self.world, scenario=scenario, method=method is None)   # before anything is written
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self.is_main = self.rank == 0
        self.quiet = cfg.quiet or not self.is_main
        self.log = get_logger("clfast", quiet=self.quiet)
        name = cfg.name or f"{cfg.method}_{cfg.dataset}_{time.strftime('%Y%m%d-%H%M%S')}"
        self.run_dir = os.path.abspath(out or os.path.join("runs", name))
        created = not os.path.exists(self.run_dir)
        if self.is_main:
            if not _resume and os.path.exists(os.path.join(self.run_dir, "checkpoints", "latest.json")):
                raise FileExistsError(f"{self.run_dir} already holds a run with checkpoints; continue it with "
                                      f"--resume {self.run_dir} or choose another --out")
            try:   # before anything is built: an unwritable --out is reported now, not at the first checkpoint
                rio.ensure_writable_dir(self.run_dir)
                rio.ensure_writable_dir(os.path.join(self.run_dir, "checkpoints"), "checkpoint directory")
            except rio.RunDirectoryError:
                if created:
                    shutil.rmtree(self.run_dir, ignore_errors=True)
                raise
            self._log_file = rio.log_to_file(self.log, os.path.join(self.run_dir, "train.log"))
        try:
            self._build(cfg, method, scenario)
            if self.is_main:
                self._check_free_space()
        except BaseException:
            # a run that could not even be set up (unknown dataset, bad setting) leaves no directory behind;
            # one that existed before (a resume, a chosen --out) is left as it was found
            if self.is_main and created:
                self.log.removeHandler(self._log_file)
                self._log_file.close()
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def _build(self, cfg: RunConfig, method: Optional[Method], scenario) -> None:
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None

        seed_everything(cfg.seed)  # model construction and augmentation draw from the global generators
        cls = type(method) if method is not None else method_class(cfg.method).resolve(dict(cfg.method_args))
        self.scenario = scenario if scenario is not None else self._build_scenario()
        if cls.trains_jointly:  # every task's data as one task; each task's test split evaluated after it
            self.scenario = self.scenario.joint_view()
        self.method = method if method is not None else self._build_method(cls)
        self._init_info = (init_from(self.method, cfg.init_from, cfg.method, self.log) if cfg.init_from
                           else None)
        # digests of the model as built: checkpoints leave out what still matches (frozen weights)
        self._built_digests = {k: rio.tensor_digest(v) for k, v in self.method.state_dict().items()
                               if v.numel() * v.element_size() >= 1 << 16}
        if self.scenario.kind not in self.method.supports:
            raise ValueError(f"method {cfg.method!r} supports {', '.join(self.method.supports)} scenarios, not "
                             f"{self.scenario.kind!r} (dataset {cfg.dataset!r}, scenario={cfg.scenario!r})")
        if self.scenario.kind == "vqa" and getattr(self.method, "tokenizer", None) is not None:
            self.scenario.set_tokenizer(self.method.tokenizer)  # questions tokenized once per split
        self.method.to(self.device)
        self.data = RunData(cfg, self.scenario, self.method.backbone.data_config, self.method.transform_args(),
                            type(self.method).__name__, rank=self.rank, world=self.world,
                            pin_memory=self.device.type == "cuda", quiet=self.quiet)
        self.class_descriptors = self.data.class_descriptors(self.method.descriptor_source(), cfg.method)
        if cfg.grad_checkpointing:
            setter = getattr(self.method.backbone, "set_grad_checkpointing", None)
            if setter is None:
                raise ValueError(f"grad_checkpointing: the backbone {type(self.method.backbone).__name__} has no "
                                 f"set_grad_checkpointing()")
            setter(True)
        if cfg.compile:
            self.method.compile_for_training(**cfg.compile_options)
        self.acc = AccuracyMatrix(joint=self.scenario.joint)   # a joint run's matrix is one column
        self.acc_val = AccuracyMatrix() if cfg.val_fraction else None
        self.eval_extras: dict[str, float] = {}      # the method's extra scores after the last evaluation
        self._best: Optional[dict] = None            # best validation state of the running stage
        self._pending_best: Optional[dict] = None
        self.last_score_extras: dict[str, float] = {}
        self.metrics = RunLogger(self.run_dir, enabled=self.is_main, log_to=cfg.log_to, config=cfg.to_dict(),
                                 project=cfg.wandb_project)
        self.pos = Position()
        self.global_step = 0
        self._resumed_from: Optional[dict] = None   # where --resume picked the run up (logged once by fit)
        self.persistent_opts: dict[str, torch.optim.Optimizer] = {}
        self._opt_states: dict[str, dict] = {}
        self._interrupt = False
        self._pending = None
        self._train_time = 0.0
        self._train_images = 0
        self._t0 = time.time()

    # setup ----------------------------------------------------------------------------------------
    def _amp_dtype(self) -> Optional[torch.dtype]:
        if self.cfg.amp == "none":
            return None
        if self.cfg.amp == "fp16":  # with a GradScaler (on the CPU too: the same code path, testable here)
            return torch.float16
        return torch.bfloat16

    def _build_scenario(self):
        from ..data.registry import dataset_info
        from ..data.scenario import Scenario

        kind = "vqa" if dataset_info(self.cfg.dataset).kind == "vqa" else self.cfg.scenario
        extra = {} if kind in ("vqa", "domain-incremental") else dict(
            class_order_seed=self.cfg.class_order_seed, shuffle_classes=self.cfg.shuffle_classes,
            first_task_classes=self.cfg.first_task_classes)
        # Images come untransformed; the engine applies the train or eval transform per use.
        scenario = Scenario.from_name(self.cfg.dataset, root=self.cfg.data_root, num_tasks=self.cfg.num_tasks,
                                      dataset_kwargs=dict(self.cfg.dataset_args), kind=kind,
                                      verify_data=self.cfg.verify_data, skip_bad_samples=self.cfg.skip_bad_samples,
                                      workers=torch.get_num_threads(), **extra)
        for split, found in (scenario.skipped or {}).items():   # skip_bad_samples: also in record.json
            if found:
                self.log.warning(f"skip_bad_samples: left out {len(found)} unreadable {split} image(s), e.g. "
                                 + "; ".join(msg for _, msg in found[:3]))
        return scenario

    def train_data(self, task: int, augment: Optional[bool] = None, seed: int = 0):
        """Task ``task``'s training data (see :meth:`RunData.train_data`)."""
        return self.data.train_data(task, augment, seed)

    def val_data(self, task: int):
        return self.data.val_data(task)

    def test_data(self, task: int):
        return self.data.test_data(task)

    def _build_method(self, cls: type[Method]) -> Method:
        return create_method(cls, cls.build_backbone(self.cfg), self.scenario.num_classes, self.scenario.num_tasks,
                             **self.cfg.method_args)

    # contexts and loaders -------------------------------------------------------------------------
    def context(self, task: int, **kw) -> TaskContext:
        sc = self.scenario
        ranges = tuple(tuple(sc.class_range(t)) for t in range(sc.num_tasks))
        return TaskContext(task=task, num_tasks=sc.num_tasks, class_range=ranges[task],
                           seen_classes=ranges[task][1], num_classes=sc.num_classes, task_ranges=ranges,
                           device=self.device, amp_dtype=self.amp_dtype, scenario=sc.kind, rank=self.rank,
                           world_size=self.world, augment=not self.data.train_tf.deterministic,
                           class_names=tuple(getattr(sc, "class_names", ()) or ()), seed=int(self.cfg.seed),
                           class_descriptors=self.class_descriptors,
                           task_loader=lambda augment=False, t=task: self.data.stats_loader(t, augment),
                           val_loader=(lambda t=task: self.data.val_loader(t)) if self.cfg.val_fraction else None, **kw)

    # the loop -------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train on every task from the current position; returns the summary dict."""
        if self.is_main and self.pos.at_task_start and self.pos.task == 0:
            self._write_start_files()
        self._banner()
        self.metrics.open(start_step=self.global_step, resumed_from=self._resumed_from)
        self._resumed_from = None
        # every rank listens (torchrun forwards signals to all workers); _interrupted() agrees across ranks
        handle = threading.current_thread() is threading.main_thread()
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if handle else {}
        for s in old:  # Ctrl-C, and the SIGTERM a scheduler sends before it kills a job
            signal.signal(s, self._on_signal)
        try:
            try:
                with deterministic_cpu(self.device.type == "cpu"):
                    for task in range(self.pos.task, self.scenario.num_tasks):
                        self._run_task(task)
                        self.pos = Position(task + 1)
                        self._evaluate(task)
                        self._save_checkpoint(tag=f"task{task + 1:03d}")
                        self._update_method_record()
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
            return self._finish()
        finally:
            self.metrics.close()  # flushes the mirrors also when interrupted

    def _on_signal(self, signum, frame):
        if self._interrupt:  # second signal: stop now
            raise KeyboardInterrupt
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if self.is_main:
            self.log.warning(f"{name}: saving a checkpoint at the next step (send it again to abort without saving)")
        self._interrupt = True

    @property
    def interrupted(self) -> bool:
        """Whether this process was asked to stop (Ctrl-C / SIGTERM, here or on another rank)."""
        return self._interrupt

    def _interrupted(self) -> bool:
        """Whether any rank was interrupted, the same answer on every rank (a MAX all-reduce under DDP)."""
        self._interrupt = self.procs.any(self._interrupt)
        return self._interrupt

    def _run_task(self, task: int) -> None:
        resuming_mid_task = not self.pos.at_task_start and self.pos.task == task
        ctx = self.context(task)
        self.method.train()
        with eager_hooks():
            self.method.begin_task(ctx)
        stages = self.method.stages(ctx)
        self.log.info(f"task {task + 1}/{self.scenario.num_tasks}: classes "
                      f"{ctx.class_range[0]}–{ctx.class_range[1] - 1}, {len(self.data.train_part(task))} training images"
                      + (f" ({len(self.data.val_positions(task)[1])} held out)" if self.cfg.val_fraction else "")
                      + f", stages: {', '.join(s.name for s in stages)}")
        first_stage = self.pos.stage if resuming_mid_task else 0
        for si in range(first_stage, len(stages)):
            self._run_stage(task, si, stages[si], ctx, resume=resuming_mid_task and si == first_stage)
        self.method.eval()
        with torch.no_grad(), self._autocast(), eager_hooks():
            self.method.end_task(ctx.replace(split="stats", cacheable=True), self.data.stats_loader(task))

    def _stage_settings(self, stage: Stage) -> dict:
        cfg = self.cfg
        return dict(epochs=stage.epochs if stage.epochs is not None else cfg.epochs,
                    batch=stage.batch_size or cfg.batch_size,
                    optim=stage.optimizer or cfg.optimizer,
                    sched=stage.schedule or cfg.schedule,
                    clip=stage.grad_clip if stage.grad_clip is not None else cfg.grad_clip,
                    persistent=stage.persistent if stage.persistent is not None else not cfg.reset_optimizer)

    def _lr_factor(self, stage: Stage, s: dict, pos: float, total: float) -> float:
        factor = self.method.lr_factor(stage, pos, total)
        return lr_factor(s["sched"], pos, total, s["optim"].lr) if factor is None else float(factor)

    def _run_stage(self, task: int, si: int, stage: Stage, ctx: TaskContext, resume: bool) -> None:
        s = self._stage_settings(stage)
        if s["batch"] % self.world:
            raise ValueError(f"stage {stage.name!r}: batch size {s['batch']} must be divisible by the "
                             f"number of processes {self.world}")
        tf = self.data.train_transform(stage.augment)
        sctx = ctx.replace(stage=stage.name, split="train", cacheable=tf.deterministic, augment=not tf.deterministic,
                           batch_size=s["batch"] // self.world)
        with eager_hooks():
            self.method.begin_stage(stage, sctx)
        if resume and self._pending is not None:
            # The hooks before this point ran again (for their effects on what checkpoints do not
            # hold); the saved state now replaces whatever they changed, RNG included.
            method_state, rng = self._pending
            self._pending = None
            rio.restore_unchanged(self.method, *method_state)
            rio.set_rng_state(rng)
        key = f"{stage.name}/{si}"
        opt = self._stage_optimizer(stage, key, s, resume)
        validate_every = stage.validate_every
        if validate_every is None and stage.data == "task":
            validate_every = self.cfg.validate_every
        if validate_every is not None and not self.cfg.val_fraction:
            raise ValueError(f"stage {stage.name!r}: validate_every needs a validation split (set val_fraction > 0)")
        if resume:
            self._best, self._pending_best = self._pending_best, None
        else:
            self._best = None
        run = _StageRun(task, si, stage, s, sctx, opt, key, self._wrap(stage), max(1, math.ceil(s["epochs"])))
        data = None if stage.data == "method" else self.train_data(task, stage.augment)
        start_epoch = self.pos.epoch if resume else 0
        for epoch in range(start_epoch, run.n_epochs):
            skip = self.pos.batch if (resume and epoch == start_epoch) else 0
            if s["sched"].per == "epoch":
                set_lr(opt, self._lr_factor(stage, s, epoch, run.n_epochs))
            self._run_epoch(run, self._epoch_plan(run, data, epoch, skip, validate_every), epoch, skip)
        if self._best is not None and stage.keep_best:
            with torch.no_grad():
                params = dict(self.method.named_parameters())
                for name, value in self._best["params"].items():
                    params[name].copy_(value)
            self.log.info(f"  task {task + 1} {stage.name}: kept the parameters of step {self._best['step']} "
                          f"(validation accuracy {self._best['acc']:.2f})")
        self._best = None
        with eager_hooks():
            self.method.end_stage(stage, sctx)

    def _stage_optimizer(self, stage: Stage, key: str, s: dict, resume: bool) -> torch.optim.Optimizer:
        """The stage's optimizer: kept across tasks when persistent, its state restored on resume."""
        opt = self.persistent_opts.get(key) if s["persistent"] else None
        if opt is None:
            opt = build_optimizer(self.method.param_groups(stage), s["optim"], s["batch"])
            if s["persistent"]:
                self.persistent_opts[key] = opt
        if resume or (s["persistent"] and key in self._opt_states):
            state = self._opt_states.pop(key, None)
            if state is not None:
                opt.load_state_dict(state)
        return opt

    def _epoch_plan(self, run: "_StageRun", data, epoch: int, skip: int, validate_every: Optional[float]) -> dict:
        """One epoch's batches (from batch ``skip`` on), its step count (None: as many as the method
        yields; also the per-step schedule's length), and how often to validate."""
        task, si, stage, s = run.task, run.si, run.stage, run.settings
        per_rank = s["batch"] // self.world
        if data is not None:
            steps_full = math.ceil(math.ceil(len(data) / self.world) / per_rank)
            n_steps = steps_full
            if s["epochs"] != math.floor(s["epochs"]) and epoch == run.n_epochs - 1:   # a fractional last epoch
                n_steps = max(1, int(round((s["epochs"] - math.floor(s["epochs"])) * steps_full)))
            if self.cfg.limit_train_batches:
                n_steps = min(n_steps, self.cfg.limit_train_batches)
            val_every = (max(1, round(validate_every * min(steps_full, self.cfg.limit_train_batches or steps_full)))
                         if validate_every is not None else None)
            sampler = EpochSampler(len(data), derive_seed(self.cfg.seed, task, si, epoch), rank=self.rank,
                                   world=self.world, skip=skip * per_rank)
            data.seed = derive_seed(self.cfg.seed, "augment", task, si, epoch)
            batches: Iterable = self.data.loader(data, sampler, per_rank)
        else:
            # Batches the method generates (e.g. sampled features) are skipped by drawing them: from
            # ctx.generator(), the stage's own stream, they are the batches the interrupted run drew
            # (the global generator, which the training steps use, was restored from the checkpoint).
            val_every = None
            batches = self.method.stage_batches(stage, run.ctx.replace(epoch=epoch))
            if skip:
                batches = itertools.islice(batches, skip, None)
            known = [x for x in (self.cfg.limit_train_batches, stage.steps_per_epoch) if x]
            n_steps = min(known) if known else None
        if n_steps is not None:  # never draw (load, augment) a batch that will not be trained on
            batches = itertools.islice(batches, max(0, n_steps - skip))
        return {"batches": batches, "n_steps": n_steps, "val_every": val_every}

    def _run_epoch(self, run: "_StageRun", plan: dict, epoch: int, skip: int) -> None:
        task, stage, s, opt, n_epochs = run.task, run.stage, run.settings, run.opt, run.n_epochs
        n_steps, val_every = plan["n_steps"], plan["val_every"]
        ectx = run.ctx.replace(epoch=epoch)
        t_epoch = time.time()
        seen, n_logged = 0, 0
        logs_acc: dict[str, float] = {}
        it = progress(plan["batches"], total=(n_steps - skip) if n_steps else None, enabled=not self.quiet,
                      desc=f"task {task + 1} {stage.name} ep {epoch + 1}/{n_epochs}")
        b = skip
        for batch in it:
            if s["sched"].per == "step" and n_steps:
                set_lr(opt, self._lr_factor(stage, s, epoch * n_steps + b, n_epochs * n_steps))
            logs = self._step(run.module, opt, batch, ectx, s["clip"])
            b += 1
            self.global_step += 1
            seen += int(batch["image"].shape[0]) if "image" in batch else 0
            for k, v in logs.items():
                logs_acc[k] = logs_acc.get(k, 0.0) + v
            n_logged += 1
            if self.global_step % self.cfg.log_every == 0:
                self.metrics.log(event="step", task=task, stage=stage.name, epoch=epoch, step=self.global_step,
                                 lr=opt.param_groups[0]["lr"], **logs)
            if val_every and (b % val_every == 0 or (n_steps is not None and b >= n_steps)):
                self._validate(task, stage)
            stop = self.cfg.stop_after_steps and self.global_step >= self.cfg.stop_after_steps
            every = self.cfg.checkpoint_every_steps
            if self._interrupted() or stop or (every and self.global_step % every == 0):
                done = n_steps is not None and b >= n_steps
                resume_at = Position(task, run.si, epoch + 1, 0) if done else Position(task, run.si, epoch, b)
                self._stash_optimizer(run.key, opt)
                if self._interrupt or stop:
                    self.pos = resume_at
                    raise Interrupted(self._save_checkpoint(tag="interrupt"))
                self._save_checkpoint(tag="step", pos=resume_at)  # periodic: save and go on
        dt = time.time() - t_epoch
        self._train_time += dt
        self._train_images += seen * self.world
        means = {k: v / max(n_logged, 1) for k, v in logs_acc.items()}
        self.metrics.log(event="epoch", task=task, stage=stage.name, epoch=epoch, step=self.global_step,
                         steps=b - skip, seconds=round(dt, 3), images_per_s=round(seen * self.world / max(dt, 1e-9), 2),
                         **means)
        if means:
            self.log.info(f"  task {task + 1} {stage.name} epoch {epoch + 1}/{n_epochs}: "
                          + ", ".join(f"{k} {v:.4f}" for k, v in means.items()) + f" ({dt:.1f} s)")

    def _validate(self, task: int, stage: Stage) -> None:
        """Accuracy on the current task's held-out split; remember the best trainable parameters."""
        self.method.eval()
        c, n = self.evaluate_task(task, task, split="val")
        self.method.train()
        acc = 100.0 * c / max(n, 1)
        self.metrics.log(event="validate", task=task, stage=stage.name, step=self.global_step, acc=round(acc, 4))
        if self._best is None or acc > self._best["acc"]:
            self._best = {"acc": acc, "step": self.global_step,
                          "params": {k: p.detach().clone() for k, p in self.method.named_parameters()
                                     if p.requires_grad}}

    def _stash_optimizer(self, key: str, opt: torch.optim.Optimizer) -> None:
        self._current_opt = (key, opt)

    def _wrap(self, stage: Stage) -> nn.Module:
        module = _StepModule(self.method)
        if self.world > 1 and any(p.requires_grad for p in self.method.parameters()):
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            module = DDP(module, device_ids=ids, broadcast_buffers=False)
        return module

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def _step(self, module: nn.Module, opt, batch: dict, ctx: TaskContext, clip: Optional[float]) -> dict:
        batch = to_device(batch, self.device)
        opt.zero_grad(set_to_none=True)
        with self._autocast():
            loss, logs = module(batch, ctx)
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(f"non-finite loss {float(loss.detach())} at step {self.global_step} "
                                     f"(task {ctx.task + 1}, stage {ctx.stage}, epoch {ctx.epoch + 1})")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(opt)
        else:
            loss.backward()
        crash_point("step", "backward")
        if clip:
            params = [p for g in opt.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip)
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        self.method.after_optimizer_step()
        crash_point("step", "update")
        out = {"loss": float(loss.detach())}
        out.update({k: _scalar(v) for k, v in logs.items()})
        return out

    # files ----------------------------------------------------------------------------------------
    def record(self) -> dict:
        """What ``record.json`` holds (see :func:`clfast.engine.record.run_record`)."""
        rec = run_record(self.cfg, self.method, self.scenario, self.device, self.world, command=self.command,
                         init_from=self._init_info)
        if self.amp_note:
            rec["amp_auto"] = self.amp_note
        return rec

    def _write_start_files(self) -> None:
        import yaml

        rio.atomic_write_text(os.path.join(self.run_dir, "config.yaml"),
                              yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        rio.atomic_write_json(os.path.join(self.run_dir, "record.json"), self.record())

    def _update_method_record(self) -> None:
        """Refresh ``method_record`` in ``record.json`` after a task: what a method decides while it trains
        (e.g. ConvPrompt's prompt counts) joins the record; the rest of the file stays as the run began."""
        if not self.is_main:
            return
        import json

        path = os.path.join(self.run_dir, "record.json")
        try:
            with open(path, encoding="utf-8") as f:
                rec = json.load(f)
        except (OSError, ValueError):
            rec = self.record()
        rec["method_record"] = dict(self.method.record())
        rio.atomic_write_json(path, rec)

    def _banner(self) -> None:
        sc = self.scenario
        w = getattr(getattr(self.method, "backbone", None), "weights", None)
        tasks = (f"joint training: {len(sc.eval_tasks(0))} tasks as one" if sc.joint else f"{sc.num_tasks} tasks")
        self.log.info(f"clfast: {self.cfg.method} on {self.cfg.dataset} ({sc.kind}, {tasks}, "
                      f"{sc.num_classes} classes), backbone {getattr(w, 'name', None) or self.cfg.backbone}"
                      + (f" [{w.source}]" if w is not None else "")
                      + f", device {self.device}{f' × {self.world}' if self.world > 1 else ''}, amp {self.cfg.amp}, "
                      f"run dir {self.run_dir}")
        if self.amp_note:
            self.log.info(self.amp_note)

    def _finish(self) -> dict:
        from .plots import plot_acc_matrix, plot_accuracy_curve

        m = self.acc.matrix()
        n = len(self.scenario.eval_tasks(self.scenario.num_tasks - 1))   # tasks evaluated (rows)
        summary = {k: float(v) for k, v in self.acc.summary().items()}
        summary.update({f"eval_{k}": v for k, v in self.eval_extras.items()})
        if self.acc_val is not None:
            summary.update({f"val_{k}": float(v) for k, v in self.acc_val.summary().items()})
        summary["wall_time_s"] = round(time.time() - self._t0 + self._prior_wall(), 3)
        summary["train_time_s"] = round(self._train_time, 3)
        summary["images_per_s"] = round(self._train_images / max(self._train_time, 1e-9), 2)
        summary["num_tasks"] = n
        if self.scenario.joint:
            summary["joint"] = True   # one training task held every task's data (the matrix has one column)
        if self.is_main:
            rio.atomic_write_json(os.path.join(self.run_dir, "summary.json"), summary)
            plot_acc_matrix(m, os.path.join(self.run_dir, "acc_matrix.png"),
                            title=f"{self.cfg.method} on {self.cfg.dataset}")
            plot_accuracy_curve(m, os.path.join(self.run_dir, "accuracy_curve.png"), label=self.cfg.method)
            self.metrics.log(event="summary", step=self.global_step, **summary)
        self.log.info(format_summary(m, summary, self.run_dir))
        self.procs.barrier()
        return summary

