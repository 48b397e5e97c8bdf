"""The two reference rows of every table: `joint` (the upper bound) and `finetune` (the naive lower bound).

`joint` trains its base method on every task's data as one task and fills one column of the accuracy
matrix; `finetune` is `linear` with the backbone trained, and `linear` exactly with it frozen. Both write the
full run directory and resume bitwise (compared as in tests/engine/test_resume.py: every tensor the final
checkpoint holds, and the matrix).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from clfast.backbones.vit import create_vit
from clfast.engine import Interrupted, Trainer, load_config
from clfast.engine.checkpoint import hashable_config
from clfast.engine.metrics import read_acc_csv
from clfast.methods import TaskContext, create_method, method_class

# digits: 5 tasks × 2 classes, small enough that a whole joint epoch takes seconds
QUICK = ["quiet=true", "threads=1", "epochs=1", "batch_size=32", "eval_batch_size=128", "limit_eval_batches=1"]
SMALL = {"linear": [], "finetune": [], "l2p": ["method_args.pool_size=4", "method_args.top_k=2"],
         "dualprompt": ["method_args.e_length=4"], "coda_prompt": ["method_args.pool_size=8"]}
RUN_FILES = ["config.yaml", "record.json", "metrics.jsonl", "acc_matrix.csv", "summary.json", "acc_matrix.png",
             "accuracy_curve.png", "train.log"]


def joint_cfg(base: str = "linear", extra=()):
    return load_config("joint", "digits", "fast", QUICK + [f"method_args.base={base}", *SMALL[base], *extra])


def final_state(run) -> dict:
    ckpts = sorted(p for p in os.listdir(os.path.join(run, "checkpoints")) if p.startswith("task"))
    return torch.load(os.path.join(run, "checkpoints", ckpts[-1]), weights_only=True)


def assert_same_run(run, ref):
    a, b = final_state(run)["method_state"], final_state(ref)["method_state"]
    assert a.keys() == b.keys()
    assert sorted(k for k in a if not torch.equal(a[k], b[k])) == []
    np.testing.assert_array_equal(read_acc_csv(os.path.join(run, "acc_matrix.csv")),
                                  read_acc_csv(os.path.join(ref, "acc_matrix.csv")))


# --- joint ------------------------------------------------------------------------------------------------

def test_joint_sees_every_class_in_one_task_and_fills_one_column(tmp_path):
    trainer = Trainer(joint_cfg(), out=str(tmp_path / "run"))
    base = trainer.scenario.scenario                              # the continual split it evaluates
    assert trainer.scenario.joint and trainer.scenario.num_tasks == 1 and trainer.method.num_tasks == 1
    assert type(trainer.method).__mro__[1] is method_class("linear")
    labels, ranges = set(), set()
    step = trainer.method.training_step

    def spy(batch, ctx):
        labels.update(batch["label"].tolist())
        ranges.add((ctx.task, ctx.class_range, ctx.seen_classes, ctx.num_tasks))
        return step(batch, ctx)

    trainer.method.training_step = spy
    summary = trainer.fit()
    run = tmp_path / "run"
    assert labels == set(range(10)) and ranges == {(0, (0, 10), 10, 1)}
    assert len(trainer.data.train_part(0)) == sum(base.task_sizes("train"))
    m = read_acc_csv(run / "acc_matrix.csv")
    assert m.shape == (5, 1) and not np.isnan(m).any()
    assert (run / "acc_matrix.csv").read_text().splitlines()[0] == "task,after_1"
    correct, total = trainer.acc.counts()
    assert total[:, 0].tolist() == [min(n, 128) for n in base.task_sizes("test")]   # each task's own split
    assert summary["A_N"] == pytest.approx(m[:, 0].mean())
    assert summary["sample_weighted_accuracy"] == pytest.approx(100 * correct.sum() / total.sum())
    assert summary["F_N"] == 0.0 and summary["BWT"] == 0.0 and summary["num_tasks"] == 5 and summary["joint"]
    for f in RUN_FILES + ["checkpoints/task001.pt"]:
        assert (run / f).is_file(), f
    assert not (run / "checkpoints" / "task002.pt").exists()
    rec = json.loads((run / "record.json").read_text())
    assert rec["method"] == "joint" and rec["method_record"]["joint_base"] == "linear"
    assert rec["scenario"]["joint"] and rec["scenario"]["num_tasks"] == 5


@pytest.mark.parametrize("base", ["l2p", "dualprompt", "coda_prompt"])
def test_joint_of_a_method_with_task_keyed_state(tmp_path, base):
    """Prompts per task and components per task are built for one task, which then sees every class."""
    trainer = Trainer(joint_cfg(base, ["limit_train_batches=3"]), out=str(tmp_path / base))
    m = trainer.method
    if base == "dualprompt":
        assert m.pool == 1 and m.e_prompt.shape[2] == 1 and m.e_keys.shape[0] == 1
    if base == "coda_prompt":
        assert m.per_task == m.cfg.pool_size == 8      # every component trained in the one task
    before = {k: v.detach().clone() for k, v in m.named_parameters() if v.requires_grad}
    trainer.fit()
    moved = {k for k, v in m.named_parameters() if v.requires_grad and not torch.equal(v, before[k])}
    assert "head.weight" in moved and moved != {"head.weight", "head.bias"}   # the prompts trained too
    if base == "coda_prompt":   # all 8 components moved, none held frozen as "an earlier task's"
        assert (m.prompts.detach() - before["prompts"]).abs().amax(dim=(0, 2, 3)).gt(0).all()
    assert read_acc_csv(tmp_path / base / "acc_matrix.csv").shape == (5, 1)


def test_joint_presets_are_the_base_methods_and_settings_hash_apart():
    for preset in ("fast", "digits", "cifar100", "imagenet_r"):
        for base in ("linear", "l2p", "finetune"):
            j = load_config("joint", "synth-shapes", preset, [f"method_args.base={base}"]).to_dict()
            b = load_config(base, "synth-shapes", preset).to_dict()
            assert j.pop("method_args") == {**b.pop("method_args"), "base": base}
            assert j.pop("method") == "joint" and b.pop("method") == base and j == b
    # the base's own settings are flat beside `base`, and checked against the base's Config
    cfg = load_config("joint", "synth-shapes", None, ["method_args.base=l2p", "method_args.top_k=2"])
    assert cfg.method_config().top_k == 2 and cfg.method_config().base == "l2p"
    with pytest.raises(ValueError, match="top_k"):
        load_config("joint", "synth-shapes", None, ["method_args.top_k=2"])   # base linear has no top_k
    hashes = {rio_hash(load_config("joint", "synth-shapes", None, [f"method_args.base={b}"])) for b in
              ("linear", "l2p")}
    assert len(hashes) == 2


def rio_hash(cfg) -> str:
    from clfast.engine import io as rio

    return rio.config_hash(hashable_config(cfg))


@pytest.mark.parametrize("bad, match", [
    ("l2q", r"method_args\.base: unknown method 'l2q'.*'l2p'"),
    ("joint", r"method_args\.base must name the method to train jointly"),
    ("5", r"method_args\.base must name a method"),
])
def test_joint_refuses_a_bad_base_naming_it(bad, match):
    with pytest.raises(ValueError, match=match):
        load_config("joint", "digits", None, [f"method_args.base={bad}"])
    backbone = create_vit("vit_tiny_synth")
    with pytest.raises(ValueError, match=match):
        create_method("joint", backbone, 10, 1, base=int(bad) if bad.isdigit() else bad)


def test_joint_resumes_exactly(tmp_path):
    """Interrupted in the middle of its one task (augmentation on), then resumed: the same run."""
    extra = ["augment=true", "limit_train_batches=4", "eval_batch_size=32"]
    Trainer(joint_cfg("dualprompt", extra), out=str(tmp_path / "full")).fit()
    with pytest.raises(Interrupted):
        Trainer(joint_cfg("dualprompt", extra + ["stop_after_steps=2"]), out=str(tmp_path / "cut")).fit()
    Trainer.resume(str(tmp_path / "cut")).fit()
    assert_same_run(tmp_path / "cut", tmp_path / "full")
    # and the equality is not that of untrained tensors: training moved the prompts from their start
    built = Trainer(joint_cfg("dualprompt", extra), out=str(tmp_path / "built")).method
    trained = final_state(tmp_path / "full")["method_state"]
    assert not torch.equal(trained["e_prompt"], built.e_prompt.detach())
    assert not torch.equal(trained["g_prompt"], built.g_prompt.detach())


# --- finetune ---------------------------------------------------------------------------------------------

def ft_cfg(method: str, extra=()):
    return load_config(method, "digits", "fast", QUICK + ["num_tasks=2", "limit_train_batches=3", *extra])


def backbone_weights(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.method.backbone.state_dict().items()}


@pytest.mark.parametrize("method", ["finetune", "linear"])
def test_finetune_changes_the_backbone_and_linear_does_not(tmp_path, method):
    trainer = Trainer(ft_cfg(method), out=str(tmp_path / method))
    before = backbone_weights(trainer)
    trainer.fit()
    after = backbone_weights(trainer)
    moved = sorted(k for k in before if not torch.equal(before[k], after[k]))
    state = final_state(tmp_path / method)
    key = "backbone.vit.blocks.0.attn.qkv.weight"
    if method == "linear":
        assert moved == [] and key in state["method_unchanged"]
    else:
        weights = [k for k, v in trainer.method.backbone.named_parameters()]
        assert set(moved) == set(weights)          # every weight of the ViT trained
        # the checkpoint holds the trained backbone (it is not "unchanged from the model as built")
        assert key in state["method_state"] and not state["method_unchanged"]
        assert torch.equal(state["method_state"][key], after[key[len("backbone."):]])
    for f in RUN_FILES + ["checkpoints/task001.pt", "checkpoints/task002.pt"]:
        assert (tmp_path / method / f).is_file(), f


def test_finetune_with_a_frozen_backbone_is_linear(tmp_path):
    """The presets of both with the same seed: the same matrix and head, bit for bit."""
    Trainer(ft_cfg("linear"), out=str(tmp_path / "linear")).fit()
    Trainer(ft_cfg("finetune", ["method_args.freeze_backbone=true"]), out=str(tmp_path / "frozen")).fit()
    assert_same_run(tmp_path / "frozen", tmp_path / "linear")
    Trainer(ft_cfg("finetune"), out=str(tmp_path / "trained")).fit()   # the control: training it differs
    assert not torch.equal(final_state(tmp_path / "trained")["method_state"]["head.weight"],
                           final_state(tmp_path / "linear")["method_state"]["head.weight"])


@pytest.mark.parametrize("stop_at", [pytest.param(2, marks=pytest.mark.slow), 5])    # task 1 mid-epoch; task 2 mid-epoch, the backbone trained
def test_finetune_resumes_exactly(tmp_path, stop_at):
    """The trained backbone comes back from the checkpoint (no frozen-weights check refuses it)."""
    extra = ["augment=true"]
    Trainer(ft_cfg("finetune", extra), out=str(tmp_path / "full")).fit()
    with pytest.raises(Interrupted):
        Trainer(ft_cfg("finetune", extra + [f"stop_after_steps={stop_at}"]), out=str(tmp_path / "cut")).fit()
    Trainer.resume(str(tmp_path / "cut")).fit()
    assert_same_run(tmp_path / "cut", tmp_path / "full")


def test_finetune_without_a_trainable_backbone_says_so():
    class Plain(torch.nn.Module):
        embed_dim = 8

    with pytest.raises(ValueError, match="freeze_backbone=true"):
        create_method("finetune", Plain(), 4, 2)
    m = create_method("finetune", Plain(), 4, 2, freeze_backbone=True)
    assert m.cfg.freeze_backbone


def test_finetune_steps_through_the_backbone():
    backbone = create_vit("vit_tiny_synth")
    m = create_method("finetune", backbone, 4, 2)
    ctx = TaskContext(task=0, num_tasks=2, class_range=(0, 2), seen_classes=2, num_classes=4,
                      task_ranges=((0, 2), (2, 4)), cacheable=True)
    batch = {"image": torch.rand(3, 3, 32, 32), "label": torch.tensor([0, 1, 0]), "index": torch.arange(3)}
    m.train()
    m.training_step(batch, ctx).loss.backward()
    assert backbone.vit.blocks[0].attn.qkv.weight.grad is not None and len(m.query_cache._rows) == 0
