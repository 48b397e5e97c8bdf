"""``clfast eval --run DIR``: re-evaluate a run's newest end-of-task checkpoint on every task it has seen."""

from __future__ import annotations

import os
import time

from . import io as rio
from .checkpoint import hashable_config, latest_task_checkpoint, load_run_config
from .config import config_from_dict
from .trainer import Trainer

__all__ = ["evaluate_run"]


def evaluate_run(run_dir: str, quiet: bool = False) -> int:
    """Load the run's newest end-of-task checkpoint, evaluate tasks 1..t, print and save ``eval.json``.

    Returns 0; raises FileNotFoundError / ValueError for a missing or mismatched run, or a damaged checkpoint
    (:class:`clfast.engine.io.DamagedCheckpointError`, naming the file and what is wrong).
    """
    run_dir = os.path.abspath(run_dir)
    cfg = config_from_dict(load_run_config(run_dir, what="--run"))
    cfg.quiet = quiet or cfg.quiet
    ckpt = latest_task_checkpoint(run_dir)
    trainer = Trainer(cfg, out=run_dir, _resume=True)
    state = rio.load_checkpoint(ckpt, expected={"method": cfg.method,
                                                "config_hash": rio.config_hash(hashable_config(cfg))})
    rio.restore_unchanged(trainer.method, state["method_state"], state.get("method_unchanged", {}))
    trainer.method.eval()
    after = int(state["position"][0]) - 1
    t0 = time.time()
    rows = []
    for i in trainer.scenario.eval_tasks(after):
        c, n = trainer.evaluate_task(i, after)
        rows.append({"task": i + 1, "correct": c, "total": n, "accuracy": 100.0 * c / max(n, 1)})
    mean = sum(r["accuracy"] for r in rows) / len(rows)
    out = {"checkpoint": os.path.basename(ckpt), "after_task": after + 1, "tasks": rows,
           "mean_accuracy": mean, "seconds": round(time.time() - t0, 3)}
    if trainer.is_main:
        rio.atomic_write_json(os.path.join(run_dir, "eval.json"), out)
        print(f"{cfg.method} on {cfg.dataset}, checkpoint {out['checkpoint']} (after task {after + 1}):")
        for r in rows:
            print(f"  task {r['task']:>2d}: {r['accuracy']:6.2f} %  ({r['correct']:.0f}/{r['total']})")
        print(f"  mean over tasks: {mean:.2f} %   (written to {os.path.join(run_dir, 'eval.json')})")
    return 0
