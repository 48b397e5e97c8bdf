"""STAR-Prompt (methods/star_prompt.md): the spec's test list (its section 8) at the method level.

Items 1-2 (the selection op) are tests/ops/test_selection.py, item 10 (the MoG) tests/methods/test_mog.py, item 12
(the backbones) tests/backbones/test_clip_text.py; the rest are here, on a random ViT with ViT-B/16's heads (12 of
64) over 32×32 images and the shipped clip_tiny_synth (its class names from its closed vocabulary).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from clfast.backbones.vit import ViTBackbone
from clfast.engine.metrics import final_accuracy
from clfast.methods import Stage, TaskContext, create_method
from clfast.methods.star_prompt import (StarPrompt, logit_norm_ce, orth_loss_stage1, orth_loss_stage2,
                                        stage2_lr_factor)
from clfast.ops import prefix_attention

NAMES = ("red solid circle", "blue dotted square", "green striped star", "purple checkered heart",
         "red dotted ring", "blue solid cross")
NUM_CLASSES, NUM_TASKS = 6, 2
RANGES = ((0, 3), (3, 6))


def ctx_for(task: int, **kw) -> TaskContext:
    return TaskContext(task=task, num_tasks=NUM_TASKS, class_range=RANGES[task], seen_classes=RANGES[task][1],
                       num_classes=NUM_CLASSES, task_ranges=RANGES, class_names=NAMES, **kw)


def small_vit(depth: int = 2, heads: int = 12) -> ViTBackbone:
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=64 * heads, depth=depth, num_heads=heads,
                            num_classes=0)
    return ViTBackbone(vit)


def batch(n: int = 5, task: int = 0, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, 32, 32, generator=g), "label": torch.randint(*RANGES[task], (n,), generator=g),
            "task": torch.full((n,), task), "index": torch.arange(n)}


@pytest.fixture(scope="module")
def method() -> StarPrompt:
    torch.manual_seed(0)
    m = create_method("star_prompt", small_vit(), NUM_CLASSES, NUM_TASKS, mog_restarts=2)
    m.begin_task(ctx_for(0))
    return m


@pytest.fixture(scope="module")
def concat_method() -> StarPrompt:
    torch.manual_seed(1)
    return create_method("star_prompt", small_vit(), NUM_CLASSES, NUM_TASKS, prompt_mode="concat", mog_restarts=2)


# 3. residual equivalence ------------------------------------------------------------------------------

def test_residual_value_prompt_equals_output_bias():
    """attn(q, k, v + π) == attn(q, k, v) + π (rows of attention sum to 1), and the whole block with π added to
    every value equals the block with the out-projection bias π·W_Oᵀ added after the attention (fp32, 1e-5)."""
    torch.manual_seed(3)
    B, H, N, d = 3, 12, 5, 64
    q, k, v = (torch.randn(B, H, N, d) for _ in range(3))
    pi = torch.randn(B, H * d)
    pv = pi.view(B, H, 1, d)
    lhs = F.scaled_dot_product_attention(q, k, v + pv)
    assert torch.allclose(lhs, F.scaled_dot_product_attention(q, k, v) + pv, atol=1e-5)

    bb = small_vit(depth=1)
    block = bb.vit.blocks[0]
    x = torch.randn(B, N, H * d)
    attn = block.attn

    def explicit_block(x):    # timm's attention written out, with π added to V (the official code's form)
        h = block.norm1(x)
        qkv = attn.qkv(h).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
        qq, kk, vv = qkv.unbind(0)
        o = F.scaled_dot_product_attention(attn.q_norm(qq), attn.k_norm(kk), vv + pv)
        a = attn.proj(o.transpose(1, 2).reshape(B, N, H * d))
        x = x + block.ls1(a)
        return x + block.ls2(block.mlp(block.norm2(x)))

    def bias_form(layer, a):
        return a + (pi @ attn.proj.weight.T)[:, None, :]

    with torch.no_grad():
        want = explicit_block(x)
        got = bb._prompted_block(block, 0, x, None, {"attn_out": bias_form})
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_method_residual_forward_is_the_value_prompt(method):
    """The method's prompted features equal a forward whose every block adds π_l to its values."""
    b = batch(4)
    L, B, D = method.num_layers, 4, method.embed_dim
    prompts = torch.randn(L, B, D)
    bb = method.backbone
    H, d = bb.num_heads, bb.head_dim
    blocks = bb.vit.blocks

    def explicit(x):
        for l, block in enumerate(blocks):
            attn = block.attn
            h = block.norm1(x)
            qkv = attn.qkv(h).reshape(B, x.shape[1], 3, H, d).permute(2, 0, 3, 1, 4)
            qq, kk, vv = qkv.unbind(0)
            o = F.scaled_dot_product_attention(qq, kk, vv + prompts[l].view(B, H, 1, d))
            x = x + attn.proj(o.transpose(1, 2).reshape(B, x.shape[1], H * d))
            x = x + block.mlp(block.norm2(x))
        return bb.vit.fc_norm(bb.vit.norm(x)[:, 0])

    vit = bb.vit
    with torch.no_grad():
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(bb.normalize(b["image"])))))
        want = explicit(x)
        got = method.prompted_features(b["image"], prompts)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, bb.features(b["image"]), atol=1e-3)      # the prompts do something


