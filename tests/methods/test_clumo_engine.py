"""CluMo in the engine on synth-vqa (spec methods/clumo.md §8 items 6 and 11; the run API): the command line from a
VLM checkpoint written by a tiny vlm_finetune run, what the run record and checkpoints hold, what stays frozen over
the whole run, an exact resume at a task boundary and inside a task, the warm-up schedule of the paper presets,
and the presets themselves."""

from __future__ import annotations

import json
import os

import pytest
import torch

from clfast.cli import main
from clfast.engine import Interrupted, Trainer, load_config
from clfast.engine.metrics import read_acc_csv
from clfast.utils.checkpoint_file import latest_task_checkpoint
from clfast.utils.files import sha256_file

# synth-vqa at 4 questions per family: 6 tasks of 4 training and 4 test questions; batch 2 -> 2 steps per task
TINY = ["dataset_args.n_per_task=4", "epochs=1", "batch_size=2", "eval_batch_size=64", "quiet=true", "threads=1",
        "amp=none", "method_args.image_size=null"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """The VLM checkpoint: a vlm_finetune run of one step per task on the same data (a test, not a warm-up)."""
    out = tmp_path_factory.mktemp("clumo") / "warm"
    cfg = load_config("vlm_finetune", "synth-vqa", "fast", TINY + ["limit_train_batches=1", "limit_eval_batches=1",
                                                                   "batch_size=4"])
    Trainer(cfg, out=str(out)).fit()
    return out


def cfg(warm, extra=()):
    return load_config("clumo", "synth-vqa", "fast", TINY + [f"method_args.vlm_checkpoint={warm}", *extra])


def state(run, tag="task006"):
    return torch.load(os.path.join(run, "checkpoints", f"{tag}.pt"), weights_only=True)["method_state"]


@pytest.fixture(scope="module")
def full(warm, tmp_path_factory):
    run = tmp_path_factory.mktemp("clumo") / "full"
    Trainer(cfg(warm), out=str(run)).fit()
    return run


def test_cli_run_reports_task_inference_and_records_the_checkpoint(warm, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--method", "clumo", "--dataset", "synth-vqa", "--out", str(out), *TINY,
                 f"method_args.vlm_checkpoint={warm}"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["num_tasks"] == 6 and 0 <= s["A_N"] <= 100 and 0 <= s["eval_task_acc"] <= 1
    rec = json.loads((out / "record.json").read_text())["method_record"]
    ckpt = latest_task_checkpoint(str(warm))
    assert rec["vlm_checkpoint"]["path"] == os.path.abspath(ckpt)
    assert rec["vlm_checkpoint"]["sha256"] == sha256_file(ckpt)
    assert rec["keys_fitted"] == 6 and rec["task_inference"] == "keys, per sample"
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["event"] == "epoch"]
    assert [e["task"] for e in epochs] == list(range(6)) and all(e["steps"] == 2 for e in epochs)


def test_the_loaded_vlm_stays_frozen_and_old_pools_stay_fixed(warm, full):
    src = torch.load(latest_task_checkpoint(str(warm)), weights_only=True)
    warm_state = {**src["method_state"]}
    states = [state(full, f"task{t:03d}") for t in range(1, 7)]
    last = states[-1]
    # the fusion encoder is the checkpoint's, bitwise, after six tasks (left out of the checkpoint as unchanged
    # since built, or saved equal)
    for k, v in warm_state.items():
        if k.startswith("backbone.fusion.") and k in last:
            assert torch.equal(last[k], v), k
    from clfast.backbones import create_vlm

    towers = create_vlm("clip_tiny_synth").towers.state_dict()      # the shipped weights, as built
    saved = [k for k in last if k.startswith("backbone.towers.")]    # (small tensors are always saved)
    assert saved and all(torch.equal(last[k], towers[k[len("backbone.towers."):]]) for k in saved)
    for t in range(5):       # task t's pools and keys do not move once task t is over
        for k in ("pool.prompts", "pool.general", "pool.keys_v", "pool.keys_t"):
            assert torch.equal(states[t][k][t], last[k][t]), (k, t)
    assert bool(last["pool.fitted"].all()) and bool(last["prev_head.taken"])
    # the head trained on (it is not frozen), and the previous-head copy is the head after task 5
    assert not torch.equal(last["backbone.head.mlp.3.weight"], warm_state["backbone.head.mlp.3.weight"])
    assert torch.equal(last["prev_head.head.mlp.3.weight"], last["backbone.head.mlp.3.weight"])


def test_loading_the_checkpoint_leaves_grad_only_on_pools_and_head(warm, tmp_path):
    t = Trainer(cfg(warm), out=str(tmp_path / "r"))
    m = t.method
    m.begin_stage(None, t.context(0))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    head = {f"backbone.head.{n}" for n, _ in m.vlm.head.named_parameters()}
    assert trainable == {"pool.prompts", "pool.general"} | head
    src = torch.load(latest_task_checkpoint(str(warm)), weights_only=True)["method_state"]
    own = m.state_dict()
    for k, v in src.items():
        if k.startswith(("backbone.fusion.", "backbone.head.")):
            assert torch.equal(own[k], v), k
    t2 = Trainer(cfg(warm, ["method_args.train_prompts=false"]), out=str(tmp_path / "r2"))
    t2.method.begin_stage(None, t2.context(0))
    assert {n for n, p in t2.method.named_parameters() if p.requires_grad} == head


def test_the_transform_keeps_the_whole_image_and_flips_only_on_request(warm, tmp_path):
    image = torch.rand(3, 64, 64)
    for flip in (False, True):
        t = Trainer(cfg(warm, [f"method_args.hflip={str(flip).lower()}"]), out=str(tmp_path / str(flip)))
        tf = t.data.train_tf
        assert tf.crop == "none" and tf.deterministic is (not flip)
        if not flip:    # the whole image, resized to the towers' 32 px, in training as at test
            whole = torch.nn.functional.interpolate(image[None], size=(32, 32), mode="bicubic", antialias=True)[0]
            torch.testing.assert_close(tf(image), whole.clamp(0, 1), rtol=0, atol=1e-5)
            torch.testing.assert_close(t.data.eval_tf(image), tf(image), rtol=0, atol=0)


def test_the_checkpoint_is_required(tmp_path):
    with pytest.raises(ValueError, match="vlm_checkpoint is required"):
        Trainer(load_config("clumo", "synth-vqa", "fast", TINY), out=str(tmp_path / "r"))


def same_run(a_run, b_run):
    a, b = state(a_run), state(b_run)
    assert a.keys() == b.keys()
    assert sorted(k for k in a if not torch.equal(a[k], b[k])) == []
    torch.testing.assert_close(torch.tensor(read_acc_csv(a_run / "acc_matrix.csv")),
                               torch.tensor(read_acc_csv(b_run / "acc_matrix.csv")), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("stop_at", [4,                                        # end of task 2: the task boundary
                                     pytest.param(5, marks=pytest.mark.slow)])  # inside task 3 (its keys saved)
def test_resume_is_exact(warm, full, tmp_path, stop_at):
    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):
        Trainer(cfg(warm, [f"stop_after_steps={stop_at}"]), out=str(cut)).fit()
    Trainer.resume(str(cut)).fit()
    same_run(cut, full)


def test_paper_presets_warm_up_in_stairs_then_stay_constant(warm, tmp_path):
    t = Trainer(load_config("clumo", "synth-vqa", "clove_scene",
                            TINY + [f"method_args.vlm_checkpoint={warm}", "method_args.clip_model=clip_tiny_synth",
                                    "method_args.clip_pretrained=null", "method_args.image_size=null"]),
                out=str(tmp_path / "p"))
    stage = t.method.stages(t.context(0))[0]
    s = t._stage_settings(stage)
    assert s["optim"].name == "adamw" and s["optim"].lr == 3e-4 and s["optim"].weight_decay == 0.02
    lr = [3e-4 * t._lr_factor(stage, s, pos, 1000) for pos in range(1000)]
    for pos in range(1000):    # ALBEF's warmup_lr_schedule(step = pos // 100 of 4), stepped every 100 iterations
        want = min(3e-4, 1e-5 + (3e-4 - 1e-5) * (pos // 100) / 4)
        assert lr[pos] == pytest.approx(want, rel=1e-9, abs=1e-15), pos
    assert lr[0] == pytest.approx(1e-5) and lr[399] == pytest.approx(1e-5 + 2.9e-4 * 3 / 4) and lr[400] == 3e-4
    for dataset in ("clove-scene", "clove-function"):      # each CLOVE dataset's own preset is the default
        assert load_config("clumo", dataset).preset == dataset.replace("-", "_")
    for name in ("clove_scene", "clove_function"):
        c = load_config("clumo", "synth-vqa", name)
        assert c.batch_size == 8 and c.seed == 42 and c.epochs == 1 and c.schedule.name == "warmup_constant"
        m = c.method_config()
        assert (m.clip_model, m.clip_pretrained, m.image_size) == ("ViT-B-16", "openai", 384)
        assert (m.n_image_keys, m.n_text_keys, m.prompt_length, m.general_length, m.kd_weight) == (3, 3, 10, 10, 1.0)
        assert (m.kmeans_samples, m.kmeans_iters, m.task_aware_test, m.hflip, m.train_prompts) == \
            (10000, 50, False, False, True)


def test_test_image_tokens_are_computed_once_and_change_nothing(warm, full, tmp_path, monkeypatch):
    """The image tower runs once per test question over the whole run (6 evaluations of a growing test set: 4 + 8
    + ... + 24 = 84 images without the cache, 24 with it), training is untouched, and the results are bitwise
    those of a run without the cache."""
    from clfast.backbones.vlm import CLIPTokenTowers

    seen = []
    orig = CLIPTokenTowers.image_tokens

    def counting(self, images, **kw):
        seen.append(images.shape[0])
        return orig(self, images, **kw)

    monkeypatch.setattr(CLIPTokenTowers, "image_tokens", counting)
    count = {}
    for mb in (2048, 0):
        seen.clear()
        run = tmp_path / f"mb{mb}"
        Trainer(cfg(warm, [f"method_args.image_token_cache_mb={mb}"]), out=str(run)).fit()
        count[mb] = sum(seen)
        same_run(run, full)
    assert count[0] - count[2048] == 4 * (1 + 2 + 3 + 4 + 5)


def test_ddp_two_cpu_processes_match_one(warm, full, tmp_path):
    """torchrun, 2 gloo ranks (batch 2 = one question per rank): the K-means keys are fitted on both ranks'
    features gathered in the documented order, so they are the one-process run's (up to the features' last bits:
    each rank's tower runs on its own share of the batch); prompts and head equal up to the reassociation of the
    averaged gradients; every test question counted once, with the same answers."""
    import subprocess
    import sys

    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "clfast", "train", "--method", "clumo", "--dataset", "synth-vqa", "--out", str(run), *TINY,
                        f"method_args.vlm_checkpoint={warm}"], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((run / "record.json").read_text())["device"]["world_size"] == 2
    a, b = state(run), state(full)
    assert a.keys() == b.keys()
    assert torch.equal(a["pool.fitted"], b["pool.fitted"])
    for k in ("pool.keys_v", "pool.keys_t"):
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=lambda m: f"{k}: {m}")
    # Float noise, amplified over 6 tasks of training: measured up to 3e-5 relative (Frobenius) per tensor, and one
    # small head weight 1.4e-4 off in absolute terms (1e-6 of features' noise at the towers' output is enough).
    for k, v in b.items():
        if v.is_floating_point():
            rel = ((a[k].double() - v.double()).norm() / v.double().norm().clamp_min(1e-12)).item()
            assert rel < 1e-4, f"{k}: relative difference {rel:.2e}"
        torch.testing.assert_close(a[k], v, atol=1e-3, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    ta, tb = (torch.load(r / "checkpoints" / "task006.pt", weights_only=True)["acc"]["total"] for r in (run, full))
    assert ta == tb
    torch.testing.assert_close(torch.tensor(read_acc_csv(run / "acc_matrix.csv")),
                               torch.tensor(read_acc_csv(full / "acc_matrix.csv")), atol=0, rtol=0, equal_nan=True)


def test_the_forgetting_analysis_script_reproduces_the_last_column(full):
    """scripts/vqa_forgetting.py rebuilds the run from config.yaml and its last checkpoint: its per-task accuracy
    is the accuracy matrix's last column; every answer lies in some task's answer set."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "vqa_forgetting.py")
    spec = importlib.util.spec_from_file_location("vqa_forgetting", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.where_answers_go(str(full))
    last = [row[-1] for row in read_acc_csv(full / "acc_matrix.csv")]
    assert [r["correct"] for r in rows] == pytest.approx(last, abs=1e-9)
    assert rows[-1]["own_set"] == rows[-1]["last_set"]           # the last task's own set is the last set
    assert all(0 <= r["own_set"] <= 100 and r["n"] == 4 for r in rows)
