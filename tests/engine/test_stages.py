"""The hook API carries multi-stage methods: stages with their own optimizers and data, persistent
optimizers, parameter groups with their own lr, statistics passes, and the hook order."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from clfast.engine import Interrupted, RunConfig, Trainer
from clfast.methods import (FrozenQueryMethod, MethodConfig, masked_logits, OptimConfig, ScheduleConfig, Stage, StepOutput,
                            register_method)


@dataclass
class TwoStageConfig(MethodConfig):
    align_steps: int = 3


@register_method("_test_two_stage")
class TwoStage(FrozenQueryMethod):
    """A toy method shaped like STAR-Prompt: a task stage, then an alignment stage on generated features."""

    Config = TwoStageConfig

    def __init__(self, backbone, num_classes, num_tasks, cfg):
        super().__init__(backbone, num_classes, num_tasks, cfg)
        self.adapter = torch.nn.Parameter(torch.zeros(self.embed_dim))
        self.register_buffer("class_means", torch.zeros(num_classes, self.embed_dim))
        self.register_buffer("class_counts", torch.zeros(num_classes))
        self.calls: list[str] = []
        self.seen_lrs: dict[str, list[float]] = {}

    def stages(self, ctx):
        return [Stage("task", persistent=True),
                Stage("align", epochs=2, data="method", optimizer=OptimConfig("sgd", lr=0.5, momentum=0.0),
                      schedule=ScheduleConfig("constant"), params="head")]

    def begin_task(self, ctx):
        self.calls.append(f"begin_task{ctx.task}")

    def begin_stage(self, stage, ctx):
        self.calls.append(f"begin_{stage.name}{ctx.task}")
        self.adapter.requires_grad_(stage.name == "task")

    def param_groups(self, stage):
        if stage.params == "head":
            return [{"params": list(self.head.parameters())}]
        return [{"params": [self.adapter], "lr_scale": 0.1}, {"params": list(self.head.parameters())}]

    def training_step(self, batch, ctx):
        self.calls.append(f"step_{ctx.stage}{ctx.task}")
        if ctx.stage == "align":  # all seen classes, from the stored class means, with a dropout's draw
            features = F.dropout(batch["features"], p=0.1, training=True)   # the global generator
            logits = masked_logits(self.classify(features), (0, ctx.seen_classes))
        else:
            logits = self.train_logits(self.classify(self.query(batch, ctx) + self.adapter), ctx)
        loss = F.cross_entropy(logits.float(), batch["label"])
        return StepOutput(loss, {"ce": loss.detach()})

    def stage_batches(self, stage, ctx):
        lo, hi = ctx.class_range
        g = ctx.generator()
        for _ in range(self.cfg.align_steps):
            labels = torch.randint(0, hi, (16,), generator=g)
            noise = torch.randn(16, self.embed_dim, generator=g)
            yield {"features": self.class_means[labels] + 0.01 * noise, "label": labels}

    def end_task(self, ctx, loader):
        self.calls.append(f"end_task{ctx.task}")
        sums = torch.zeros_like(self.class_means)
        counts = torch.zeros_like(self.class_counts)
        for batch in loader:
            q = self.query(batch, ctx)
            sums.index_add_(0, batch["label"], q)
            counts.index_add_(0, batch["label"], torch.ones_like(batch["label"], dtype=torch.float))
        ctx.all_reduce(sums)
        ctx.all_reduce(counts)
        seen = counts > 0
        self.class_means[seen] = sums[seen] / counts[seen, None]
        self.class_counts += counts

    def predict(self, batch, ctx):
        return self.predict_logits(self.classify(self.query(batch, ctx) + self.adapter), ctx)


def cfg(**kw):
    base = dict(method="_test_two_stage", dataset="digits", num_tasks=2, epochs=1, batch_size=32,
                limit_train_batches=3, limit_eval_batches=1, quiet=True, threads=1, amp="none", augment=False,
                optimizer={"name": "adam", "lr": 0.01})
    return RunConfig(**{**base, **kw})


def test_hooks_run_in_order_with_their_own_optimizers(tmp_path):
    t = Trainer(cfg(), out=str(tmp_path / "r"))
    m = t.method
    t.fit()
    # every stage's steps follow its begin_stage; statistics after the stages; two tasks
    order = [c for c in m.calls if not c.startswith("step_")]
    assert order == ["begin_task0", "begin_task0", "begin_align0", "end_task0",
                     "begin_task1", "begin_task1", "begin_align1", "end_task1"]
    steps = [c for c in m.calls if c.startswith("step_")]
    assert steps.count("step_task0") == 3 and steps.count("step_align0") == 2 * 3   # 2 epochs × 3 batches
    # the persistent task-stage optimizer is one object kept across tasks, with the group lr scale
    (key, opt), = t.persistent_opts.items()
    assert key == "task/0"
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * t.cfg.optimizer.lr, t.cfg.optimizer.lr])
    assert int(opt.state[m.adapter]["step"]) == 6                    # 3 steps in each of 2 tasks
    # statistics passed over the whole task data (not limited) and the class means are set
    assert int(m.class_counts.sum()) == len(t.scenario.train_set(0)) + len(t.scenario.train_set(1))


def test_interrupted_method_stage_resumes(tmp_path):
    full = Trainer(cfg(), out=str(tmp_path / "full"))
    full.fit()
    run = tmp_path / "r"
    with pytest.raises(Interrupted):
        Trainer(cfg(stop_after_steps=5), out=str(run)).fit()    # inside task 0's align stage
    resumed = Trainer.resume(str(run), stop_after_steps=None)
    assert (resumed.pos.task, resumed.pos.stage, resumed.pos.epoch, resumed.pos.batch) == (0, 1, 0, 2)
    resumed.fit()
    # the resumed run trained the rest of the interrupted align epoch, not all of it again
    assert resumed.method.calls.count("step_align0") == 6 - 2
    torch.testing.assert_close(torch.tensor(resumed.acc.matrix()), torch.tensor(full.acc.matrix()), rtol=0, atol=0,
                               equal_nan=True)
    for k, v in full.method.state_dict().items():
        assert torch.equal(resumed.method.state_dict()[k], v), k
