"""Optional mirrors of metrics.jsonl: TensorBoard event files and an offline W&B run."""

from __future__ import annotations

import glob
import os

import pytest

from clfast.engine import Interrupted, Trainer
from clfast.engine.config import RunConfig
from clfast.engine.io import read_jsonl
from clfast.engine.loggers import RunLogger, check_sinks, read_metrics

from .test_trainer import tiny_cfg


def _scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_mirrors_the_jsonl_events(tmp_path):
    out = tmp_path / "run"
    summary = Trainer(tiny_cfg("linear", ["log_to=[tensorboard]", "log_every=1"]), out=str(out)).fit()
    tb = _scalars(str(out))
    steps = [e for e in read_jsonl(out / "metrics.jsonl") if e["event"] == "step"]
    assert [s for s, _ in tb["train/loss"]] == [e["step"] for e in steps]
    assert [v for _, v in tb["train/loss"]] == pytest.approx([e["loss"] for e in steps], rel=1e-6)
    evals = [e for e in read_jsonl(out / "metrics.jsonl") if e["event"] == "eval"]
    assert tb["eval/mean"] == [(e["step"], pytest.approx(e["mean"], rel=1e-6)) for e in evals]
    assert [s for s, _ in tb["eval/mean"]] == [4, 8]          # after each task's 4 steps
    assert tb["eval/task1"][-1][1] == pytest.approx(evals[-1]["acc"][0], rel=1e-6)
    assert tb["summary/A_N"] == [(8, pytest.approx(summary["A_N"], rel=1e-6))]


def test_tensorboard_resume_purges_the_replayed_steps(tmp_path):
    full = tmp_path / "full"
    Trainer(tiny_cfg("linear", ["log_to=[tensorboard]", "log_every=1", "checkpoint_every_steps=2"]),
            out=str(full)).fit()
    cut = tmp_path / "cut"
    # a crash after step 3: the newest checkpoint is the one of step 2, so step 3 is trained and logged twice
    with pytest.raises(Interrupted):
        Trainer(tiny_cfg("linear", ["log_to=[tensorboard]", "log_every=1", "checkpoint_every_steps=2",
                                    "stop_after_steps=3"]), out=str(cut)).fit()
    os.remove(cut / "checkpoints" / "interrupt.pt")
    Trainer.resume(str(cut), stop_after_steps=None).fit()
    got = [s for s, _ in _scalars(str(cut))["train/loss"]]
    assert got == [s for s, _ in _scalars(str(full))["train/loss"]]
    assert len(got) == len(set(got)), "a step appears twice in the resumed TensorBoard curve"
    # metrics.jsonl keeps everything the interrupted process logged (step 3 twice, a resume event between);
    # read_metrics gives the uninterrupted run's events
    raw = read_jsonl(cut / "metrics.jsonl")
    assert [e["step"] for e in raw if e["event"] == "step"].count(3) == 2
    assert [e for e in raw if e["event"] == "resume"] == [{"event": "resume", "step": 2, "task": 0,
                                                          "checkpoint": "step.pt"}]

    def curve(run, kind):
        return [(e["step"], e.get("loss", e.get("acc"))) for e in read_metrics(run / "metrics.jsonl")
                if e["event"] == kind]

    for kind in ("step", "eval", "summary"):
        assert curve(cut, kind) == curve(full, kind), kind
    assert len(curve(full, "step")) == 8 and len(curve(full, "eval")) == 2


def test_read_metrics_drops_what_a_resume_superseded(tmp_path):
    """Hand-made log: a run killed in task 1 after step 7 and its eval of task 0, resumed from a checkpoint of
    step 5 inside task 1, then killed again after step 6 and resumed from the task-1 boundary (step 4)."""
    path = tmp_path / "metrics.jsonl"
    events = [dict(event="step", step=s) for s in range(1, 5)] + [dict(event="eval", after_task=0, step=4)] + \
             [dict(event="step", step=s) for s in range(5, 8)] + [dict(event="epoch", step=7)] + \
             [dict(event="resume", step=5, task=1)] + [dict(event="step", step=s) for s in (6,)] + \
             [dict(event="resume", step=4, task=1)] + [dict(event="step", step=s) for s in (5, 6, 7, 8)] + \
             [dict(event="eval", after_task=1, step=8), dict(event="summary", step=8)]
    path.write_text("".join(__import__("json").dumps(e) + "\n" for e in events))
    got = [(e["event"], e["step"]) for e in read_metrics(path)]
    assert got == [("step", s) for s in range(1, 5)] + [("eval", 4)] + [("step", s) for s in range(5, 9)] + \
        [("eval", 8), ("summary", 8)]
    # a resume at the start of task 1 drops the eval of task 1 that a killed checkpoint write left behind
    path.write_text("".join(__import__("json").dumps(e) + "\n" for e in [
        dict(event="eval", after_task=0, step=4), dict(event="eval", after_task=1, step=8),
        dict(event="resume", step=4, task=1)]))
    assert [e["after_task"] for e in read_metrics(path)] == [0]


def test_wandb_offline_run_is_continued_on_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):
        Trainer(tiny_cfg("linear", ["log_to=[wandb]", "wandb_project=clfast-test", "log_every=1",
                                    "stop_after_steps=5"]),
                out=str(cut)).fit()
    run_id = (cut / "wandb_id").read_text().strip()
    Trainer.resume(str(cut), stop_after_steps=None).fit()
    runs = sorted(glob.glob(str(cut / "wandb" / "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith("-" + run_id) for r in runs), runs
    data = b"".join(open(p, "rb").read() for p in glob.glob(str(cut / "wandb" / "offline-run-*" / "*.wandb")))
    for key in (b"train/loss", b"eval/mean", b"summary/A_N", b"clfast-test"):
        assert key in data, key


def test_log_to_is_validated_and_not_part_of_the_run_identity():
    assert check_sinks("tensorboard") == ("tensorboard",)
    assert check_sinks(["wandb", "tensorboard", "wandb"]) == ("wandb", "tensorboard")
    with pytest.raises(ValueError, match="log_to: unknown sink 'tensorbord'"):
        RunConfig(log_to=["tensorbord"])
    with pytest.raises(ValueError, match="log_to must be a list"):
        RunConfig(log_to=3)
    from clfast.engine.checkpoint import hashable_config

    assert hashable_config(RunConfig(log_to=["tensorboard"])) == hashable_config(RunConfig())


def test_missing_package_is_named(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match="log_to: 'wandb' needs the 'wandb' package: pip install wandb"):
        RunLogger(str(tmp_path), log_to=["wandb"])
    RunLogger(str(tmp_path), enabled=False, log_to=["wandb"])  # other ranks import nothing
