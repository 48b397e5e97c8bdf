"""The ``clumo`` method on the shipped clip_tiny_synth VLM (spec methods/clumo.md §8 items 1, 3, 5, 6, 7, 11):
stage 1 against features computed independently, one pooling function everywhere, padding invariance, the
selection and task inference of ``predict``, what one optimizer step may change, the distillation term, the
parameter groups and the configuration errors. The engine runs (CLI, resume) are in test_clumo_engine.py."""

from __future__ import annotations

import copy

import pytest
import torch

from clfast.backbones import vlm as vlm_mod
from clfast.backbones.vlm import create_vlm
from clfast.data import create_dataset
from clfast.data.synth import VQA_ANSWERS
from clfast.methods import TaskContext, create_method
from clfast.methods.cluster_prompts import fit_keys, select_prompts
from clfast.methods.clumo import CluMo, CluMoConfig

T = 3                                 # the first three question families of synth-vqa
A = len(VQA_ANSWERS)
RANGES = ((0, A),) * T


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)        # tiny matrices: a second thread only waits on a busy machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base_vlm():
    torch.manual_seed(0)
    return create_vlm("clip_tiny_synth", answers=list(VQA_ANSWERS))


@pytest.fixture(scope="module")
def data(base_vlm):
    """Per task, two batches of 6 questions (train split) as the engine builds them: tokens, soft targets."""
    ds = create_dataset("synth-vqa", "train", n_per_task=12, image_size=32)     # clip_tiny_synth's input size
    out = []
    for t in range(T):
        idx = [i for i in range(len(ds)) if ds.task_ids[i] == t]
        batches = []
        for part in (idx[:6], idx[6:]):
            items = [ds[i] for i in part]
            tokens = torch.as_tensor(base_vlm.tokenizer([it["question"] for it in items]), dtype=torch.long)
            labels = torch.tensor([it["label"] for it in items])
            batches.append({"image": torch.stack([it["image"] for it in items]), "question": tokens,
                            "label": labels, "task": torch.full((len(part),), t), "index": torch.tensor(part),
                            "answer_scores": torch.nn.functional.one_hot(labels, A).float()})
        out.append(batches)
    return out


def ctx_for(task, data=None, **kw):
    return TaskContext(task=task, num_tasks=T, class_range=RANGES[task], seen_classes=A, num_classes=A,
                       task_ranges=RANGES, scenario="vqa", seed=3,
                       task_loader=(lambda augment=False: list(data[task])) if data is not None else None, **kw)


def make(base_vlm, **cfg) -> CluMo:
    torch.manual_seed(1)
    return create_method("clumo", copy.deepcopy(base_vlm), A, T, **cfg)


def independent_features(vlm, batch, mode="mean"):
    """h^v and h^t written out: mean/max over patch tokens and over the tokens up to EOT, per sample."""
    with torch.no_grad():
        img = vlm.towers.image_tokens(batch["image"])[:, 1:].double()
        emb = vlm.towers.text_input_embeddings(batch["question"]).double()
    eot = batch["question"].argmax(1)
    red = (lambda x: x.mean(0)) if mode == "mean" else (lambda x: x.amax(0))
    hv = torch.stack([red(img[b]) for b in range(img.shape[0])])
    ht = torch.stack([red(emb[b, : int(eot[b]) + 1]) for b in range(emb.shape[0])])
    return hv, ht


# ---------------------------------------------------------------------------------------------------------
# §8 items 1, 2 and 3: shapes, stage 1, pooling
# ---------------------------------------------------------------------------------------------------------

