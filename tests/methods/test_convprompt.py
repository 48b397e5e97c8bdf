"""ConvPrompt (methods/convprompt.md): the spec's test list (its section 8), item by item.

The fused-vs-loop and attention checks run the whole model against an independent reference written from the
spec: the released code's ``Conv2d`` module per (layer, K/V, head, prompt) applied to B copies of the embedding,
the one-step residual, and attention on the explicit concatenation ``[P̃; k]`` with a softmax. They use a random
ViT with ViT-B/16's heads (12 of 64) and ConvPrompt's prompt shapes (length 20, 17×17 kernels, E 72×960) but two
blocks of five tokens, so that every per-layer shape is the paper's. Shapes and parameter counts use ViT-B/16
itself (random weights, or on the meta device); training behaviour the shipped vit_tiny_synth.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from clfast.backbones.vit import ViTBackbone, create_vit
from clfast.engine.optim import build_optimizer
from clfast.methods import OptimConfig, Stage, TaskContext, build_config, create_method, method_class
from clfast.methods.convprompt import ConvPrompt
from clfast.methods.task_similarity import (PhraseEmbedder, new_prompt_count, phrase_union, plan_prompt_counts,
                                            task_similarity)
from clfast.ops import prefix_attention

NUM_CLASSES, NUM_TASKS = 8, 2
PER = NUM_CLASSES // NUM_TASKS
RANGES = tuple((t * PER, (t + 1) * PER) for t in range(NUM_TASKS))
NAMES = tuple(f"class {c}" for c in range(NUM_CLASSES))


def ctx_for(task: int, ranges=RANGES, names=NAMES, **kw) -> TaskContext:
    return TaskContext(task=task, num_tasks=len(ranges), class_range=ranges[task], seen_classes=ranges[task][1],
                       num_classes=ranges[-1][1], task_ranges=ranges, class_names=names, **kw)


def images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def make_batch(n: int = 4, seed: int = 0, task: int = 0, ranges=RANGES) -> dict:
    g = torch.Generator().manual_seed(seed + 1000)
    return {"image": images(n, seed), "label": torch.randint(*ranges[task], (n,), generator=g),
            "task": torch.full((n,), task), "index": torch.arange(n)}


def small_vit(heads: int = 12, depth: int = 2) -> ViTBackbone:
    """A random ViT with ``heads`` heads of ViT-B/16's width (64), ``depth`` blocks over 32×32 images (5 tokens)."""
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=64 * heads, depth=depth, num_heads=heads,
                            num_classes=0)
    return ViTBackbone(vit)


@pytest.fixture(scope="module")
def tiny_built():
    return create_vit("vit_tiny_synth", pretrained=True)


@pytest.fixture
def tiny(tiny_built):
    return copy.deepcopy(tiny_built)   # ConvPrompt trains the backbone's LayerNorms: a fresh copy per test


SMALL = dict(layers=(0, 1, 2), prompt_length=4, kernel_size=5, language_guidance=False)


def build(backbone, seed: int = 0, **cfg) -> ConvPrompt:
    torch.manual_seed(seed)
    return create_method("convprompt", backbone, NUM_CLASSES, NUM_TASKS, **{**SMALL, **cfg})


def trainable_grads(m, loss) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    return dict(zip([n for n, _ in named], torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)))


# --- the independent reference: the released code's forward ---------------------------------------------------


def released_convs(m: ConvPrompt, f: int) -> dict[tuple, torch.nn.Conv2d]:
    """One ``Conv2d(1, 1, k)`` per (layer, K/V, head, prompt) holding the method's kernel (8,400 of them for the
    paper's 7 layers × 2 × 12 heads × 50 prompts)."""
    convs = {}
    k = m.cfg.kernel_size
    for slot in range(len(m.layers)):
        for kv in range(2):
            for h in range(m.num_heads):
                for p in range(f):
                    conv = torch.nn.Conv2d(1, 1, k)
                    with torch.no_grad():
                        conv.weight.copy_(m.kernels[slot, kv, h, p][None, None])
                        conv.bias.copy_(m.kernel_bias[slot, kv, h, p][None])
                    convs[slot, kv, h, p] = conv
    return convs


