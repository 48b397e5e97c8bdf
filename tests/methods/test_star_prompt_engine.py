"""STAR-Prompt in the engine: the command line on synth-shapes (the shipped clip_tiny_synth and vit_tiny_synth),
its four stages per task in mammoth's order, the scores it adds to the summary, and an exact resume from inside
every stage (the MoG fits, the cached keys and the aligned head are in the checkpoint)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from clfast.cli import main
from clfast.engine import Interrupted, Trainer, load_config
from clfast.engine.metrics import read_acc_csv

# 100 classes × 6 images (2 tasks of 50 classes): every stage runs 2 steps
TINY = ["num_tasks=2", "epochs=1", "batch_size=16", "eval_batch_size=300", "limit_train_batches=2",
        "limit_eval_batches=1", "quiet=true", "threads=1", "dataset_args.n_per_class=6",
        "method_args.stage1_epochs=1", "method_args.align1_epochs=1", "method_args.align2_epochs=1",
        "method_args.align2_epoch_step=0", "method_args.align_samples=8", "method_args.align_batch_size=16",
        "method_args.stage1_batch_size=16", "method_args.mog_restarts=2"]


def events(run, kind):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["event"] == kind]


def state(run, tag="task002"):
    return torch.load(os.path.join(run, "checkpoints", f"{tag}.pt"), weights_only=True)["method_state"]


def cfg(extra=()):
    return load_config("star_prompt", "synth-shapes", "fast", TINY + list(extra))


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    run = tmp_path_factory.mktemp("star") / "full"
    Trainer(cfg(), out=str(run)).fit()
    return run


def test_cli_runs_every_stage_and_reports_its_scores(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--method", "star_prompt", "--dataset", "synth-shapes", "--out", str(out), "--quiet",
                 *TINY]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["num_tasks"] == 2 and 0 <= s["A_N"] <= 100
    for key in ("eval_select_acc", "eval_stage1_acc"):
        assert 0 <= s[key] <= 1, key
    stages = [(e["task"], e["stage"]) for e in events(out, "epoch")]
    assert stages == [(0, "stage1"), (0, "align1"), (0, "stage2"),
                      (1, "stage1"), (1, "align1"), (1, "stage2"), (1, "align2")]
    assert "after task 2" in (out / "train.log").read_text()      # --quiet quiets the terminal, not the log
    rec = json.loads((out / "record.json").read_text())
    assert rec["extra_weights"][0]["name"] == "clip_tiny_synth" and rec["method_record"]["keys_written"] == 100
    t1, t2 = state(out, "task001"), state(out, "task002")
    assert torch.equal(t1["keys"][:50], t2["keys"][:50])              # written once, then fixed
    assert torch.equal(t1["context"][:50], t2["context"][:50])
    assert bool(t2["mog_clip.fitted"].all()) and bool(t2["mog_vit.fitted"].all())
    assert int(t2["aligned_task"]) == 1 and not torch.equal(t2["aligned_head.weight"], t2["head.weight"])


def test_stage1_alone(tmp_path):
    out = tmp_path / "s1"
    assert main(["train", "--method", "star_prompt_stage1", "--dataset", "synth-shapes", "--out", str(out),
                 "--quiet", *TINY]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert 100 * s["eval_stage1_acc"] == pytest.approx(s["sample_weighted_accuracy"], abs=1e-6)
    assert [e["stage"] for e in events(out, "epoch")] == ["stage1", "align1"] * 2


def same_run(a_run, b_run):
    a, b = state(a_run), state(b_run)
    assert a.keys() == b.keys()
    assert sorted(k for k in a if not torch.equal(a[k], b[k])) == []
    torch.testing.assert_close(torch.tensor(read_acc_csv(a_run / "acc_matrix.csv")),
                               torch.tensor(read_acc_csv(b_run / "acc_matrix.csv")), rtol=0, atol=0, equal_nan=True)


# steps: task 1 = stage1 1-2, align1 3-4, stage2 5-6; task 2 = stage1 7-8, align1 9-10, stage2 11-12, align2 13-14
@pytest.mark.parametrize("stop_at", [pytest.param(3, marks=pytest.mark.slow),    # inside align1
                                     pytest.param(6, marks=pytest.mark.slow),    # the task boundary
                                     13])                                        # inside align2
def test_resume_is_exact(full, tmp_path, stop_at):
    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):
        Trainer(cfg([f"stop_after_steps={stop_at}"]), out=str(cut)).fit()
    Trainer.resume(str(cut)).fit()
    same_run(cut, full)


def test_the_engine_steps_the_stage2_cosine_per_epoch(tmp_path):
    """The lr the engine sets at each stage-2 epoch is lr·cos(99π·e / (200(K−1))); ``constant`` keeps lr."""
    import math

    from clfast.methods.star_prompt import stage2_lr_factor

    for schedule, want in (("cosine", lambda e, K: stage2_lr_factor(e, K)), ("constant", lambda e, K: 1.0)):
        t = Trainer(cfg(["epochs=20", f"method_args.stage2_schedule={schedule}"]), out=str(tmp_path / schedule))
        stage2 = next(s for s in t.method.stages(t.context(1)) if s.name == "stage2")
        settings = t._stage_settings(stage2)
        assert settings["epochs"] == 20 and settings["persistent"] is False       # re-created every task
        got = [t._lr_factor(stage2, settings, e, 20) for e in range(20)]
        assert got == [pytest.approx(want(e, 20)) for e in range(20)]
    assert got[-1] == 1.0 and math.isclose(stage2_lr_factor(19, 20), math.cos(99 * math.pi / 200))