# 4. concat mode -----------------------------------------------------------------------------------------

def test_concat_prefix_equals_explicit_concatenation():
    torch.manual_seed(4)
    B, H, N, P, d = 3, 12, 5, 5, 64
    q, k, v = (torch.randn(B, H, N, d) for _ in range(3))
    pk, pv = torch.randn(B, H, P, d), torch.randn(B, H, P, d)
    want = torch.softmax(q @ torch.cat([pk, k], 2).transpose(-1, -2) / math.sqrt(d), -1) @ torch.cat([pv, v], 2)
    got = prefix_attention(q, k, v, pk, pv)
    assert torch.allclose(got, want, atol=1e-5)


def test_concat_mode_prefix_shapes_and_forward(concat_method):
    m = concat_method
    m.begin_task(ctx_for(0))
    assert m.values.shape == (m.num_layers, NUM_CLASSES, 2 * 5 * m.embed_dim)
    b = batch(3)
    prompts = torch.randn(m.num_layers, 3, 2 * 5 * m.embed_dim)
    seen = {}
    orig = m.backbone.features

    def spy(images, **kw):
        seen.update(kw)
        return orig(images, **kw)

    m.backbone.features = spy
    try:
        with torch.no_grad():
            out = m.prompted_features(b["image"], prompts)
    finally:
        del m.backbone.features
    assert out.shape == (3, m.embed_dim)
    pre = seen["prefixes"]
    assert sorted(pre) == list(range(m.num_layers))
    pk, pv = pre[0]
    assert pk.shape == (3, 5, m.embed_dim) and pv.shape == (3, 5, m.embed_dim)
    # split into heads as the backbone does: (B, 12, 5, 64)
    assert pk.reshape(3, 5, 12, 64).permute(0, 2, 1, 3).shape == (3, 12, 5, 64)
    assert torch.equal(pk, prompts[0].view(3, 2, 5, m.embed_dim)[:, 0])


# 5. shapes ---------------------------------------------------------------------------------------------

def test_shapes(method):
    m = method
    ctx = ctx_for(0)
    m.write_keys(ctx)
    q = m.clip_query(batch(5), ctx)
    assert q.shape == (5, m.clip_dim)
    prompts, idx = m.select(q, ctx.seen_classes)
    assert prompts.shape == (m.num_layers, 5, 768) and idx.shape == (m.num_layers, 5)
    assert int(idx.max()) < ctx.seen_classes
    enc = m._text_encoder
    assert enc.tokens.shape[0] == NUM_CLASSES
    tok = m.clip_tokenizer
    assert enc.tokens[0, 0].item() == tok.sot_id        # v_c at position 1, right after <sot>
    n = int(sum(p.numel() for p in (m.modulators, m.values)) + m.head.weight.numel() + m.head.bias.numel())
    assert n == m.num_layers * NUM_CLASSES * (m.clip_dim + 768) + 769 * NUM_CLASSES