def released_logits(m: ConvPrompt, x: torch.Tensor, convs: dict, s: int, f: int, ranges=RANGES,
                    residual: bool = True) -> torch.Tensor:
    """ConvPrompt's forward written from the spec (no clfast op): per-prompt convolutions on B copies of E scaled
    by raw cosines and summed, the one-step residual, attention on the explicit concatenation, per-task heads."""
    vit = m.backbone.vit
    H, d, L = m.num_heads, m.head_dim, m.cfg.prompt_length
    B = x.shape[0]
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    prev_layer, prev = None, None
    for layer, blk in enumerate(vit.blocks):
        if layer not in m.layers:
            x = blk(x)
            continue
        slot = m.layers.index(layer)
        q = m.query(x[:, 0])
        keys = torch.cat([m.keys[:s].detach(), m.keys[s:f]])
        w = (q / q.norm(dim=1, keepdim=True)) @ (keys / keys.norm(dim=1, keepdim=True)).T
        E = m.embeddings[slot].view(2, m.in_len, H, m.in_dim)     # the released 72×960 → (2, 36, 12, 80)
        streams = []
        for kv in range(2):
            heads = []
            for h in range(H):
                copies = E[kv, :, h, :][None, None].repeat(B, 1, 1, 1)
                acc = torch.zeros(B, L, d)
                for p in range(f):
                    acc = acc + w[:, p, None, None] * convs[slot, kv, h, p](copies)[:, 0]
                heads.append(acc)
            streams.append(torch.stack(heads, 1))
        P = torch.stack(streams, 1)                                # (B, 2, H, L, d)
        mixed = P + prev if residual and prev_layer == layer - 1 else P
        prev_layer, prev = layer, P
        N = x.shape[1]
        qkv = blk.attn.qkv(blk.norm1(x)).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
        kk = torch.cat([mixed[:, 0], qkv[1]], 2)
        vv = torch.cat([mixed[:, 1], qkv[2]], 2)
        a = ((qkv[0] @ kk.transpose(-2, -1)) * d ** -0.5).softmax(-1)
        x = x + blk.ls1(blk.attn.proj((a @ vv).transpose(1, 2).reshape(B, N, H * d)))
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    feats = vit.norm(x)[:, 0]
    hd = m.heads
    out = [F.linear(F.layer_norm(feats, feats.shape[-1:], hd.norm_weight[t], hd.norm_bias[t], 1e-5),
                    hd.weight[a:z], hd.bias[a:z]) for t, (a, z) in enumerate(ranges)]
    return torch.cat(out, 1)


# --- 1. fused vs. loop, on the whole model (and 5. prefix_attention inside it) --------------------------------


def close(a: torch.Tensor, b: torch.Tensor, name: str, tol: float = 1e-5) -> None:
    """fp32 agreement to ``tol`` relative to the tensor's scale (some gradients are O(50): g's output bias)."""
    scale = max(1.0, float(b.abs().max()))
    err = float((a - b).abs().max())
    assert err <= tol * scale, f"{name}: max error {err:.3g} at scale {scale:.3g}"


