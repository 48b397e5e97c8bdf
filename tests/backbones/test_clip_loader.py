"""create_clip: open_clip models with recorded weights (shipped, local file, hub cache, random)."""

import json
import os
import warnings

import pytest
import torch

import open_clip
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file

import clfast.backbones as B

FAKE_REPO = "clfast-test/clip_tiny_synth"


@pytest.fixture(scope="module")
def shipped():
    return B.create_clip("clip_tiny_synth")


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(2)
    return B.clip_normalize(torch.rand(2, 3, 32, 32, generator=g)), B.clip_tiny_synth_tokenizer()(
        ["a red circle", "a small blue striped square"])


@pytest.fixture
def offline_with_fake_tag(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1, an empty Hugging Face cache in tmp, and an open_clip tag 'fake' for
    clip_tiny_synth whose weights live on the hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "clip_tiny_synth",
                        {"fake": {"hf_hub": FAKE_REPO + "/", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}})
    return cache


def _encode(model, inputs):
    images, texts = inputs
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts)


def _assert_same(model, ref, inputs):
    for a, b in zip(_encode(model, inputs), _encode(ref, inputs)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_shipped_clip_tiny_synth(shipped, inputs):
    model, preprocess, tokenizer, w = shipped
    with open(os.path.join(B.ASSET_DIR, "checksums.json"), encoding="utf-8") as f:
        expected = json.load(f)["clip_tiny_synth.safetensors"]
    assert (w.name, w.source, w.path, w.sha256) == ("clip_tiny_synth", "shipped", B.CLIP_TINY_SYNTH_FILE, expected)
    assert isinstance(model, open_clip.CLIP) and not model.training
    assert isinstance(tokenizer, B.WordTokenizer) and callable(preprocess)
    ref, _, _ = B.create_clip_tiny_synth()
    _assert_same(model, ref, inputs)


@pytest.mark.parametrize("how", ["checkpoint_path", "pretrained_path"])
def test_local_checkpoint_file(tmp_path, shipped, inputs, how):
    model = shipped[0]
    path = str(tmp_path / "clip.pt")
    torch.save(model.state_dict(), path)
    kw = {"checkpoint_path": path} if how == "checkpoint_path" else {"pretrained": path}
    m2, _, tok, w = B.create_clip("clip_tiny_synth", **kw)
    assert (w.source, w.path, w.sha256) == ("file", path, B.sha256_file(path))
    assert isinstance(tok, B.WordTokenizer)
    _assert_same(m2, model, inputs)


def test_random_on_request(shipped, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # asked for: no warning
        model, _, _, w = B.create_clip("clip_tiny_synth", pretrained="none")
    assert (w.source, w.path, w.sha256) == ("random", None, None) and "randomly initialised" in w.note
    img, _ = _encode(model, inputs)
    assert (img - _encode(shipped[0], inputs)[0]).abs().max() > 0.1


def test_tag_offline_and_not_cached_falls_back_to_random(offline_with_fake_tag):
    loud = r"'clip_tiny_synth:fake' are missing .*RANDOMLY INITIALISED.*checkpoint_path="
    with pytest.warns(UserWarning, match=loud):
        model, _, _, w = B.create_clip("clip_tiny_synth", pretrained="fake")
    assert (w.name, w.source) == ("clip_tiny_synth:fake", "random")
    assert "HF_HUB_OFFLINE" in w.note and FAKE_REPO in w.note
    assert isinstance(model, open_clip.CLIP)


def test_tag_from_the_hub_cache(offline_with_fake_tag, shipped, inputs):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_with_fake_tag / ("models--" + FAKE_REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    path = str(repo / "snapshots" / commit / "open_clip_model.safetensors")
    save_file(shipped[0].state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, preprocess, _, w = B.create_clip("clip_tiny_synth", pretrained="fake")
    assert (w.source, w.path, w.sha256) == ("hub", path, B.sha256_file(path))
    _assert_same(model, shipped[0], inputs)
    # The tag's preprocessing (mean = std = 0.5 here) is kept.
    assert any(getattr(t, "mean", None) == (0.5, 0.5, 0.5) for t in preprocess.transforms)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"unknown open_clip model 'clip_tiny_synt'.*Did you mean: clip_tiny_synth"):
        B.create_clip("clip_tiny_synt")
    with pytest.raises(ValueError, match=r"'ViT-B-32' has no pretrained tag 'opnai'.*Did you mean: openai"):
        B.create_clip("ViT-B-32", pretrained="opnai")
    with pytest.raises(FileNotFoundError, match="checkpoint_path .*missing.pt"):
        B.create_clip("clip_tiny_synth", checkpoint_path="/nonexistent/missing.pt")
