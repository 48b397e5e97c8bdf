"""The evaluation half of :class:`clfast.engine.Trainer`: every seen task's test (and validation) split after
a task, with the method's own scores and its evaluation protocol, into the accuracy matrices and the metrics
log."""

from __future__ import annotations

import os
import time

import torch

from ..methods.base import masked_logits
from .data_views import to_device
from .faults import crash_point
from .progress import progress


class Evaluating:
    """A mixin over the trainer's state: ``cfg``, ``method``, ``scenario``, ``data``, ``procs``, ``acc`` /
    ``acc_val``, ``metrics``, ``log`` and ``context()``."""

    @torch.no_grad()
    def evaluate_task(self, evaluated: int, after: int, split: str = "test") -> tuple[int, int]:
        """(correct, total) on task ``evaluated``'s test (or ``"val"``) split with the model after task ``after``."""
        ds = self.test_data(evaluated) if split == "test" else self.val_data(evaluated)
        loader = self.data.sharded_loader(ds)
        ctx = self.context(after, split=split, cacheable=True)
        correct = torch.zeros((), dtype=torch.float64)
        total = torch.zeros((), dtype=torch.float64)
        names = tuple(self.method.score_names)      # the same on every rank, also one with no batches
        extra = torch.zeros(len(names), dtype=torch.float64)
        # the method's evaluation protocol: fair by default; the alternatives reproduce released code and
        # the method flags them in record.json (Method.eval_protocol, EvalProtocol)
        protocol = self.method.eval_protocol()
        batch_acc = torch.zeros(2, dtype=torch.float64)   # (sum of per-batch accuracies, batches)
        limit = self.cfg.limit_eval_batches
        for i, batch in enumerate(progress(loader, total=min(len(loader), limit or len(loader)), enabled=not self.quiet,
                                           desc=f"eval task {evaluated + 1} after {after + 1}")):
            if limit and i >= limit:
                break
            batch = to_device(batch, self.device)
            with self._autocast():
                logits = self.method.predict(batch, ctx).float()
            if protocol.mask_unseen:
                logits = masked_logits(logits, (0, ctx.seen_classes))
            if self.scenario.kind == "task-incremental":   # a split holds one task: its classes only
                logits = masked_logits(logits, self.scenario.eval_class_range(evaluated) if split == "test"
                                       else self.scenario.class_range(evaluated))
            scored = self.method.score(batch, logits, ctx)
            parts = scored if isinstance(scored, dict) else {"credit": scored}
            if set(parts) != {"credit", *names}:
                raise ValueError(f"{type(self.method).__name__}.score() must return "
                                 f"{'a dict with credit and ' + ', '.join(names) if names else 'a tensor'}, "
                                 f"got {sorted(parts) if isinstance(scored, dict) else type(scored).__name__}")
            for k, v in parts.items():
                if v.shape != (logits.shape[0],):
                    raise ValueError(f"{type(self.method).__name__}.score()[{k!r}] must be ({logits.shape[0]},) "
                                     f"per-sample values, got shape {tuple(v.shape)}")
            crash_point("eval", "batch")
            correct += float(parts["credit"].double().sum())
            for j, k in enumerate(names):
                extra[j] += float(parts[k].double().sum())
            total += logits.shape[0]
            if logits.shape[0]:
                batch_acc += torch.tensor([float(parts["credit"].double().mean()), 1.0], dtype=torch.float64)
        counts = self.procs.all_reduce(torch.cat([torch.stack([correct, total]), extra, batch_acc]))
        n = max(int(counts[1]), 1)
        self.last_score_extras = {k: float(counts[2 + j]) / n for j, k in enumerate(names)}
        if protocol.mean_of_batches:   # as a count, so that the accuracy matrix holds the batch mean
            return float(counts[-2]) / max(float(counts[-1]), 1.0) * int(counts[1]), int(counts[1])
        return float(counts[0]), int(counts[1])

    def _evaluate(self, after: int) -> None:
        self.method.eval()
        t0 = time.time()
        row, sizes, credit = [], [], 0.0
        extras: dict[str, list[float]] = {k: [] for k in self.method.score_names}
        for i in self.scenario.eval_tasks(after):   # tasks 0..after (every task after a joint one)
            c, n = self.evaluate_task(i, after)
            self.acc.update(i, after, c, n)
            row.append(100.0 * c / max(n, 1))
            sizes.append(int(n))
            credit += c
            for k, v in self.last_score_extras.items():
                extras[k].append(v)
        m = self.acc.matrix()
        seen_mean = float(sum(row) / len(row))
        weighted = 100.0 * credit / max(sum(sizes), 1)   # over every sample of the seen tasks (clumo.md §5)
        self.eval_extras = {k: float(sum(v) / len(v)) for k, v in extras.items()}   # mean over the seen tasks
        self.metrics.log(event="eval", after_task=after, step=self.global_step, acc=[round(a, 4) for a in row],
                         mean=round(seen_mean, 4), sample_weighted=round(weighted, 4),
                         sizes=sizes,
                         seconds=round(time.time() - t0, 3),
                         **({"extras": {k: [round(x, 6) for x in v] for k, v in extras.items()}} if extras else {}),
                         **{f"{k}_mean": round(v, 6) for k, v in self.eval_extras.items()})
        self.log.info(f"after task {after + 1}: accuracy on tasks 1..{len(row)} = "
                      + " ".join(f"{a:.1f}" for a in row) + f"  (mean {seen_mean:.2f}, sample-weighted {weighted:.2f})")
        if self.is_main:
            self.acc.to_csv(os.path.join(self.run_dir, "acc_matrix.csv"))
        del m
        if self.acc_val is not None:  # the held-out split, for choosing settings without the test set
            vrow = []
            for i in range(after + 1):
                c, n = self.evaluate_task(i, after, split="val")
                self.acc_val.update(i, after, c, n)
                vrow.append(100.0 * c / max(n, 1))
            self.metrics.log(event="eval_val", after_task=after, step=self.global_step,
                             acc=[round(a, 4) for a in vrow], mean=round(float(sum(vrow) / len(vrow)), 4))
            if self.is_main:
                self.acc_val.to_csv(os.path.join(self.run_dir, "acc_matrix_val.csv"))