def test_stage1_keys_and_shapes(base_vlm, data):
    m = make(base_vlm)
    D_v, D_w, D_f = base_vlm.towers.image_width, base_vlm.towers.text_width, base_vlm.width
    assert m.pool.keys_v.shape == (T, 3, D_v) and m.pool.keys_t.shape == (T, 3, D_w)
    assert m.pool.prompts.shape == (T, 9, 10, D_f) and m.pool.general.shape == (T, 10, D_f)
    before = m.pool.keys_v.clone()
    m.begin_task(ctx_for(1, data))
    assert m.pool.fitted.tolist() == [False, True, False]
    assert torch.equal(m.pool.keys_v[[0, 2]], before[[0, 2]])
    feats = [independent_features(base_vlm, b) for b in data[1]]
    hv, ht = torch.cat([f[0] for f in feats]), torch.cat([f[1] for f in feats])
    assert hv.shape == (12, D_v) and ht.shape == (12, D_w)
    from clfast.utils.seeding import derive_seed
    want_v = fit_keys(hv.float(), 3, seed=derive_seed(3, "clumo-keys-v", 1))
    want_t = fit_keys(ht.float(), 3, seed=derive_seed(3, "clumo-keys-t", 1))
    torch.testing.assert_close(m.pool.keys_v[1], want_v, rtol=0, atol=1e-5)
    torch.testing.assert_close(m.pool.keys_t[1], want_t, rtol=0, atol=1e-5)
    # the selection: idx in [0, 9), Π (B, 20, D_f)
    batch = data[1][0]
    enc = m.vlm.encode(batch["image"], batch["question"])
    sel = m.select(batch, ctx_for(1), torch.full((6,), 1), enc)
    assert sel.index.min() >= 0 and sel.index.max() < 9
    assert m.pool.prompt(sel.task, sel.index).shape == (6, 20, D_f)
    # a second begin_task (a resume inside the task) keeps the fitted keys
    m.pool.keys_v[1].add_(1.0)
    kept = m.pool.keys_v[1].clone()
    m.begin_task(ctx_for(1, data))
    assert torch.equal(m.pool.keys_v[1], kept)


def test_farthest_assignment_option_runs_the_codes_lloyd_steps(base_vlm, data):
    from clfast.utils.seeding import derive_seed

    m = make(base_vlm, farthest_assignment=True, kmeans_iters=7, lloyd_batch=5)
    m.begin_task(ctx_for(2, data))
    feats = [independent_features(base_vlm, b) for b in data[2]]
    hv, ht = torch.cat([f[0] for f in feats]).float(), torch.cat([f[1] for f in feats]).float()
    for got, x, tag in ((m.pool.keys_v[2], hv, "v"), (m.pool.keys_t[2], ht, "t")):
        want = fit_keys(x, 3, seed=derive_seed(3, f"clumo-keys-{tag}", 2), farthest=True, n_iter=7, batch_size=5)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert not torch.allclose(got, fit_keys(x, 3, seed=derive_seed(3, f"clumo-keys-{tag}", 2)), atol=1e-3)