def check_fused_equals_loop(f: int, B: int, task: int, heads: int = 12, **shape):
    """Logits and every gradient (E, kernels, biases, keys, g, heads, backbone LayerNorms) of the prompt_conv +
    prefix_attention model equal the released code's per-(layer, K/V, head, prompt) Conv2d loop with explicit
    concatenated attention, fp32. In task 1 (f old prompts, f new) the old kernels get no gradient and the old
    keys are detached."""
    torch.manual_seed(0)
    m = create_method("convprompt", small_vit(heads), NUM_CLASSES, NUM_TASKS, layers=(0, 1), prompts_per_task=f,
                      language_guidance=False, **shape).train()
    for t in range(task + 1):
        m.begin_task(ctx_for(t))
    s, f = m.prompt_range(task)
    with torch.no_grad():   # heads and norms away from their (1, 0) start, so that their gradients are generic
        m.heads.norm_weight.normal_(1.0, 0.2)
        m.heads.norm_bias.normal_(0.0, 0.2)
    ref = copy.deepcopy(m)
    convs = released_convs(ref, f)
    x = images(B, 1)
    labels = torch.randint(*RANGES[task], (B,))
    m.trace = []
    ours = m.logits(x, ctx_for(task))
    theirs = released_logits(ref, x, convs, s, f)
    assert any((w < 0).any() for _, w, _, _ in m.trace), "the raw cosines must include negative weights"
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    a, z = RANGES[task]     # the loss: CE on the current head

    def loss(logits):
        return F.cross_entropy(logits[:, a:z], labels - a)

    g_ours = trainable_grads(m, loss(ours))
    ref_named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    conv_params = [p for c in convs.values() for p in (c.weight, c.bias)]
    got = torch.autograd.grad(loss(theirs), [p for _, p in ref_named] + conv_params, allow_unused=True)
    g_theirs = dict(zip([n for n, _ in ref_named], got[: len(ref_named)]))
    g_convs = dict(zip(convs, zip(got[len(ref_named)::2], got[len(ref_named) + 1::2])))
    assert g_ours.keys() == g_theirs.keys()
    for n in g_ours:
        if n in ("kernels", "kernel_bias"):   # the reference's kernels are its Conv2d modules
            continue
        if g_theirs[n] is None:
            assert g_ours[n] is None or g_ours[n].abs().max() == 0, n
            continue
        close(g_ours[n], g_theirs[n], n)
    gw, gb = g_ours["kernels"], g_ours["kernel_bias"]
    for (slot, kv, h, p), (wg, bg) in g_convs.items():
        if p < s:   # earlier tasks' kernels: frozen (their gradient is zeroed)
            assert gw[slot, kv, h, p].abs().max() == 0 and gb[slot, kv, h, p] == 0
            continue
        close(gw[slot, kv, h, p], wg[0, 0], "kernels")
        close(gb[slot, kv, h, p], bg[0], "kernel_bias")
    assert f == m.max_prompts or gw[:, :, :, f:].abs().max() == 0     # slots not in use get exactly zero
    assert task == 0 or g_ours["keys"][:s].abs().max() == 0


@pytest.mark.parametrize("f,B,task", [(1, 1, 0), (5, 7, 0), (18, 1, 0), (18, 7, 0), (5, 7, 1)])
def test_whole_model_fused_equals_the_released_conv2d_loop(f, B, task):
    """At ConvPrompt's per-layer shapes: 12 heads of 64, prompt length 20, 17×17 kernels, E 72×960 (1–7 s each on
    2 CPU threads: up to 864 released-code convolutions forward and backward)."""
    check_fused_equals_loop(f, B, task, heads=12)


def test_prompt_conv_is_called_once_per_layer_per_step_for_the_whole_batch(tiny, monkeypatch):
    import clfast.methods.convprompt as cp

    m = build(tiny).train()
    m.begin_task(ctx_for(0))
    calls = []
    real = cp.prompt_conv

    def spy(E, W, b, w):
        calls.append((tuple(E.shape), tuple(W.shape), tuple(w.shape)))
        return real(E, W, b, w)

    monkeypatch.setattr(cp, "prompt_conv", spy)
    m.training_step(make_batch(6), ctx_for(0)).loss.backward()
    assert calls == [((6, 8, 68), (6, 5, 5, 5), (6, 5))] * 3     # 3 layers: (2·3 heads, f=5), batch 6
    calls.clear()
    with torch.no_grad():   # evaluation: one call for every layer's convolutions, then einsums
        m.predict(make_batch(6), ctx_for(0))
        m.predict(make_batch(6, seed=1), ctx_for(0))
    assert calls == [((18, 8, 68), (18, 5, 5, 5), (5, 5))]


def test_loop_option_is_the_released_computation(tiny):
    m = build(tiny).eval()
    m.begin_task(ctx_for(0))
    loop = build(tiny, prompt_conv_impl="loop").eval()
    loop.load_state_dict(m.state_dict())
    loop.begin_task(ctx_for(0))
    x = make_batch(3)
    with torch.no_grad():
        torch.testing.assert_close(m.predict(x, ctx_for(0)), loop.predict(x, ctx_for(0)), atol=1e-5, rtol=1e-5)


