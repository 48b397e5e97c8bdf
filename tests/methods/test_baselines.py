"""The method API and the baselines (linear, l2p, dualprompt, coda_prompt) on a small random ViT."""

from __future__ import annotations

import pytest
import torch

from clfast.backbones.vit import create_vit
from clfast.methods import (QueryCache, TaskContext, build_config, create_method, freeze_rows, list_methods,
                            masked_logits, method_class)
from clfast.ops import retrieve, use_backend

BASELINES = ["linear", "l2p", "dualprompt", "coda_prompt"]
SMALL = {  # small pools keep the tests fast; the semantics are the same
    "linear": {},
    "l2p": {"pool_size": 6, "length": 3, "top_k": 2},
    "dualprompt": {"g_length": 2, "e_length": 4},
    "coda_prompt": {"pool_size": 8, "length": 4, "ortho_weight": 0.1},
}
NUM_CLASSES, NUM_TASKS = 8, 2


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return create_vit("vit_tiny_synth", pretrained=True)


def ctx_for(task: int, **kw) -> TaskContext:
    per = NUM_CLASSES // NUM_TASKS
    ranges = tuple((t * per, (t + 1) * per) for t in range(NUM_TASKS))
    return TaskContext(task=task, num_tasks=NUM_TASKS, class_range=ranges[task], seen_classes=ranges[task][1],
                       num_classes=NUM_CLASSES, task_ranges=ranges, **kw)


def make_batch(n: int = 5, seed: int = 0, task: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    per = NUM_CLASSES // NUM_TASKS
    return {"image": torch.rand(n, 3, 32, 32, generator=g),
            "label": torch.randint(task * per, (task + 1) * per, (n,), generator=g),
            "task": torch.full((n,), task), "index": torch.arange(n)}


def build(name: str, backbone, seed: int = 0):
    torch.manual_seed(seed)
    return create_method(name, backbone, NUM_CLASSES, NUM_TASKS, **SMALL[name])


def test_registry_lists_baselines_and_suggests_close_names():
    assert set(BASELINES) <= set(list_methods())
    with pytest.raises(ValueError, match="did you mean 'l2p'|Did you mean 'l2p'"):
        method_class("l2q")
    with pytest.raises(ValueError, match="pool_size"):
        build_config(method_class("l2p").Config, {"pool_sise": 3}, "l2p")
    with pytest.raises(ValueError, match="top_k"):
        build_config(method_class("l2p").Config, {"top_k": 11}, "l2p")
    with pytest.raises(ValueError, match="length must be int"):
        build_config(method_class("l2p").Config, {"length": "five"}, "l2p")


def test_masked_logits_and_freeze_rows():
    x = torch.zeros(2, 6)
    y = masked_logits(x, (2, 4))
    assert torch.isinf(y[:, :2]).all() and torch.isinf(y[:, 4:]).all() and (y[:, 2:4] == 0).all()
    p = torch.nn.Parameter(torch.ones(4, 3))
    stop = [2]
    freeze_rows(p, lambda: stop[0])
    (p * torch.arange(4.0)[:, None]).sum().backward()
    assert (p.grad[:2] == 0).all() and (p.grad[2:] != 0).all()


@pytest.mark.parametrize("restore", [True, False])
def test_frozen_rows_stay_fixed_under_a_persistent_adamw(restore):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 6, 2))           # rows along dim 1, e.g. (layers, pool, C)
    stop = [0]
    rows = freeze_rows(p, lambda: stop[0], dim=1)
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.1)  # one optimizer for every "task"
    for task in range(3):
        stop[0] = 2 * task                                   # rows of finished tasks are frozen
        before = p.detach().clone()
        for _ in range(4):
            opt.zero_grad()
            (p ** 2).sum().backward()
            assert (p.grad[:, : stop[0]] == 0).all() and (p.grad[:, stop[0]:] != 0).all()
            opt.step()
            if restore:
                rows.restore()
        moved = (p.detach() - before).abs().amax(dim=(0, 2))
        if restore:
            assert (moved[: stop[0]] == 0).all(), f"task {task}: a frozen row moved"
        elif task > 0:
            # the control: momentum and weight decay move rows whose gradient is zero
            assert (moved[: stop[0]] > 0).all()
        assert (moved[stop[0]:] > 0).all()
    with pytest.raises(ValueError, match="dim must be in"):
        freeze_rows(p, 1, dim=3)
    with pytest.raises(ValueError, match="requires grad"):
        freeze_rows(torch.zeros(3), 1)


