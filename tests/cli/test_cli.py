"""The command line: every baseline through `clfast train`, eval, datasets, DDP, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from clfast.cli import main
from clfast.engine.metrics import read_acc_csv

RUN_FILES = ["config.yaml", "record.json", "metrics.jsonl", "acc_matrix.csv", "summary.json", "acc_matrix.png",
             "accuracy_curve.png", "checkpoints/task001.pt", "checkpoints/task002.pt"]
TINY = ["num_tasks=2", "epochs=1", "batch_size=32", "limit_train_batches=3", "limit_eval_batches=1", "threads=1"]
SMALL_ARGS = {"linear": [], "l2p": ["method_args.pool_size=4", "method_args.top_k=2"],
              "dualprompt": ["method_args.e_length=4"], "coda_prompt": ["method_args.pool_size=8"]}


@pytest.mark.parametrize("method", ["linear", "l2p", "dualprompt", "coda_prompt"])
def test_train_each_baseline_through_the_cli(tmp_path, method, capsys):
    out = tmp_path / method
    rc = main(["train", "--method", method, "--dataset", "digits", "--out", str(out), "--quiet",
               *TINY, *SMALL_ARGS[method]])
    assert rc == 0
    for f in RUN_FILES:
        assert (out / f).is_file(), f
    s = json.loads((out / "summary.json").read_text())
    m = read_acc_csv(out / "acc_matrix.csv")
    assert m.shape == (2, 2) and s["num_tasks"] == 2
    assert s["A_N"] == pytest.approx((m[0, 1] + m[1, 1]) / 2)
    rec = json.loads((out / "record.json").read_text())
    assert rec["method"] == method and rec["command"].startswith(f"clfast train --method {method}")
    # task 2 trained the method: its head moved, and the frozen backbone was left out as unchanged
    t1, t2 = (torch.load(out / "checkpoints" / f"task00{t}.pt", weights_only=True) for t in (1, 2))
    assert not torch.equal(t1["method_state"]["head.weight"], t2["method_state"]["head.weight"])
    assert "backbone.vit.blocks.0.attn.qkv.weight" in t2["method_unchanged"]


def test_eval_reproduces_the_last_column(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "linear", "--dataset", "digits", "--out", str(out), "--quiet", *TINY]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "task  2" in printed
    ev = json.loads((out / "eval.json").read_text())
    m = read_acc_csv(out / "acc_matrix.csv")
    assert [t["accuracy"] for t in ev["tasks"]] == pytest.approx([m[0, 1], m[1, 1]])


def test_bad_input_names_the_problem(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)   # where a default run directory (runs/<name>) would be made
    cases = [
        (["train", "--method", "l2pp", "--dataset", "digits"], "did you mean 'l2p'"),
        (["train", "--method", "l2p", "--dataset", "digitz"], "digits"),
        (["train", "--method", "l2p", "--dataset", "digits", "epochz=1"], "epochs"),
        (["train", "--method", "l2p", "--dataset", "digits", "batch_size=many"], "batch_size"),
        (["train", "--method", "l2p", "--dataset", "digits", "novalue"], "key=value"),
        (["train", "--method", "l2p", "--dataset", "cifar100", "--data-root", str(tmp_path)], "cifar-100-python"),
        (["train", "--method", "l2p", "--dataset", "digits", "--preset", "paperr"], "preset"),
        (["train", "--resume", str(tmp_path / "nothing")], "config.yaml"),
    ]
    for argv, expect in cases:
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, argv
        assert expect.lower() in err.lower(), (argv, err)
    # a run that could not be set up leaves no directory behind
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_datasets_lists_layouts(tmp_path, capsys):
    assert main(["datasets", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("synth-shapes", "digits", "cifar100", "imagenet_r", "cub200", "domainnet", "eurosat"):
        assert name in out
    assert "NOT FOUND" in out and "ships with clfast" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    assert " ? answers" in lines["clove-scene"] and "100 classes" in lines["cifar100"]   # CLOVE: from its answer list
    assert "answers" in lines["synth-vqa"]


def test_ddp_two_cpu_processes_match_one(tmp_path):
    # DualPrompt: prefix attention, retrieval and the pull loss all run under DDP. (L2P at its paper lr
    # of 0.03 is chaotic in the first steps: Adam turns 1e-7 reassociation differences in near-zero
    # gradients into ±lr steps, so two runs drift apart whatever the process count.)
    args = ["train", "--method", "dualprompt", "--dataset", "digits", "--quiet", "num_tasks=2", "epochs=1",
            "batch_size=32", "limit_train_batches=8", "threads=1", "amp=none", "method_args.e_length=4",
            "val_fraction=0.2", "augment=true"]   # an item's augmentation depends on (seed, index), not the rank
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "clfast", *args,
                          "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    a = torch.tensor(read_acc_csv(tmp_path / "ddp" / "acc_matrix.csv"))
    b = torch.tensor(read_acc_csv(tmp_path / "one" / "acc_matrix.csv"))
    # same global batches and averaged gradients: equal up to float reassociation
    torch.testing.assert_close(a, b, atol=1.2, rtol=0, equal_nan=True)   # at most 2 of 177 test samples
    # the held-out split is the same on every rank count, sharded without duplicates
    va, vb = (torch.tensor(read_acc_csv(tmp_path / d / "acc_matrix_val.csv")) for d in ("ddp", "one"))
    torch.testing.assert_close(va, vb, atol=1.2, rtol=0, equal_nan=True)
    states = [torch.load(tmp_path / d / "checkpoints" / "task002.pt", weights_only=True)["method_state"]
              for d in ("ddp", "one")]
    for k, v in states[1].items():
        torch.testing.assert_close(states[0][k], v, atol=1e-4, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    rec = json.loads((tmp_path / "ddp" / "record.json").read_text())
    assert rec["device"]["world_size"] == 2
    # evaluation is sharded without duplicates: every test sample counted exactly once
    totals = [torch.load(tmp_path / d / "checkpoints" / "task002.pt", weights_only=True)["acc"]["total"]
              for d in ("ddp", "one")]
    assert totals[0] == totals[1]


DDP_SIGNAL_SCRIPT = """
import os, signal, sys
from clfast.engine import Interrupted, Trainer, load_config

