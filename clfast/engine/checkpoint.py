"""Checkpoints: what one holds, how a run continues from one, and which settings a resume may change.

A checkpoint (``checkpoints/<tag>.pt``, written atomically by :func:`clfast.engine.io.save_checkpoint`)
holds the position (task, stage, epoch, batch), the method's state (tensors still equal to the model as
built are left out and recorded by digest), the optimizers, every rank's RNG states, the accuracy
matrices, the AMP scaler and the timers, plus the method name and a hash of the settings that change the
numbers (:func:`hashable_config`); loading refuses another method or other settings.

Every checkpoint carries the sha256 of its content (checked on load: a damaged file is refused by name).
``task<NNN>.pt`` are written once per task; ``step.pt`` and ``interrupt.pt`` are overwritten, and the
intact file they replace is kept as ``step.prev.pt`` / ``interrupt.prev.pt``; nothing else is deleted.
So ``--resume`` always has an older intact checkpoint to fall back to when the newest one is damaged,
and says which it skipped and which it used.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional

from ..utils.checkpoint_file import latest_task_checkpoint
from . import io as rio
from .config import RunConfig, config_from_dict

__all__ = ["Position", "Checkpointing", "CHECKPOINT_FORMAT", "READABLE_FORMATS", "RESUME_MAY_CHANGE",
           "hashable_config", "resume_config", "load_run_config", "latest_task_checkpoint", "init_from"]

CHECKPOINT_FORMAT = 3      # 2: tensors unchanged since the model was built are left out (by digest)
READABLE_FORMATS = (1, 2, 3)   # 3: a content hash (io.HASH_KEY), required from io.HASHED_SINCE_FORMAT on
ROTATED_TAGS = ("step", "interrupt")   # overwritten tags: the intact file replaced is kept as <tag>.prev.pt


@dataclass
class Position:
    """Where training stands: the next batch to run is ``batch`` of ``epoch`` of ``stage`` of ``task``."""

    task: int = 0
    stage: int = 0
    epoch: int = 0
    batch: int = 0

    @property
    def at_task_start(self) -> bool:
        return self.stage == 0 and self.epoch == 0 and self.batch == 0


def hashable_config(cfg: RunConfig) -> dict:
    """The settings that change the numbers (what a checkpoint must agree with)."""
    d = cfg.to_dict()
    d.pop("method")   # a checkpoint records its method on its own (and loading checks it)
    for k in NOT_HASHED:
        d.pop(k, None)
    # settings at their default are left out, so a field added in a later version (at its default)
    # does not make older checkpoints unresumable
    default = RunConfig().to_dict()
    # method settings at the method's own default count as unset too, spelled out in a preset or not
    method_cfg = cfg.method_config()
    method_default = dataclasses.asdict(type(method_cfg)())
    d["method_args"] = {k: v for k, v in d["method_args"].items()
                        if _plain(method_default.get(k, _MISSING)) != _plain(getattr(method_cfg, k))}
    for k in list(d):
        if isinstance(d[k], dict) and isinstance(default.get(k), dict):
            d[k] = {s: v for s, v in d[k].items() if default[k].get(s, _MISSING) != v}
        if d[k] == default.get(k, _MISSING):
            del d[k]
    return d


_MISSING = object()


def _plain(v):
    """Tuples as lists, so that a YAML list and a dataclass tuple compare equal."""
    return list(v) if isinstance(v, tuple) else v

# what `--resume` may change: settings that do not change the numbers
RESUME_MAY_CHANGE = frozenset({"quiet", "num_workers", "threads", "stop_after_steps", "checkpoint_every_steps",
                               "log_every", "log_to", "wandb_project", "verify_data", "dist_timeout_s"})


def _get_setting(data: dict, key: str):
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _set_setting(data: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _same_setting(data: dict, key: str, value) -> bool:
    """Whether ``key`` (dotted) already has ``value`` in the run's config (tuples compare as lists)."""
    have = _get_setting(data, key)
    norm = (lambda v: list(v) if isinstance(v, tuple) else v)
    if have is _MISSING:  # a setting the run's config.yaml predates: only its default is "the same"
        default = _get_setting(RunConfig().to_dict(), key)
        return default is not _MISSING and norm(default) == norm(value)
    return norm(have) == norm(value)


