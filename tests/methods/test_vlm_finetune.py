"""vlm_finetune: the VLM's fusion encoder and head trained with the towers frozen, from the command line on
synth-vqa; its checkpoint loaded back by load_vlm_checkpoint (bitwise, checked: shapes, settings, vocabulary, content
hash); the task-heads baseline over a frozen loaded VLM; the loss and the transform."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from clfast.backbones import create_vlm, load_vlm_checkpoint
from clfast.cli import main
from clfast.data.synth import VQA_ANSWERS
from clfast.engine import Trainer, load_config
from clfast.methods.vqa_losses import soft_target_ce as soft_cross_entropy
from clfast.utils.checkpoint_file import DamagedCheckpointError, latest_task_checkpoint
from clfast.utils.files import sha256_file

torch.set_num_threads(1)

# synth-vqa at 4 questions per family: 6 tasks of 4 training and 4 test questions, one step each
TINY = ["dataset_args.n_per_task=4", "epochs=1", "batch_size=8", "eval_batch_size=64", "limit_train_batches=1",
        "quiet=true", "threads=1", "amp=none"]
FUSION = ("backbone.fusion.", "backbone.head.")


def state(run):
    return torch.load(latest_task_checkpoint(str(run)), weights_only=True)


def cfg(extra=()):
    return load_config("vlm_finetune", "synth-vqa", "fast", TINY + list(extra))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A CLI run; its trainer's VLM is not at hand, so the in-process tests below use their own."""
    out = tmp_path_factory.mktemp("vlm") / "run"
    assert main(["train", "--method", "vlm_finetune", "--dataset", "synth-vqa", "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An in-process run: the trainer (with its method) before and after fit."""
    out = tmp_path_factory.mktemp("vlm") / "trained"
    t = Trainer(cfg(), out=str(out))
    towers = {k: v.clone() for k, v in t.method.backbone.towers.state_dict().items()}
    fusion0 = {k: v.clone() for k, v in t.method.state_dict().items() if k.startswith(FUSION)}
    t.fit()
    return t, out, towers, fusion0


def fresh_vlm(**kw):
    vlm = create_vlm("clip_tiny_synth", image_size=64, **kw)   # the fast preset's towers run at 64 px
    vlm.build_head(len(VQA_ANSWERS))
    return vlm


def test_cli_run_writes_the_vlm_into_its_checkpoint(run):
    s = json.loads((run / "summary.json").read_text())
    assert s["num_tasks"] == 6 and 0 <= s["A_N"] <= 100
    rec = json.loads((run / "record.json").read_text())["method_record"]
    assert rec["answers"] == list(VQA_ANSWERS) and rec["vlm"]["clip_name"] == "clip_tiny_synth"
    assert (rec["vlm"]["depth"], rec["vlm"]["width"], rec["vlm"]["heads"]) == (2, 192, 3)
    ms = state(run)["method_state"]
    assert any(k.startswith("backbone.fusion.layers.1.cross_attn.kv") for k in ms)
    assert "backbone.head.mlp.3.weight" in ms and "backbone.answer_digests" in ms and "backbone.config_json" in ms
    cfg_saved = json.loads(bytes(ms["backbone.config_json"].tolist()).decode())
    assert cfg_saved["num_answers"] == len(VQA_ANSWERS)
    # the log names the backbone the method built (not the run's unused `backbone` key, vit_tiny_synth)
    assert "backbone clip_tiny_synth [shipped]" in (run / "train.log").read_text()


def test_checkpoint_loads_back_bitwise(run):
    ms = state(run)["method_state"]
    vlm = fresh_vlm()
    before = {k: v.clone() for k, v in vlm.state_dict().items()}
    for source in (str(run), latest_task_checkpoint(str(run))):     # a run directory or a file
        record = load_vlm_checkpoint(vlm, source)
        sd = vlm.state_dict()
        for k, v in sd.items():
            if k.startswith(("fusion.", "head.")):
                assert torch.equal(v, ms["backbone." + k]), k
            if k.startswith("towers."):
                assert torch.equal(v, before[k]), k                 # the towers are not loaded
        n = sum(1 for k in sd if k.startswith(("fusion.", "head."))) + 2   # + config_json, answer_digests
        assert record["keys"] == n and record["method"] == "vlm_finetune"
        assert record["path"] == os.path.abspath(latest_task_checkpoint(str(run)))
        assert record["sha256"] == sha256_file(record["path"]) and record["config"]["width"] == 192
    vlm.set_answers(VQA_ANSWERS)           # the vocabulary it was trained on: accepted
    assert vlm.answers == list(VQA_ANSWERS)


def test_mismatches_raise_naming_what_differs(run, tmp_path):
    with pytest.raises(ValueError, match=r"backbone\.fusion\.text_proj\.weight: checkpoint \(192, 128\) vs this VLM "
                                         r"\(96, 128\)"):
        load_vlm_checkpoint(fresh_vlm(width=96), str(run))
    with pytest.raises(ValueError, match=r"image_size: checkpoint 64 vs this VLM 32"):   # towers at another size
        vlm = create_vlm("clip_tiny_synth")
        vlm.build_head(len(VQA_ANSWERS))
        load_vlm_checkpoint(vlm, str(run))
    with pytest.raises(ValueError, match=r"heads: checkpoint 3 vs this VLM 2"):   # same shapes, other heads
        load_vlm_checkpoint(fresh_vlm(heads=2), str(run))
    swapped = list(VQA_ANSWERS)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    vlm = create_vlm("clip_tiny_synth", image_size=64, answers=swapped)
    with pytest.raises(ValueError, match=r"another answer vocabulary: 2 of 28 answers differ, at positions \[0, 1\]"):
        load_vlm_checkpoint(vlm, str(run))
    loaded = fresh_vlm()
    load_vlm_checkpoint(loaded, str(run))
    with pytest.raises(ValueError, match=r"differs at 2 of 28 positions"):          # named after loading
        loaded.set_answers(swapped)
    with pytest.raises(ValueError, match=r"backbone\.head\.mlp\.3\.weight: checkpoint \(28, 384\) vs this VLM \(5, 384\)"):
        load_vlm_checkpoint(create_vlm("clip_tiny_synth", image_size=64, num_answers=5), str(run))
    damaged = tmp_path / "damaged.pt"
    data = bytearray(open(latest_task_checkpoint(str(run)), "rb").read())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpointError, match="damaged"):
        load_vlm_checkpoint(fresh_vlm(), str(damaged))
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file nor a run directory"):
        load_vlm_checkpoint(fresh_vlm(), str(tmp_path / "nothing.pt"))


def test_only_fusion_and_head_train_and_the_towers_stay_bitwise(trained):
    t, _, towers, fusion0 = trained
    m = t.method
    trainable = sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert trainable and all(n.startswith(FUSION) for n in trainable)
    assert len(trainable) == sum(1 for n, _ in m.named_parameters() if n.startswith(FUSION))
    for k, v in m.backbone.towers.state_dict().items():
        assert torch.equal(v, towers[k]), k
    moved = [k for k, v in m.state_dict().items() if k.startswith(FUSION) and not torch.equal(v, fusion0[k])]
    assert len(moved) == len(fusion0)                     # every fusion and head tensor trained
    assert not m.backbone.towers.clip.training


def test_loss_is_the_soft_target_cross_entropy():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 6, generator=g)
    w = torch.rand(4, 6, generator=g)
    want = -sum(float(w[b, a]) * float(torch.log_softmax(z[b], 0)[a]) for b in range(4) for a in range(6)) / 4
    assert float(soft_cross_entropy(z, w)) == pytest.approx(want, rel=1e-6)
    y = torch.tensor([0, 3, 5, 1])
    torch.testing.assert_close(soft_cross_entropy(z, F.one_hot(y, 6).float()), F.cross_entropy(z, y))


