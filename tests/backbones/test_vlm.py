"""The clfast VLM (methods/clumo.md §2): frozen open_clip towers with token outputs, the prompt-prefixed fusion
encoder, the answer head. References are open_clip's own forward passes, explicit concatenation in float64,
and hand-written layer math."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import open_clip

import clfast.backbones as B
from clfast.backbones.vlm import (AnswerHead, CLIPTokenTowers, FusionEncoder, PromptedCrossAttention, create_vlm,
                                  pool_tokens)
from clfast.ops import FusedMultiheadAttention, use_backend

torch.set_num_threads(1)

ANSWERS = ["red", "blue", "green", "yes", "no"]
QUESTIONS = ["what colour is the circle ?", "is there a star ?", "how many squares are there ?"]
BACKENDS = ["reference", None]   # None: the default dispatch (the C++ backend on the CPU)


def small_open_clip(custom_text: bool = False, image_size: int = 16):
    """A randomly initialised standard open_clip model: 77-token BPE text tower, widths 32/24."""
    torch.manual_seed(0)
    vision = open_clip.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=image_size)
    text = open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=24, heads=2, layers=2)
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return cls(20, vision, text).eval(), open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def tiny():
    model, _, tok, _ = B.create_clip("clip_tiny_synth")
    return model, tok


@pytest.fixture(scope="module", params=["clip_tiny_synth", "bpe_CLIP", "bpe_CustomTextCLIP"])
def any_clip(request, tiny):
    if request.param == "clip_tiny_synth":
        return copy.deepcopy(tiny[0]), tiny[1]
    return small_open_clip(custom_text=request.param == "bpe_CustomTextCLIP")


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return create_vlm("clip_tiny_synth", answers=ANSWERS)


def unfused(model):
    """A copy of ``model`` whose attention is PyTorch's own ``nn.MultiheadAttention`` (the towers fuse theirs)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if type(m) is FusedMultiheadAttention:
            m.__class__ = nn.MultiheadAttention
    return model


