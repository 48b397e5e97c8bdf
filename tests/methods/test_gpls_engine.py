"""GPLS in the engine: the command line, exact resume (priors, frozen rows and the query cache across an
interruption), task-identification accuracy in the summary, and the released code's evaluation through
``Method.eval_protocol`` (flagged in record.json)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from clfast.cli import main
from clfast.engine import Interrupted, Trainer, load_config
from clfast.engine.metrics import read_acc_csv

TINY = ["num_tasks=2", "epochs=1", "batch_size=16", "eval_batch_size=128", "limit_train_batches=4",
        "limit_eval_batches=1", "quiet=true", "threads=1"]


def cfg(extra=()):
    return load_config("gpls", "digits", "fast", TINY + list(extra))


def state(run, tag="task002"):
    return torch.load(os.path.join(run, "checkpoints", f"{tag}.pt"), weights_only=True)


def test_train_through_the_cli_reports_task_identification(tmp_path, capsys):
    out = tmp_path / "gpls"
    assert main(["train", "--method", "gpls", "--dataset", "digits", "--out", str(out), "--quiet", *TINY[:-2],
                 "threads=1"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert 0.0 <= s["eval_task_acc"] <= 1.0 and s["num_tasks"] == 2
    rec = json.loads((out / "record.json").read_text())
    assert rec["method"] == "gpls" and rec["method_record"]["unfair_evaluation"] is False
    assert rec["method_record"]["task_inference"] == "keys"
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    assert [len(e["extras"]["task_acc"]) for e in evals] == [1, 2]
    assert evals[0]["extras"]["task_acc"] == [1.0]          # one task seen: the keys cannot pick another
    steps = [e for e in events if e["event"] == "epoch"]
    assert all("kl" in e and e["kl"] > 0 for e in steps)
    t1, t2 = state(out, "task001")["method_state"], state(out, "task002")["method_state"]
    # the priors travel with the checkpoints; task 2's statistics joined task 1's
    assert t1["priors.0.count"][1] == 0 and t2["priors.0.count"][1] > 0
    assert torch.equal(t1["priors.0.mean"][0], t2["priors.0.mean"][0])
    assert torch.equal(t1["task_embed"][0], t2["task_embed"][0]) and torch.equal(t1["keys"][0], t2["keys"][0])
    eps = [k for k in t2 if ".eps_" in k]
    assert eps and all(torch.equal(t1[k], t2[k]) for k in eps)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    run = tmp_path_factory.mktemp("gpls") / "full"
    Trainer(cfg(), out=str(run)).fit()
    return run


# task 1 mid-epoch, the task boundary, task 2 mid-epoch (the default suite keeps the last: priors, frozen rows and
# the cache all cross a boundary before it)
@pytest.mark.parametrize("stop_at", [pytest.param(2, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow), 6])
def test_resume_is_exact(full, tmp_path, stop_at):
    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):
        Trainer(cfg([f"stop_after_steps={stop_at}"]), out=str(cut)).fit()
    Trainer.resume(str(cut)).fit()
    a, b = state(cut)["method_state"], state(full)["method_state"]
    assert a.keys() == b.keys()
    assert sorted(k for k in a if not torch.equal(a[k], b[k])) == []
    torch.testing.assert_close(torch.tensor(read_acc_csv(cut / "acc_matrix.csv")),
                               torch.tensor(read_acc_csv(full / "acc_matrix.csv")), rtol=0, atol=0, equal_nan=True)


def test_resume_from_a_task_boundary_is_exact(full, tmp_path):
    """A run that stopped right after task 1's checkpoint (a crash before task 2): the fresh model gets the
    priors of task 1 from the checkpoint, and task 2's statistics join them."""
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    (cut / "checkpoints" / "task002.pt").unlink()
    (cut / "checkpoints" / "latest.json").write_text(json.dumps({"checkpoint": "task001.pt"}))
    Trainer.resume(str(cut)).fit()
    a, b = state(cut)["method_state"], state(full)["method_state"]
    assert sorted(k for k in a if not torch.equal(a[k], b[k])) == []


def test_released_code_evaluation_is_what_the_matrix_holds_and_is_flagged(tmp_path):
    """eval_all_logits + acc_mean_of_batches: the engine leaves unseen classes in and averages batch
    accuracies. Every cell is recomputed here by hand from the end-of-task checkpoints over the test sets
    (177 and 178 images in batches of 100): after task 1 the 5 classes of task 2 compete untrained."""
    extra = ["method_args.eval_all_logits=true", "method_args.acc_mean_of_batches=true", "eval_batch_size=100",
             "limit_eval_batches=null", "limit_train_batches=15", "amp=none",   # fp32: recomputed bit for bit
             "method_args.head_init=kaiming"]   # the code's head, whose untrained rows win images (below)
    t = Trainer(cfg(extra), out=str(tmp_path / "run"))
    t.fit()
    rec = json.loads((tmp_path / "run" / "record.json").read_text())["method_record"]
    assert rec["unfair_evaluation"] is True
    assert set(rec["unfair_evaluation_reasons"]) == {"eval_all_logits", "acc_mean_of_batches"}
    got = read_acc_csv(tmp_path / "run" / "acc_matrix.csv")
    m = t.method.eval()
    future_wins = 0
    for after in (0, 1):
        m.load_state_dict(state(tmp_path / "run", f"task00{after + 1}")["method_state"], strict=False)
        ctx = t.context(after, split="test", cacheable=True)
        mean_of_batches, per_sample = [], []
        with torch.no_grad():
            for i in range(after + 1):
                accs, right, n = [], 0.0, 0
                for batch in t.data.sharded_loader(t.test_data(i)):
                    logits = m.predict(batch, ctx)
                    assert torch.isfinite(logits).all(), "eval_all_logits: no class is masked"
                    pred = logits.argmax(1)
                    future_wins += int((pred >= ctx.seen_classes).sum())
                    hit = (pred == batch["label"]).double()
                    accs.append(float(hit.mean()))
                    right, n = right + float(hit.sum()), n + hit.numel()
                assert len(accs) == 2 and n == (177, 178)[i]
                mean_of_batches.append(100.0 * sum(accs) / len(accs))
                per_sample.append(100.0 * right / n)
        assert got[: after + 1, after].tolist() == pytest.approx(mean_of_batches, abs=1e-9)
        if after == 1:
            assert mean_of_batches != pytest.approx(per_sample, abs=1e-6), "unequal batches must tell them apart"
    # after task 1 the untrained rows of task 2's classes win images (all of them, here: the code's head
    # init, kaiming rows against rows trained only against each other)
    assert future_wins > 0
