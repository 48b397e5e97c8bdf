"""create_vit / ViTBackbone: weight loading (shipped, files, hub cache, offline fallback) and prompting."""

import dataclasses
import json
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import timm
import timm.models.vision_transformer as tvit
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file

import clfast.backbones as B
from clfast.backbones import vit as V
from clfast.ops import PromptContext, PromptedAttention

HUB_NAME = "vit_tiny_patch16_224.augreg_in21k"   # the smallest hub ViT of the augreg family


@pytest.fixture(scope="module")
def backbone():
    return B.create_vit("vit_tiny_synth")


@pytest.fixture(scope="module")
def plain():
    """timm's own model with the shipped weights and its 100-class head (state dict incl. head)."""
    return timm.create_model("vit_tiny_synth", pretrained=True).eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 32, 32, generator=g)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 with an empty Hugging Face cache in tmp."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def fake_hf_cache(cache, repo_id, filename, write):
    """Lay out one cached hub file the way huggingface_hub does; ``write(path)`` writes it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    write(str(snap / filename))
    return str(snap / filename)


def _ref_features(model, x):
    with torch.no_grad():
        return model.forward_head(model.forward_features(B.vit_normalize(x)), pre_logits=True)


# ------------------------------------------------------------------------------------------------
# WeightsInfo


def test_weights_info_record():
    w = B.WeightsInfo("vit_base_patch16_224.augreg_in21k", "file", "/x.npz", "ab" * 32, "checkpoint_path")
    assert w.to_dict() == {"name": "vit_base_patch16_224.augreg_in21k", "source": "file", "path": "/x.npz",
                           "sha256": "ab" * 32, "note": "checkpoint_path"}
    json.dumps(w.to_dict())
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.source = "hub"
    with pytest.raises(ValueError, match="source must be one of"):
        B.WeightsInfo("x", "internet")


# ------------------------------------------------------------------------------------------------
# The shipped model and equivalence with timm


def test_shipped_weights_and_attributes(backbone):
    w = backbone.weights
    with open(os.path.join(B.ASSET_DIR, "checksums.json"), encoding="utf-8") as f:
        expected = json.load(f)["vit_tiny_synth.safetensors"]
    assert (w.name, w.source, w.path, w.sha256) == (
        "vit_tiny_synth.synth_pretrain", "shipped", os.path.abspath(B.VIT_TINY_SYNTH_FILE), expected)
    assert (backbone.embed_dim, backbone.num_layers, backbone.num_heads, backbone.head_dim,
            backbone.num_prefix_tokens) == (192, 6, 3, 64, 1)
    dc = backbone.data_config
    assert dc["input_size"] == (3, 32, 32) and dc["mean"] == dc["std"] == (0.5, 0.5, 0.5)
    assert {"interpolation", "crop_pct"} <= set(dc)
    assert isinstance(backbone.vit, tvit.VisionTransformer)
    for i, blk in enumerate(backbone.vit.blocks):
        assert isinstance(blk.attn, PromptedAttention) and blk.attn.layer == i
        assert blk.attn.context is backbone.context and isinstance(backbone.context, PromptContext)
    assert not any(p.requires_grad for p in backbone.parameters())
    # timm's key names are kept, so the state dict still loads into a plain timm model.
    plain = timm.create_model("vit_tiny_synth", num_classes=0)
    plain.load_state_dict({k[len("vit."):]: v for k, v in backbone.state_dict().items()})


def test_features_equal_timm(backbone, plain, images):
    ref = _ref_features(plain, images)
    with torch.no_grad():
        tokens = backbone(images)
        feats = backbone.features(images)
        torch.testing.assert_close(tokens, plain.forward_features(B.vit_normalize(images)), atol=1e-4, rtol=1e-4)
    assert tokens.shape == (2, 1 + 64, 192) and feats.shape == (2, 192)
    torch.testing.assert_close(feats, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(backbone.cls(tokens), feats)
    torch.testing.assert_close(backbone.features(B.vit_normalize(images), normalized=True).detach(), ref,
                               atol=1e-4, rtol=1e-4)
    q = backbone.query(images)
    assert not q.requires_grad
    torch.testing.assert_close(q, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(backbone.normalize(images), B.vit_normalize(images))


def test_prompt_tokens_shape_position_and_gradients(backbone, images):
    L = 5
    prompts = torch.randn(L, 192, requires_grad=True)
    tokens = backbone(images, prompt_tokens=prompts)
    assert tokens.shape == (2, 1 + L + 64, 192)
    per_sample = backbone(images, prompt_tokens=prompts.detach().expand(2, -1, -1))
    torch.testing.assert_close(per_sample, tokens.detach())
    unprompted = backbone(images)
    assert (backbone.cls(tokens) - backbone.cls(unprompted)).abs().max() > 1e-3
    backbone.features(images, prompt_tokens=prompts).square().sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())
    with pytest.raises(ValueError, match=r"prompt_tokens must have shape \(B,L,C\) = \(2,L,192\)"):
        backbone(images, prompt_tokens=torch.randn(3, 5, 192))
    with pytest.raises(ValueError, match="prompt_tokens"):
        backbone(images, prompt_tokens=torch.randn(5, 191))


def test_prefixes_change_output_and_get_gradients(backbone, images):
    pk = torch.randn(2, 4, 192, requires_grad=True)   # per sample (B, P, C)
    pv = torch.randn(2, 4, 192, requires_grad=True)
    sk = torch.randn(4, 192, requires_grad=True)      # shared by the batch (P, C)
    sv = torch.randn(4, 192, requires_grad=True)
    feats = backbone.features(images, prefixes={2: (pk, pv), 5: (sk, sv)})
    assert (feats - backbone.query(images)).abs().max() > 1e-3
    feats.square().sum().backward()
    assert all(t.grad.abs().sum() > 0 for t in (pk, pv, sk, sv))
    assert all(p.grad is None for p in backbone.parameters())
    # The context is per forward: afterwards the model is unprompted again.
    assert backbone.context.get(2) is None and backbone.context.get(5) is None
    with pytest.raises(ValueError, match=r"pair \(prefix_k, prefix_v\)"):
        backbone(images, prefixes={0: pk})


def test_grad_checkpointing_recomputes_with_the_same_prompts(images):
    """Checkpointed blocks see their prefixes again in the backward (the context is gone by then)."""
    torch.manual_seed(0)
    bb = B.create_vit("vit_tiny_synth", pretrained=True)
    g = torch.Generator().manual_seed(1)
    leaves = [torch.randn(*s, generator=g, requires_grad=True) for s in [(2, 4, 192), (2, 4, 192), (3, 192)]]

    def grads():
        pk, pv, tok = leaves
        out = bb.features(images, prefixes={1: (pk, pv), 4: (pk * 0.5, pv)}, prompt_tokens=tok)
        out.square().sum().backward()
        got = [out.detach()] + [t.grad.clone() for t in leaves]
        for t in leaves:
            t.grad = None
        return got

    plain = grads()
    assert bb.set_grad_checkpointing() is bb and bb.grad_checkpointing
    ckpt = grads()
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in bb.parameters())
    with torch.no_grad():  # inference takes the plain path
        torch.testing.assert_close(bb.features(images), bb.set_grad_checkpointing(False).features(images))


def test_block_fn_prefixes_from_the_hidden_state_match_a_manual_block_loop(backbone, images):
    """block_fn sees the tokens entering each block; the result equals running the blocks by hand."""
    w = torch.randn(192, 192, requires_grad=True) * 0.05

    def block_fn(layer, x):
        if layer not in (1, 3):
            return None
        p = (x[:, :1] @ w).expand(-1, 2, -1)          # (B, 2, C) from the block input's CLS token
        return p, p * 0.5

    out = backbone(images, block_fn=block_fn)
    vit = backbone.vit
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(backbone.normalize(images))))
    for i, blk in enumerate(vit.blocks):
        pref = block_fn(i, x)
        with backbone.context.prompts({} if pref is None else {i: pref}):
            x = blk(x)
    torch.testing.assert_close(out, vit.norm(x))
    assert (out - backbone(images)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="both prefixes and block_fn"):
        backbone(images, prefixes={1: block_fn(1, torch.zeros(2, 65, 192))}, block_fn=block_fn)


def test_prompt_kv_equals_inserting_the_tokens_into_the_block(backbone, images):
    """Tokens inserted after [CLS] and dropped after the block give the real rows exactly what the prefix
    from prompt_kv gives them through prefix attention (forward and gradient w.r.t. the tokens), per sample
    and shared; the helper does what the block's own LN1 + qkv do to those rows."""
    vit = backbone.vit
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(backbone.normalize(images)))).detach()   # (2, 65, 192)
    assert backbone.num_tokens == x.shape[1] == 65
    g = torch.Generator().manual_seed(3)
    for layer in (0, 5):
        blk = vit.blocks[layer]
        for shape in ((2, 4, 192), (4, 192)):
            z = torch.randn(*shape, generator=g).requires_grad_(True)
            zb = z if z.dim() == 3 else z.expand(2, -1, -1)
            inserted = blk(torch.cat([x[:, :1], zb, x[:, 1:]], dim=1))
            inserted = torch.cat([inserted[:, :1], inserted[:, 1 + z.shape[-2]:]], dim=1)
            (dz_ins,) = torch.autograd.grad(inserted.square().sum(), z)
            pk, pv = backbone.prompt_kv(layer, z)
            assert pk.shape == pv.shape == (*shape[:-2], 3, 4, 64)
            with backbone.context.prompts({layer: (pk, pv)}):
                prefixed = blk(x)
            (dz_pre,) = torch.autograd.grad(prefixed.square().sum(), z)
            torch.testing.assert_close(prefixed, inserted, rtol=1e-5, atol=2e-5)
            torch.testing.assert_close(dz_pre, dz_ins, rtol=1e-4, atol=1e-4)
    # the helper is the block's own projection: k and v rows of timm's qkv on norm1(tokens)
    z = torch.randn(2, 3, 192, generator=g)
    qkv = vit.blocks[2].attn.qkv(vit.blocks[2].norm1(z)).reshape(2, 3, 3, 3, 64).permute(2, 0, 3, 1, 4)
    pk, pv = backbone.prompt_kv(2, z)
    torch.testing.assert_close(pk, qkv[1])
    torch.testing.assert_close(pv, qkv[2])
    with pytest.raises(ValueError, match=r"layer must be in \[0, 6\)"):
        backbone.prompt_kv(6, z)
    with pytest.raises(ValueError, match="tokens must have shape"):
        backbone.prompt_kv(0, torch.zeros(2, 3, 191))