def images(n, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# Towers


def test_shapes(vlm):
    tok = vlm.tokenizer(QUESTIONS)
    enc = vlm.encode(images(3), tok)
    assert enc.image.shape == (3, 65, 192) and enc.text.shape == (3, 32, 128)
    assert enc.text_mask.shape == (3, 32) and enc.text_mask.dtype == torch.bool and enc.eot.shape == (3,)
    assert vlm.fuse(enc).shape == (3, 192) and vlm(images(3), tok).shape == (3, len(ANSWERS))
    assert vlm.towers.text_input_embeddings(tok).shape == (3, 32, 128)
    assert vlm.data_config["input_size"] == (3, 32, 32) and vlm.data_config["crop_pct"] == 1.0
    assert vlm.data_config["mean"] == B.zoo.OPENAI_MEAN and vlm.data_config["std"] == B.zoo.OPENAI_STD


def test_image_tokens_equal_open_clip(any_clip):
    model, _ = any_clip
    stock = unfused(model)
    towers = CLIPTokenTowers(model)
    assert any(type(m) is FusedMultiheadAttention for m in towers.visual.modules())
    size = towers.image_size[0]
    x = images(2, size)
    ours = towers.image_tokens(x)
    v = stock.visual
    v.output_tokens = True
    try:
        with torch.no_grad():
            pooled, patches = v(B.clip_normalize(x))
    finally:
        v.output_tokens = False
    assert ours.shape == (2, towers.num_image_tokens, towers.image_width)
    torch.testing.assert_close(ours[:, 1:], patches, rtol=0, atol=1e-5)   # fused attention: fp32 rounding
    torch.testing.assert_close(ours[:, 0] @ v.proj, pooled, rtol=1e-5, atol=1e-6)


def test_text_tokens_equal_open_clip(any_clip):
    model, tok = any_clip
    stock = unfused(model)
    towers = CLIPTokenTowers(model)
    assert any(type(m) is FusedMultiheadAttention for m in towers.text.modules())
    t = tok(["a red circle", "is there a blue star above the square ?"])
    x, mask, eot = towers.text_tokens(t)
    assert eot.tolist() == t.argmax(-1).tolist()
    with torch.no_grad():
        ref = stock.forward_intermediates(text=t, text_indices=1, normalize_intermediates=True,
                                          intermediates_only=True)["text_intermediates"][-1]
        emb = stock.encode_text(t)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-5)
    proj = B.clip_text.text_tower(model).text_projection
    pooled = x[torch.arange(2), eot]
    pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
    torch.testing.assert_close(pooled, emb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(towers.encode_text(t), F.normalize(emb, dim=-1))
    # token + position embeddings before the transformer
    tt = B.clip_text.text_tower(model)
    torch.testing.assert_close(towers.text_input_embeddings(t), tt.token_embedding(t) + tt.positional_embedding,
                               rtol=0, atol=0)


def test_towers_under_bf16_autocast_match_open_clip_in_float32(tiny):
    """The engine's amp: the frozen towers run bf16 (their fused attention, not PyTorch's module, whose
    in-projection is a bmm against an L-fold expanded weight under autocast); tokens within bf16 noise."""
    model, tok = tiny
    stock, towers = unfused(model), CLIPTokenTowers(copy.deepcopy(model))
    x, t = images(3), tok(QUESTIONS)
    with torch.no_grad():
        v = stock.visual
        v.output_tokens = True
        try:
            want_img = v(B.clip_normalize(x))[1]
        finally:
            v.output_tokens = False
        want_txt = stock.forward_intermediates(text=t, text_indices=1, normalize_intermediates=True,
                                               intermediates_only=True)["text_intermediates"][-1]
    with torch.autocast("cpu", torch.bfloat16):
        img, (txt, pad, _) = towers.image_tokens(x), towers.text_tokens(t)
    assert img.dtype == torch.bfloat16   # the image stream is bf16 from conv1 on (the text stream stays fp32)
    scale = max(want_img.abs().max().item(), 1.0)
    torch.testing.assert_close(img[:, 1:].float(), want_img, rtol=0, atol=0.05 * scale)
    scale = max(want_txt.abs().max().item(), 1.0)
    torch.testing.assert_close(txt.float()[pad], want_txt[pad], rtol=0, atol=0.05 * scale)


def test_padding_mask_and_pooling_invariant_to_padding_length(tiny):
    model, tok = tiny
    towers = CLIPTokenTowers(copy.deepcopy(model))
    long, short = tok(QUESTIONS, context_length=32), tok(QUESTIONS, context_length=10)
    assert torch.equal(long[:, :10], short)
    for t in (long, short):
        mask, eot = towers.padding_mask(t)
        for b in range(len(QUESTIONS)):   # True exactly on <sot> ... <eot>
            assert mask[b].tolist() == [i <= int((t[b] != 0).sum()) - 1 for i in range(t.shape[1])]
            assert int(eot[b]) == int((t[b] != 0).sum()) - 1
    for fn in (towers.text_input_embeddings, lambda t: towers.text_tokens(t)[0]):
        for mode in ("mean", "max"):
            a = pool_tokens(fn(long), towers.padding_mask(long)[0], mode)
            b = pool_tokens(fn(short), towers.padding_mask(short)[0], mode)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_pool_tokens_matches_a_loop_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1] * 7, [1, 0, 0, 0, 0, 0, 0], [0] * 7], dtype=torch.bool)
    poisoned = x.masked_fill(~mask[:, :, None], float("nan"))
    for mode, red in (("mean", lambda t: t.mean(0)), ("max", lambda t: t.amax(0))):
        want = torch.stack([red(x[b, mask[b]]) if mask[b].any() else torch.zeros(5, dtype=x.dtype)
                            for b in range(4)])
        torch.testing.assert_close(pool_tokens(poisoned, mask, mode), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(pool_tokens(x), x.mean(1))
    with pytest.raises(ValueError, match="mode"):
        pool_tokens(x, mask, "sum")
    with pytest.raises(ValueError, match=r"mask must be a bool tensor \(B,N\)"):
        pool_tokens(x, mask.long())


def test_position_embedding_interpolation(tiny):
    model, _ = tiny
    same = CLIPTokenTowers(copy.deepcopy(model), image_size=32)
    assert torch.equal(same.visual.positional_embedding, model.visual.positional_embedding)
    torch.testing.assert_close(same.image_tokens(images(2)), CLIPTokenTowers(copy.deepcopy(model)).image_tokens(images(2)),
                               rtol=0, atol=0)
    big = CLIPTokenTowers(copy.deepcopy(model), image_size=64)
    assert big.grid_size == (16, 16) and big.num_image_tokens == 257 and big.image_size == (64, 64)
    pe = big.visual.positional_embedding
    assert torch.equal(pe[0], model.visual.positional_embedding[0])   # class token kept
    assert not pe.requires_grad
    # open_clip's own checkpoint loading into a model built at 64 px (its loader does this for force_image_size;
    # the shipped file is fp16, which CPU bicubic cannot resample, so the fp32 state dict is loaded here)
    ref = open_clip.create_model("clip_tiny_synth", pretrained=None, force_image_size=64).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    open_clip.model.resize_pos_embed(sd, ref)
    ref.load_state_dict(sd)
    torch.testing.assert_close(pe, ref.visual.positional_embedding, rtol=0, atol=0)
    x = images(2, 64)
    ref.visual.output_tokens = True
    with torch.no_grad():
        _, patches = ref.visual(B.clip_normalize(x))
    torch.testing.assert_close(big.image_tokens(x)[:, 1:], patches, rtol=0, atol=1e-5)
    # an independent bicubic resample of the 8x8 grid
    grid = model.visual.positional_embedding[1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(pe[1:], want.permute(0, 2, 3, 1).reshape(256, -1), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        CLIPTokenTowers(copy.deepcopy(model), image_size=30)
    with pytest.raises(ValueError, match="must be 64x64"):
        big.image_tokens(images(1, 32))


def test_vit_b16_at_384_has_577_tokens():
    cfg = open_clip.get_model_config("ViT-B-16")
    with torch.device("meta"):   # shapes only: no memory, no init
        model = open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
    towers = CLIPTokenTowers(model, image_size=384)
    assert towers.num_image_tokens == 577 and towers.visual.positional_embedding.shape == (577, 768)
    assert (towers.image_width, towers.text_width, towers.context_length) == (768, 512, 77)
    assert B.vlm.fusion_defaults("ViT-B-16") == (6, 768, 12)


def test_towers_frozen_and_in_eval(vlm):
    assert not any(p.requires_grad for p in vlm.towers.parameters())
    assert all(p.requires_grad for p in vlm.fusion.parameters()) and all(p.requires_grad for p in vlm.head.parameters())
    vlm.train()
    try:
        assert vlm.fusion.training and vlm.head.training
        assert not any(m.training for m in vlm.towers.clip.modules())
        enc = vlm.encode(images(2), vlm.tokenizer(QUESTIONS[:2]))
        assert not any(t.requires_grad for t in enc)
    finally:
        vlm.eval()


# --------------------------------------------------------------------------------------------------
# Prefix path = explicit concatenation


def fusion_inputs(enc_width=48, image_width=48, text_width=40, B_=3, L=6, N=5, P=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(B_, L, text_width, generator=g, dtype=dtype)
    image = torch.randn(B_, N, image_width, generator=g, dtype=dtype)
    text_mask = torch.ones(B_, L, dtype=torch.bool)
    text_mask[0, 3:] = False
    text_mask[2, 5:] = False
    image_mask = torch.ones(B_, N, dtype=torch.bool)
    image_mask[1, 2:] = False
    per_sample = torch.randn(B_, P, enc_width, generator=g, dtype=dtype)
    shared = torch.randn(P, enc_width, generator=g, dtype=dtype)
    return text, text_mask, image, image_mask, per_sample, shared


def cross_attention_by_concatenation(attn: PromptedCrossAttention, x, memory, prefix, mask):
    """float64 multi-head attention of x over cat([prefix, memory]) with explicit weights."""
    W_q, b_q = attn.q.weight.double(), attn.q.bias.double()
    W_kv, b_kv = attn.kv.weight.double(), attn.kv.bias.double()
    Bn, P = x.shape[0], prefix.shape[-2]
    if prefix.dim() == 2:
        prefix = prefix.expand(Bn, -1, -1)
    mem = torch.cat([prefix.double(), memory.double()], 1)
    full_mask = torch.cat([torch.ones(Bn, P, dtype=torch.bool), mask], 1)
    H, d = attn.heads, attn.head_dim
    q = (x.double() @ W_q.T + b_q).reshape(Bn, -1, H, d).transpose(1, 2)
    kv = mem @ W_kv.T + b_kv
    k, v = (t.reshape(Bn, -1, H, d).transpose(1, 2) for t in kv.chunk(2, -1))
    scores = (q @ k.transpose(-1, -2)) / d ** 0.5
    scores = scores.masked_fill(~full_mask[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(Bn, -1, H * d)
    return out @ attn.proj.weight.double().T + attn.proj.bias.double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["per_sample", "shared"])
def test_cross_attention_prefix_equals_concatenation(backend, kind):
    torch.manual_seed(0)
    attn = PromptedCrossAttention(48, 4)
    x, _, memory, mask, per_sample, shared = fusion_inputs(image_width=48, text_width=48)
    prefix = (per_sample if kind == "per_sample" else shared).requires_grad_()
    x.requires_grad_()
    memory.requires_grad_()
    with use_backend(backend) if backend else torch.enable_grad():
        out = attn(x, memory, prefix=prefix, memory_mask=mask)
    ref = cross_attention_by_concatenation(attn, x, memory, prefix, mask)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)
    g = torch.randn_like(ref)
    params = [prefix, x, memory, *attn.parameters()]
    got = torch.autograd.grad(out, params, g.float())
    want = torch.autograd.grad(ref, params, g)
    for name, a, b in zip(["prefix", "x", "memory", "q.w", "q.b", "kv.w", "kv.b", "proj.w", "proj.b"], got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=2e-5, msg=name)
    # the projected prefix has the documented shape and is the memory's K/V projection
    pk, pv = attn.project_kv(prefix)
    assert pk.shape == ((3, 4, 4, 12) if kind == "per_sample" else (4, 4, 12))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["per_sample", "shared"])
@pytest.mark.parametrize("masked", [False, True])
def test_fusion_prefix_equals_memory_concatenation(backend, kind, masked):
    """With image_width == width (image_proj is the identity) a prefix Π equals prepending Π to the image tokens
    (and True to the memory mask), in every layer: forward and gradients w.r.t. Π, the fusion weights and the
    text tokens."""
    torch.manual_seed(1)
    enc = FusionEncoder(2, 48, 4, text_width=40, image_width=48)
    assert isinstance(enc.image_proj, nn.Identity)
    text, tmask, image, imask, per_sample, shared = fusion_inputs()
    imask = imask if masked else None
    prefix = (per_sample if kind == "per_sample" else shared).requires_grad_()
    text.requires_grad_()
    def ctx():
        return use_backend(backend) if backend else torch.enable_grad()

    with ctx():
        out = enc(text, tmask, image, image_mask=imask, prefix=prefix)
        P, Bn = prefix.shape[-2], text.shape[0]
        cat = torch.cat([prefix.expand(Bn, -1, -1) if prefix.dim() == 2 else prefix, image], 1)
        cmask = torch.cat([torch.ones(Bn, P, dtype=torch.bool),
                           imask if imask is not None else torch.ones(Bn, image.shape[1], dtype=torch.bool)], 1)
        ref = enc(text, tmask, cat, image_mask=cmask)
    torch.testing.assert_close(out, ref, rtol=0, atol=5e-6)
    g = torch.randn_like(out)
    params = [prefix, text, *enc.parameters()]
    names = ["prefix", "text", *(n for n, _ in enc.named_parameters())]
    with ctx():
        got = torch.autograd.grad(out, params, g)
        want = torch.autograd.grad(ref, params, g)
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_prefix_per_layer_and_reaches_every_layer():
    torch.manual_seed(2)
    enc = FusionEncoder(2, 48, 4, text_width=40, image_width=48)
    text, tmask, image, _, per_sample, _ = fusion_inputs()
    base = enc(text, tmask, image)
    both = enc(text, tmask, image, prefix=per_sample)
    torch.testing.assert_close(enc(text, tmask, image, prefix=[per_sample, per_sample]), both, rtol=0, atol=0)
    only0 = enc(text, tmask, image, prefix=[per_sample, None])
    only1 = enc(text, tmask, image, prefix=[None, per_sample])
    for a, b in ((base, only0), (base, only1), (only0, both), (only1, both)):
        assert (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match="one per layer"):
        enc(text, tmask, image, prefix=[per_sample])
    with pytest.raises(ValueError, match=r"prefix must have shape \(B,P,48\)"):
        enc(text, tmask, image, prefix=per_sample[..., :40])


def test_image_projection_when_widths_differ():
    enc = FusionEncoder(1, 48, 4, text_width=40, image_width=32)
    assert isinstance(enc.image_proj, nn.Linear) and enc.image_proj.in_features == 32
    text, tmask, image, _, per_sample, _ = fusion_inputs(image_width=32)
    assert enc(text, tmask, image, prefix=per_sample).shape == (3, 6, 48)


def test_init_like_bert():
    enc = FusionEncoder(2, 48, 4, text_width=40, image_width=32)
    for name, m in enc.named_modules():
        if isinstance(m, nn.Linear):
            assert m.weight.abs().max() <= 0.04 and 0.01 < m.weight.std() < 0.03, name
            assert not m.bias.any(), name
        if isinstance(m, nn.LayerNorm):
            assert bool((m.weight == 1).all()) and not m.bias.any(), name


# --------------------------------------------------------------------------------------------------
# Adapter sites


def fusion_by_hand(enc, text, tmask, image, add_attn=None, add_mlp=None, scale_attn=1.0):
    """The documented pre-LN layer math, written out from the encoder's submodules; the site changes apply to the
    branch outputs only: ``a ↦ scale_attn·a + add_attn[i]``, ``m ↦ m + add_mlp[i]``."""
    x = enc.text_proj(text)
    for i, layer in enumerate(enc.layers):
        h = layer.ln1(x)
        a = layer.self_attn(h, h, memory_mask=tmask) * scale_attn
        x = x + (a + add_attn[i] if add_attn else a)
        x = x + layer.cross_attn(layer.ln2(x), image)
        m = layer.mlp[2](F.gelu(layer.mlp[0](layer.ln3(x))))
        x = x + (m + add_mlp[i] if add_mlp else m)
    return enc.ln_final(x)


def test_site_fns_placement():
    torch.manual_seed(3)
    enc = FusionEncoder(3, 48, 4, text_width=40, image_width=48)
    text, tmask, image, *_ = fusion_inputs()
    plain = enc(text, tmask, image)
    torch.testing.assert_close(plain, fusion_by_hand(enc, text, tmask, image), rtol=0, atol=1e-6)
    calls = []

    def ident(site):
        def f(layer, out):
            calls.append((site, layer, tuple(out.shape)))
            return out
        return f

    same = enc(text, tmask, image, site_fns={"attn_out": ident("attn_out"), "mlp_out": ident("mlp_out")})
    assert torch.equal(same, plain)
    assert calls == [(s, i, (3, 6, 48)) for i in range(3) for s in ("attn_out", "mlp_out")]
    # per-channel constants: a constant equal on every channel would vanish in the next LayerNorm
    ramp = torch.linspace(-1.0, 1.0, 48)
    ca, cm = [0.5 * ramp, -1.0 * ramp, 2.0 * ramp.flip(0)], [0.25 * ramp, ramp.square(), -0.75 * ramp]
    got = enc(text, tmask, image, site_fns={"attn_out": lambda i, o: o + ca[i], "mlp_out": lambda i, o: o + cm[i]})
    torch.testing.assert_close(got, fusion_by_hand(enc, text, tmask, image, ca, cm), rtol=0, atol=1e-6)
    assert (got - plain).abs().max() > 1e-3
    scaled = enc(text, tmask, image, site_fns={"attn_out": lambda i, o: 3.0 * o})   # the branch, not the stream
    torch.testing.assert_close(scaled, fusion_by_hand(enc, text, tmask, image, scale_attn=3.0), rtol=0, atol=1e-6)
    only_mlp = enc(text, tmask, image, site_fns={"mlp_out": lambda i, o: o + cm[i]})
    torch.testing.assert_close(only_mlp, fusion_by_hand(enc, text, tmask, image, None, cm), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="unknown site_fns"):
        enc(text, tmask, image, site_fns={"cross_out": ident("x")})
    with pytest.raises(TypeError, match="site_fns must be a dict"):
        enc(text, tmask, image, site_fns=[ident("x")])


def test_vlm_fuse_reads_eot_and_passes_sites(vlm):
    tok = vlm.tokenizer(QUESTIONS)
    enc = vlm.encode(images(3), tok)
    full = vlm.fusion(enc.text, enc.text_mask, enc.image)
    h = vlm.fuse(enc)
    assert torch.equal(h, full[torch.arange(3), enc.eot])
    bump = vlm.fuse(enc, site_fns={"mlp_out": lambda i, o: o + 1.0})
    assert not torch.equal(bump, h)
    torch.testing.assert_close(vlm(images(3), tok), vlm.head(h), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# torch.compile


def test_fusion_encoder_under_torch_compile():
    torch.manual_seed(4)
    enc = FusionEncoder(2, 32, 2, text_width=24, image_width=32)
    text, tmask, image, imask, per_sample, _ = fusion_inputs(enc_width=32, image_width=32, text_width=24)
    eager = enc(text, tmask, image, image_mask=imask, prefix=per_sample)
    torch._dynamo.reset()
    compiled = torch.compile(enc, backend="aot_eager")
    out = compiled(text, tmask, image, image_mask=imask, prefix=per_sample)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_fusion_encoder_under_inductor():
    torch.manual_seed(4)
    enc = FusionEncoder(2, 32, 2, text_width=24, image_width=32)
    text, tmask, image, imask, per_sample, _ = fusion_inputs(enc_width=32, image_width=32, text_width=24)
    eager = enc(text, tmask, image, image_mask=imask, prefix=per_sample)
    torch._dynamo.reset()
    out = torch.compile(enc)(text, tmask, image, image_mask=imask, prefix=per_sample)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Answer head


def test_classify_head_is_linear_ln_gelu_linear():
    torch.manual_seed(5)
    head = AnswerHead(16, 7)
    assert head.hidden == 32
    h = torch.randn(4, 16)
    m = head.mlp
    want = F.linear(F.gelu(F.layer_norm(F.linear(h, m[0].weight, m[0].bias), (32,), m[1].weight, m[1].bias)),
                    m[3].weight, m[3].bias)
    torch.testing.assert_close(head(h), want, rtol=0, atol=0)


def test_rank_head_equals_its_definition(tiny):
    model, tok = tiny
    torch.manual_seed(6)
    vlm = create_vlm("clip_tiny_synth", answers=ANSWERS, answer_mode="rank")
    with torch.no_grad():
        e = F.normalize(model.encode_text(tok(ANSWERS)), dim=-1)    # an independent CLIP of the same weights
    assert vlm.head.answer_embeddings.shape == (len(ANSWERS), 128)
    torch.testing.assert_close(vlm.head.answer_embeddings, e, rtol=0, atol=1e-6)
    h = torch.randn(3, vlm.width)
    torch.testing.assert_close(vlm.head(h), (h @ vlm.head.proj.weight.T) @ e.T, rtol=1e-5, atol=1e-6)
    assert "head.answer_embeddings" not in vlm.state_dict()        # follows from the towers and the answers
    unset = create_vlm("clip_tiny_synth", num_answers=5, answer_mode="rank")
    with pytest.raises(RuntimeError, match="needs the answer embeddings"):
        unset.head(h)
    unset.set_answers(ANSWERS)
    torch.testing.assert_close(unset.head.answer_embeddings, e, rtol=0, atol=1e-6)


def test_answer_vocabulary_and_config_in_state_dict(vlm):
    sd = vlm.state_dict()
    assert torch.equal(sd["answer_digests"], B.vlm.answer_digests(ANSWERS)) and sd["answer_digests"].any(1).all()
    import json

    cfg = json.loads(bytes(sd["config_json"].tolist()).decode())
    assert cfg["clip_name"] == "clip_tiny_synth" and (cfg["depth"], cfg["width"], cfg["heads"]) == (2, 192, 3)
    assert cfg["num_answers"] == len(ANSWERS) and cfg["towers_sha256"] == vlm.weights.sha256
    assert set(vlm.trainable_state_dict()) == {k for k in sd if not k.startswith("towers.")}


# --------------------------------------------------------------------------------------------------
# Errors


def test_errors(tiny, vlm):
    model, tok = tiny
    bad = copy.deepcopy(model)
    bad.visual = nn.Identity()
    with pytest.raises(TypeError, match="VisionTransformer, got Identity"):
        CLIPTokenTowers(bad)
    bad = copy.deepcopy(model)
    del bad.token_embedding
    with pytest.raises(TypeError, match="text tower must be open_clip's"):
        CLIPTokenTowers(bad)
    with pytest.raises(ValueError, match="context length 32"):
        vlm.towers.text_tokens(tok(QUESTIONS, context_length=40))
    with pytest.raises(ValueError, match="int64 tensor"):
        vlm.towers.text_tokens(tok(QUESTIONS).float())
    with pytest.raises(ValueError, match="divisible"):
        FusionEncoder(2, 50, 4, 40, 50)
    with pytest.raises(ValueError, match="depth must be a positive int"):
        FusionEncoder(0, 48, 4, 40, 48)
    headless = create_vlm("clip_tiny_synth")
    assert headless.head is None and headless.num_answers is None
    with pytest.raises(RuntimeError, match="no answer head yet"):
        headless(images(1), tok(QUESTIONS[:1]))
    headless.build_head(len(ANSWERS), ANSWERS)
    assert headless(images(1), tok(QUESTIONS[:1])).shape == (1, len(ANSWERS))
    with pytest.raises(ValueError, match="num_answers=3 but 5 answers"):
        create_vlm("clip_tiny_synth", num_answers=3, answers=ANSWERS)
    with pytest.raises(ValueError, match="answer_mode"):
        create_vlm("clip_tiny_synth", num_answers=3, answer_mode="generate")
    with pytest.raises(ValueError, match="unique"):
        vlm.set_answers(["a", "a", "b", "c", "d"])
    with pytest.raises(ValueError, match=r"differs at 2 of 5 positions, e.g. 0: 'blue', 1: 'red'"):
        vlm.set_answers(["blue", "red", "green", "yes", "no"])
    vlm.set_answers(ANSWERS)   # the same vocabulary again is fine
    with pytest.raises(ValueError, match="has 5 answers, got 2"):
        vlm.set_answers(["a", "b"])
    with pytest.raises(ValueError, match="same batch size"):
        vlm.encode(images(2), tok(QUESTIONS))
    with pytest.raises(ValueError, match=r"h must have shape \(B,192\)"):
        vlm.head(torch.randn(2, 10))


def test_bf16_autocast_runs_the_prefixed_vlm_close_to_fp32(vlm):
    tok = vlm.tokenizer(QUESTIONS)
    pi = 0.02 * torch.randn(3, 4, vlm.width, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = vlm(images(3), tok, prefix=pi)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = vlm(images(3), tok, prefix=pi)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0, atol=0.1 * float(want.abs().max()))