def test_trainable_parameter_count_vit_b_cifar():
    """Level 2 at ViT-B/16 and CLIP-L/14 widths with C = 200: 12·C·(768+768) + 769·C ≈ 3.84M (spec)."""
    C, L, D, Dc = 200, 12, 768, 768
    assert L * C * (D + Dc) + (D + 1) * C == 3_840_200


# 6. key cache ------------------------------------------------------------------------------------------

def test_key_cache_bitwise_and_past_context_fixed():
    torch.manual_seed(6)
    m = create_method("star_prompt", small_vit(depth=1), NUM_CLASSES, NUM_TASKS, mog_restarts=2)
    c0 = ctx_for(0)
    m.begin_task(c0)
    m.write_keys(c0)
    c1 = ctx_for(1)
    m.begin_task(c1)
    m.begin_stage(Stage(name="stage1"), c1.replace(stage="stage1"))
    with torch.no_grad():
        again = m.class_keys(0, 3)
    assert torch.equal(m.keys[:3], again)
    before = m.context.detach().clone()
    opt = torch.optim.SGD([m.context], lr=0.5)
    out = m.training_step(batch(4, task=1), c1.replace(stage="stage1"))
    out.loss.backward()
    opt.step()
    m.after_optimizer_step()
    assert torch.equal(m.context[:3], before[:3])           # past rows unchanged
    assert not torch.equal(m.context[3:], before[3:])       # current rows trained
    assert m.context.grad[:3].abs().sum() == 0


# 7. initialisation ---------------------------------------------------------------------------------------

def test_initialisation(method):
    A = method.modulators.detach().double()
    eye = torch.eye(NUM_CLASSES, dtype=torch.float64)
    for l in range(A.shape[0]):
        assert torch.allclose(A[l] @ A[l].T, eye, atol=1e-5)
    norms = method.values.detach().norm(dim=-1)
    assert not torch.allclose(norms, torch.ones_like(norms), atol=0.05)      # slice of a (C,3,D) orthogonal tensor
    assert torch.allclose(norms.pow(2).mean(), torch.tensor(1 / 3), atol=0.1)
    assert 0.01 < float(method.context.detach().std()) < 0.03


# 8. orthogonality losses -------------------------------------------------------------------------------

def test_orthogonality_losses_by_hand():
    torch.manual_seed(8)
    v = torch.randn(5, 4)
    assert orth_loss_stage1(v, 0, 3) == 0
    want = sum((v[c] @ v[p]) ** 2 for c in (2, 3, 4) for p in (0, 1)) / 6
    assert torch.allclose(orth_loss_stage1(v, 2, 5), want)
    P = torch.randn(2, 5, 4)
    assert orth_loss_stage2(P, 0, 2) == 0
    per_layer = []
    for l in range(2):
        norm = sum((P[l, c] @ P[l, c] - 1) ** 2 for c in (2, 3, 4)) / 3
        cross = sum((P[l, c] @ P[l, p]) ** 2 for c in (2, 3, 4) for p in (0, 1)) / 6
        per_layer.append(norm + cross)
    assert torch.allclose(orth_loss_stage2(P, 2, 5), sum(per_layer) / 2)
    Q = torch.linalg.qr(torch.randn(6, 6)).Q.T.reshape(1, 6, 6)        # orthonormal rows
    assert float(orth_loss_stage2(Q, 3, 6)) < 1e-10
    # gradient reaches only the current rows
    P.requires_grad_(True)
    orth_loss_stage2(P, 2, 5).backward()
    assert P.grad[:, :2].abs().sum() == 0 and P.grad[:, 2:].abs().sum() > 0


def test_logit_norm_ce():
    z = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    want = F.cross_entropy(z / (0.1 * (torch.tensor([[5.0], [1.0]]) + 1e-7)), y)
    assert torch.allclose(logit_norm_ce(z, y), want)