def _describe_change(data: dict, key: str, value) -> str:
    have = _get_setting(data, key)
    return f"{key} ({'unset' if have is _MISSING else repr(have)} -> {value!r})"


# run settings that do not change the numbers: checkpoints do not record them
NOT_HASHED = RESUME_MAY_CHANGE | {"name", "device"}


def load_run_config(run_dir: str, what: str = "--resume") -> dict:
    """The settings in ``run_dir/config.yaml`` (a mapping; FileNotFoundError if it is not a run directory)."""
    import yaml

    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{what} {run_dir}: no config.yaml there (not a clfast run directory)")
    with open(cfg_path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def resume_config(run_dir: str, overrides: dict[str, Any]) -> tuple[RunConfig, str]:
    """The configuration to continue ``run_dir`` with, and its newest checkpoint.

    ``overrides`` (dotted keys) may change only :data:`RESUME_MAY_CHANGE`; any other key must be given
    the value the run already has (so the original command line with ``--resume`` added is accepted).
    ``stop_after_steps`` applies to the process it is given to: the resumed run does not inherit it.
    """
    data = load_run_config(run_dir)
    data["stop_after_steps"] = None
    if overrides.get("amp") == "auto" and data.get("amp") in ("bf16", "none"):
        overrides = {k: v for k, v in overrides.items() if k != "amp"}     # what the run resolved auto to stays
    changed = sorted(k for k, v in overrides.items() if k not in RESUME_MAY_CHANGE and not _same_setting(data, k, v))
    if changed:
        raise ValueError(f"--resume: cannot change {', '.join(_describe_change(data, k, overrides[k]) for k in changed)} "
                         f"of a run (only {sorted(RESUME_MAY_CHANGE)} may change)")
    for k, v in overrides.items():
        _set_setting(data, k, v)
    cfg = config_from_dict(data)
    ckpt_path = rio.find_latest_checkpoint(run_dir)
    if ckpt_path is None:
        raise FileNotFoundError(f"--resume {run_dir}: no checkpoint in {os.path.join(run_dir, 'checkpoints')}")
    return cfg, ckpt_path


def init_from(method, source: str, method_name: str, log=None) -> dict:
    """Load the method state of another run (its newest end-of-task checkpoint, or a checkpoint file)
    into the freshly built ``method``: every saved tensor must exist here with the same shape; tensors
    the source left out (unchanged since it was built) keep this run's values. Returns what
    ``record.json`` notes (path, sha256, source method, tensors loaded)."""
    from ..utils.files import sha256_file

    path = latest_task_checkpoint(source) if os.path.isdir(source) else source
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init_from: {source} is neither a checkpoint file nor a run directory")
    state = rio.load_checkpoint(path)
    saved = state.get("method_state", {})
    own = method.state_dict()
    unknown = sorted(k for k in saved if k not in own)
    shapes = sorted(k for k in saved if k in own and tuple(saved[k].shape) != tuple(own[k].shape))
    if unknown or shapes:
        raise ValueError(f"init_from {path}: the checkpoint (method {state.get('method')!r}) does not fit "
                         f"{method_name!r}: unknown keys {unknown[:5]}, shape mismatches "
                         + ", ".join(f"{k} {tuple(saved[k].shape)} vs {tuple(own[k].shape)}" for k in shapes[:5]))
    method.load_state_dict(saved, strict=False)
    if log is not None:
        log.info(f"init_from {path}: loaded {len(saved)} of {len(own)} tensors (method {state.get('method')!r})")
    return {"path": os.path.abspath(path), "sha256": sha256_file(path), "method": state.get("method"),
            "loaded": len(saved)}


class Checkpointing:
    """The checkpoint half of :class:`clfast.engine.Trainer` (a mixin over the trainer's state: ``cfg``,
    ``pos``, ``global_step``, ``method``, the optimizers, ``acc``/``acc_val``, ``scaler``, the timers and
    the process layout)."""

    def _prior_wall(self) -> float:
        return getattr(self, "_wall_before_resume", 0.0)

    def _checkpoint_state(self, pos: Optional[Position], rng: Any) -> dict:
        pos = self.pos if pos is None else pos
        opts = {k: o.state_dict() for k, o in self.persistent_opts.items()}
        cur = getattr(self, "_current_opt", None)
        if cur is not None and not pos.at_task_start:
            opts[cur[0]] = cur[1].state_dict()
        return {
            "format": CHECKPOINT_FORMAT,
            "method": self.cfg.method,
            "config_hash": rio.config_hash(hashable_config(self.cfg)),
            "position": [pos.task, pos.stage, pos.epoch, pos.batch],
            "global_step": self.global_step,
            **dict(zip(("method_state", "method_unchanged"),
                       rio.split_unchanged(self.method.state_dict(), self._built_digests))),
            "optimizers": opts,
            "rng": rng,
            "acc": self.acc.state_dict(),
            "acc_val": self.acc_val.state_dict() if self.acc_val is not None else None,
            "eval_extras": dict(self.eval_extras),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "stage_best": self._best if not pos.at_task_start else None,
            "train_time": self._train_time,
            "train_images": self._train_images,
            "wall_time": time.time() - self._t0 + self._prior_wall(),
        }

    def _save_checkpoint(self, tag: str, pos: Optional[Position] = None) -> str:
        """Write ``checkpoints/<tag>.pt`` (resuming at ``pos``, default the current position).

        Raises:
            CheckpointWriteError: the write failed (e.g. ENOSPC); the message names the file, the errno and
                the checkpoint ``latest.json`` still names, which is intact.
        """
        path = os.path.join(self.run_dir, "checkpoints", f"{tag}.pt")
        # every rank's random streams (a list indexed by rank under DDP), so a resumed run continues each
        rng = self.procs.gather(rio.rng_state())
        if self.is_main:
            try:
                rio.save_checkpoint(path, self._checkpoint_state(pos, rng if self.world > 1 else rng[0]),
                                    keep_previous=tag in ROTATED_TAGS)
            except rio.CheckpointWriteError as e:
                msg = f"{e.strerror or e}; fix the cause (free space) and continue with --resume {self.run_dir}"
                self.log.error(msg)
                raise (rio.CheckpointWriteError(e.errno, msg) if e.errno is not None
                       else rio.CheckpointWriteError(msg)) from e
        self.procs.barrier()
        return path

    def _checkpoint_bytes_estimate(self) -> int:
        """An upper bound on the size of one checkpoint of this run: the tensors always saved (those below
        the size that is left out when unchanged), the trainable parameters, and two optimizer slots per
        trainable parameter (Adam's moments, saved in checkpoints taken mid-task)."""
        params = {k for k, p in self.method.named_parameters() if p.requires_grad}
        total = 0
        for k, v in self.method.state_dict().items():
            n = v.numel() * v.element_size()
            if k in params:
                total += 3 * n
            elif k not in self._built_digests:
                total += n
        return total + (1 << 16)   # RNG states, positions, the pickle

    def _check_free_space(self) -> None:
        """Warn (before training) when this run's checkpoints look larger than the space left for them."""
        ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        free = rio.free_bytes(ckpt_dir)
        if free is None:
            return
        each = self._checkpoint_bytes_estimate()
        count = self.scenario.num_tasks + (2 if self.cfg.checkpoint_every_steps else 0)
        if each * count > free:
            mib = 1 << 20
            self.log.warning(f"{ckpt_dir} has {free / mib:.1f} MiB free, but this run's checkpoints may need up to "
                             f"{each * count / mib:.1f} MiB ({count} files of about {each / mib:.1f} MiB): a "
                             f"checkpoint write will fail with ENOSPC (no space left on device) unless space is freed")

    @classmethod
    def resume(cls, run_dir: str, *, command: Optional[str] = None, **overrides) -> "Checkpointing":
        """A trainer continuing the run in ``run_dir`` from its newest checkpoint.

        ``overrides`` may change only what does not affect the numbers (``quiet``, ``num_workers``,
        ``threads``, ``stop_after_steps``, ``checkpoint_every_steps``, logging); any other key must be
        given the value the run already has (so the original command line with ``--resume`` added is
        accepted). ``stop_after_steps`` applies to the process it is given to: the resumed run does not
        inherit it.

        The newest checkpoint is checked against its content hash; if it is damaged, the newest intact one
        is used instead and the log says which file was skipped (and why) and which was used. Temporary
        files a killed writer left are removed first.
        """
        cfg, _ = resume_config(run_dir, overrides)
        trainer = cls(cfg, out=run_dir, command=command, _resume=True)
        if trainer.is_main:   # what writers killed mid-write left (no other process writes this run now)
            for d in (trainer.run_dir, os.path.join(trainer.run_dir, "checkpoints")):
                removed = rio.remove_partial_files(d)
                if removed:
                    trainer.log.warning(f"--resume: removed {len(removed)} partial file(s) a killed run left in {d}: "
                                     + ", ".join(removed))
        expected = {"method": cfg.method, "config_hash": rio.config_hash(hashable_config(cfg))}
        with warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always", rio.CheckpointWarning)
            ckpt_path, state, skipped = rio.load_latest_checkpoint(run_dir, expected=expected)
        for w in notes:
            if issubclass(w.category, rio.CheckpointWarning):
                trainer.log.warning(f"--resume: {w.message}")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        for bad, why in skipped:
            trainer.log.warning(f"--resume: skipping {bad}: {why}")
        if skipped:
            trainer.log.warning(f"--resume: resuming from {ckpt_path} instead, the newest intact checkpoint (the "
                                f"steps after it are trained again)")
        trainer._load_state(state)
        trainer._resumed_from = dict(step=trainer.global_step, task=trainer.pos.task,
                                     checkpoint=os.path.basename(ckpt_path))
        trainer.log.info(f"resuming {run_dir} from {os.path.basename(ckpt_path)} at task {trainer.pos.task + 1}, "
                         f"stage {trainer.pos.stage + 1}, epoch {trainer.pos.epoch + 1}, batch {trainer.pos.batch}")
        return trainer

    def _load_state(self, state: dict) -> None:
        if state.get("format") not in READABLE_FORMATS:
            raise ValueError(f"checkpoint format {state.get('format')} is not one of {READABLE_FORMATS}")
        self.pos = Position(*[int(x) for x in state["position"]])
        self.global_step = int(state["global_step"])
        self.acc.load_state_dict(state["acc"])   # into the run's own matrix (square, or a joint run's column)
        self.eval_extras = {k: float(v) for k, v in state.get("eval_extras", {}).items()}
        self._pending_best = state.get("stage_best")
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.acc_val is not None and state.get("acc_val") is not None:
            self.acc_val.load_state_dict(state["acc_val"])
        self._train_time = float(state["train_time"])
        self._train_images = int(state["train_images"])
        self._wall_before_resume = float(state["wall_time"])
        self._opt_states = dict(state["optimizers"])
        rng = state["rng"]
        if isinstance(rng, list):
            if len(rng) != self.world:
                raise ValueError(f"the checkpoint was written by {len(rng)} processes; resume it with the same "
                                 f"number (this run has {self.world})")
            rng = rng[self.rank]
        elif self.world > 1:
            raise ValueError("the checkpoint was written by one process; resume it with one process")
        method_state = (state["method_state"], state.get("method_unchanged", {}))
        rio.check_unchanged(self.method, method_state[1])   # now, not when the stage starts
        if self.pos.at_task_start:
            rio.restore_unchanged(self.method, *method_state)
            rio.set_rng_state(rng)
        else:  # applied in _run_stage, after begin_task and begin_stage have run again
            self._pending = (method_state, rng)