def test_site_fns_wrap_the_attention_and_mlp_branches(backbone, images):
    seen = []
    ident = {"attn_out": lambda i, a: (seen.append(("attn", i)), a)[1],
             "mlp_out": lambda i, m: (seen.append(("mlp", i)), m)[1]}
    torch.testing.assert_close(backbone(images, site_fns=ident), backbone(images))   # identity sites: timm's block
    assert seen == [(k, i) for i in range(6) for k in ("attn", "mlp")]
    up = torch.zeros(192, 192, requires_grad=True)
    adapter = {"mlp_out": lambda i, m: m + m @ up}          # an adapter after each MLP, zero-initialised
    out = backbone(images, site_fns=adapter)
    torch.testing.assert_close(out, backbone(images))
    out.square().sum().backward()
    assert up.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown site_fns"):
        backbone(images, site_fns={"ffn": lambda i, m: m})


def test_block_fn_and_sites_under_grad_checkpointing(images):
    torch.manual_seed(0)
    bb = B.create_vit("vit_tiny_synth", pretrained=True)
    w = torch.randn(192, 192, requires_grad=True)
    up = torch.randn(192, 192, requires_grad=True)

    def run():
        out = bb.features(images, block_fn=lambda i, x: (x[:, :2] @ w * 0.01, x[:, :2] * 0.5) if i == 2 else None,
                          site_fns={"attn_out": lambda i, a: a + 0.01 * a @ up})
        out.square().sum().backward()
        got = [out.detach(), w.grad.clone(), up.grad.clone()]
        w.grad = up.grad = None
        return got

    plain = run()
    bb.set_grad_checkpointing()
    for a, b in zip(plain, run()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_prompt_layers_subset_and_bad_values(images):
    bb = B.create_vit("vit_tiny_synth", prompt_layers=[0, 1])
    assert bb.prompt_layers == (0, 1)
    assert [isinstance(b.attn, PromptedAttention) for b in bb.vit.blocks] == [True, True] + [False] * 4
    with pytest.raises(ValueError, match=r"layers \[4\], which are not prompted"):
        bb(images, prefixes={4: (torch.randn(2, 192), torch.randn(2, 192))})
    with pytest.raises(ValueError, match=r"prompt_layers must be block indices in \[0, 6\)"):
        V.ViTBackbone(timm.create_model("vit_tiny_synth", num_classes=0), prompt_layers=[6])
    none = V.ViTBackbone(timm.create_model("vit_tiny_synth", num_classes=0), prompt_layers="none")
    assert none.prompt_layers == () and none.weights.source == "unknown"


def test_frozen_backbone_stays_in_eval_mode():
    bb = B.create_vit("vit_tiny_synth", drop_path_rate=0.1)
    parent = nn.Sequential(bb, nn.Linear(192, 10))
    parent.train()
    assert parent.training and bb.training and parent[1].training
    assert not any(m.training for m in bb.vit.modules())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bb.features(x), bb.features(x))   # no drop path
    trainable = B.create_vit("vit_tiny_synth", train_backbone=True, pretrained=False)
    nn.Sequential(trainable).train()
    assert trainable.vit.training and all(p.requires_grad for p in trainable.parameters())


