"""Where a finished GPLS run loses accuracy: the task it infers, or the prompts themselves.

    python scripts/gpls_analysis.py runs/results/gpls_s0 [--every-task]

From the run's last checkpoint, for each task's test images: accuracy with the task GPLS infers (what the
accuracy matrix holds), accuracy with the true task's prompts (an oracle for task identity only: the head
still chooses among every seen class), the same within the task's own classes (task-incremental: how well
the task was learnt, apart from telling its classes from other tasks'), and the share of images whose task
was inferred right. With
``--every-task``, the same for the diagonal (each task right after training it, from its end-of-task
checkpoint): whether each task was learnt at all, apart from identifying it later. The GPLS numbers of
docs/results.md come from this.
"""

from __future__ import annotations

import argparse
import sys

import torch

from digits_analysis import _batches, _tasks_done, _trainer_at


@torch.no_grad()
def after(run: str, last: int) -> list[tuple[float, float, float, float]]:
    """(inferred, oracle, oracle within the task's own classes, task-id) accuracy in % for tasks 0..last, from
    the end-of-task-``last`` checkpoint."""
    t = _trainer_at(run, last)
    m = t.method
    ctx = t.context(last, split="test", cacheable=False)
    out = []
    for task in range(last + 1):
        lo, hi = ctx.task_ranges[task]
        ok_inf = ok_oracle = ok_own = ok_id = n = 0
        for b in _batches(t, task):
            with t._autocast():
                inferred = m.predict(b, ctx).float().argmax(1)
                tid, _ = m.infer_task(b, ctx)
                true = torch.full_like(tid, task)
                logits = m.logits(b["image"], true).float()
                oracle = m.predict_logits(logits, ctx).argmax(1)
                own = logits[:, lo:hi].argmax(1) + lo
            ok_inf += int((inferred == b["label"]).sum())
            ok_oracle += int((oracle == b["label"]).sum())
            ok_own += int((own == b["label"]).sum())
            ok_id += int((tid == task).sum())
            n += len(true)
        out.append(tuple(round(100 * v / n, 1) for v in (ok_inf, ok_oracle, ok_own, ok_id)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--every-task", action="store_true", help="also the diagonal, from every end-of-task checkpoint")
    args = p.parse_args(argv)
    last = _tasks_done(args.run) - 1
    rows = after(args.run, last)
    head = "task | inferred | oracle task | oracle, own classes | task id"
    line = "{:>4} | {:>8} | {:>11} | {:>19} | {:>7}"
    print(f"after task {last + 1}: {head}")
    for i, r in enumerate(rows):
        print(line.format(i + 1, *r))
    print(line.format("mean", *[round(sum(r[k] for r in rows) / len(rows), 2) for k in range(4)]))
    if args.every_task:
        print(f"diagonal: {head}")
        for task in range(last + 1):
            print(line.format(task + 1, *after(args.run, task)[task]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
