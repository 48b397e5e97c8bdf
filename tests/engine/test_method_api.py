"""The hooks later methods need: class names, per-rank generators, stage-level augmentation and batch
counts, custom lr factors, transform arguments, scoring, backbone construction, and checkpoints that
leave the frozen backbone out."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from clfast.backbones.vit import create_vit
from clfast.engine import Interrupted, RunConfig, Trainer
from clfast.engine import io as rio
from clfast.engine.optim import lr_factor
from clfast.methods import (FrozenQueryMethod, MethodConfig, OptimConfig, ScheduleConfig, Stage, StepOutput,
                            TaskContext, masked_logits, register_method)

ALIGN_STEPS = 4


class _Brighten(torch.nn.Module):
    def forward(self, x):
        return (x + 0.25).clamp(0, 1)


@register_method("_test_api")
class ApiProbe(FrozenQueryMethod):
    """Records what the engine hands it; an augmented task stage and a generated-data stage."""

    Config = MethodConfig
    built_with = []
    score_names = ("half",)

    def __init__(self, backbone, num_classes, num_tasks, cfg):
        super().__init__(backbone, num_classes, num_tasks, cfg)
        self.seen: dict[str, list] = {"task_ctx": [], "align_lr": [], "stats_aug": [], "features": []}

    @classmethod
    def build_backbone(cls, run_cfg):
        cls.built_with.append(run_cfg.backbone)
        return create_vit(run_cfg.backbone, pretrained=run_cfg.pretrained)

    def extra_weights(self):
        return [{"name": "text_encoder", "source": "test", "sha256": "0" * 64}]

    def transform_args(self):
        return {"scale": (0.5, 1.0), "hflip": 0.0, "extra": [_Brighten()]}

    def stages(self, ctx):
        return [Stage("task", augment=True),
                Stage("align", epochs=2, data="method", steps_per_epoch=ALIGN_STEPS, params="head",
                      optimizer=OptimConfig("sgd", lr=1.0, momentum=0.0),
                      schedule=ScheduleConfig("cosine", per="step"))]

    def lr_factor(self, stage, pos, total):
        if stage.name == "align":
            return math.cos(0.5 * math.pi * pos / total)   # a schedule no config expresses
        return None

    def param_groups(self, stage):
        if stage.params == "head":
            return [{"params": list(self.head.parameters())}]
        return super().param_groups(stage)

    def training_step(self, batch, ctx: TaskContext):
        if ctx.stage == "align":
            logits = masked_logits(self.classify(batch["features"]), (0, ctx.seen_classes))
        else:
            self.seen["task_ctx"].append((ctx.augment, ctx.cacheable, ctx.batch_size, len(ctx.class_names)))
            logits = self.train_logits(self.classify(self.query(batch, ctx)), ctx)
        loss = F.cross_entropy(logits.float(), batch["label"])
        return StepOutput(loss, {})

    def stage_batches(self, stage, ctx):
        g = ctx.generator()
        for _ in range(ALIGN_STEPS):
            feats = torch.randn(ctx.batch_size, self.embed_dim, generator=g)
            self.seen["features"].append(feats[0, :3].clone())
            yield {"features": feats, "label": torch.randint(0, ctx.seen_classes, (ctx.batch_size,), generator=g)}

    def end_task(self, ctx, loader):
        augmented = ctx.task_loader(augment=True)
        self.seen["stats_aug"].append(augmented.loader.dataset.transform.deterministic)
        # ctx is cacheable for the plain loader; augmented batches carry no index, so no cache keeps them
        assert ctx.cacheable and "index" in next(iter(loader)) and "index" not in next(iter(augmented))

    def score(self, batch, logits, ctx):
        n = logits.shape[0]
        return {"credit": torch.full((n,), 0.25), "half": (torch.arange(n) % 2).float()}

    def predict(self, batch, ctx):
        return self.predict_logits(self.classify(self.query(batch, ctx)), ctx)


def cfg(**kw):
    base = dict(method="_test_api", dataset="digits", num_tasks=2, epochs=1, batch_size=16, limit_train_batches=5,
                limit_eval_batches=1, quiet=True, threads=1, amp="none", augment=False, log_every=1,
                optimizer={"name": "adam", "lr": 0.01})
    return RunConfig(**{**base, **kw})


def test_hooks_reach_the_engine(tmp_path):
    ApiProbe.built_with.clear()
    t = Trainer(cfg(), out=str(tmp_path / "r"))
    summary = t.fit()
    m = t.method
    assert ApiProbe.built_with == ["vit_tiny_synth"]
    # the task stage augments although the run does not; per-rank batch and class names reach it
    assert m.seen["task_ctx"] and all(s == (True, False, 16, t.scenario.num_classes) for s in m.seen["task_ctx"])
    assert t.context(0).class_names == tuple(t.scenario.class_names)
    crop = t.data.train_tfs[True]._pipeline.transforms
    assert tuple(crop[0].scale) == (0.5, 1.0) and isinstance(crop[1], _Brighten) and len(crop) == 2  # no flip
    assert t.data.train_tfs[True](torch.zeros(3, 40, 40)).min() == 0.25        # the extra op runs in training
    assert t.data.eval_tf(torch.zeros(3, 40, 40)).max() == 0                    # and not in evaluation
    assert m.seen["stats_aug"] == [False, False]                          # task_loader(augment=True)
    # the method stage ran 2 epochs × steps_per_epoch, with the method's own per-step lr factor
    lrs = [e["lr"] for e in rio.read_jsonl(tmp_path / "r" / "metrics.jsonl")
           if e["event"] == "step" and e["stage"] == "align"]
    total = 2 * ALIGN_STEPS
    assert lrs == pytest.approx([math.cos(0.5 * math.pi * p / total) for p in range(total)] * 2)
    # generated batches differ by epoch and task, and are drawn again identically from the same coordinates
    feats = m.seen["features"]
    assert len(feats) == 2 * 2 * ALIGN_STEPS and not torch.equal(feats[0], feats[ALIGN_STEPS])
    ctx = t.context(0).replace(stage="align", epoch=0, batch_size=16)
    assert torch.equal(torch.randn(16, m.embed_dim, generator=ctx.generator())[0, :3], feats[0])
    other_rank = ctx.replace(rank=1).generator()
    assert not torch.equal(torch.randn(3, generator=other_rank), torch.randn(3, generator=ctx.generator()))
    # the method's score is what the accuracy matrix counts; its extra values are averaged and reported
    assert summary["A_N"] == pytest.approx(25.0)
    evals = [e for e in rio.read_jsonl(tmp_path / "r" / "metrics.jsonl") if e["event"] == "eval"]
    assert [len(e["extras"]["half"]) for e in evals] == [1, 2]
    assert 0.4 < summary["eval_half"] < 0.6 and summary["eval_half"] == pytest.approx(evals[-1]["half_mean"])
    rec = json.loads((tmp_path / "r" / "record.json").read_text())
    assert rec["extra_weights"] == [{"name": "text_encoder", "source": "test", "sha256": "0" * 64}]


def test_checkpoints_leave_out_the_frozen_backbone_and_check_it_on_load(tmp_path):
    run = tmp_path / "r"
    t = Trainer(cfg(method="l2p", method_args={"pool_size": 4, "top_k": 1, "length": 2}), out=str(run))
    t.fit()
    path = run / "checkpoints" / "task002.pt"
    state = torch.load(path, weights_only=True)
    qkv = "backbone.vit.blocks.0.attn.qkv.weight"
    assert qkv in state["method_unchanged"] and qkv not in state["method_state"]
    assert "prompts" in state["method_state"] and "head.weight" in state["method_state"]
    full = sum(v.numel() * v.element_size() for v in t.method.state_dict().values())
    saved = sum(v.numel() * v.element_size() for v in state["method_state"].values())
    assert saved < 0.2 * full
    # the model built for `clfast eval` / --resume is checked against the digests
    fresh = Trainer(cfg(method="l2p", method_args={"pool_size": 4, "top_k": 1, "length": 2}),
                    out=str(tmp_path / "fresh"))
    rio.restore_unchanged(fresh.method, state["method_state"], state["method_unchanged"])
    for k, v in t.method.state_dict().items():
        assert torch.equal(fresh.method.state_dict()[k], v), k
    with torch.no_grad():
        fresh.method.backbone.vit.blocks[0].attn.qkv.weight.add_(1e-3)    # "other pretrained weights"
    with pytest.raises(ValueError, match="were the pretrained weights"):
        rio.restore_unchanged(fresh.method, state["method_state"], state["method_unchanged"])
    with pytest.raises(ValueError, match="missing"):
        rio.restore_unchanged(fresh.method, {}, {})


@pytest.mark.parametrize("kw, pos, total, want", [
    (dict(name="warmup_linear", warmup=4, warmup_start=0.0), 0, 20, 0.0),      # HF: lr 0 at step 0
    (dict(name="warmup_linear", warmup=4, warmup_start=0.0), 2, 20, 0.5),
    (dict(name="warmup_linear", warmup=4), 0, 20, 1 / 5),                      # default never 0
    (dict(name="warmup_constant", warmup=400, warmup_start=1 / 30, every=100), 150, 10_000,
     1 / 30 + (1 - 1 / 30) * 100 / 400),                                       # CluMo's stairs
    (dict(name="warmup_constant", warmup=400, warmup_start=1 / 30, every=100), 5000, 10_000, 1.0),
])
def test_schedule_warmup_start_and_stairs(kw, pos, total, want):
    assert lr_factor(ScheduleConfig(**kw), pos, total, 1.0) == pytest.approx(want)


def test_bad_new_settings_name_the_field():
    with pytest.raises(ValueError, match="warmup_start"):
        ScheduleConfig(warmup_start=1.5)
    with pytest.raises(ValueError, match="every"):
        ScheduleConfig(every=0)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        Stage("x", data="method", steps_per_epoch=0)
    from clfast.data.transforms import build_transforms
    with pytest.raises(ValueError, match="scale"):
        build_transforms(32, train=True, scale=(0.9, 0.5))
    with pytest.raises(ValueError, match="hflip"):
        build_transforms(32, train=True, hflip=2)
    with pytest.raises(ValueError, match="extra must be a list of callables"):
        build_transforms(32, train=True, extra=["RandAugment"])


def test_validation_split_is_held_out_per_class_and_evaluated(tmp_path):
    run = tmp_path / "r"
    t = Trainer(cfg(method="linear", val_fraction=0.2, val_seed=3), out=str(run))
    for task in range(2):
        train_pos, val_pos = t.data.val_positions(task)
        full = t.scenario.train_set(task)
        assert not set(train_pos) & set(val_pos) and len(train_pos) + len(val_pos) == len(full)
        labels = torch.as_tensor(full.targets)
        for c in torch.unique(labels).tolist():                 # every class is in both parts, ~20 % held out
            n_c = int((labels == c).sum())
            n_val = int((labels[val_pos] == c).sum())
            assert 1 <= n_val < n_c and abs(n_val - 0.2 * n_c) <= 1
        assert len(t.train_data(task)) == len(train_pos) and len(t.val_data(task)) == len(val_pos)
    probe = {}
    orig = t.method.end_task

    def end_task(ctx, loader):
        probe[ctx.task] = sum(b["label"].numel() for b in ctx.val_loader())
        return orig(ctx, loader)

    t.method.end_task = end_task
    summary = t.fit()
    assert probe == {0: len(t.data.val_positions(0)[1]), 1: len(t.data.val_positions(1)[1])}
    assert (run / "acc_matrix_val.csv").is_file() and 0 <= summary["val_A_N"] <= 100
    assert {"val_F_N", "val_BWT"} <= set(summary)
    # the split depends on val_seed only, not on the run's seed
    again = Trainer(cfg(method="linear", val_fraction=0.2, val_seed=3, seed=7), out=str(tmp_path / "s"))
    assert again.data.val_positions(1) == t.data.val_positions(1)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        cfg(val_fraction=1.0)


def test_init_from_another_run(tmp_path):
    args = {"pool_size": 4, "top_k": 1, "length": 2}
    src = Trainer(cfg(method="l2p", method_args=args, num_tasks=2), out=str(tmp_path / "src"))
    src.fit()
    trained = {k: v.clone() for k, v in src.method.state_dict().items()}
    dst = Trainer(cfg(method="l2p", method_args=args, init_from=str(tmp_path / "src"), seed=5),
                  out=str(tmp_path / "dst"))
    for k in ("prompts", "keys", "head.weight"):
        assert torch.equal(dst.method.state_dict()[k], trained[k]), k
    rec = dst.record()["init_from"]
    assert rec["path"].endswith("task002.pt") and len(rec["sha256"]) == 64 and rec["method"] == "l2p"
    dst.fit()                                  # trains on, and its own checkpoints resume from there
    with pytest.raises(ValueError, match="does not fit 'dualprompt'"):
        Trainer(cfg(method="dualprompt", method_args={"e_length": 4}, init_from=str(tmp_path / "src")),
                out=str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="shape mismatches prompts"):
        Trainer(cfg(method="l2p", method_args={**args, "length": 3}, init_from=str(tmp_path / "src")),
                out=str(tmp_path / "bad2"))
    with pytest.raises(FileNotFoundError, match="init_from"):
        Trainer(cfg(method="l2p", init_from=str(tmp_path / "nothing.pt")), out=str(tmp_path / "bad3"))


@register_method("_test_worsen")
class Worsen(FrozenQueryMethod):
    """Learns for the first half of each task, then unlearns (gradient ascent): the best parameters are
    those of the middle validation, not the last ones."""

    Config = MethodConfig

    def __init__(self, backbone, num_classes, num_tasks, cfg):
        super().__init__(backbone, num_classes, num_tasks, cfg)
        self.history: list[torch.Tensor] = []
        self.kept: list[torch.Tensor] = []
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))   # checkpointed, unlike history

    def stages(self, ctx):
        return [Stage("train", validate_every=0.25)]

    def end_stage(self, stage, ctx):
        self.kept.append(self.head.weight.detach().clone())

    def training_step(self, batch, ctx):
        logits = self.train_logits(self.classify(self.query(batch, ctx)), ctx)
        sign = 1.0 if int(self.steps) % 8 < 4 else -1.0
        return StepOutput(sign * F.cross_entropy(logits.float(), batch["label"]), {})

    def after_optimizer_step(self):
        self.steps += 1
        self.history.append(self.head.weight.detach().clone())

    def predict(self, batch, ctx):
        return self.predict_logits(self.classify(self.query(batch, ctx)), ctx)


def test_validation_keeps_the_best_parameters_and_resumes_exactly(tmp_path):
    kw = dict(method="_test_worsen", val_fraction=0.2, limit_train_batches=8, num_tasks=2,
              optimizer={"name": "adam", "lr": 0.005})
    t = Trainer(cfg(**kw), out=str(tmp_path / "full"))
    t.fit()
    events = [e for e in rio.read_jsonl(tmp_path / "full" / "metrics.jsonl") if e["event"] == "validate"]
    worse = 0
    for task in (0, 1):
        ev = [e for e in events if e["task"] == task]
        assert [e["step"] for e in ev] == [8 * task + s for s in (2, 4, 6, 8)]   # every quarter of the 8 steps
        best = max(ev, key=lambda e: (e["acc"], -e["step"]))                    # the first of the best
        worse += best["acc"] > ev[-1]["acc"]
        assert torch.equal(t.method.kept[task], t.method.history[best["step"] - 1]), task
    assert worse, "the toy must end a task worse than its best for this test to mean anything"
    # interrupted after a validation inside task 2: the best-so-far travels in the checkpoint
    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):
        Trainer(cfg(**kw, stop_after_steps=13), out=str(cut)).fit()
    resumed = Trainer.resume(str(cut), stop_after_steps=None)
    resumed.fit()
    assert torch.equal(resumed.method.head.weight, t.method.head.weight)
    assert torch.equal(resumed.method.kept[-1], t.method.kept[-1])
    with pytest.raises(ValueError, match="needs a validation split"):
        Trainer(cfg(method="_test_worsen"), out=str(tmp_path / "noval")).fit()
    # the run-level setting applies to methods that do not name it in their stages
    Trainer(cfg(method="linear", val_fraction=0.2, validate_every=0.5, limit_train_batches=4),
            out=str(tmp_path / "run_level")).fit()
    steps = [e["step"] for e in rio.read_jsonl(tmp_path / "run_level" / "metrics.jsonl") if e["event"] == "validate"]
    assert steps == [2, 4, 6, 8]
    with pytest.raises(ValueError, match="validate_every"):
        Stage("x", data="method", validate_every=0.5)


def test_context_autocast_is_the_runs_precision():
    from clfast.methods import TaskContext

    kw = dict(task=0, num_tasks=1, class_range=(0, 2), seen_classes=2, num_classes=2, task_ranges=((0, 2),))
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    with TaskContext(**kw, amp_dtype=torch.bfloat16).autocast():
        assert (a @ b).dtype == torch.bfloat16
    with TaskContext(**kw).autocast():
        assert (a @ b).dtype == torch.float32