def test_task_heads_over_a_frozen_loaded_vlm(run, tmp_path):
    t = Trainer(cfg([f"method_args.vlm_checkpoint={run}", "method_args.task_heads=true"]), out=str(tmp_path / "th"))
    m = t.method
    loaded = {k: v.clone() for k, v in m.state_dict().items() if k.startswith(FUSION)}
    ms = state(run)["method_state"]
    assert all(torch.equal(v, ms[k]) for k, v in loaded.items())
    heads0 = [{k: v.clone() for k, v in h.state_dict().items()} for h in m.task_heads]
    t.fit()
    assert all(torch.equal(v, loaded[k]) for k, v in m.state_dict().items() if k.startswith(FUSION))
    for h, h0 in zip(m.task_heads, heads0):               # each task trained its own head
        assert any(not torch.equal(v, h0[k]) for k, v in h.state_dict().items())
    rec = json.loads((tmp_path / "th" / "record.json").read_text())["method_record"]
    assert rec["task_heads"] and rec["vlm_checkpoint"]["sha256"] == sha256_file(latest_task_checkpoint(str(run)))
    batch = next(iter(t.data.loader(t.test_data(0), None, 8)))
    batch["task"] = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])[: len(batch["task"])]
    with torch.no_grad():
        got = m.predict(batch, t.context(5))
        h = m.fused(batch)
        want = torch.stack([m.task_heads[int(k)](h[i:i + 1])[0] for i, k in enumerate(batch["task"])])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_init_from_a_run_loads_the_vlm(run, tmp_path):
    t = Trainer(cfg([f"init_from={run}"]), out=str(tmp_path / "init"))
    ms = state(run)["method_state"]
    assert all(torch.equal(v, ms[k]) for k, v in t.method.state_dict().items() if k.startswith(FUSION))


