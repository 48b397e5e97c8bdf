"""The training loop: run files, resume equality, schedules, samplers, configuration."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from clfast.engine import Interrupted, Trainer, load_config
from clfast.engine.config import RunConfig, apply_overrides, list_presets, parse_override
from clfast.engine.metrics import read_acc_csv
from clfast.engine.optim import lr_factor
from clfast.engine.sampling import EpochSampler, ShardSampler
from clfast.methods import ScheduleConfig, list_methods

RUN_FILES = ["config.yaml", "record.json", "metrics.jsonl", "acc_matrix.csv", "summary.json", "acc_matrix.png",
             "accuracy_curve.png", "train.log"]
TINY = ["num_tasks=2", "epochs=1", "batch_size=32", "eval_batch_size=128", "limit_train_batches=4",
        "limit_eval_batches=1", "quiet=true", "threads=1"]


def tiny_cfg(method="l2p", extra=(), dataset="digits"):
    args = {"l2p": ["method_args.pool_size=4", "method_args.top_k=2", "method_args.length=3"],
            "coda_prompt": ["method_args.pool_size=8", "method_args.length=4"],
            "dualprompt": ["method_args.e_length=4"], "linear": [], "gpls": []}[method]
    return load_config(method, dataset, "fast", TINY + args + list(extra))


def test_run_writes_every_file_and_consistent_summary(tmp_path):
    out = tmp_path / "run"
    summary = Trainer(tiny_cfg("l2p"), out=str(out)).fit()
    for f in RUN_FILES:
        assert (out / f).is_file(), f
    assert sorted(os.listdir(out / "checkpoints")) == ["latest.json", "task001.pt", "task002.pt"]
    m = read_acc_csv(out / "acc_matrix.csv")
    assert m.shape == (2, 2)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == pytest.approx(summary)
    for key in ("A_N", "F_N", "BWT", "sample_weighted_accuracy", "wall_time_s", "images_per_s"):
        assert key in on_disk
    assert on_disk["A_N"] == pytest.approx((m[0, 1] + m[1, 1]) / 2)
    rec = json.loads((out / "record.json").read_text())
    assert rec["scenario"]["class_order"] and len(rec["scenario"]["class_order"]) == 10
    assert rec["backbone"]["source"] == "shipped" and len(rec["backbone"]["sha256"]) == 64
    assert rec["versions"]["torch"] == torch.__version__
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["method"] == "l2p" and cfg["optimizer"]["lr"] == 0.005 and cfg["method_args"]["head"] == "cls"
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events.count("eval") == 2 and events[-1] == "summary"


def test_existing_run_directory_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_cfg("linear"), out=str(out)).fit()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(tiny_cfg("linear"), out=str(out))


# mid-epoch, at an epoch end / task boundary, in task 2 (slow: test_resume covers task 2 mid-epoch)
@pytest.mark.parametrize("stop_at", [3, 4, pytest.param(6, marks=pytest.mark.slow)])
def test_resume_reaches_the_same_numbers(tmp_path, stop_at):
    full = Trainer(tiny_cfg("dualprompt"), out=str(tmp_path / "full")).fit()
    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):
        Trainer(tiny_cfg("dualprompt", [f"stop_after_steps={stop_at}"]), out=str(cut)).fit()
    assert (cut / "checkpoints" / "interrupt.pt").is_file()
    resumed = Trainer.resume(str(cut), stop_after_steps=None).fit()
    torch.testing.assert_close(torch.tensor(read_acc_csv(cut / "acc_matrix.csv")),
                               torch.tensor(read_acc_csv(tmp_path / "full" / "acc_matrix.csv")), rtol=0, atol=0,
                               equal_nan=True)
    assert resumed["A_N"] == full["A_N"] and resumed["F_N"] == full["F_N"]


def test_persistent_adamw_leaves_frozen_components_alone_and_resumes_exactly(tmp_path):
    # one AdamW (momentum + weight decay) for both tasks: CODA-Prompt's task-0 components must not move
    # in task 2, also across an interruption inside task 2 (the frozen rows' snapshot is re-taken)
    extra = ["reset_optimizer=false", "optimizer.name=adamw", "optimizer.weight_decay=0.05"]
    full = Trainer(tiny_cfg("coda_prompt", extra), out=str(tmp_path / "full")).fit()
    ck = tmp_path / "full" / "checkpoints"
    after1, after2 = (torch.load(ck / f"task00{t}.pt", weights_only=True)["method_state"] for t in (1, 2))
    per_task = 8 // 2
    for name in ("prompts", "keys", "attn"):
        assert torch.equal(after2[name][:, :per_task], after1[name][:, :per_task]), name
        assert not torch.equal(after2[name][:, per_task:], after1[name][:, per_task:]), name
    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):
        Trainer(tiny_cfg("coda_prompt", extra + ["stop_after_steps=6"]), out=str(cut)).fit()
    resumed = Trainer.resume(str(cut), stop_after_steps=None).fit()
    assert resumed["A_N"] == full["A_N"] and resumed["F_N"] == full["F_N"]
    final = torch.load(cut / "checkpoints" / "task002.pt", weights_only=True)["method_state"]
    assert torch.equal(final["prompts"], after2["prompts"])


def test_fp16_with_grad_scaler_trains_and_resumes_its_scale(tmp_path):
    # the fp16 + GradScaler path runs on the CPU too (the same code as on CUDA)
    # batch 8: fp16 is emulated (slow) on a CPU without AVX512-FP16
    small = ["amp=fp16", "batch_size=8", "eval_batch_size=32"]
    # both runs start from the same scale, one that does not overflow here (the default 2^16 overflows on the
    # first steps at batch 8, and those steps are skipped); powers of two leave the unscaled gradients exact
    scale = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
             "_growth_tracker": 0}
    full_trainer = Trainer(tiny_cfg("dualprompt", small), out=str(tmp_path / "full"))
    full_trainer.scaler.load_state_dict(scale)
    full = full_trainer.fit()
    cut = tmp_path / "cut"
    t = Trainer(tiny_cfg("dualprompt", [*small, "stop_after_steps=3"]), out=str(cut))
    assert t.amp_dtype == torch.float16 and t.scaler is not None
    t.scaler.load_state_dict(scale)
    with pytest.raises(Interrupted):
        t.fit()
    saved = torch.load(cut / "checkpoints" / "interrupt.pt", weights_only=True)["scaler"]
    assert saved["scale"] == 1024.0
    resumed = Trainer.resume(str(cut), stop_after_steps=None)
    assert resumed.scaler.get_scale() == 1024.0
    summary = resumed.fit()
    assert summary["A_N"] == full["A_N"] and summary["F_N"] == full["F_N"]


def test_step_checkpoints_resume_after_a_crash(tmp_path, monkeypatch):
    """checkpoint_every_steps: a run killed by an error (not a signal) resumes from its last step checkpoint."""
    full = Trainer(tiny_cfg("dualprompt"), out=str(tmp_path / "full")).fit()
    crash = tmp_path / "crash"
    t = Trainer(tiny_cfg("dualprompt", ["checkpoint_every_steps=3"]), out=str(crash))
    real_step, calls = t.method.training_step, [0]

    def failing_step(batch, ctx):
        calls[0] += 1
        if calls[0] == 7:  # task 2, step 3 of 4; the last step checkpoint was after global step 6
            raise RuntimeError("simulated crash")
        return real_step(batch, ctx)

    monkeypatch.setattr(t.method, "training_step", failing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        t.fit()
    state = torch.load(crash / "checkpoints" / "step.pt", weights_only=True)
    assert state["global_step"] == 6 and state["position"] == [1, 0, 0, 2]
    assert json.loads((crash / "checkpoints" / "latest.json").read_text())["checkpoint"] == "step.pt"
    resumed = Trainer.resume(str(crash)).fit()
    assert resumed["A_N"] == full["A_N"] and resumed["F_N"] == full["F_N"]
    torch.testing.assert_close(torch.tensor(read_acc_csv(crash / "acc_matrix.csv")),
                               torch.tensor(read_acc_csv(tmp_path / "full" / "acc_matrix.csv")), rtol=0, atol=0,
                               equal_nan=True)


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_saves_a_checkpoint_at_the_next_step(tmp_path, monkeypatch, signum):
    import signal

    cut = tmp_path / "cut"
    t = Trainer(tiny_cfg("linear"), out=str(cut))
    real_step, calls = t.method.training_step, [0]

    def signalling_step(batch, ctx):
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), getattr(signal, signum))  # the handler only sets a flag
        return real_step(batch, ctx)

    monkeypatch.setattr(t.method, "training_step", signalling_step)
    before = signal.getsignal(getattr(signal, signum))
    with pytest.raises(Interrupted):
        t.fit()
    assert signal.getsignal(getattr(signal, signum)) is before  # the caller's handler is back
    state = torch.load(cut / "checkpoints" / "interrupt.pt", weights_only=True)
    assert state["global_step"] == 2 and state["position"] == [0, 0, 0, 2]
    full = Trainer(tiny_cfg("linear"), out=str(tmp_path / "full")).fit()
    assert Trainer.resume(str(cut)).fit()["A_N"] == full["A_N"]


def test_config_hash_ignores_settings_left_at_their_default():
    from clfast.engine.checkpoint import hashable_config

    base = tiny_cfg("linear")
    h = hashable_config(base)
    assert "grad_checkpointing" not in h and "checkpoint_every_steps" not in h  # as if added later
    assert hashable_config(tiny_cfg("linear", ["checkpoint_every_steps=5", "quiet=false"])) == h
    assert hashable_config(tiny_cfg("linear", ["grad_checkpointing=true"]))["grad_checkpointing"] is True
    assert hashable_config(tiny_cfg("linear", ["optimizer.lr=0.5"]))["optimizer"]["lr"] == 0.5


def test_resume_rejects_a_changed_config(tmp_path):
    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):
        Trainer(tiny_cfg("linear", ["stop_after_steps=2"]), out=str(cut)).fit()
    with pytest.raises(ValueError, match="cannot change"):
        Trainer.resume(str(cut), epochs=3)
    cfg = yaml.safe_load((cut / "config.yaml").read_text())
    cfg["optimizer"]["lr"] = 0.5
    (cut / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="config_hash"):
        Trainer.resume(str(cut))


def test_task_incremental_masks_to_the_sample_task(tmp_path):
    s = Trainer(tiny_cfg("linear", ["scenario=task-incremental"]), out=str(tmp_path / "r")).fit()
    c = Trainer(tiny_cfg("linear"), out=str(tmp_path / "c")).fit()
    assert s["A_N"] >= c["A_N"]  # knowing the task can only help a shared head


# --- schedules, samplers ------------------------------------------------------------------------


def test_lr_schedules():
    const = ScheduleConfig("constant")
    assert lr_factor(const, 5, 10, 1.0) == 1.0
    cos = ScheduleConfig("cosine", min_lr=0.0)
    assert lr_factor(cos, 0, 10, 1.0) == pytest.approx(1.0)
    assert lr_factor(cos, 5, 10, 1.0) == pytest.approx(0.5)
    assert lr_factor(cos, 10, 10, 1.0) == pytest.approx(0.0)
    floor = ScheduleConfig("cosine", min_lr=0.1)
    assert lr_factor(floor, 10, 10, 1.0) == pytest.approx(0.1)
    wl = ScheduleConfig("warmup_linear", per="step", warmup=0.1)
    assert lr_factor(wl, 0, 100, 1.0) < lr_factor(wl, 5, 100, 1.0) < 1.0
    assert lr_factor(wl, 10, 100, 1.0) == pytest.approx(1.0)
    assert lr_factor(wl, 100, 100, 1.0) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule.name"):
        ScheduleConfig("step")


@pytest.mark.parametrize("n,world,batch", [(10, 2, 4), (11, 2, 4), (37, 3, 6)])
def test_rank_batches_union_is_the_single_process_batch(n, world, batch):
    single = list(EpochSampler(n, 7, world=1))
    per = batch // world
    ranks = [list(EpochSampler(n, 7, rank=r, world=world)) for r in range(world)]
    for i in range(n // batch):  # every full batch (the last one may hold padding repeats)
        union = sorted(x for r in ranks for x in r[i * per:(i + 1) * per])
        assert union == sorted(single[i * batch:(i + 1) * batch])
    resumed = list(EpochSampler(n, 7, rank=1, world=world, skip=per))
    assert resumed == ranks[1][per:]
    shards = [list(ShardSampler(n, r, world)) for r in range(world)]
    assert sorted(x for s in shards for x in s) == list(range(n))


# --- configuration ------------------------------------------------------------------------------


def test_every_method_has_fast_and_paper_presets():
    for m in ("linear", "l2p", "dualprompt", "coda_prompt", "finetune"):
        assert m in list_methods()
        assert {"fast", "cifar100", "imagenet_r"} <= set(list_presets(m)), m
        for preset in list_presets(m):
            cfg = load_config(m, "synth-shapes", preset)
            cfg.method_config()


def test_presets_hold_only_what_differs_from_the_defaults():
    """A default lives in its dataclass (RunConfig, OptimConfig, ScheduleConfig, the method's Config); a
    preset spells out only what differs from it."""
    import dataclasses

    from clfast.engine.config import CONFIG_DIR, read_preset
    from clfast.methods import method_class

    plain = (lambda v: list(v) if isinstance(v, tuple) else v)
    run_default = RunConfig().to_dict()
    for m in list_methods():
        method_default = {k: plain(v) for k, v in dataclasses.asdict(method_class(m).Config()).items()}
        for preset in list_presets(m):
            raw = yaml.safe_load(open(os.path.join(CONFIG_DIR, m, f"{preset}.yaml"), encoding="utf-8"))
            for key, value in raw.items():
                if key == "method_args":
                    same = [a for a, b in value.items() if method_default.get(a) == b]
                elif key in ("optimizer", "schedule"):
                    same = [a for a, b in value.items() if plain(run_default[key].get(a)) == b]
                else:
                    same = [] if key == "base" or run_default.get(key) != value else [key]
                assert not same, f"{m}/{preset}.yaml repeats the default of {key}: {same}"
            read_preset(m, preset)   # and resolves (its base chain included)


def test_preset_base_merges_and_refuses_a_cycle(tmp_path, monkeypatch):
    from clfast.engine import config as config_mod

    for name, text in {"a": "epochs: 3\nmethod_args: {pool_size: 4, top_k: 2}\n",
                       "b": "base: a\nmethod_args: {top_k: 1}\n", "c": "base: d\n", "d": "base: c\n"}.items():
        (tmp_path / "l2p").mkdir(exist_ok=True)
        (tmp_path / "l2p" / f"{name}.yaml").write_text(text)
    monkeypatch.setattr(config_mod, "CONFIG_DIR", str(tmp_path))
    assert config_mod.read_preset("l2p", "b") == {"epochs": 3, "method_args": {"pool_size": 4, "top_k": 1}}
    with pytest.raises(ValueError, match="cycle"):
        config_mod.read_preset("l2p", "c")


def test_overrides_parse_and_validate():
    assert parse_override("optimizer.lr=1e-3") == ("optimizer.lr", 1e-3)
    assert parse_override("augment=false") == ("augment", False)
    assert parse_override("method_args.layers=[0,1]") == ("method_args.layers", [0, 1])
    cfg = load_config("l2p", "synth-shapes", overrides=["epochs=3", "optimizer.lr=0.01", "method_args.top_k=3"])
    assert cfg.epochs == 3 and cfg.optimizer.lr == 0.01 and cfg.method_config().top_k == 3
    with pytest.raises(ValueError, match="'epochs'"):
        load_config("l2p", "synth-shapes", overrides=["epoch=3"])
    with pytest.raises(ValueError, match="'lr'"):
        load_config("l2p", "synth-shapes", overrides=["optimizer.lrr=3"])
    with pytest.raises(ValueError, match="batch_size"):
        load_config("l2p", "synth-shapes", overrides=["batch_size=abc"])
    with pytest.raises(ValueError, match="amp"):
        load_config("l2p", "synth-shapes", overrides=["amp=fp8"])
    with pytest.raises(ValueError, match="pool_size"):
        load_config("l2p", "synth-shapes", overrides=["method_args.pool_sise=3"])
    with pytest.raises(ValueError, match="no sub-keys"):
        apply_overrides({}, [("epochs.x", 1)])
    with pytest.raises(ValueError, match="preset"):
        load_config("l2p", "synth-shapes", "fats")
    assert RunConfig(pretrained="none").pretrained == "none"   # the backbone loader reads the spellings


@pytest.mark.parametrize("method", ["dualprompt", "gpls"])
def test_compiled_training_matches_eager(tmp_path, method):
    """compile: true traces the prompted backbone (custom ops included) and trains the same. GPLS: its
    begin_task statistics pass (a data-dependent bincount inside the block loop) runs eager, so the steps' forward
    (prefixes from block_fn) is still traced whole, not block by block into the recompile limit."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    states = []
    for i, extra in enumerate([[], ["compile=true", "compile_options.backend=aot_eager"]]):
        out = tmp_path / f"r{i}"
        with pytest.raises(Interrupted):
            Trainer(tiny_cfg(method, ["amp=none", "stop_after_steps=3", *extra]), out=str(out)).fit()
        states.append(torch.load(out / "checkpoints" / "interrupt.pt", weights_only=True)["method_state"])
        if i == 0:   # the eager run compiled nothing
            assert counters["stats"]["unique_graphs"] == 0
    # the compiled run traced the backbone, prefixes and custom ops included, in whole graphs
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not counters["unimplemented"], list(counters["unimplemented"])     # e.g. the recompile limit
    assert counters["frames"]["total"] == counters["frames"]["ok"] <= 2, dict(counters["frames"])
    for k, v in states[0].items():
        torch.testing.assert_close(states[1][k], v, atol=1e-5, rtol=1e-5, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("tokenize", [False, True], ids=["strings", "tokens"])
def test_vqa_batches_train_and_evaluate_with_soft_scores(tmp_path, monkeypatch, tokenize):
    """synth-vqa through the engine: question strings reach the method, accuracy credits soft scores."""
    import clfast.methods.base as base
    from clfast.data import Scenario
    from clfast.data.synth import SynthVQA

    def soft_scores(self, j):  # VQA-style annotator credit: 1 for the answer, 0.6 for the next answer id
        scores = torch.zeros(len(self.classes))
        scores[self.targets[j]] = 1.0
        scores[(self.targets[j] + 1) % len(self.classes)] = 0.6
        return scores

    monkeypatch.setattr(SynthVQA, "answer_scores", soft_scores, raising=False)
    from clfast.methods import FrozenQueryMethod, MethodConfig, StepOutput

    seen_questions = []

    class FixedAnswer(FrozenQueryMethod):
        """Trains a head on image features; predicts the true answer for even indices and the next answer
        id (worth 0.6) for odd ones, so the expected soft accuracy is known exactly."""
        Config = MethodConfig
        supports = ("vqa",)

        def __init__(self, *args):
            super().__init__(*args)
            # a method that reads questions may set a tokenizer; the engine then tokenizes each split once
            self.tokenizer = (lambda qs: torch.tensor([[len(q), q.count(" ")] for q in qs])) if tokenize else None

        def training_step(self, batch, ctx):
            q = batch["question"]
            if tokenize:
                assert q.dtype == torch.int64 and q.shape == (batch["image"].shape[0], 2) and (q[:, 0] > 0).all()
            else:
                assert isinstance(q, list) and all(isinstance(x, str) for x in q)
            assert batch["answer_scores"].shape == (batch["image"].shape[0], self.num_classes)
            seen_questions.append(q)
            logits = self.classify(self.query(batch, ctx))
            return StepOutput(torch.nn.functional.cross_entropy(logits, batch["label"]), {})

        def predict(self, batch, ctx):
            answer = (batch["label"] + batch["index"] % 2) % self.num_classes
            return torch.nn.functional.one_hot(answer, self.num_classes).float()

    monkeypatch.setitem(base._METHODS, "fixed_answer", FixedAnswer)
    preset = tmp_path / "preset.yaml"
    preset.write_text("backbone: vit_tiny_synth\nepochs: 1\nbatch_size: 16\naugment: false\n"
                      "optimizer: {name: adam, lr: 0.001}\n")
    data_args = ["dataset_args={n_per_task: 4}", "quiet=true", "threads=1"]  # 6 question families = 6 tasks
    cfg = load_config("fixed_answer", "synth-vqa", str(preset), data_args)
    summary = Trainer(cfg, out=str(tmp_path / "run")).fit()
    assert seen_questions
    acc = read_acc_csv(tmp_path / "run" / "acc_matrix.csv")
    scenario = Scenario.from_name("synth-vqa", dataset_kwargs={"n_per_task": 4})
    assert acc.shape == (6, 6)
    for t in range(6):
        test = scenario.test_set(t)
        want = 100 * sum(1.0 if int(test[i]["index"]) % 2 == 0 else 0.6 for i in range(len(test))) / len(test)
        assert acc[t, -1] == pytest.approx(want, abs=1e-4)  # scores are float32
    assert summary["A_N"] == pytest.approx(acc[:, -1].mean())


def test_grad_checkpointing_trains_the_same(tmp_path):
    runs = {}
    for flag in (False, True):
        cfg = tiny_cfg("dualprompt", ["amp=none", f"grad_checkpointing={str(flag).lower()}"])
        t = Trainer(cfg, out=str(tmp_path / str(flag)))
        assert t.method.backbone.grad_checkpointing is flag
        runs[flag] = (t.fit(), t.method.state_dict())
    assert runs[True][0]["A_N"] == pytest.approx(runs[False][0]["A_N"])
    for k, v in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("native", [False, True], ids=["no-bf16-cpu", "bf16-cpu"])
def test_amp_auto_resolves_once_per_run_and_resume_keeps_it(tmp_path, monkeypatch, native):
    """amp=auto (the default) is bf16 on a CPU with AVX512-BF16 or AMX and none elsewhere; the choice is written
    to config.yaml and record.json, so a resume on another machine (here: the other answer) keeps it, also when
    the original command line says amp=auto."""
    from clfast.engine.config import resolve_amp

    def machine(bf16: bool):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)

    machine(native)
    assert RunConfig().amp == "auto"
    assert resolve_amp("cpu")[0] == ("bf16" if native else "none")
    cut = tmp_path / "cut"
    t = Trainer(tiny_cfg("dualprompt", ["stop_after_steps=2"]), out=str(cut))
    assert t.cfg.amp == ("bf16" if native else "none")
    assert t.amp_dtype == (torch.bfloat16 if native else None)
    with pytest.raises(Interrupted):
        t.fit()
    assert yaml.safe_load((cut / "config.yaml").read_text())["amp"] == t.cfg.amp
    assert json.loads((cut / "record.json").read_text())["amp_auto"].startswith(f"amp auto -> {t.cfg.amp}")
    machine(not native)
    r = Trainer.resume(str(cut), amp="auto")
    assert r.cfg.amp == t.cfg.amp and r.amp_dtype == t.amp_dtype
    with pytest.raises(ValueError, match="amp"):
        Trainer.resume(str(cut), amp="fp16")