def test_lr_scales_group_parameters_by_longest_prefix(backbone):
    from clfast.engine.optim import build_optimizer
    from clfast.methods import OptimConfig, Stage

    torch.manual_seed(0)
    m = create_method("l2p", backbone, NUM_CLASSES, NUM_TASKS, **SMALL["l2p"],
                      lr_scales={"head": 4, "head.bias": 0, "keys": 0.5})
    groups = m.param_groups(Stage("train"))
    by_scale = {g["lr_scale"]: {id(p) for p in g["params"]} for g in groups}
    assert by_scale == {4.0: {id(m.head.weight)}, 0.0: {id(m.head.bias)}, 0.5: {id(m.keys)},
                        1.0: {id(m.prompts)}}
    opt = build_optimizer(groups, OptimConfig(lr=0.01), batch_size=8)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(m.head.weight)] == pytest.approx(0.04) and lrs[id(m.head.bias)] == 0.0
    assert lrs[id(m.keys)] == pytest.approx(0.005) and lrs[id(m.prompts)] == pytest.approx(0.01)
    # no scales: one group, as before
    assert len(build("l2p", backbone).param_groups(Stage("train"))) == 1
    # a prefix that names nothing (or half a name) is an error naming it, never a silent 1.0
    with pytest.raises(ValueError, match="'prompt' names no parameter.*'prompts'"):
        create_method("l2p", backbone, NUM_CLASSES, NUM_TASKS, lr_scales={"prompt": 0.1}).param_groups(Stage("t"))
    with pytest.raises(ValueError, match=r"lr_scales\['head'\] must be a number >= 0"):
        build_config(method_class("l2p").Config, {"lr_scales": {"head": -1}}, "l2p")
    with pytest.raises(ValueError, match="lr_scales must be a mapping"):
        build_config(method_class("l2p").Config, {"lr_scales": [1.0]}, "l2p")


def test_l2p_cls_head_reads_the_prompted_class_token(backbone):
    torch.manual_seed(0)
    m = create_method("l2p", backbone, NUM_CLASSES, NUM_TASKS, **SMALL["l2p"], head="cls")
    batch, ctx = make_batch(3), ctx_for(0)
    with torch.no_grad():
        _, idx = retrieve(m.query(batch, ctx), m.keys, m.cfg.top_k)
        tokens = m.prompts[idx].reshape(3, -1, m.embed_dim)
        want = m.head(backbone.features(batch["image"], prompt_tokens=tokens))
        got = m.predict(batch, ctx)
    assert torch.allclose(got[:, :4], want[:, :4], atol=1e-5) and torch.isinf(got[:, 4:]).all()
    with pytest.raises(ValueError, match="head must be 'prompt' or 'cls'"):
        build_config(method_class("l2p").Config, {"head": "token"}, "l2p")


