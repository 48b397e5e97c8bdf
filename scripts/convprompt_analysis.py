"""Where a ConvPrompt run's forgetting comes from: prompts that drift, or heads that compete.

    python scripts/convprompt_analysis.py runs/results/convprompt_s2 [more runs ...]

For every task i of a finished run (its end-of-task checkpoints), on task i's test set:

- ``right after``: the accuracy after training task i (the diagonal of the matrix, over the classes seen then);
- ``final``: the accuracy after the last task (the last column);
- ``final heads, task-i prompts``: the last task's heads over the features of the model as it was after task i
  (E, kernels, keys, query MLP and backbone LayerNorms from that checkpoint): what is left of forgetting when the
  prompts do not move, i.e. the later heads' competition alone;
- ``own head``: task-incremental accuracy (task i's classes only) with the final model and with task i's model:
  how much the drift of the shared prompts costs task i's own head.

Prints a markdown table per run and the means over tasks 1..T-1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from clfast.engine import Trainer  # noqa: E402
from clfast.engine.checkpoint import load_run_config  # noqa: E402
from clfast.engine.config import config_from_dict  # noqa: E402


@torch.no_grad()
def accuracy(t: Trainer, task: int, model_task: int, seen_after: int, own_head: bool) -> float:
    """% of task ``task``'s test images classified right by the current model with the prompts in use after task
    ``model_task``, among the classes seen after task ``seen_after`` (class-incremental) or among task ``task``'s own
    classes."""
    ctx = t.context(model_task, split="test", cacheable=True)
    lo, hi = ctx.task_ranges[task] if own_head else (0, t.context(seen_after).seen_classes)
    right = n = 0
    for batch in t.data.sharded_loader(t.test_data(task)):
        with t._autocast():
            logits = t.method.predict(batch, ctx).float()
        pred = logits[:, lo:hi].argmax(1) + lo
        right += int((pred == batch["label"]).sum())
        n += len(pred)
    return 100.0 * right / n


def analyse(run: str) -> list[str]:
    data = load_run_config(run, "convprompt_analysis")
    data.update(quiet=True, threads=data.get("threads") or 1)
    cfg = config_from_dict(data)
    with tempfile.TemporaryDirectory() as tmp:
        t = Trainer(cfg, out=tmp)
    T = t.scenario.num_tasks
    states = [torch.load(os.path.join(run, "checkpoints", f"task{i + 1:03d}.pt"), weights_only=True)["method_state"]
              for i in range(T)]
    m = t.method.eval()
    final = states[-1]
    heads = {k: v for k, v in final.items() if k.startswith("heads.")}
    rows = ["| task | right after | final | final heads, task-i prompts | own head: task-i model | own head: final |",
            "|---|---:|---:|---:|---:|---:|"]
    sums = [0.0] * 5
    for i in range(T):
        m.load_state_dict(states[i], strict=False)
        right_after = accuracy(t, i, i, i, False)
        own_then = accuracy(t, i, i, i, True)
        m.load_state_dict(heads, strict=False)              # the last task's heads over task i's features
        competition = accuracy(t, i, i, T - 1, False)
        m.load_state_dict(final, strict=False)
        last, own_final = accuracy(t, i, T - 1, T - 1, False), accuracy(t, i, T - 1, T - 1, True)
        vals = (right_after, last, competition, own_then, own_final)
        rows.append(f"| {i + 1} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
        if i < T - 1:
            sums = [s + v for s, v in zip(sums, vals)]
    rows.append(f"| mean 1..{T - 1} | " + " | ".join(f"{s / (T - 1):.1f}" for s in sums) + " |")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    args = p.parse_args(argv)
    for run in args.runs:
        print(f"\n{run}\n")
        print("\n".join(analyse(run)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
