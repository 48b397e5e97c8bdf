"""Where a finished STAR-Prompt run loses accuracy: level 1 (which class the CLIP keys pick), or level 2.

    python scripts/star_analysis.py runs/results/star_prompt_s0 [--every-task]

From the run's last checkpoint, for each task's test images (every seen class competing, as in the accuracy
matrix): the accuracy; level 1's own accuracy (argmax of the CLIP query against the class keys); the share of
blocks whose level-2 selection is the true class; the accuracy with an oracle selection (every block prompted
with the true class's value prompt, weighted by its own modulated score: what level 2 does when level 1 is
right); the accuracy among images whose level-1 choice is right / wrong; and level 1's accuracy among the
task's own classes only. The level-1 keys and context vectors of finished tasks never change (tested bitwise),
so a task's level-1 accuracy can fall only because the keys of later classes compete with its own. With
``--every-task``, the same for the diagonal (each task right after training it). The STAR-Prompt numbers of
docs/results.md come from this.
"""

from __future__ import annotations

import argparse
import sys

import torch

from clfast.ops import modulated_cosine
from digits_analysis import _batches, _tasks_done, _trainer_at

HEAD = ("acc", "level 1", "selection", "oracle selection", "acc | level 1 right", "acc | level 1 wrong",
        "level 1, own classes")


@torch.no_grad()
def after(run: str, last: int) -> list[tuple]:
    t = _trainer_at(run, last)
    m = t.method
    ctx = t.context(last, split="test", cacheable=False)
    seen = ctx.seen_classes
    out = []
    for task in range(last + 1):
        lo, hi = ctx.task_ranges[task]
        sums = dict(n=0, ok=0, l1=0, sel=0.0, oracle=0, ok_l1=0, n_l1=0, ok_nl1=0, own=0)
        for b in _batches(t, task):
            y = b["label"]
            with t._autocast():
                pred = m.predict(b, ctx).float()[:, :seen].argmax(1)
                q = m.clip_query(b, ctx)
                s1 = m.stage1_logits(q, m.keys[:seen])
                _, idx = m.select(q, seen)
                scores = modulated_cosine(q.float(), m.modulators[:, :seen], m.keys[:seen],
                                          scale=m.cfg.selection_scale)               # (L, B, C)
                w = scores.gather(2, y.view(1, -1, 1).expand(scores.shape[0], -1, 1))  # (L, B, 1)
                if not m.cfg.confidence_modulation:
                    w = torch.ones_like(w)
                oracle_prompts = w * m.values[:, y]                                  # (L, B, E)
                oracle = m.eval_head(ctx)(m.prompted_features(b["image"], oracle_prompts)).float()[:, :seen]
            l1 = s1.argmax(1)
            right = l1 == y
            sums["n"] += len(y)
            sums["ok"] += int((pred == y).sum())
            sums["l1"] += int(right.sum())
            sums["sel"] += float((idx == y[None]).float().mean(0).sum())
            sums["oracle"] += int((oracle.argmax(1) == y).sum())
            sums["ok_l1"] += int(((pred == y) & right).sum())
            sums["n_l1"] += int(right.sum())
            sums["ok_nl1"] += int(((pred == y) & ~right).sum())
            sums["own"] += int((s1[:, lo:hi].argmax(1) + lo == y).sum())
        n, n1 = sums["n"], sums["n_l1"]
        pct = lambda a, d: round(100.0 * a / d, 1) if d else float("nan")  # noqa: E731
        out.append((pct(sums["ok"], n), pct(sums["l1"], n), pct(sums["sel"], n), pct(sums["oracle"], n),
                    pct(sums["ok_l1"], n1), pct(sums["ok_nl1"], n - n1), pct(sums["own"], n)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--every-task", action="store_true", help="also the diagonal, from every end-of-task checkpoint")
    args = p.parse_args(argv)
    last = _tasks_done(args.run) - 1
    rows = after(args.run, last)
    line = "{:>4} | " + " | ".join("{:>%d}" % len(h) for h in HEAD)
    print(f"after task {last + 1}: task | " + " | ".join(HEAD))
    for i, r in enumerate(rows):
        print(line.format(i + 1, *r))
    print(line.format("mean", *[round(sum(r[k] for r in rows) / len(rows), 2) for k in range(len(HEAD))]))
    if args.every_task:
        print("diagonal: task | " + " | ".join(HEAD))
        for task in range(last + 1):
            print(line.format(task + 1, *after(args.run, task)[task]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