@pytest.mark.parametrize("name", BASELINES)
def test_step_trains_only_method_parameters(name, backbone):
    m = build(name, backbone)
    m.train()
    ctx = ctx_for(0)
    m.begin_task(ctx)
    out = m.training_step(make_batch(), ctx)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert "ce" in out.logs
    out.loss.backward()
    assert all(p.grad is None for p in m.backbone.parameters()), "the frozen backbone received gradients"
    trained = [n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert "head.weight" in trained
    if name != "linear":
        assert any(not n.startswith("head") for n in trained), f"{name}: no prompt parameter was trained"
    assert not m.backbone.vit.training, "the frozen backbone must stay in eval mode"


@pytest.mark.parametrize("name", BASELINES)
def test_predict_masks_unseen_classes_and_is_batch_invariant(name, backbone):
    m = build(name, backbone).eval()
    ctx = ctx_for(0, split="test")
    m.begin_task(ctx)
    batch = make_batch(6, seed=1)
    with torch.no_grad():
        logits = m.predict(batch, ctx)
        assert logits.shape == (6, NUM_CLASSES)
        assert torch.isinf(logits[:, ctx.seen_classes:]).all()
        assert torch.isfinite(logits[:, : ctx.seen_classes]).all()
        # per-sample selection: a sample's prediction does not depend on the rest of its batch
        single = torch.cat([m.predict({k: v[i: i + 1] for k, v in batch.items()}, ctx) for i in range(6)])
    torch.testing.assert_close(single[:, :4], logits[:, :4], atol=2e-4, rtol=1e-4)


def test_training_masks_to_current_task(backbone):
    m = build("linear", backbone)
    ctx = ctx_for(1)
    logits = m.train_logits(torch.zeros(3, NUM_CLASSES), ctx)
    assert torch.isinf(logits[:, :4]).all() and (logits[:, 4:] == 0).all()
    m.cfg.train_mask = False
    logits = m.train_logits(torch.zeros(3, NUM_CLASSES), ctx)
    assert torch.isfinite(logits).all()


def test_query_cache_returns_the_computed_features(backbone):
    m = build("l2p", backbone)
    batch = make_batch(7, seed=3)
    ctx = ctx_for(0, split="test", cacheable=True)
    fresh = m.query(batch, ctx_for(0))
    first = m.query(batch, ctx)                       # fills the cache
    part = {k: v[2:5] for k, v in batch.items()}
    cached = m.query(part, ctx)                       # served from the cache
    torch.testing.assert_close(first, fresh)
    torch.testing.assert_close(cached, fresh[2:5])
    calls = []
    m.backbone.query, orig = (lambda x: calls.append(x.shape[0]) or orig(x)), m.backbone.query
    try:
        m.query(part, ctx)
        assert calls == [], "a cached query ran the backbone again"
        m.query(part, ctx_for(0, split="test", cacheable=False))
        assert calls == [3]
    finally:
        del m.backbone.query


def test_query_cache_keeps_row_shapes_and_dtype_within_its_budget():
    rows = torch.randn(10, 3, 4).to(torch.bfloat16)
    row_bytes = 3 * 4 * 2
    calls = []

    def get(cache, split, idx):
        def compute(missing):
            calls.append(int(missing.sum()))
            return rows[idx[missing]]
        return cache(split, idx, compute)

    c = QueryCache(dtype=None, max_bytes=8 * row_bytes)          # room for 8 rows of all splits together
    idx = torch.tensor([0, 2, 5])
    out = get(c, "test", idx)
    assert out.dtype == torch.bfloat16 and torch.equal(out, rows[idx])
    assert torch.equal(get(c, "test", idx[:2]), rows[idx[:2]]) and calls == [3]      # served, not computed
    assert c.nbytes <= 8 * row_bytes and c.overflowed == 0
    big = torch.tensor([9, 1])                                     # 10 rows: past the budget, computed, not kept
    assert torch.equal(get(c, "test", big), rows[big]) and c.overflowed == 2 and calls == [3, 2]
    assert torch.equal(get(c, "val", torch.tensor([1])), rows[[1]])   # "test" took the budget: not kept
    assert c.nbytes <= 8 * row_bytes and c.overflowed == 3
    assert torch.equal(get(c, "test", idx), rows[idx]) and calls == [3, 2, 1]
    with pytest.raises(ValueError, match="max_bytes"):
        QueryCache(max_bytes=-1)


def test_l2p_selects_top_k_keys_per_sample(backbone):
    m = build("l2p", backbone)
    batch = make_batch(4)
    q = m.query(batch, ctx_for(0))
    cos = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(m.keys.detach(), dim=1).T
    want = cos.topk(m.cfg.top_k, dim=1).indices.sort(1).values
    _, got = retrieve(q, m.keys.detach(), m.cfg.top_k)
    assert torch.equal(got.sort(1).values, want)


def test_l2p_frequency_penalty_steers_training_away_from_used_prompts(backbone):
    torch.manual_seed(0)
    m = create_method("l2p", backbone, NUM_CLASSES, NUM_TASKS, **{**SMALL["l2p"], "top_k": 1},
                      frequency_penalty=True)
    batch = make_batch(6)
    q = m.query(batch, ctx_for(0))
    _, by_cos = retrieve(q, m.keys.detach(), 1)
    m.begin_task(ctx_for(0))
    m.training_step(batch, ctx_for(0))               # task 0: no history, plain cosine selection
    assert m.task_usage.sum() == 6 and torch.equal(m.task_usage.nonzero().flatten(),
                                                   by_cos.flatten().unique())
    m.end_task(ctx_for(0), [])
    used = m.usage.nonzero().flatten()
    assert m.task_usage.sum() == 0 and m.usage.sum() == 6

    m.begin_task(ctx_for(1))
    m.training_step(make_batch(6, task=1), ctx_for(1))
    picked = m.task_usage.nonzero().flatten()
    assert not set(picked.tolist()) & set(used.tolist()), "task 1 re-used task 0's prompts"
    # evaluation ignores the usage: cosine alone
    _, idx = m._select(q, training=False)
    assert torch.equal(idx, by_cos)
    # the counts travel with the method's state (checkpoints)
    state = m.state_dict()
    assert torch.equal(state["usage"], m.usage) and torch.equal(state["task_usage"], m.task_usage)

    plain = build("l2p", backbone)                    # off by default: training selects by cosine
    plain.usage.fill_(1.0)
    plain.usage[by_cos.flatten()] = 100.0
    _, idx = plain._select(q, training=True)
    _, want = retrieve(q, plain.keys.detach(), plain.cfg.top_k)
    assert torch.equal(idx, want)


def test_l2p_train_vote_gives_the_batch_majority_in_training_only(backbone):
    torch.manual_seed(0)
    m = create_method("l2p", backbone, NUM_CLASSES, NUM_TASKS, **SMALL["l2p"], train_vote=True)
    batch = make_batch(7)
    q = m.query(batch, ctx_for(0))
    _, per_sample = retrieve(q, m.keys.detach(), m.cfg.top_k)
    votes = torch.bincount(per_sample.flatten(), minlength=m.cfg.pool_size)
    order = sorted(range(m.cfg.pool_size), key=lambda i: (-int(votes[i]), i))
    scores, idx = m._select(q, training=True)
    assert torch.equal(idx, torch.tensor(order[: m.cfg.top_k]).expand(7, -1))
    qn = torch.nn.functional.normalize(q, dim=1)
    kn = torch.nn.functional.normalize(m.keys.detach()[idx[0]], dim=1)
    torch.testing.assert_close(scores.detach(), qn @ kn.T)
    assert m.task_usage.sum() == 7 * m.cfg.top_k
    scores.sum().backward()                           # the pull loss reaches the chosen keys only
    touched = m.keys.grad.abs().sum(1) > 0
    assert touched.nonzero().flatten().tolist() == sorted(order[: m.cfg.top_k])
    _, idx = m._select(q, training=False)              # evaluation stays per sample
    assert torch.equal(idx, per_sample)


def test_dualprompt_trains_only_the_current_expert_and_selects_among_seen(backbone):
    m = build("dualprompt", backbone)
    ctx = ctx_for(1)
    m.begin_task(ctx)
    torch.testing.assert_close(m.e_prompt[:, :, 1], m.e_prompt[:, :, 0])   # copied from the previous expert
    m.training_step(make_batch(task=1), ctx).loss.backward()
    g = m.e_prompt.grad
    assert g[:, :, 0].abs().sum() == 0 and g[:, :, 1].abs().sum() > 0
    assert m.e_keys.grad[0].abs().sum() == 0 and m.e_keys.grad[1].abs().sum() > 0
    with torch.no_grad():
        m.e_keys[1] = -m.e_keys[0] * 1e3          # make task 1's key far from everything
        idx0 = m.select(make_batch(), ctx_for(0))
    assert (idx0 == 0).all(), "after task 0 only task 0's key may be selected"


def test_coda_prompt_orthogonal_init_and_frozen_old_components(backbone):
    m = build("coda_prompt", backbone)
    m.begin_task(ctx_for(0))
    old = m.prompts.detach().clone()
    m.begin_task(ctx_for(1))
    per = m.per_task
    torch.testing.assert_close(m.prompts[:, :per], old[:, :per])          # old components kept
    for p in (m.keys, m.attn, m.prompts):
        flat = p.detach()[0, : 2 * per].reshape(2 * per, -1).double()
        gram = flat @ flat.T
        torch.testing.assert_close(gram, torch.eye(2 * per, dtype=torch.float64), atol=1e-5, rtol=0)
    m.training_step(make_batch(task=1), ctx_for(1)).loss.backward()
    for p in (m.keys, m.attn, m.prompts):
        assert p.grad[:, :per].abs().sum() == 0 and p.grad[:, per: 2 * per].abs().sum() > 0
    # components of future tasks do not change the output
    m2 = build("coda_prompt", backbone)
    m2.begin_task(ctx_for(0))
    batch = make_batch()
    with torch.no_grad():
        a = m2.predict(batch, ctx_for(0, split="test"))
        m2.prompts[:, per:] += 5.0
        b = m2.predict(batch, ctx_for(0, split="test"))
    torch.testing.assert_close(a[:, :4], b[:, :4])


@pytest.mark.parametrize("name", ["l2p", "dualprompt", "coda_prompt"])
def test_convergence_fused_matches_reference(name, backbone):
    """A few optimizer steps on one batch with the fused ops and with the reference ops give the same losses,
    and the classification loss falls (the step trains)."""
    def run(backend):
        m = build(name, backbone, seed=1)
        ctx = ctx_for(0)
        m.begin_task(ctx)
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        losses, ce = [], []
        batch = make_batch(8, seed=0)
        for step in range(5):
            with use_backend(backend):
                out = m.training_step(batch, ctx)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(float(out.loss.detach()))
            ce.append(float(out.logs["ce"]))
        return losses, ce

    (ref, ref_ce), (fused, fused_ce) = run("reference"), run("cpu")
    assert ref_ce[-1] < 0.8 * ref_ce[0], ref_ce      # the same batch five times: its loss must fall
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(ref), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(torch.tensor(fused_ce), torch.tensor(ref_ce), atol=2e-3, rtol=2e-3)