def test_keys_are_invariant_to_padding_length(base_vlm, data):
    m1, m2 = make(base_vlm), make(base_vlm)
    m1.begin_task(ctx_for(0, data))
    L = max(int(b["question"].argmax(1).max()) for b in data[0]) + 1
    assert L < data[0][0]["question"].shape[1]
    trimmed = [dict(b, question=b["question"][:, :L]) for b in data[0]]
    m2.begin_task(ctx_for(0, [trimmed] + data[1:]))
    assert torch.equal(m1.pool.keys_t[0], m2.pool.keys_t[0]) and torch.equal(m1.pool.keys_v[0], m2.pool.keys_v[0])
    for mode in ("mean", "max"):      # and so are the selection features
        a = m1.key_features(data[0][0]["image"], data[0][0]["question"], mode)[1]
        b = m1.key_features(data[0][0]["image"], trimmed[0]["question"], mode)[1]
        assert torch.equal(a, b)
        ref = independent_features(base_vlm, data[0][0], mode)[1]
        torch.testing.assert_close(a.double(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("key_pooling,stage1,select", [("mean", "mean", "mean"), ("max", "max", "max"),
                                                        ("official", "mean", "max")])
def test_stage1_and_selection_call_the_same_pooling(base_vlm, data, monkeypatch, key_pooling, stage1, select):
    calls = []
    real = vlm_mod.pool_tokens

    def spy(x, mask=None, mode="mean"):
        calls.append(mode)
        return real(x, mask, mode)

    monkeypatch.setattr(vlm_mod, "pool_tokens", spy)
    m = make(base_vlm, key_pooling=key_pooling)
    m.begin_task(ctx_for(0, data))
    assert calls == [stage1] * 4          # 2 batches x (image, text)
    calls.clear()
    m.training_step(data[0][0], ctx_for(0))
    m.predict(data[0][0], ctx_for(0))
    assert calls == [select] * 4


# ---------------------------------------------------------------------------------------------------------
# §8 item 5: task inference in predict
# ---------------------------------------------------------------------------------------------------------

def fitted(base_vlm, data, **cfg) -> CluMo:
    m = make(base_vlm, **cfg)
    for t in range(T):
        m.begin_task(ctx_for(t, data))
    m.eval()
    return m


def test_predict_infers_the_task_from_the_keys(base_vlm, data):
    m = fitted(base_vlm, data)
    batch = {k: torch.cat([data[t][1][k] for t in range(T)]) for k in data[0][0]}
    ctx = ctx_for(T - 1)
    with torch.no_grad():
        logits = m.predict(batch, ctx)
        scores = m.score(batch, logits, ctx)
    hv, ht = independent_features(base_vlm, batch, "mean")
    ref = select_prompts(hv.float(), ht.float(), m.pool.keys_v, m.pool.keys_t)
    assert torch.equal(scores["task_acc"], (ref.task == batch["task"]).float())
    assert scores["task_acc"].mean() > 0.5         # question families have their own templates
    # the logits are those of the reference selection's prompts
    with torch.no_grad():
        enc = m.vlm.encode(batch["image"], batch["question"])
        z = m.vlm.head(m.vlm.fuse(enc, prefix=torch.cat([m.pool.general[ref.task],
                                                         m.pool.prompts[ref.task, ref.index]], 1)))
    torch.testing.assert_close(logits, z, rtol=0, atol=1e-5)
    # batch-invariant: each sample alone gets the same task, prompt and logits
    for b in (0, 7, 17):
        one = {k: v[b:b + 1] for k, v in batch.items()}
        with torch.no_grad():
            lo = m.predict(one, ctx)
            so = m.score(one, lo, ctx)
        assert so["task_acc"].item() == scores["task_acc"][b].item()
        torch.testing.assert_close(lo[0], logits[b], rtol=0, atol=1e-5)
    # only the seen tasks compete: after task 0 every sample uses pool 0
    with torch.no_grad():
        lo = m.predict(batch, ctx_for(0))
        so = m.score(batch, lo, ctx_for(0))
    assert torch.equal(so["task_acc"], (batch["task"] == 0).float())


def test_task_aware_test_uses_the_given_task(base_vlm, data):
    m = fitted(base_vlm, data, task_aware_test=True)
    batch = {k: torch.cat([data[t][1][k] for t in range(T)]) for k in data[0][0]}
    with torch.no_grad():
        logits = m.predict(batch, ctx_for(T - 1))
        s = m.score(batch, logits, ctx_for(T - 1))
    assert s["task_acc"].tolist() == [1.0] * 18
    assert m.record()["unfair_evaluation"] is True and make(base_vlm).record()["unfair_evaluation"] is False
    hv, ht = independent_features(base_vlm, batch, "mean")
    ref = select_prompts(hv.float(), ht.float(), m.pool.keys_v, m.pool.keys_t, task=batch["task"])
    with torch.no_grad():
        enc = m.vlm.encode(batch["image"], batch["question"])
        z = m.vlm.head(m.vlm.fuse(enc, prefix=m.pool.prompt(ref.task, ref.index)))
    torch.testing.assert_close(logits, z, rtol=0, atol=1e-5)
    assert s["credit"].shape == (18,)


# ---------------------------------------------------------------------------------------------------------
# §8 item 6: what one optimizer step changes
# ---------------------------------------------------------------------------------------------------------

def one_step(m, batch, ctx):
    m.train()
    opt = torch.optim.AdamW(m.param_groups(None), lr=1e-2, weight_decay=0.02)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    out = m.training_step(batch, ctx)
    out.loss.backward()
    opt.step()
    m.after_optimizer_step()
    return before, {k: v.clone() for k, v in m.state_dict().items()}


def test_one_step_changes_only_the_selected_prompts_general_prompt_and_head(base_vlm, data):
    m = make(base_vlm)
    m.begin_task(ctx_for(0, data))
    m.end_task(ctx_for(0), [])
    m.begin_task(ctx_for(1, data))
    m.begin_stage(None, ctx_for(1))
    assert {n for n, p in m.named_parameters() if p.requires_grad} == \
        {"pool.prompts", "pool.general"} | {f"backbone.head.{n}" for n, _ in m.vlm.head.named_parameters()}
    batch = data[1][0]
    with torch.no_grad():
        enc = m.vlm.encode(batch["image"], batch["question"])
        selected = set(m.select(batch, ctx_for(1), torch.full((6,), 1), enc).index.tolist())
    before, after = one_step(m, batch, ctx_for(1))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    head = {k for k in before if k.startswith("backbone.head.")}
    assert changed == head | {"pool.prompts", "pool.general"}
    rows = (after["pool.prompts"] != before["pool.prompts"]).flatten(2).any(-1)      # (T, 9)
    assert set(rows.nonzero()[:, 0].tolist()) == {1} and set(rows[1].nonzero()[:, 0].tolist()) == selected
    g = (after["pool.general"] != before["pool.general"]).flatten(1).any(-1)
    assert g.tolist() == [False, True, False]


def test_old_rows_stay_frozen_and_train_prompts_false_never_changes_the_pools(base_vlm, data):
    m = make(base_vlm)
    m.begin_task(ctx_for(0, data))
    one_step(m, data[0][0], ctx_for(0))
    m.end_task(ctx_for(0), [])
    m.begin_task(ctx_for(1, data))
    opt = torch.optim.AdamW(m.param_groups(None), lr=1e-2)     # a persistent optimizer (momentum of task 0 rows)
    keep = m.pool.prompts[0].clone(), m.pool.general[0].clone()
    for batch in data[1]:
        m.training_step(batch, ctx_for(1)).loss.backward()
        opt.step()
        m.after_optimizer_step()
    assert torch.equal(m.pool.prompts[0], keep[0]) and torch.equal(m.pool.general[0], keep[1])

    m = make(base_vlm, train_prompts=False)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == \
        {f"backbone.head.{n}" for n, _ in m.vlm.head.named_parameters()}
    m.begin_task(ctx_for(0, data))
    before, after = one_step(m, data[0][0], ctx_for(0))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.startswith("backbone.head.")}


def test_param_groups_decay_only_the_head_weight_matrices(base_vlm):
    m = make(base_vlm)
    names = {id(p): n for n, p in m.named_parameters()}
    groups = m.param_groups(None)
    decay = [names[id(p)] for g in groups if "weight_decay" not in g for p in g["params"]]
    plain = [names[id(p)] for g in groups if g.get("weight_decay") == 0.0 for p in g["params"]]
    assert sorted(decay) == ["backbone.head.mlp.0.weight", "backbone.head.mlp.3.weight"]
    assert {"pool.prompts", "pool.general", "backbone.head.mlp.1.weight"} <= set(plain)
    m = make(base_vlm, lr_scales={"pool": 0.5})
    names = {id(p): n for n, p in m.named_parameters()}
    scaled = {names[id(p)] for g in m.param_groups(None) if g.get("lr_scale") == 0.5 for p in g["params"]}
    assert scaled == {"pool.prompts", "pool.general"}


# ---------------------------------------------------------------------------------------------------------
# §8 item 7: the distillation term
# ---------------------------------------------------------------------------------------------------------

def test_distillation_is_off_at_task_0_and_zero_for_identical_heads(base_vlm, data):
    m = make(base_vlm)
    m.begin_task(ctx_for(0, data))
    out = m.training_step(data[0][0], ctx_for(0))
    assert "kd" not in out.logs and torch.equal(out.loss.detach(), out.logs["ce"])
    m.end_task(ctx_for(0), [])
    m.begin_task(ctx_for(1, data))
    out = m.training_step(data[1][0], ctx_for(1))
    assert out.logs["kd"].item() == 0.0                 # the copy equals the head it was taken from
    out.loss.backward()
    assert all(p.grad is None for p in m.prev_head.parameters())
    with torch.no_grad():
        m.vlm.head.mlp[3].bias.add_(0.25)
    out = m.training_step(data[1][0], ctx_for(1))
    torch.testing.assert_close(out.logs["kd"], torch.tensor(0.0625), rtol=1e-5, atol=0)   # (0.25)² everywhere
    torch.testing.assert_close(out.loss.detach(), out.logs["ce"] + out.logs["kd"], rtol=1e-6, atol=0)
    m = make(base_vlm, kd_weight=0.0)
    m.begin_task(ctx_for(1, data))
    assert "kd" not in m.training_step(data[1][0], ctx_for(1)).logs


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------

def test_config_errors_name_the_setting(base_vlm):
    for bad, match in (({"key_pooling": "cls"}, "key_pooling"), ({"answer_mode": "gen"}, "answer_mode"),
                       ({"n_image_keys": 0}, "n_image_keys"), ({"kd_weight": -1.0}, "kd_weight"),
                       ({"image_size": 0}, "image_size"), ({"general_length": -1}, "general_length")):
        with pytest.raises(ValueError, match=match):
            CluMoConfig(**bad)
    with pytest.raises(ValueError, match="28 answers"):
        create_method("clumo", copy.deepcopy(base_vlm), A + 1, T)
    with pytest.raises(TypeError, match="VLM"):
        create_method("clumo", torch.nn.Linear(2, 2), A, T)


# ---------------------------------------------------------------------------------------------------------
# §8 item 1 at the spec's widths (ViT-B-16: D_v 768, D_w 512, fusion 6 x 768 x 12)
# ---------------------------------------------------------------------------------------------------------

def test_prefix_keys_and_values_have_the_spec_shape():
    from clfast.backbones.vlm import PromptedCrossAttention
    from clfast.methods.cluster_prompts import ClusterPromptPool

    pool = ClusterPromptPool(6, 768, 512, 768)
    pi = pool.prompt(torch.tensor([0, 3, 5]), torch.tensor([8, 0, 4]))
    assert pi.shape == (3, 20, 768)
    pk, pv = PromptedCrossAttention(768, 12).project_kv(pi)
    assert pk.shape == pv.shape == (3, 12, 20, 64)


@pytest.mark.slow      # a random-weight ViT-B-16 CLIP: about 10 s to build and run on 2 cores
def test_shapes_on_the_spec_backbone():
    torch.manual_seed(0)
    vlm = create_vlm("ViT-B-16", pretrained="none", num_answers=5)
    m = create_method("clumo", vlm, 5, 2)
    images = torch.rand(2, 3, 224, 224)
    tokens = torch.as_tensor(vlm.tokenizer(["what is on the table", "where is the cat"]), dtype=torch.long)
    h_v, h_t = m.key_features(images, tokens, "mean")
    assert h_v.shape == (2, 768) and h_t.shape == (2, 512)
    assert m.pool.keys_v.shape == (2, 3, 768) and m.pool.keys_t.shape == (2, 3, 512)
    assert m.pool.prompts.shape == (2, 9, 10, 768) and m.pool.general.shape == (2, 10, 768)
    assert (vlm.fusion.depth, vlm.fusion.width, vlm.fusion.heads) == (6, 768, 12)
    batch = {"image": images, "question": tokens, "answer_scores": torch.eye(5)[:2], "task": torch.zeros(2).long()}
    ctx = TaskContext(task=0, num_tasks=2, class_range=(0, 5), seen_classes=5, num_classes=5,
                      task_ranges=((0, 5),) * 2, scenario="vqa")
    m.pool.set_keys(0, torch.randn(3, 768), torch.randn(3, 512))
    out = m.training_step(batch, ctx)
    out.loss.backward()
    assert m.pool.prompts.grad.shape == (2, 9, 10, 768) and m.pool.prompts.grad[1].abs().sum() == 0


def test_rank_answers_distil_and_survive_a_reload(data):
    """answer_mode rank: the previous-head copy scores with the same answer embeddings, also in a method rebuilt from
    a saved state (the embeddings are not saved; begin_task restores them)."""
    torch.manual_seed(0)
    vlm = create_vlm("clip_tiny_synth", answers=list(VQA_ANSWERS), answer_mode="rank")
    m = create_method("clumo", copy.deepcopy(vlm), A, T, answer_mode="rank")
    m.begin_task(ctx_for(0, data))
    one_step(m, data[0][0], ctx_for(0))
    m.end_task(ctx_for(0), [])
    m.begin_task(ctx_for(1, data))
    assert m.training_step(data[1][0], ctx_for(1)).logs["kd"].item() == 0.0
    # as the engine builds it: a VLM whose answers are named by the scenario in begin_task
    unnamed = create_vlm("clip_tiny_synth", num_answers=A, answer_mode="rank")
    fresh = create_method("clumo", unnamed, A, T, answer_mode="rank")
    fresh.load_state_dict(m.state_dict())
    fresh.begin_task(ctx_for(1, data, class_names=tuple(VQA_ANSWERS)))
    torch.testing.assert_close(fresh.prev_head.head.answer_embeddings, m.vlm.head.answer_embeddings, rtol=0, atol=0)
    a, b = m.training_step(data[1][1], ctx_for(1)), fresh.training_step(data[1][1], ctx_for(1))
    assert torch.equal(a.logs["kd"], b.logs["kd"]) and torch.equal(a.loss, b.loss)
