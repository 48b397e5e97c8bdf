"""ClassTextEncoder: CoOp-style per-class context tokens through open_clip's own text encoder."""

import copy

import pytest
import torch
from torch import nn

import open_clip

import clfast.backbones as B
from clfast.backbones import ClassTextEncoder

SHAPES = ["red striped circle", "blue solid star", "yellow dotted heart", "green checkered ring"]


def small_open_clip(custom_text: bool = False):
    """A randomly initialised standard open_clip model (77-token BPE text tower, width 32, 2 layers)."""
    torch.manual_seed(0)
    vision = open_clip.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
    text = open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return cls(24, vision, text).eval(), open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def synth():
    model, _, tok, _ = B.create_clip("clip_tiny_synth")
    return model, tok


@pytest.fixture(scope="module", params=["clip_tiny_synth", "bpe_CLIP", "bpe_CustomTextCLIP"])
def any_clip(request, synth):
    if request.param == "clip_tiny_synth":
        return synth
    return small_open_clip(custom_text=request.param == "bpe_CustomTextCLIP")


def word_embedding(model, tok, word):
    """The token embedding of a one-token word, taken from the model's own embedding table."""
    ids = tok([word])[0]
    assert int((ids != 0).sum()) == 3, f"{word!r} is not one token"
    emb = model.token_embedding if hasattr(model, "token_embedding") else model.text.token_embedding
    return emb.weight[ids[1]].detach()


def test_placeholder_embedding_gives_encode_text(any_clip):
    model, tok = any_clip
    enc = ClassTextEncoder(model, tok, SHAPES)
    ctx = enc.placeholder_embedding().expand(len(SHAPES), -1)
    with torch.no_grad():
        keys, raw = enc(ctx), enc(ctx, normalize=False)
        tokens = tok([f"X {n}." for n in SHAPES], context_length=enc.context_length)
        assert torch.equal(enc.tokens, tokens)
        ref_raw = model.encode_text(tokens)
        ref = model.encode_text(tokens, normalize=True)
    torch.testing.assert_close(keys, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(raw, ref_raw, atol=1e-6, rtol=0)


def test_context_is_the_token_after_sot(any_clip):
    """v_c = embedding of "a" must give the keys of "a {name}." (so the context lands at position 1)."""
    model, tok = any_clip
    enc = ClassTextEncoder(model, tok, SHAPES)
    ctx = word_embedding(model, tok, "a").expand(len(SHAPES), -1)
    with torch.no_grad():
        ref = model.encode_text(tok([f"a {n}." for n in SHAPES], context_length=enc.context_length), normalize=True)
        plain = model.encode_text(enc.tokens, normalize=True)
        torch.testing.assert_close(enc(ctx), ref, atol=1e-6, rtol=0)
        assert (enc(torch.randn(len(SHAPES), enc.width)) - plain).abs().max() > 1e-3


def test_shapes_gradients_and_subsets(synth):
    model, tok = synth
    enc = ClassTextEncoder(model, tok, SHAPES)
    C, L = len(SHAPES), enc.context_length
    assert enc.tokens.shape == (C, L) and enc.tokens.dtype == torch.int64 and L == 32
    assert enc.placeholder_position == 1
    assert (enc.tokens[:, 0] == tok.sot_id).all() and (enc.tokens[:, 1] == tok.unk_id).all()   # "X" is <unk>
    V = nn.Parameter(0.02 * torch.randn(C, 1, enc.width, generator=torch.Generator().manual_seed(3)))
    full = enc(V)
    assert full.shape == (C, enc.embed_dim) and enc.embed_dim == 128
    torch.testing.assert_close(full.norm(dim=-1), torch.ones(C))
    idx = torch.tensor([3, 1])
    keys = enc(V[idx], idx)
    torch.testing.assert_close(keys, full[idx], atol=1e-6, rtol=0)
    torch.testing.assert_close(enc(V[1:3], slice(1, 3)), full[1:3], atol=1e-6, rtol=0)
    keys.sum().backward()
    grad_rows = V.grad.flatten(1).abs().sum(1) > 0
    assert grad_rows.tolist() == [False, True, False, True]
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_only_the_rows_asked_for_run_the_transformer(synth):
    model, tok = synth
    enc = ClassTextEncoder(model, tok, SHAPES)
    seen = []
    handle = model.transformer.register_forward_pre_hook(lambda m, args, kw: seen.append(args[0].shape[0]),
                                                         with_kwargs=True)
    try:
        enc(torch.zeros(2, enc.width), torch.tensor([0, 2]))
        enc(torch.zeros(1, 1, enc.width), slice(3, 4))
    finally:
        handle.remove()
    assert seen == [2, 1]


def test_hook_lives_only_inside_one_call(synth):
    model, tok = synth
    enc = ClassTextEncoder(model, tok, SHAPES)
    ctx = torch.randn(len(SHAPES), enc.width)
    other = tok(["a blue circle ."], context_length=enc.context_length)
    with torch.no_grad():
        plain_other = model.encode_text(other)
    nested = {}

    def encode_other_meanwhile(module, args, out):   # another encode_text on the same model, mid-forward
        if "busy" not in nested:
            nested["busy"] = True
            nested["out"] = model.encode_text(other)

    handle = model.ln_final.register_forward_hook(encode_other_meanwhile)
    try:
        with torch.no_grad():
            enc(ctx)
    finally:
        handle.remove()
    torch.testing.assert_close(nested["out"], plain_other, atol=0, rtol=0)
    assert not model.token_embedding._forward_hooks

    def fail(module, args, out):
        raise RuntimeError("boom")

    handle = model.ln_final.register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            enc(ctx)
    finally:
        handle.remove()
    assert not model.token_embedding._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(other), plain_other, atol=0, rtol=0)