def test_img_size_resamples_position_embeddings(plain):
    bb = B.create_vit("vit_tiny_synth", img_size=64)
    assert bb.data_config["input_size"] == (3, 64, 64) and bb.weights.source == "shipped"
    assert bb(torch.rand(1, 3, 64, 64)).shape == (1, 1 + 256, 192)
    assert bb.vit.pos_embed.shape == (1, 1 + 256, 192)


# ------------------------------------------------------------------------------------------------
# Local files


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth_state_dict", "bin_model", "backbone_state_dict"])
def test_local_file_gives_shipped_features(tmp_path, plain, images, fmt):
    sd = {k: v.clone() for k, v in plain.state_dict().items()}   # includes the 100-class head
    assert "head.weight" in sd
    path = tmp_path / {"safetensors": "w.safetensors", "bin_model": "w.bin"}.get(fmt, "w.pth")
    if fmt == "safetensors":
        save_file(sd, str(path))
    elif fmt == "pth":
        torch.save(sd, path)
    elif fmt == "pth_state_dict":
        torch.save({"state_dict": sd, "epoch": 3}, path)
    elif fmt == "bin_model":
        torch.save({"model": sd}, path)
    else:   # what ViTBackbone.state_dict() saves: keys under "vit."
        torch.save({"vit." + k: v for k, v in sd.items() if not k.startswith("head.")}, path)
    bb = B.create_vit("vit_tiny_synth", checkpoint_path=str(path), pretrained=False)
    w = bb.weights
    assert (w.source, w.path, w.sha256) == ("file", str(path), B.sha256_file(str(path)))
    assert w.name == "vit_tiny_synth.synth_pretrain"
    torch.testing.assert_close(bb.query(images), _ref_features(plain, images), atol=1e-4, rtol=1e-4)