# 9. schedule -------------------------------------------------------------------------------------------

def test_stage2_schedule_values():
    K = 20
    for e in range(K):
        assert stage2_lr_factor(e, K) == pytest.approx(math.cos(99 * math.pi * e / (200 * (K - 1))))
    assert stage2_lr_factor(K - 1, K) == pytest.approx(0.0157, abs=1e-3)     # ≈ 1.6 % of lr at the end
    assert stage2_lr_factor(0, 1) == 1.0


def test_stage_plan(method):
    s0 = method.stages(ctx_for(0))
    assert [s.name for s in s0] == ["stage1", "align1", "stage2"]          # no head alignment at t = 0
    s1 = method.stages(ctx_for(1))
    assert [s.name for s in s1] == ["stage1", "align1", "stage2", "align2"]
    assert all(s.persistent is False for s in s1)                          # optimizers re-created every task
    assert s1[3].epochs == method.cfg.align2_epochs + method.cfg.align2_epoch_step * 1
    assert s1[0].optimizer.name == "sgd" and s1[0].optimizer.momentum == 0 and s1[0].augment is False
    assert s1[1].steps_per_epoch == math.ceil(method.cfg.align_samples * 6 / method.cfg.align_batch_size)
    stage2 = s1[2]
    assert method.lr_factor(stage2, 3, 10) == pytest.approx(stage2_lr_factor(3, 10))
    assert method.lr_factor(s1[0], 3, 10) is None
    const = create_method("star_prompt", small_vit(depth=1), NUM_CLASSES, NUM_TASKS, stage2_schedule="constant")
    assert const.lr_factor(stage2, 3, 10) == 1.0


# 11. head alignment -------------------------------------------------------------------------------------

def test_head_alignment_is_used_for_evaluation_only():
    torch.manual_seed(11)
    m = create_method("star_prompt", small_vit(depth=1), NUM_CLASSES, NUM_TASKS, mog_restarts=2)
    c1 = ctx_for(1)
    m.begin_task(c1)
    m.write_keys(ctx_for(0))
    m.write_keys(c1)
    trained = {k: v.clone() for k, v in m.head.state_dict().items()}
    m.begin_stage(Stage(name="align2"), c1.replace(stage="align2"))
    with torch.no_grad():
        m.aligned_head.weight.add_(1.0)          # what the alignment's SGD steps do, in one go
    b = batch(4, task=1)
    with torch.no_grad():
        q = m.clip_query(b, c1)
        prompts, _ = m.select(q, 6)
        feats = m.prompted_features(b["image"], prompts)
        logits = m.predict(b, c1)
    assert torch.allclose(logits, m.aligned_head(feats), atol=1e-5)        # evaluation: the aligned head
    nxt = TaskContext(task=2, num_tasks=3, class_range=(6, 6), seen_classes=6, num_classes=6,
                      task_ranges=RANGES + ((6, 6),), class_names=NAMES)
    assert m.eval_head(nxt) is m.head                                     # the next task: the backup
    assert all(torch.equal(m.head.state_dict()[k], v) for k, v in trained.items())
    s2 = c1.replace(stage="stage2")
    m.begin_stage(Stage(name="stage2"), s2)
    out = m.training_step(b, s2)                                           # training never reads the aligned head
    out.loss.backward()
    assert m.aligned_head.weight.grad is None and m.head.weight.grad is not None


# 13. metrics --------------------------------------------------------------------------------------------

def test_final_accuracy_is_mammoths_mean_over_tasks():
    acc = np.array([[90.0, 80.0, 70.0], [np.nan, 85.0, 60.0], [np.nan, np.nan, 95.0]])
    mammoth = float(np.mean([acc[i, -1] for i in range(3)]))    # mammoth: mean of the per-task accuracies at the end
    assert final_accuracy(acc) == pytest.approx(mammoth)