def test_the_train_transform_keeps_the_whole_image_unflipped(trained):
    t = trained[0]
    tf = t.data.train_transform(True)
    img = torch.rand(3, 64, 64)   # synth-vqa's size: the whole image, resized to itself
    for seed in range(5):
        torch.manual_seed(seed)
        torch.testing.assert_close(tf(img), img, rtol=0, atol=1e-5)
    assert t.method.transform_args()["hflip"] == 0.0


def test_presets_build(tmp_path):
    c = load_config("vlm_finetune", "synth-vqa", "vqav2")
    m = c.method_config()
    assert (m.clip_model, m.clip_pretrained, m.image_size) == ("ViT-B-16", "openai", 384)
    assert (c.batch_size, c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay) == (8, "adamw", 3e-4, 0.02)
    with pytest.raises(ValueError, match="answer_mode"):
        load_config("vlm_finetune", "synth-vqa", "fast", ["method_args.answer_mode=generate"]).method_config()


@pytest.mark.slow
def test_resume_inside_the_run_is_exact(trained, tmp_path):
    from clfast.engine import Interrupted
    from clfast.engine.metrics import read_acc_csv

    full = trained[1]
    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):
        Trainer(cfg(["stop_after_steps=3"]), out=str(cut)).fit()
    Trainer.resume(str(cut)).fit()
    a, b = state(full)["method_state"], state(cut)["method_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(torch.tensor(read_acc_csv(full / "acc_matrix.csv")),
                               torch.tensor(read_acc_csv(cut / "acc_matrix.csv")), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("task_heads", [False, True], ids=["naive", "task_heads"])
def test_test_image_tokens_are_computed_once_and_change_nothing(run, tmp_path, monkeypatch, task_heads):
    """Each test question's image tokens come from the tower once per run (6 evaluations of 4, 8, ..., 24
    questions: 84 images without the cache, 24 with it); the answers are those of a run without the cache."""
    from clfast.backbones.vlm import CLIPTokenTowers
    from clfast.engine.metrics import read_acc_csv

    seen = []
    orig = CLIPTokenTowers.image_tokens
    monkeypatch.setattr(CLIPTokenTowers, "image_tokens",
                        lambda self, images, **kw: seen.append(images.shape[0]) or orig(self, images, **kw))
    extra = [f"method_args.vlm_checkpoint={run}", "method_args.task_heads=true"] if task_heads else []
    count, acc = {}, {}
    for mb in (2048, 0):
        seen.clear()
        out = tmp_path / f"mb{mb}"
        Trainer(cfg([*extra, f"method_args.image_token_cache_mb={mb}"]), out=str(out)).fit()
        count[mb], acc[mb] = sum(seen), read_acc_csv(out / "acc_matrix.csv")
    assert count[0] - count[2048] == 4 * (1 + 2 + 3 + 4 + 5)
    torch.testing.assert_close(torch.tensor(acc[0]), torch.tensor(acc[2048]), rtol=0, atol=0, equal_nan=True)
