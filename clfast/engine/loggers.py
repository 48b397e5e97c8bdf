"""Where a run's events go: ``metrics.jsonl`` always, TensorBoard and Weights & Biases on request.

The trainer emits four kinds of events (``step``, ``epoch``, ``eval``, ``summary``); :class:`RunLogger`
writes each to ``metrics.jsonl`` and mirrors its numbers to the sinks named in the run's ``log_to``:

- ``tensorboard``: event files under ``<run>/tensorboard`` (``torch.utils.tensorboard``; needs the
  ``tensorboard`` package). A resumed run purges the events logged after its checkpoint's step, so the
  curves have no doubled segment.
- ``wandb``: a W&B run whose id is stored in ``<run>/wandb_id`` so that ``--resume`` continues the same
  W&B run; files under ``<run>/wandb``. ``WANDB_MODE=offline`` (or ``disabled``) works as usual, and
  the project is the run's ``wandb_project``.

Scalars are named ``train/<name>`` (every ``log_every`` steps), ``epoch/<name>``, ``eval/task<i>`` and
``eval/mean`` (after each task; ``val/...`` likewise on the held-out split when ``val_fraction`` > 0),
and ``summary/<name>``; TensorBoard puts them all on the global step,
W&B plots ``eval/*`` against ``tasks_trained`` and keeps ``summary/*`` in the run summary. Only rank 0
writes anything.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Optional

from . import io as rio

__all__ = ["RunLogger", "SINKS", "check_sinks", "read_metrics"]

SINKS = {"tensorboard": "tensorboard", "wandb": "wandb"}   # sink name -> the package it needs


def check_sinks(names) -> tuple[str, ...]:
    """Validate ``log_to``: a list of sink names, each known and importable (errors name the key)."""
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)):
        raise ValueError(f"log_to must be a list of {sorted(SINKS)}, got {names!r}")
    out = []
    for name in names:
        if name not in SINKS:
            raise ValueError(f"log_to: unknown sink {name!r}; choose from {sorted(SINKS)}")
        if name not in out:
            out.append(name)
    return tuple(out)


def _import_sink(name: str):
    try:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            return SummaryWriter
        import wandb
        return wandb
    except ImportError as e:
        raise ImportError(f"log_to: {name!r} needs the {SINKS[name]!r} package: pip install {SINKS[name]} "
                          f"({e})") from None


def _scalars(fields: dict, prefix: str) -> dict[str, float]:
    """The numeric fields of an event, as ``prefix/name`` floats (other fields are left out)."""
    out = {}
    for k, v in fields.items():
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)):
            out[f"{prefix}/{k}"] = float(v)
    return out


def read_metrics(path) -> list[dict]:
    """The events of a run's ``metrics.jsonl`` as an uninterrupted run would have logged them.

    A ``resume`` event (``step``, ``task``) marks where ``--resume`` picked the run up: the events an interrupted
    process logged after that checkpoint were trained or evaluated again, so they are dropped: ``step``,
    ``epoch`` and ``validate`` events with a larger ``step``, and ``eval``/``eval_val`` events after task
    ``task`` or later. The ``resume`` events themselves are dropped too; nothing else is. The file itself is
    never rewritten (nothing a run logged is lost).
    """
    out: list[dict] = []
    for event in rio.read_jsonl(path):
        if event.get("event") != "resume":
            out.append(event)
            continue
        step, task = int(event["step"]), int(event["task"])

        def superseded(e: dict) -> bool:
            kind = e.get("event")
            if kind in ("step", "epoch", "validate"):
                return int(e.get("step", 0)) > step
            if kind in ("eval", "eval_val"):
                return int(e.get("after_task", -1)) >= task
            return False

        out = [e for e in out if not superseded(e)]
    return out


class RunLogger:
    """``metrics.jsonl`` plus the optional mirrors of ``log_to`` (see the module docstring).

    Args:
        run_dir: the run directory.
        enabled: write nothing at all when False (ranks other than 0).
        log_to: sink names (validated with :func:`check_sinks`).
        config: the resolved run configuration (W&B stores it with the run).
        project: the W&B project.
    """

    def __init__(self, run_dir: str, enabled: bool = True, log_to=(), config: Optional[dict] = None,
                 project: str = "clfast") -> None:
        self.run_dir = run_dir
        self.enabled = bool(enabled)
        self.sinks = check_sinks(log_to)
        self.config = config or {}
        self.project = project
        self.jsonl = rio.JsonlLogger(os.path.join(run_dir, "metrics.jsonl"), enabled=self.enabled)
        self._tb = None
        self._wandb = None
        if self.enabled:
            for name in self.sinks:  # fail at construction, before any training, if a package is missing
                _import_sink(name)

    def open(self, start_step: int = 0, resumed_from: Optional[dict] = None) -> None:
        """Start the mirrors; ``start_step`` > 0 when resuming (events after it are superseded).

        ``resumed_from`` (``step``, ``task``, ``checkpoint``: where ``--resume`` picked the run up) is logged as a
        ``resume`` event: what the interrupted process logged after that checkpoint stays in the file and is
        trained again; :func:`read_metrics` drops it."""
        if not self.enabled:
            return
        if resumed_from is not None:
            self.jsonl.log(event="resume", **resumed_from)
        if "tensorboard" in self.sinks and self._tb is None:
            writer_cls = _import_sink("tensorboard")
            # the checkpoint was written after its step was logged: what comes after it is replayed
            self._tb = writer_cls(log_dir=os.path.join(self.run_dir, "tensorboard"),
                                  purge_step=start_step + 1 if start_step > 0 else None)
        if "wandb" in self.sinks and self._wandb is None:
            wandb = _import_sink("wandb")
            id_path = os.path.join(self.run_dir, "wandb_id")
            if os.path.isfile(id_path):
                with open(id_path, encoding="utf-8") as f:
                    run_id = f.read().strip()
            else:
                run_id = uuid.uuid4().hex[:16]
                rio.atomic_write_text(id_path, run_id + "\n")
            os.makedirs(os.path.join(self.run_dir, "wandb"), exist_ok=True)
            self._wandb = wandb.init(project=self.project, id=run_id, resume="allow", dir=self.run_dir,
                                     name=os.path.basename(self.run_dir), config=self.config)
            # own x axes, so a resumed run (whose step goes back to its checkpoint) logs without conflict
            for prefix, axis in (("train", "global_step"), ("epoch", "global_step"), ("eval", "tasks_trained"),
                                 ("val", "tasks_trained")):
                self._wandb.define_metric(axis, hidden=True)
                self._wandb.define_metric(f"{prefix}/*", step_metric=axis)

    def log(self, event: str, **fields: Any) -> None:
        """Append the event to ``metrics.jsonl`` and mirror its numbers."""
        if not self.enabled:
            return
        self.jsonl.log(event=event, **fields)
        scalars, step = self._mirror(event, fields)
        if not scalars:
            return
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, global_step=step)
            self._tb.flush()
        if self._wandb is not None:
            if event == "summary":
                self._wandb.summary.update(scalars)
            elif event in ("eval", "eval_val"):
                self._wandb.log({**scalars, "tasks_trained": int(fields["after_task"]) + 1})
            else:
                self._wandb.log({**scalars, "global_step": step})

    @staticmethod
    def _mirror(event: str, fields: dict) -> tuple[dict[str, float], int]:
        """The event's scalars and the global step they belong to."""
        step = int(fields.get("step", 0))
        if event == "step":
            return _scalars({k: v for k, v in fields.items() if k not in ("task", "epoch", "step")}, "train"), step
        if event == "epoch":
            skip = ("task", "epoch", "step", "steps")
            return _scalars({k: v for k, v in fields.items() if k not in skip}, "epoch"), step
        if event in ("eval", "eval_val"):
            prefix = "eval" if event == "eval" else "val"
            out = {f"{prefix}/task{i + 1}": float(a) for i, a in enumerate(fields.get("acc", []))}
            out[f"{prefix}/mean"] = float(fields["mean"])
            out.update({f"{prefix}/{k}": float(v) for k, v in fields.items() if k.endswith("_mean") and k != "mean"})
            return out, step
        if event == "summary":
            return _scalars({k: v for k, v in fields.items() if k != "step"}, "summary"), step
        return {}, step

    def close(self) -> None:
        self.jsonl.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