# --- 2. shapes -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vitb():
    torch.manual_seed(0)
    return create_vit("vit_base_patch16_224", pretrained=False)


def test_shapes_at_vit_base(vitb):
    m = create_method("convprompt", copy.deepcopy(vitb), 200, 10, language_guidance=False).eval()
    m.begin_task(ctx_for(0, ranges=tuple((20 * t, 20 * t + 20) for t in range(10)), names=()))
    assert m.embeddings.shape == (7, 72, 960) and m.embeddings[0].view(2, 36, 12, 80).shape == (2, 36, 12, 80)
    E, W, b = m.conv_inputs(3, 5)
    assert E.shape == (24, 36, 80) and W.shape == (24, 5, 17, 17) and b.shape == (24, 5)
    assert torch.equal(E[12 + 4], m.embeddings[3].view(2, 36, 12, 80)[1, :, 4, :])   # V stream, head 4
    C = m.conv_outputs(5, [0])
    assert C[:, 0].transpose(0, 1).shape == (24, 5, 20, 64)                       # C_ℓ (2H, f, 20, 64)
    m.trace = []
    outs = {}
    hooks = [m.backbone.vit.blocks[i].register_forward_hook(lambda mod, a, o, i=i: outs.__setitem__(i, o.shape))
             for i in range(12)]
    with torch.no_grad():
        m.predict({"image": torch.rand(2, 3, 224, 224)}, ctx_for(0, ranges=((0, 20),) * 1))
    for h in hooks:
        h.remove()
    assert [layer for layer, *_ in m.trace] == list(range(7))
    for _, w, P, mixed in m.trace:
        assert w.shape == (2, 5) and mixed.unflatten(1, (2, 12)).shape == (2, 2, 12, 20, 64)
    assert all(outs[i] == (2, 197, 768) for i in range(12))                       # blocks keep 197 tokens


# --- 3. batch invariance ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad", [False, True])
def test_a_samples_prompt_does_not_depend_on_the_batch(tiny, grad):
    m = build(tiny)
    m.begin_task(ctx_for(0))
    x = make_batch(5)["image"]
    with torch.set_grad_enabled(grad):
        m.trace = []
        together = m.features(x, 0)
        prompts = [mixed for *_, mixed in m.trace]
        for i in range(5):
            m.trace = []
            alone = m.features(x[i:i + 1], 0)
            torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=1e-5)
            for layer_prompts, (*_, mixed) in zip(prompts, m.trace):
                torch.testing.assert_close(mixed[0], layer_prompts[i], atol=1e-6, rtol=1e-6)


# --- 4. the cross-layer residual -------------------------------------------------------------------------------


def test_cross_layer_residual_reaches_one_step_back(tiny):
    """P̃_ℓ = P_ℓ + P_{ℓ−1} with the un-accumulated P_{ℓ−1}; no residual in block 0 nor after an unprompted block."""
    m = build(tiny, layers=(0, 1, 2, 4))
    m.begin_task(ctx_for(0))
    m.trace = []
    with torch.no_grad():
        m.features(make_batch(3)["image"], 0)
    layers = [t[0] for t in m.trace]
    P = {layer: p for layer, _, p, _ in m.trace}
    mixed = {layer: x for layer, _, _, x in m.trace}
    assert layers == [0, 1, 2, 4]
    assert torch.equal(mixed[0], P[0]) and torch.equal(mixed[4], P[4])     # block 3 is not prompted
    torch.testing.assert_close(mixed[1], P[1] + P[0], rtol=0, atol=0)
    torch.testing.assert_close(mixed[2], P[2] + P[1], rtol=0, atol=0)       # not P[2] + P̃[1]
    assert (mixed[2] - (P[2] + mixed[1])).abs().max() > 1e-3
    # and P itself is the layer's own mixture of convolutions (checked against the released loop above)
    E, W, b = m.conv_inputs(1, 5)
    w = m.trace[1][1]
    C = torch.stack([F.conv2d(E[None], W[:, p:p + 1], b[:, p], groups=6)[0] for p in range(5)])   # (f, 2H, L, d)
    torch.testing.assert_close(P[1], torch.einsum("bp,pgld->bgld", w, C), atol=1e-5, rtol=1e-5)