def test_autocast_and_a_cast_model(synth):
    model, tok = synth
    enc = ClassTextEncoder(model, tok, SHAPES)
    ctx = nn.Parameter(torch.randn(len(SHAPES), enc.width) * 0.02)
    ref = enc(ctx).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        keys = enc(ctx)
    assert keys.dtype == torch.bfloat16
    torch.testing.assert_close(keys.float(), ref, atol=3e-2, rtol=0)
    keys.float().sum().backward()
    assert ctx.grad.dtype == torch.float32 and ctx.grad.abs().sum() > 0
    enc16 = ClassTextEncoder(copy.deepcopy(model).to(torch.bfloat16), tok, SHAPES)
    keys16 = enc16(ctx)
    assert keys16.dtype == torch.bfloat16
    torch.testing.assert_close(keys16.float(), ref, atol=3e-2, rtol=0)


def test_frozen_eval_and_logit_scale():
    model, tok = small_open_clip()
    model.train()
    assert all(p.requires_grad for p in model.parameters())
    enc = ClassTextEncoder(model, tok, SHAPES).train()
    assert enc.training and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert enc.logit_scale == pytest.approx(1 / 0.07, rel=1e-5) and not enc.logit_scale.requires_grad
    assert enc.embed_dim == 24 and enc.width == 32 and enc.tokens.shape == (4, 77)


def test_words_outside_a_closed_vocabulary(synth):
    model, tok = synth
    digits = [str(i) for i in range(10)]
    with pytest.raises(ValueError, match=r"class '0': '0'; class '1': '1';.*class '9': '9'\. Pass name_map="):
        ClassTextEncoder(model, tok, digits)
    words = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four"}
    enc = ClassTextEncoder(model, tok, digits[:5], name_map=words)
    assert enc.texts == ["X zero.", "X one.", "X two.", "X three.", "X four."]
    with pytest.raises(ValueError, match=r"class '5': '5'; .*class '9': '9'\.") as err:
        ClassTextEncoder(model, tok, digits, name_map=words)
    assert "class '4'" not in str(err.value)
    with pytest.raises(ValueError, match=r"class 'navy circle': 'navy'\."):
        ClassTextEncoder(model, tok, ["red circle", "navy circle"])
    with pytest.raises(ValueError, match=r"name_map keys \['10'\] are not class names"):
        ClassTextEncoder(model, tok, digits[:5], name_map={**words, "10": "ten"})


def test_synth_shapes_class_names_are_in_the_vocabulary(synth):
    from clfast.data import create_dataset
    model, tok = synth
    classes = create_dataset("synth-shapes", split="train", n_per_class=1).classes   # same classes, fewer images
    enc = ClassTextEncoder(model, tok, classes)
    rest = torch.cat([enc.tokens[:, :1], enc.tokens[:, 2:]], 1)
    assert len(classes) == 100 and not (rest == tok.unk_id).any()


def test_bpe_text_longer_than_the_context():
    model, tok = small_open_clip()
    enc = ClassTextEncoder(model, tok, ["cat", "word " * 73])   # <sot> X 73 words . <eot>: exactly 77 tokens
    assert (enc.tokens[1] != 0).all()
    with pytest.raises(ValueError, match=r"longer than the context length 77: class 'word word.*word '"):
        ClassTextEncoder(model, tok, ["cat", "word " * 74])
    with pytest.raises(ValueError, match=r"length 77: class 'very very.*long name': 'X very"):
        ClassTextEncoder(model, tok, ["cat", "very " * 80 + "long name"])


def test_bad_arguments(synth):
    model, tok = synth
    with pytest.raises(TypeError, match="clip_model must be an open_clip CLIP"):
        ClassTextEncoder(nn.Linear(2, 2), tok, SHAPES)
    with pytest.raises(TypeError, match="class_names must be a non-empty sequence of str"):
        ClassTextEncoder(model, tok, "red circle")
    with pytest.raises(ValueError, match=r"template must contain '\{\}' once"):
        ClassTextEncoder(model, tok, SHAPES, template="X shape.")
    with pytest.raises(ValueError, match="placeholder 'X' must occur in template '{}, X.' before"):
        ClassTextEncoder(model, tok, SHAPES, template="{}, X.")
    with pytest.raises(ValueError, match="placeholder 'X Y' must be one token, got 2"):
        ClassTextEncoder(model, tok, SHAPES, template="X Y {}.", placeholder="X Y")
    enc = ClassTextEncoder(model, tok, SHAPES, template="a photo of X {}.")
    assert enc.placeholder_position == 4
    with pytest.raises(ValueError, match=r"context must have shape \(n, D_w\) = \(2, 128\).*got \(4, 128\)"):
        enc(torch.zeros(4, 128), slice(0, 2))
    with pytest.raises(TypeError, match="context must be a float tensor"):
        enc(torch.zeros(4, 128, dtype=torch.long))
    with pytest.raises(TypeError, match="classes must be a 1-D integer tensor, a slice or None, got list"):
        enc(torch.zeros(2, 128), [0, 1])
    with pytest.raises(TypeError, match="classes must be a 1-D integer tensor.*torch.bool"):
        enc(torch.zeros(2, 128), torch.tensor([True, False, True, False]))