# options and guards ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("strict", [False, True])
def test_selection_gradient_mode_reaches_the_modulators(strict):
    """Official: every current class's modulator gets a gradient (straight-through); strict: only the chosen
    classes'. Past classes' modulators and values get none in both."""
    torch.manual_seed(12)
    m = create_method("star_prompt", small_vit(depth=1), NUM_CLASSES, NUM_TASKS, strict_selection_grad=strict,
                      lambda_ortho2=0.0)        # (the orthogonality term would reach every current value row)
    c1 = ctx_for(1)
    m.begin_task(c1)
    m.write_keys(ctx_for(0))
    s2 = c1.replace(stage="stage2")
    m.begin_stage(Stage(name="stage2"), s2)
    b = batch(2, task=1)
    m.training_step(b, s2).loss.backward()
    g = m.modulators.grad.abs().sum(-1)[0]                  # (C,) per class, block 0
    _, idx = m.select(m.clip_query(b, s2), 6)
    chosen = set(idx[0].tolist())
    assert g[:3].sum() == 0 and m.values.grad[:, :3].abs().sum() == 0
    for c in range(3, 6):
        assert (g[c] > 0) == ((not strict) or c in chosen), (c, chosen)
    vg = m.values.grad.abs().sum(-1)[0]
    assert all((vg[c] > 0) == (c in chosen) for c in range(3, 6))


def test_options_reach_their_parts():
    m = create_method("star_prompt", small_vit(depth=1), NUM_CLASSES, NUM_TASKS, gmm_torch_density=True,
                      mog_components=3, align1_em_iters=7, align2_em_iters=9)
    assert m.mog_clip.gmm_torch_density and m.mog_vit.gmm_torch_density
    assert m.mog_clip.n_components == 3 and (m.mog_clip.max_iter, m.mog_vit.max_iter) == (7, 9)


def test_clip_fp16_casts_the_clip_only():
    m = create_method("star_prompt", small_vit(depth=1), NUM_CLASSES, NUM_TASKS, clip_fp16=True)
    assert next(m.clip.parameters()).dtype == torch.float16 and m.context.dtype == torch.float32
    ctx = ctx_for(0)
    m.begin_task(ctx)
    q = m.clip_query(batch(2), ctx)
    assert q.dtype == torch.float32 and torch.isfinite(q).all()
    keys = m.class_keys(0, 3)
    assert keys.shape == (3, m.clip_dim) and torch.isfinite(keys).all()


def test_class_names_outside_the_tiny_clips_vocabulary_are_named():
    m = create_method("star_prompt", small_vit(depth=1), 10, 2)
    digits = tuple(str(i) for i in range(10))
    ctx = TaskContext(task=0, num_tasks=2, class_range=(0, 5), seen_classes=5, num_classes=10,
                      task_ranges=((0, 5), (5, 10)), class_names=digits)
    with pytest.raises(ValueError, match=r"'0'.*name_map"):
        m.begin_task(ctx)
    mapped = create_method("star_prompt", small_vit(depth=1), 10, 2,
                           class_name_map={d: w for d, w in zip(digits, ["no shape", "one", "two", "three", "four",
                                                                          "five", "six", "seven", "eight", "nine"])})
    with pytest.raises(ValueError, match="five"):      # the map's words must be in the vocabulary too
        mapped.begin_task(ctx)


def test_features_are_gathered_over_ranks_before_a_fit(method, monkeypatch):
    """Under DDP every rank fits the same mixtures on every rank's features (ctx.all_gather)."""
    gathered = []

    def all_gather(self, t):
        gathered.append(t.shape[0])
        return torch.cat([t, t])              # a second rank holding the same rows

    monkeypatch.setattr(TaskContext, "all_gather", all_gather)
    ctx = ctx_for(0, world_size=2)
    feats = [torch.randn(12, method.clip_dim, dtype=torch.float64)]
    labels = [torch.arange(3).repeat(4)]
    x, y = method._gather(ctx, feats, labels)
    assert gathered == [12, 12] and x.shape[0] == 24 and y.shape[0] == 24
