"""Where a continual-VQA model's answers go after the last task: per task evaluated, the share of its test
questions answered correctly, answered with an answer of its own task (its family's answer set, e.g. a colour for
an attribute question), and answered with an answer of the **last** task's set. A head that forgets by drifting
to the last task's answers (the naive fine-tuning baseline) shows it in the third column.

    python scripts/vqa_forgetting.py RUN [RUN ...] [--threads 2]

RUN: a finished run directory of a VQA method (config.yaml and its newest end-of-task checkpoint); the scenario and
the method are rebuilt from config.yaml (nothing is written to RUN), the checkpoint loaded, each task's test split
answered with the engine's evaluation context. A task's answer set is every answer its training split uses.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, ROOT)

from clfast.engine import Trainer  # noqa: E402
from clfast.engine.checkpoint import load_run_config  # noqa: E402
from clfast.engine.config import config_from_dict  # noqa: E402
from clfast.engine.data_views import to_device  # noqa: E402
from clfast.utils.checkpoint_file import latest_task_checkpoint, read_checkpoint  # noqa: E402


def answer_sets(trainer) -> list[set[int]]:
    """Per task, the labels its training split uses."""
    out = []
    for t in range(trainer.scenario.num_tasks):
        data = trainer.train_data(t, augment=False)
        out.append({int(data[i]["label"]) for i in range(len(data))})
    return out


@torch.no_grad()
def where_answers_go(run: str) -> list[dict]:
    cfg = config_from_dict(load_run_config(run, "vqa_forgetting"))
    cfg.quiet, cfg.stop_after_steps = True, None
    with tempfile.TemporaryDirectory() as tmp:
        t = Trainer(cfg, out=os.path.join(tmp, "run"))
        state = read_checkpoint(latest_task_checkpoint(run))
        t.method.load_state_dict(state["method_state"], strict=False)
        t.method.eval()
        sets = answer_sets(t)
        last = t.scenario.num_tasks - 1
        rows = []
        for task in range(t.scenario.num_tasks):
            ctx = t.context(last, split="test", cacheable=True)
            n = correct = own = to_last = 0
            for batch in t.data.sharded_loader(t.test_data(task)):
                batch = to_device(batch, t.device)
                with t._autocast():
                    pred = t.method.predict(batch, ctx).float().argmax(1).cpu()
                n += pred.numel()
                correct += int((pred == batch["label"].cpu()).sum())
                own += sum(int(p) in sets[task] for p in pred.tolist())
                to_last += sum(int(p) in sets[last] for p in pred.tolist())
            rows.append({"task": task + 1, "n": n, "correct": 100 * correct / n, "own_set": 100 * own / n,
                         "last_set": 100 * to_last / n})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for run in args.runs:
        print(f"\n{run}: after the last task, per task evaluated (%; exact match with the label)")
        print("task      n  correct  own answer set  last task's answer set")
        for r in where_answers_go(run):
            print(f"{r['task']:>4} {r['n']:>6} {r['correct']:>8.1f} {r['own_set']:>15.1f} {r['last_set']:>23.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
