"""Where a finished class-incremental run loses accuracy: cross-task confusion, and prompt routing.

    python scripts/digits_analysis.py confusion runs/digits/linear_s0
    python scripts/digits_analysis.py keys runs/digits/dualprompt_s0

``confusion``: for each task t, from the run's end-of-task checkpoint t, the share of task t's test images
predicted as one of task t's own classes and as an earlier task's class (the class-incremental diagonal
minus the first share is what cross-task confusion costs). ``keys``: for a method with per-task prompts
chosen by key (``select(batch, ctx)``, e.g. DualPrompt), the share of each task's test images routed to
that task's prompt after the last task. The numbers of docs/results.md ("digits") come from these.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from clfast.engine import Trainer
from clfast.engine import io as rio
from clfast.engine.checkpoint import resume_config


def _trainer_at(run: str, task: int) -> Trainer:
    cfg, _ = resume_config(run, {"quiet": True, "threads": 1})
    t = Trainer(cfg, out=run, _resume=True)
    state = rio.load_checkpoint(os.path.join(run, "checkpoints", f"task{task + 1:03d}.pt"))
    rio.restore_unchanged(t.method, state["method_state"], state.get("method_unchanged", {}))
    t.method.eval()
    return t


def _tasks_done(run: str) -> int:
    return sum(1 for f in os.listdir(os.path.join(run, "checkpoints")) if f.startswith("task") and f.endswith(".pt"))


def _batches(t: Trainer, task: int):
    return torch.utils.data.DataLoader(t.test_data(task), batch_size=256)


@torch.no_grad()
def confusion(run: str) -> list[tuple[float, float]]:
    out = []
    for task in range(_tasks_done(run)):
        t = _trainer_at(run, task)
        ctx = t.context(task, split="test", cacheable=False)
        lo, hi = ctx.class_range
        own = earlier = n = 0
        for b in _batches(t, task):
            with t._autocast():
                pred = t.method.predict(b, ctx).float()[:, :hi].argmax(1)
            own += int(((pred >= lo) & (pred < hi)).sum())
            earlier += int((pred < lo).sum())
            n += len(pred)
        out.append((round(100 * own / n, 1), round(100 * earlier / n, 1)))
    return out


@torch.no_grad()
def keys(run: str) -> list[float]:
    last = _tasks_done(run) - 1
    t = _trainer_at(run, last)
    if not hasattr(t.method, "select"):
        raise SystemExit(f"{type(t.method).__name__} chooses no per-task prompt by key (no select())")
    ctx = t.context(last, split="test", cacheable=False)
    out = []
    for task in range(last + 1):
        ok = n = 0
        for b in _batches(t, task):
            idx = t.method.select(b, ctx)
            ok += int((idx == task).sum())
            n += len(idx)
        out.append(round(100 * ok / n, 1))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["confusion", "keys"])
    p.add_argument("run", help="a finished run directory")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.what == "confusion":
        print("own / earlier-task predictions (%) of each task right after training it:", confusion(args.run))
    else:
        print("test images routed to their own task's prompt after the last task (%):", keys(args.run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
