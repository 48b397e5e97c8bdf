"""--resume reaches the uninterrupted run bitwise: with augmentation on, in a method with several stages
and its own random draws, from step checkpoints after a SIGKILL, and under the command line; and each
check is shown to fail on the bug it guards (negative controls with the fix taken out).

Every comparison is of the whole trained state (every tensor the checkpoint holds) and of the accuracy
matrix, on runs whose trained tensors move by much more than rounding between different seeds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from clfast.engine import Interrupted, Trainer, load_config
from clfast.engine import io as rio
from clfast.engine import data_views
from clfast.engine.metrics import read_acc_csv

# small but not degenerate: 2 tasks of digits, 4 steps of 16 images each, augmentation on
AUG = ["num_tasks=2", "epochs=1", "batch_size=16", "eval_batch_size=128", "limit_train_batches=4",
       "limit_eval_batches=1", "quiet=true", "threads=1", "augment=true", "method_args.e_length=4"]


def dual_cfg(extra=()):
    return load_config("dualprompt", "digits", "fast", AUG + list(extra))


def final_state(run) -> dict:
    return torch.load(os.path.join(run, "checkpoints", "task002.pt"), weights_only=True)["method_state"]


def matrix(run):
    return torch.tensor(read_acc_csv(os.path.join(run, "acc_matrix.csv")))


def differing(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return sorted(k for k in a if not torch.equal(a[k], b[k]))


def assert_same_run(run, ref):
    assert differing(final_state(run), final_state(ref)) == []
    torch.testing.assert_close(matrix(run), matrix(ref), rtol=0, atol=0, equal_nan=True)


def interrupted_then_resumed(cfg_fn, run, stop_at, **resume_kw):
    with pytest.raises(Interrupted):
        Trainer(cfg_fn([f"stop_after_steps={stop_at}"]), out=str(run)).fit()
    Trainer.resume(str(run), **resume_kw).fit()


@pytest.fixture(scope="module")
def dual_full(tmp_path_factory):
    run = tmp_path_factory.mktemp("dual") / "full"
    Trainer(dual_cfg(), out=str(run)).fit()
    return run


def test_the_comparison_can_see_a_change(dual_full, tmp_path):
    """Another seed moves every trained tensor: equality below is not a property of any two runs."""
    Trainer(dual_cfg(["seed=1"]), out=str(tmp_path / "other")).fit()
    moved = differing(final_state(tmp_path / "other"), final_state(dual_full))
    assert {"e_prompt", "g_prompt", "e_keys", "head.weight"} <= set(moved)


@pytest.mark.parametrize("stop_at", [2, 4, 6])   # task 1 mid-epoch, the task boundary, task 2 mid-epoch
def test_resume_with_augmentation_is_exact(dual_full, tmp_path, stop_at):
    interrupted_then_resumed(dual_cfg, tmp_path / "cut", stop_at)
    assert_same_run(tmp_path / "cut", dual_full)


def test_negative_control_global_rng_augmentation_breaks_resume(dual_full, tmp_path, monkeypatch):
    """The bug this file guards, put back: augmentation from the global generator and loaders that draw
    their worker seed from it. The resumed run then differs, so the tests above would catch it."""
    monkeypatch.setattr(data_views, "cpu_rng_seeded", lambda seed: contextlib.nullcontext())
    real_loader = data_views.DataLoader
    monkeypatch.setattr(data_views, "DataLoader",
                        lambda *a, generator=None, **kw: real_loader(*a, **kw))
    interrupted_then_resumed(dual_cfg, tmp_path / "cut", 6)
    assert differing(final_state(tmp_path / "cut"), final_state(dual_full))


def test_augmentation_of_an_item_depends_only_on_seed_and_index():
    """The same item, augmented after different histories of the global generator, is the same; other
    items and other seeds differ; the global generator does not move."""
    from clfast.data.transforms import build_transforms

    images = [{"image": torch.rand(3, 40, 40), "label": i} for i in range(3)]
    ds = data_views.Transformed(images, build_transforms(32, train=True), seed=123)
    before = torch.get_rng_state()
    a = ds[1]["image"]
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(1000)
    assert torch.equal(ds[1]["image"], a)
    assert not torch.equal(ds[0]["image"], ds[1]["image"][:, :, :])
    ds.seed = 124
    assert not torch.equal(ds[1]["image"], a)


# --- a method with several stages that draws from the global generator ----------------------------------

def two_stage_cfg(extra=()):
    from clfast.engine import RunConfig
    from tests.engine.test_stages import TwoStage  # noqa: F401  (registers _test_two_stage)

    kw = dict(method="_test_two_stage", dataset="digits", num_tasks=2, epochs=1, batch_size=16,
              limit_train_batches=4, limit_eval_batches=1, quiet=True, threads=1, amp="none", augment=True,
              optimizer={"name": "adam", "lr": 0.01})
    for e in extra:
        k, v = e.split("=")
        kw[k] = int(v)
    return RunConfig(**kw)


@pytest.fixture(scope="module")
def stages_full(tmp_path_factory):
    run = tmp_path_factory.mktemp("stages") / "full"
    Trainer(two_stage_cfg(), out=str(run)).fit()
    return run


# global steps: task 0 = 4 task-stage + 6 align-stage steps (2 epochs × 3), task 1 the same
@pytest.mark.parametrize("stop_at", [pytest.param(2, marks=pytest.mark.slow), 7, 12, pytest.param(17, marks=pytest.mark.slow)])
def test_multi_stage_method_resumes_exactly(stages_full, tmp_path, stop_at):
    interrupted_then_resumed(two_stage_cfg, tmp_path / "cut", stop_at)
    assert_same_run(tmp_path / "cut", stages_full)


def test_negative_control_skipping_the_rng_restore_breaks_resume(stages_full, tmp_path, monkeypatch):
    """The RNG-restore mutant: a resumed run that does not put the saved generator states back draws other
    alignment batches (the method samples them from the global generator)."""
    with pytest.raises(Interrupted):
        Trainer(two_stage_cfg(["stop_after_steps=12"]), out=str(tmp_path / "cut")).fit()
    monkeypatch.setattr(rio, "set_rng_state", lambda state: None)
    Trainer.resume(str(tmp_path / "cut")).fit()
    assert differing(final_state(tmp_path / "cut"), final_state(stages_full))


# --- step checkpoints and SIGKILL, through the command line --------------------------------------------

CLI = ["--method", "dualprompt", "--dataset", "digits", "--quiet", *[a for a in AUG if a != "quiet=true"]]


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "clfast", "train", *args], capture_output=True, text=True,
                          timeout=600, **kw)


def test_sigkill_after_a_step_checkpoint_resumes_exactly(dual_full, tmp_path):
    """A process killed with SIGKILL (no handler runs) continues from its last step checkpoint and ends
    with the uninterrupted run's state and matrix; the original command line with --resume added is
    accepted."""
    run = tmp_path / "killed"
    args = [*CLI, "--out", str(run), "checkpoint_every_steps=1"]
    proc = subprocess.Popen([sys.executable, "-m", "clfast", "train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    step_ckpt = run / "checkpoints" / "step.pt"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if step_ckpt.is_file():
                try:
                    if torch.load(step_ckpt, weights_only=True)["global_step"] >= 5:
                        break
                except Exception:  # replaced while reading: try again
                    pass
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "checkpoints" / "task002.pt").exists()
    done = _cli(*args, "--resume", str(run))
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_run(run, dual_full)


def test_resume_refuses_a_real_change_and_names_it(dual_full, tmp_path):
    run = tmp_path / "cut"
    with pytest.raises(Interrupted):
        Trainer(dual_cfg(["stop_after_steps=3"]), out=str(run)).fit()
    out = _cli(*CLI, "seed=3", "--resume", str(run))
    assert out.returncode == 2 and "seed (0 -> 3)" in out.stderr
    out = _cli("--resume", str(run), "--dataset", "synth-shapes")
    assert out.returncode == 2 and "dataset ('digits' -> 'synth-shapes')" in out.stderr


def _perturbed_copy_of_the_shipped_backbone(path):
    from safetensors.torch import load_file, save_file

    from clfast.backbones import zoo

    weights = load_file(zoo.VIT_TINY_SYNTH_FILE)
    save_file(weights, str(path))

    def perturb():
        w = load_file(str(path))
        key = next(k for k in w if k.endswith("blocks.0.attn.qkv.weight"))
        w[key] = w[key] + 1e-3
        save_file(w, str(path))
    return perturb


def test_resume_and_eval_refuse_other_frozen_weights(tmp_path):
    """The frozen tensors a checkpoint leaves out are checked by digest when `--resume` and `clfast eval`
    rebuild the model: weights changed on disk since the run are refused, with the reason."""
    weights = tmp_path / "backbone.safetensors"
    perturb = _perturbed_copy_of_the_shipped_backbone(weights)
    run = tmp_path / "run"
    args = [*CLI, "--out", str(run), f"checkpoint_path={weights}"]
    out = _cli(*args, "stop_after_steps=5")
    assert out.returncode == 0 and "interrupted" in out.stderr, out.stderr[-2000:]
    perturb()
    out = _cli("--resume", str(run))
    assert out.returncode == 2 and "were the pretrained weights" in out.stderr, out.stderr[-2000:]
    ev = subprocess.run([sys.executable, "-m", "clfast", "eval", "--run", str(run), "--quiet"], capture_output=True,
                        text=True, timeout=600)
    assert ev.returncode == 2 and "were the pretrained weights" in ev.stderr, ev.stderr[-2000:]


# --- reproducibility at the default thread count ------------------------------------------------------

def test_two_runs_at_two_threads_are_bitwise_equal(tmp_path):
    """Same seed, two threads: the same trained tensors (advanced indexing's backward adds atomically
    across threads; the engine runs deterministic algorithms on the CPU and the methods index_select)."""
    runs = []
    for i in range(2):
        # the preset's prompts at batch 64: the gathered prompts' gradient is large enough (64 × 5 × 192)
        # for the stock CPU kernel to split it over threads
        extra = ["threads=2", "batch_size=64", "limit_train_batches=2"]
        keep = [a for a in AUG if not a.startswith(("threads", "method_args", "batch_size", "limit_train"))]
        cfg = load_config("l2p", "digits", "fast", keep + extra)
        Trainer(cfg, out=str(tmp_path / f"r{i}")).fit()
        runs.append(tmp_path / f"r{i}")
    assert_same_run(runs[1], runs[0])
