"""The shipped backbones: loading through timm / open_clip, integrity, quality, and the recipe."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clfast.backbones as B
from clfast.backbones import zoo
from clfast.data import create_dataset
from clfast.data import synth as S

import open_clip  # noqa: E402
import timm  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METRICS = os.path.join(zoo.ASSET_DIR, "metrics.json")


@pytest.fixture(scope="module")
def metrics():
    with open(METRICS, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("pretrain_embedded",
                                                  os.path.join(ROOT, "scripts", "pretrain_embedded.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def vit():
    return timm.create_model("vit_tiny_synth", pretrained=True).eval()


@pytest.fixture(scope="module")
def clip():
    return B.create_clip_tiny_synth()


@pytest.fixture(scope="module")
def shapes():
    # A few hundred held-out-class images: 100 synth-shapes classes, 6 train / 3 test each.
    return (create_dataset("synth-shapes", "train", n_per_class=6),
            create_dataset("synth-shapes", "test", n_per_class=3))


def _u8(ds):
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------
# Files


def test_assets_checksums_size_and_fp16():
    from safetensors import safe_open
    digests = B.verify_assets()
    assert set(digests) >= {"vit_tiny_synth.safetensors", "clip_tiny_synth.safetensors",
                            "clip_tiny_synth.json", "clip_tiny_synth_vocab.json"}
    weights = [B.VIT_TINY_SYNTH_FILE, B.CLIP_TINY_SYNTH_FILE]
    assert sum(os.path.getsize(p) for p in weights) <= 10 * 1024 * 1024
    for p in weights:
        with safe_open(p, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    # The README records the same digests.
    with open(os.path.join(zoo.ASSET_DIR, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for name in ("vit_tiny_synth.safetensors", "clip_tiny_synth.safetensors"):
        assert digests[name] in readme


def test_tampered_asset_is_reported(tmp_path, monkeypatch):
    for name in ("checksums.json", "vit_tiny_synth.safetensors"):
        (tmp_path / name).write_bytes(open(os.path.join(zoo.ASSET_DIR, name), "rb").read())
    (tmp_path / "vit_tiny_synth.safetensors").write_bytes(b"not the weights")
    monkeypatch.setattr(zoo, "ASSET_DIR", str(tmp_path))
    monkeypatch.setattr(zoo, "CHECKSUMS_FILE", str(tmp_path / "checksums.json"))
    with pytest.raises((ValueError, FileNotFoundError)):
        zoo.verify_assets()


# ------------------------------------------------------------------------------------------------
# timm


def test_vit_loads_through_timm_and_matches_fingerprint(vit, metrics, script):
    assert type(vit).__name__ == "VisionTransformer"
    assert all(p.dtype == torch.float32 for p in vit.parameters())
    assert vit.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) and vit.pretrained_cfg["input_size"] == (3, 32, 32)
    assert len(vit.blocks) == 6 and vit.embed_dim == 192 and vit.blocks[0].attn.num_heads == 3
    with torch.no_grad():
        feats = vit.forward_head(vit.forward_features(B.vit_normalize(script.fingerprint_input())),
                                 pre_logits=True)
    expected = torch.tensor(metrics["quality"]["vit_fingerprint"]).view(4, 8)
    torch.testing.assert_close(feats[:, :8], expected, atol=2e-3, rtol=1e-3)
    # A randomly initialised model is nowhere near the fingerprint.
    torch.manual_seed(0)
    rand = timm.create_model("vit_tiny_synth").eval()
    with torch.no_grad():
        r = rand.forward_head(rand.forward_features(B.vit_normalize(script.fingerprint_input())),
                              pre_logits=True)
    assert (r[:, :8] - expected).abs().max() > 0.1


def test_vit_heads_and_overlay_file(vit):
    x = torch.rand(2, 3, 32, 32)
    m0 = timm.create_model("vit_tiny_synth", pretrained=True, num_classes=0).eval()
    m10 = timm.create_model("vit_tiny_synth", pretrained=True, num_classes=10).eval()
    with torch.no_grad():
        assert m0(x).shape == (2, 192) and m10(x).shape == (2, 10) and vit(x).shape == (2, 100)
        torch.testing.assert_close(m0.forward_features(x), vit.forward_features(x))
    m = timm.create_model("vit_tiny_synth", pretrained=True,
                          pretrained_cfg_overlay=dict(file=B.VIT_TINY_SYNTH_FILE)).eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), vit(x))


def test_vit_missing_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such"):
        timm.create_model("vit_tiny_synth", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "no_such.safetensors")))


def test_vit_classifies_pretrain_classes(vit):
    ds = create_dataset("synth-pretrain", "test", n_per_class=2)
    with torch.no_grad():
        logits = vit(B.vit_normalize(_u8(ds).float() / 255))
    acc = (logits.argmax(1) == torch.tensor(ds.targets)).float().mean().item()
    # Recorded: 64.5 % on 100 × 20 images (clfast/assets/README.md; 66.5 % on these 200); chance 1 %.
    assert acc > 0.40, acc


def test_linear_probe_on_held_out_classes(vit, shapes, script):
    train, test = shapes
    acc = script.linear_probe(script.vit_features(vit, _u8(train)), train.targets,
                              script.vit_features(vit, _u8(test)), test.targets, max_iter=200)
    torch.manual_seed(0)
    rand = timm.create_model("vit_tiny_synth").eval()
    acc_rand = script.linear_probe(script.vit_features(rand, _u8(train)), train.targets,
                                   script.vit_features(rand, _u8(test)), test.targets, max_iter=200)
    print(f"linear probe: pretrained {acc:.3f}, random init {acc_rand:.3f}")
    chance = 1 / 100
    # Recorded with 3,000 probe-training images: 63.2 % (random init 11.3 %); with these 600:
    # 60.3 % (random init 6.3 %).
    assert acc > 35 * chance, acc
    assert acc > acc_rand + 0.20, (acc, acc_rand)


# ------------------------------------------------------------------------------------------------
# open_clip


def test_clip_loads_through_open_clip_and_matches_fingerprint(clip, metrics, script):
    model, preprocess, tok = clip
    assert isinstance(model, open_clip.CLIP)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert "clip_tiny_synth" in open_clip.list_models()
    # Plain open_clip call with the local file gives the same model.
    m2, _, _ = open_clip.create_model_and_transforms("clip_tiny_synth", pretrained=B.CLIP_TINY_SYNTH_FILE)
    m2.eval()
    x = script.fingerprint_input()
    text = tok(script.fingerprint_texts())
    q = metrics["quality"]
    with torch.no_grad():
        img = model.encode_image(B.clip_normalize(x))
        txt = model.encode_text(text)
        torch.testing.assert_close(m2.encode_image(B.clip_normalize(x)), img)
    torch.testing.assert_close(img[:, :8], torch.tensor(q["clip_image_fingerprint"]).view(4, 8),
                               atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(txt[:, :8], torch.tensor(q["clip_text_fingerprint"]).view(4, 8),
                               atol=2e-3, rtol=1e-3)
    from PIL import Image
    pil = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    assert preprocess(pil).shape == (3, 32, 32)


def test_clip_zero_shot_on_held_out_classes(clip, shapes, script):
    model, _, tok = clip
    _, test = shapes
    acc = script.clip_zero_shot(model, tok, _u8(test), test.targets, test.class_defs)
    # Recorded: 45.8 % on 100 × 10 images (43.3 % on these 300); chance is 1 %.
    assert acc > 28 / 100, acc


def test_clip_text_matches_its_image_attributes(clip):
    """Each image's own caption outranks the same caption with the colour swapped."""
    model, _, tok = clip
    ds = create_dataset("synth-shapes", "test", n_per_class=1)
    wins = 0
    with torch.no_grad():
        f = F.normalize(model.encode_image(B.clip_normalize(_u8(ds).float() / 255)), dim=-1)
        for i in range(len(ds)):
            o = ds.scene(i).objects[0]
            other = S.COLOURS[(S.COLOURS.index(o.colour) + 2) % len(S.COLOURS)]
            t = F.normalize(model.encode_text(tok([f"a {o.colour} {o.shape}", f"a {other} {o.shape}"])), dim=-1)
            s = f[i] @ t.t()
            wins += int(s[0] > s[1])
    assert wins / len(ds) > 0.8, wins