def test_npz_is_routed_to_timms_big_vision_loader(tmp_path, monkeypatch, plain, images):
    path = tmp_path / "ViT-Ti_16.npz"
    np.savez(path, **{"embedding/kernel": np.zeros((4, 4, 3, 192), np.float32)})
    calls = []

    def fake_load_weights(model, checkpoint_path, prefix=""):
        calls.append(checkpoint_path)
        model.load_state_dict({k: v for k, v in plain.state_dict().items() if not k.startswith("head.")})

    monkeypatch.setattr(tvit, "_load_weights", fake_load_weights)
    bb = B.create_vit("vit_tiny_synth", checkpoint_path=str(path))
    assert calls == [str(path)]
    assert bb.weights.source == "file" and bb.weights.sha256 == B.sha256_file(str(path))
    torch.testing.assert_close(bb.query(images), _ref_features(plain, images), atol=1e-4, rtol=1e-4)


def test_npz_without_big_vision_layout_is_a_clear_error(tmp_path):
    path = tmp_path / "wrong.npz"
    np.savez(path, something=np.zeros(3))
    with pytest.raises(ValueError, match="is not a big_vision/augreg .npz"):
        B.create_vit("vit_tiny_synth", checkpoint_path=str(path))


def test_bad_checkpoints_name_the_keys(tmp_path, plain):
    sd = {k: v for k, v in plain.state_dict().items() if not k.startswith("blocks.5.mlp")}
    sd["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.safetensors"
    save_file(sd, str(path))
    keys = r"missing keys \[blocks\.5\.mlp\.fc1\.bias.*unexpected keys \[extra\.weight\]"
    with pytest.raises(ValueError, match=keys):
        B.create_vit("vit_tiny_synth", checkpoint_path=str(path))
    sd = dict(plain.state_dict())
    sd["norm.weight"] = torch.ones(10)
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"shape mismatches \[norm\.weight \(10,\) vs model \(192,\)\]"):
        B.create_vit("vit_tiny_synth", checkpoint_path=str(path))
    with pytest.raises(FileNotFoundError, match="checkpoint_path .*nope.pth"):
        B.create_vit("vit_tiny_synth", checkpoint_path=str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read weights file .*junk.pth"):
        B.create_vit("vit_tiny_synth", checkpoint_path=str(tmp_path / "junk.pth"))


# ------------------------------------------------------------------------------------------------
# Names, random init, the hub


def test_unknown_names_and_tags_suggest_close_matches():
    with pytest.raises(ValueError, match=r"unknown timm model .*Did you mean: vit_base_patch16_224\.augreg_in21k"):
        B.create_vit("vit_base_patch16_244.augreg_in21k")
    with pytest.raises(ValueError, match=r"no weight tag 'nope'; known tags: vit_tiny_synth\.synth_pretrain"):
        B.create_vit("vit_tiny_synth.nope")
    with pytest.raises(ValueError, match="must be a timm VisionTransformer, 'resnet18' builds ResNet"):
        B.create_vit("resnet18", pretrained=False)
    with pytest.raises(ValueError, match="class token"):
        B.create_vit("vit_base_patch16_siglip_224", pretrained=False)
    with pytest.raises(ValueError, match="pass a local file as checkpoint_path="):
        B.create_vit("vit_tiny_synth", pretrained="weights.pth")


@pytest.mark.parametrize("pretrained", [False, "none"])
def test_random_on_request(pretrained, images, plain):
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # asked for: no warning
        bb = B.create_vit("vit_tiny_synth", pretrained=pretrained)
    assert bb.weights.source == "random" and bb.weights.path is None and "randomly initialised" in bb.weights.note
    assert (bb.query(images) - _ref_features(plain, images)).abs().max() > 0.1


def test_hub_weights_offline_random_when_not_cached_then_from_the_cache(offline):
    with pytest.warns(UserWarning, match=r"RANDOMLY INITIALISED.*checkpoint_path="):
        rand = B.create_vit(HUB_NAME, prompt_layers=None)
    w = rand.weights
    assert (w.name, w.source, w.path, w.sha256) == (HUB_NAME, "random", None, None)
    assert "HF_HUB_OFFLINE" in w.note and "timm/vit_tiny_patch16_224.augreg_in21k" in w.note
    assert rand.data_config["input_size"] == (3, 224, 224) and rand.data_config["mean"] == (0.5, 0.5, 0.5)
    # Put "the hub's file" (these random weights plus a 21k head) into the cache: now it loads from there.
    sd = dict(rand.vit.state_dict(), **{"head.weight": torch.zeros(21843, 192), "head.bias": torch.zeros(21843)})
    path = fake_hf_cache(offline, "timm/" + HUB_NAME, "model.safetensors", lambda p: save_file(sd, p))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bb = B.create_vit(HUB_NAME, prompt_layers=[0])
    w = bb.weights
    assert (w.name, w.source, w.path, w.sha256) == (HUB_NAME, "hub", path, B.sha256_file(path))
    x = torch.rand(1, 3, 224, 224)
    torch.testing.assert_close(bb.query(x), rand.query(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("network", ["down", "up"])
def test_hub_download(monkeypatch, tmp_path, network):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    torch.manual_seed(5)
    hub_sd = timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict()
    calls = []

    def fake_hub(model_id, *args, **kwargs):   # stands in for timm's download from the hub
        calls.append(model_id)
        if network == "down":
            raise OSError("Name or service not known")
        return dict(hub_sd)

    monkeypatch.setattr("timm.models._builder.load_state_dict_from_hf", fake_hub)
    if network == "down":
        with pytest.warns(UserWarning, match="download from hf-hub:timm/vit_tiny_patch16_224.augreg_in21k failed"):
            bb = B.create_vit(HUB_NAME, prompt_layers=None)
        assert bb.weights.source == "random" and "Name or service not known" in bb.weights.note
    else:
        bb = B.create_vit(HUB_NAME, prompt_layers=None)
        w = bb.weights
        assert (w.source, w.note) == ("hub", "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k")
        torch.testing.assert_close(bb.vit.pos_embed, hub_sd["pos_embed"])
    assert calls == ["timm/" + HUB_NAME]


def test_hub_offline_reads_the_environment_now(monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert B.hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not B.hub_offline()