cfg = load_config("linear", "digits", "fast", ["num_tasks=2", "epochs=1", "batch_size=32", "limit_train_batches=4",
                                               "limit_eval_batches=1", "threads=1", "quiet=true"])
trainer = Trainer(cfg, out=sys.argv[1])
real_step, calls = trainer.method.training_step, [0]

def step(batch, ctx):
    calls[0] += 1
    if calls[0] == 2 and os.environ["RANK"] == "1":  # only rank 1 is told to stop (as a scheduler might)
        os.kill(os.getpid(), signal.SIGTERM)
    return real_step(batch, ctx)

trainer.method.training_step = step
try:
    trainer.fit()
except Interrupted:
    with open(os.path.join(sys.argv[1], f"interrupted_rank{os.environ['RANK']}"), "w") as f:
        f.write(str(trainer.global_step))
"""


def test_ddp_a_signal_on_one_rank_stops_every_rank_with_one_checkpoint(tmp_path):
    script = tmp_path / "signal_one_rank.py"
    script.write_text(DDP_SIGNAL_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):  # both ranks stopped at the same step
        assert (tmp_path / "run" / f"interrupted_rank{rank}").read_text() == "2", run.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "interrupt.pt", weights_only=True)
    assert state["global_step"] == 2 and state["position"] == [0, 0, 0, 2] and len(state["rng"]) == 2


@pytest.mark.parametrize("method, extra", [("joint", ["method_args.base=linear"]), ("finetune", [])])
def test_the_bounds_through_the_cli(tmp_path, method, extra, capsys):
    """`joint` (one column) and `finetune` (the trained backbone checked back in by `clfast eval`)."""
    out = tmp_path / method
    assert main(["train", "--method", method, "--dataset", "digits", "--out", str(out), "--quiet", *TINY,
                 *extra]) == 0
    m = read_acc_csv(out / "acc_matrix.csv")
    assert m.shape == ((2, 1) if method == "joint" else (2, 2))
    for f in RUN_FILES[:-1 if method == "joint" else None]:
        assert (out / f).is_file(), f
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--quiet"]) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert [t["accuracy"] for t in ev["tasks"]] == pytest.approx(list(m[:, -1]))
    rc = main(["train", "--method", "joint", "--dataset", "digits", "--out", str(tmp_path / "bad"),
               "method_args.base=linearr"])
    assert rc == 2 and "method_args.base: unknown method 'linearr'" in capsys.readouterr().err


@pytest.mark.parametrize("suite, want", [("ops", {"ops"}), ("train", {"train"}), ("all", {"ops", "train"})])
def test_bench_runs_the_suites_it_names(monkeypatch, suite, want):
    """`clfast bench all --quick` (make bench-quick) runs the op suites and bench_train.py in one pytest run, then
    report.py on its JSON; `ops` and `train` run one kind each."""
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    assert main(["bench", suite, "--quick"]) == 0
    pytest_cmd, report_cmd = calls
    files = [os.path.basename(a) for a in pytest_cmd if a.endswith(".py")]
    kinds = {"train" if f == "bench_train.py" else "ops" for f in files}
    assert kinds == want and "--quick" in pytest_cmd
    assert ("bench_ops.py" in files) == ("ops" in want)
    assert report_cmd[-1].endswith(f"{suite}_quick.json") and os.path.basename(report_cmd[1]) == "report.py"


def test_bench_amp_sets_the_training_steps_precision_and_refuses_what_it_cannot_do(monkeypatch, capsys):
    """`clfast bench train --amp none` runs bench_train.py in fp32 (CLFAST_BENCH_AMP), into its own JSON and, with
    --write, its own table (train_step_fp32: the train_step table holds amp=auto's run); it refuses --write with
    --amp bf16 or with -k (a part of the suite would replace a whole table) and suites without a training step,
    naming the option."""
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, **kw: calls.append((cmd, kw.get("env", {}))) or 0)
    assert main(["bench", "train", "--quick", "--amp", "none"]) == 0
    (pytest_cmd, env), (report_cmd, _) = calls
    assert env["CLFAST_BENCH_AMP"] == "none" and report_cmd[2].endswith("train_quick_none.json")
    assert report_cmd[3:] == ["--train-block", "train_step_fp32"]      # printed under that name
    calls.clear()
    assert main(["bench", "train", "--quick"]) == 0 and calls[0][1]["CLFAST_BENCH_AMP"] == "auto"
    calls.clear()
    assert main(["bench", "train", "--amp", "none", "--write"]) == 0
    report_cmd = calls[1][0]
    assert report_cmd[-3:] == ["--write", "--train-block", "train_step_fp32"]
    calls.clear()
    assert main(["bench", "train", "--write"]) == 0 and "--train-block" not in calls[1][0]
    calls.clear()
    assert main(["bench", "train", "--amp", "bf16", "--write"]) == 2
    assert "--write with --amp bf16" in capsys.readouterr().err
    assert main(["bench", "train", "-k", "gpls", "--write"]) == 2
    assert "--write with -k 'gpls'" in capsys.readouterr().err
    assert main(["bench", "ops", "--amp", "bf16"]) == 2
    assert "--amp bf16" in capsys.readouterr().err and calls == []