# --- 5. prefix_attention at ConvPrompt's shapes ------------------------------------------------------------------


def test_prefix_attention_equals_explicit_concatenation_at_convprompt_shapes():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 12, 197, 64, generator=g, requires_grad=True) for _ in range(3))
    pk, pv = (torch.randn(2, 12, 20, 64, generator=g, requires_grad=True) for _ in range(2))
    out = prefix_attention(q, k, v, pk, pv, scale=0.125)
    a = (q @ torch.cat([pk, k], 2).transpose(-2, -1) * 0.125).softmax(-1)
    ref = a @ torch.cat([pv, v], 2)
    assert out.shape == (2, 12, 197, 64)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    dout = torch.randn(out.shape, generator=g)
    for x, y in zip(torch.autograd.grad(out, (q, k, v, pk, pv), dout), torch.autograd.grad(ref, (q, k, v, pk, pv), dout)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


# --- 6. the evaluation cache -----------------------------------------------------------------------------------


def test_eval_cache_is_bitwise_the_recomputed_forward_and_follows_parameter_changes(tiny):
    m = build(tiny).eval()
    m.begin_task(ctx_for(0))
    batch = make_batch(4)
    with torch.no_grad():
        first = m.predict(batch, ctx_for(0))           # computes and caches C
        cached = m.cached_conv_outputs(5)
        again = m.predict(batch, ctx_for(0))           # reads the cache
        m._conv_cache = None
        recomputed = m.predict(batch, ctx_for(0))
        assert torch.equal(first, again) and torch.equal(again, recomputed)
        assert m.cached_conv_outputs(5) is not cached   # recomputed after the reset...
        stale = m.cached_conv_outputs(5)
        m.kernels[0, 0, 0, 0, 2, 2] += 0.5              # ...and after any change of E, W or b
        assert m.cached_conv_outputs(5) is not stale
        changed = m.predict(batch, ctx_for(0))
        assert not torch.equal(changed, first)
    # the training path (prompt_conv with the weights, no cache) gives the same logits up to rounding
    with torch.enable_grad():
        torch.testing.assert_close(m.predict(batch, ctx_for(0)), changed, atol=1e-5, rtol=1e-5)


# --- 7. descriptors and the number of prompts ---------------------------------------------------------------------


FIXED = {"red": [1.0, 0.0, 0.0], "crimson": [0.8, 0.6, 0.0], "round": [0.0, 1.0, 0.0], "blue": [0.0, 0.0, 1.0],
         "square": [0.6, 0.0, 0.8]}


def fixed_encoder(phrases):
    return torch.tensor([FIXED[p] for p in phrases])


def test_task_similarity_on_a_hand_made_descriptor_file(tmp_path):
    from clfast.data import load_descriptors

    path = tmp_path / "desc.json"
    path.write_text(json.dumps({"a": ["red", "round"], "b": ["round", "red"], "c": ["crimson", "round"],
                                "d": ["blue"], "e": ["red"], "f": ["round"], "g": ["square", "blue"], "h": ["red"]}))
    desc = load_descriptors(str(path), classes=list("abcdefgh"))
    phrases = [desc[c] for c in "abcdefgh"]
    assert phrase_union(phrases[:2]) == ["red", "round"]                # set union, de-duplicated
    calls = []
    embed = PhraseEmbedder(lambda ps: calls.append(list(ps)) or fixed_encoder(ps))
    ranges = ((0, 2), (2, 4), (4, 6), (6, 8))
    plan = plan_prompt_counts(phrases, ranges, 3, 5, embed)
    # task 1: A = {crimson, round, blue} vs {red, round}: max cos 0.8, 1, 0 → s = 0.6, k = ⌈0.4·5⌉ = 2
    # task 2: A = {red, round}, all seen → s = 1, k = 0
    # task 3: A = {square, blue, red} vs {red, round, crimson, blue}: 0.8, 1, 1 → s = 14/15, k = ⌈1/3⌉ = 1
    assert plan[0] == (None, 5)
    assert plan[1][0] == pytest.approx(0.6) and plan[1][1] == 2
    assert plan[2] == (pytest.approx(1.0), 0)
    assert plan[3][0] == pytest.approx(14 / 15) and plan[3][1] == 1
    assert sorted(p for c in calls for p in c) == sorted(FIXED)          # every phrase embedded once
    assert task_similarity(fixed_encoder(["red"]), fixed_encoder(["crimson", "blue"])) == pytest.approx(0.8)


def test_embedding_phrases_leaves_the_global_random_stream_alone():
    """Loading an encoder draws from the global generator (its layers are initialised before the weights load): a
    resumed run loads it again where the original did not, so the draw must not reach the run's stream."""
    def drawing_encoder(phrases):
        torch.rand(1000)
        return fixed_encoder(phrases)

    before = torch.get_rng_state()
    PhraseEmbedder(drawing_encoder)(["red", "blue"])
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("s,k", [(1.0, 0), (1.0 - 1e-8, 0), (0.0, 5), (0.8, 1), (0.7999, 2), (-0.3, 5),
                                 (0.8795, 1)])
def test_new_prompt_count(s, k):
    assert new_prompt_count(s, 5) == k      # 0.8795 → 1: the third-party ImR log's s_1


def test_descriptor_keys_must_be_the_classes_in_order(tmp_path):
    from clfast.data import load_descriptors

    path = tmp_path / "desc.json"
    path.write_text(json.dumps({"b": ["x"], "a": ["y"]}))
    with pytest.raises(ValueError, match="keys do not match the dataset's classes in order"):
        load_descriptors(str(path), classes=["a", "b"])


def test_class_name_fallback_and_descriptors_in_the_context(tiny):
    m = build(tiny, language_guidance=True)
    m.phrase_embedder = PhraseEmbedder(lambda ps: torch.tensor([[float(p == q) for q in NAMES + ("x",)] for p in ps]))
    m.begin_task(ctx_for(0))
    m.begin_task(ctx_for(1))         # class names 4..7 are new: orthogonal rows, s = 0, k = K
    assert m.phrase_source == "class names" and m.prompt_counts.tolist() == [5, 5]
    m2 = build(tiny, language_guidance=True)
    m2.phrase_embedder = m.phrase_embedder
    same = (("x",),) * NUM_CLASSES   # descriptors win over names: every class says the same thing
    m2.begin_task(ctx_for(0, class_descriptors=same))
    m2.begin_task(ctx_for(1, class_descriptors=same))
    assert m2.phrase_source == "descriptors" and m2.prompt_counts.tolist() == [5, 0]
    assert m2.prompt_range(1) == (5, 5) and m2.similarity[1] == 1.0
    rec = m2.record()
    assert rec["new_prompts_per_task"] == [5, 0] and rec["task_similarity"] == [None, 1.0]
    with pytest.raises(ValueError, match="class descriptors or class names"):
        build(tiny, language_guidance=True).begin_task(ctx_for(0, names=()))


# --- 8. keys ------------------------------------------------------------------------------------------------------


def one_step(m, task, lr=0.01, seed=0):
    ctx = ctx_for(task)
    opt = build_optimizer(m.param_groups(Stage()), OptimConfig(lr=lr), 4)
    out = m.training_step(make_batch(4, seed=seed, task=task), ctx)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    m.after_optimizer_step()
    return opt


@pytest.mark.parametrize("train_keys", [True, False])
def test_new_keys_are_orthonormal_to_the_old_and_train_only_when_asked(tiny, train_keys):
    m = build(tiny, train_keys=train_keys).train()
    m.begin_task(ctx_for(0))
    one_step(m, 0)
    m.begin_task(ctx_for(1))
    old, new = m.keys.detach()[:5], m.keys.detach()[5:10]
    assert (new @ old.T).abs().max() < 1e-5                               # |κ_i·κ_j| < 1e-5 to the old keys
    torch.testing.assert_close(new @ new.T, torch.eye(5), atol=1e-5, rtol=0)   # and orthonormal among themselves
    assert train_keys or torch.allclose(old @ old.T, torch.eye(5), atol=1e-5)  # untrained: still orthonormal
    before = m.keys.detach().clone()
    opt = one_step(m, 1)
    changed = (m.keys.detach() != before).any(dim=1)
    if train_keys:
        assert changed[5:10].all() and not changed[:5].any()
    else:
        assert not changed.any()
        key_group = [g for g in opt.param_groups if any(p is m.keys for p in g["params"])]
        assert key_group and key_group[0]["lr"] == 0.0     # in the optimizer (and the clip norm), never moved


# --- 9. freezing and the LayerNorm learning rate -------------------------------------------------------------------


def test_old_kernels_stay_bitwise_and_layernorms_train_at_0_005_after_task_0(tiny):
    m = build(tiny).train()
    m.begin_task(ctx_for(0))
    opt0 = one_step(m, 0)
    norm = m.backbone.vit.blocks[0].norm1.weight
    group0 = [g for g in opt0.param_groups if any(p is norm for p in g["params"])][0]
    assert group0["lr"] == 0.01                          # full lr on task 0
    snap = {n: p.detach().clone() for n, p in m.named_parameters()}
    m.begin_task(ctx_for(1))
    for step in range(3):
        opt1 = one_step(m, 1, seed=step)
    assert torch.equal(m.kernels[:, :, :, :5], snap["kernels"][:, :, :, :5])
    assert torch.equal(m.kernel_bias[:, :, :, :5], snap["kernel_bias"][:, :, :, :5])
    assert not torch.equal(m.kernels[:, :, :, 5:10], snap["kernels"][:, :, :, 5:10])
    assert torch.equal(m.heads.weight[:4], snap["heads.weight"][:4]) and torch.equal(
        m.heads.norm_weight[0], snap["heads.norm_weight"][0])
    assert not torch.equal(m.heads.weight[4:], snap["heads.weight"][4:])
    assert not torch.equal(m.embeddings, snap["embeddings"])          # E and g keep training (with the L1 drift)
    group1 = [g for g in opt1.param_groups if any(p is norm for p in g["params"])][0]
    assert group1["lr"] == pytest.approx(0.005 * 0.01)
    names = {n for n, p in m.named_parameters() if p.requires_grad and n.startswith("backbone")}
    assert names == {f"backbone.vit.blocks.{i}.norm{j}.{w}" for i in range(6) for j in (1, 2)
                     for w in ("weight", "bias")} | {"backbone.vit.norm.weight", "backbone.vit.norm.bias"}


def test_loss_is_current_head_ce_plus_the_l1_drift_from_task_1(tiny):
    m = build(tiny, drift_weight=0.01).train()
    m.begin_task(ctx_for(0))
    batch0 = make_batch(4)
    out0 = m.training_step(batch0, ctx_for(0))
    assert "drift" not in out0.logs and torch.equal(out0.loss, out0.logs["ce"])
    one_step(m, 0)
    m.begin_task(ctx_for(1))
    with torch.no_grad():
        assert float(m.snapshot.l1()) == 0.0                   # snapshot taken at the task start
        m.embeddings[0, 0, :3] += torch.tensor([0.5, -0.25, 0.125])
        m.query[0].weight[0, 0] -= 1.0
    batch = make_batch(4, task=1)
    out = m.training_step(batch, ctx_for(1))
    assert float(out.logs["drift"]) == pytest.approx(0.875 + 1.0, rel=1e-6)
    logits = m.logits(batch["image"], ctx_for(1))
    ce = F.cross_entropy(logits[:, 4:8], batch["label"] - 4)      # the current head only
    torch.testing.assert_close(out.loss, ce + 0.01 * (0.875 + 1.0), atol=1e-5, rtol=1e-5)


# --- 10. parameter counts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("classes,heads", [(200, 169_160), (100, 92_260)])
def test_parameter_counts_at_vit_base(classes, heads):
    with torch.device("meta"):
        bb = ViTBackbone(timm.create_model("vit_base_patch16_224", num_classes=0))
        m = create_method("convprompt", bb, classes, 10)
    n = {name: p.numel() for name, p in m.named_parameters() if p.requires_grad}
    assert n["embeddings"] == 483_840
    assert (n["kernels"] + n["kernel_bias"]) // 50 == 48_720 and (n["kernels"] + n["kernel_bias"]) == 2_436_000
    assert n["query.0.weight"] + n["query.0.bias"] + n["query.2.weight"] + n["query.2.bias"] == 369_216
    assert n["keys"] == 9_600
    assert sum(v for k, v in n.items() if k.startswith("heads.")) == heads
    assert sum(v for k, v in n.items() if k.startswith("backbone.")) == 38_400
    total = sum(n.values())
    assert total == 483_840 + 2_436_000 + 369_216 + 9_600 + heads + 38_400      # ≈ 3.51M / 3.43M
    active_18 = 483_840 + 18 * 48_720 + 369_216 + 9_600 + heads + 38_400
    assert round(active_18 / 1e6, 2) == (1.95 if classes == 200 else 1.87)


# --- 11. learning rate and schedule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,batch,lr", [("cifar100", 128, 0.0025), ("imagenet_r", 128, 0.0025),
                                             ("cub200", 24, 9.375e-5)])