def test_tokenizer_interface():
    tok = B.clip_tiny_synth_tokenizer()
    out = tok(["a small red striped triangle on a dark background", "what color is it?", "zebra"])
    assert out.dtype == torch.int64 and out.shape == (3, tok.context_length)
    assert out[:, 0].eq(tok.sot_id).all()
    # The end-of-text token has the largest id, so open_clip's argmax pooling finds it.
    assert (out.argmax(1) == torch.tensor([10, 6, 2])).all() and tok.eot_id == tok.vocab_size - 1
    assert tok.decode(out[0]) == "a small red striped triangle on a dark background"
    assert out[2, 1] == tok.unk_id
    long = tok(" ".join(["red"] * 100))
    assert long.shape == (1, tok.context_length) and long[0, -1] == tok.eot_id
    assert tok("a red circle", context_length=8).shape == (1, 8)
    cfg = json.load(open(B.CLIP_TINY_SYNTH_CONFIG))
    assert cfg["text_cfg"]["vocab_size"] == tok.vocab_size


def test_clip_missing_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrain_embedded"):
        B.create_clip_tiny_synth(checkpoint_path=str(tmp_path / "nope.safetensors"))


# ------------------------------------------------------------------------------------------------
# The recipe


def test_pretrain_script_smoke(tmp_path, script):
    threads = torch.get_num_threads()
    try:
        rc = script.main(["--out", str(tmp_path), "--smoke", "--no-eval", "--no-bf16",
                          "--threads", str(threads)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    names = {"vit_tiny_synth.safetensors", "clip_tiny_synth.safetensors", "clip_tiny_synth.json",
             "clip_tiny_synth_vocab.json", "checksums.json", "metrics.json"}
    assert names <= set(os.listdir(tmp_path))
    m = json.load(open(tmp_path / "metrics.json"))
    assert m["vit"]["steps"] == 3 and np.isfinite(m["vit"]["final_train_loss"])
    assert m["clip"]["steps"] == 3 and np.isfinite(m["clip"]["final_train_loss"])
    # The recipe's config and vocabulary are the shipped ones.
    for name in ("clip_tiny_synth.json", "clip_tiny_synth_vocab.json"):
        assert (tmp_path / name).read_bytes() == open(os.path.join(zoo.ASSET_DIR, name), "rb").read()
    vit = timm.create_model("vit_tiny_synth", pretrained=True, pretrained_cfg_overlay=dict(
        file=str(tmp_path / "vit_tiny_synth.safetensors")))
    model, _, _ = B.create_clip_tiny_synth(checkpoint_path=str(tmp_path / "clip_tiny_synth.safetensors"))
    assert vit.patch_embed.proj.weight.dtype == torch.float32 and model.logit_scale.dtype == torch.float32


def test_save_fp16_is_byte_reproducible(tmp_path, script):
    """safetensors writes its metadata in hash-map order; the recipe's writer sorts the header, so
    the same weights always give the same file (and sha256)."""
    from safetensors import safe_open
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    meta = {"arch": "x", "data": "y", "steps": 3, "batch": 16, "seed": 0}
    blobs = []
    for i in range(4):
        script.save_fp16(m, str(tmp_path / f"{i}.safetensors"), meta)
        blobs.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert all(b == blobs[0] for b in blobs)
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata() == {k: str(v) for k, v in meta.items()}
        for k, v in m.state_dict().items():
            assert f.get_tensor(k).dtype == torch.float16
            torch.testing.assert_close(f.get_tensor(k).float(), v.half().float())


# ------------------------------------------------------------------------------------------------
# Sentence encoder for descriptors


def test_sentence_encoder_missing_package_names_it(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(ImportError, match="pip install sentence-transformers"):
        B.load_sentence_encoder()


def test_embed_descriptor_phrases_offline():
    phrases = ["red colour", "red hue", "six straight sides"]
    emb = B.embed_phrases(phrases)
    assert emb.shape == (3, 384) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3), atol=1e-4, rtol=0)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.1
    with pytest.raises(ValueError, match="sequence"):
        B.embed_phrases("red colour")