def test_effective_lr_is_lr_times_batch_over_256(preset, batch, lr):
    from clfast.engine import load_config

    cfg = load_config("convprompt", "synth-shapes", preset)
    assert cfg.batch_size == batch and cfg.schedule.name == "cosine" and cfg.schedule.per == "epoch"
    assert cfg.optimizer.name == "adam" and cfg.optimizer.betas == (0.9, 0.999) and cfg.optimizer.weight_decay == 0
    opt = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))]}], cfg.optimizer, cfg.batch_size)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr)
    assert cfg.reset_optimizer and cfg.shuffle_classes is False
    assert cfg.grad_clip == (None if preset == "imagenet_r" else 1.0)


# --- 13. metrics --------------------------------------------------------------------------------------------------


def test_sample_weighted_accuracy_and_a_n_with_unequal_task_sizes():
    from clfast.engine.metrics import AccuracyMatrix

    sizes = [40, 120]
    acc = AccuracyMatrix()
    for (i, j), c in {(0, 0): 36, (0, 1): 30, (1, 1): 60}.items():
        acc.update(i, j, c, sizes[i])
    s = acc.summary()
    assert s["A_N"] == pytest.approx((75 + 50) / 2)                      # mean over tasks
    assert s["sample_weighted_accuracy"] == pytest.approx(100 * 90 / 160)   # ConvPrompt's printed number
    assert s["F_N"] == pytest.approx(90 - 75)


# --- the config --------------------------------------------------------------------------------------------------


def test_config_errors_name_the_setting(tiny):
    for bad, match in (({"prompt_length": 0}, "prompt_length"), ({"input_norm": "imagenet1k"}, "input_norm"),
                       ({"prompt_conv_impl": "fast"}, "prompt_conv_impl"), ({"drift_weight": -1}, "drift_weight"),
                       ({"crop_pct": 1.5}, "crop_pct"), ({"layers": [0, 0]}, "layers"),
                       ({"prompts_per_taks": 3}, "prompts_per_task")):
        with pytest.raises(ValueError, match=match):
            build_config(method_class("convprompt").Config, bad, "convprompt")
    with pytest.raises(ValueError, match=r"layers \[6\] are not promptable"):
        build(tiny, layers=(0, 6))
    m = build(tiny)
    with pytest.raises(ValueError, match="not decided yet"):
        m.prompt_range(0)


def test_convergence_fused_matches_reference_backends(tiny):
    """Four Adam steps on one batch with the fused ops and with every op's reference backend give the same losses,
    and the loss falls (the step trains)."""
    from clfast.ops import use_backend

    def run(backend):
        m = build(copy.deepcopy(tiny), seed=1).train()
        m.begin_task(ctx_for(0))
        opt = build_optimizer(m.param_groups(Stage()), OptimConfig(lr=0.001), 8)
        batch, losses = make_batch(8), []
        for _ in range(4):
            with use_backend(backend):
                out = m.training_step(batch, ctx_for(0))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            m.after_optimizer_step()
            losses.append(float(out.loss.detach()))
        return losses

    ref, fused = run("reference"), run("cpu")
    assert ref[-1] < 0.85 * ref[0], ref
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(ref), atol=2e-3, rtol=2e-3)
