"""Facts about the pretrained backbones the method specs rely on (STAR-Prompt spec, section 8 item 12).

- timm resolves the untagged ``vit_base_patch16_224`` (what mammoth asks for with ``in21k-ft-in1k``) to
  ``augreg2_in21k_ft_in1k``; read from timm's pretrained configs, nothing downloaded.
- open_clip ``ViT-L-14`` with ``pretrained='openai'`` gives the features of OpenAI's own ``clip`` package
  (cos > 0.9999). Runs only where both weight files and the ``clip`` package are present; skips naming
  what is missing otherwise.
"""

import os

import pytest
import torch

import open_clip
import timm
from huggingface_hub import constants as hf_constants

import clfast.backbones as B
from clfast.backbones import vit as V
from clfast.backbones.weights import hf_cached, safe_first, url_cached


def test_untagged_vit_base_resolves_to_augreg2_in21k_ft_in1k():
    cfg = timm.models.get_pretrained_cfg("vit_base_patch16_224")
    assert cfg.tag == "augreg2_in21k_ft_in1k"
    assert cfg.hf_hub_id == "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert V._resolve_vit_name("vit_base_patch16_224")[0] == "vit_base_patch16_224.augreg2_in21k_ft_in1k"
    # mammoth's other choice, 'in21k', names its tag explicitly
    assert timm.models.get_pretrained_cfg("vit_base_patch16_224.augreg_in21k").tag == "augreg_in21k"


def test_open_clip_openai_tag_uses_quick_gelu():
    """OpenAI's CLIPs use QuickGELU; open_clip applies it only through the tag's config."""
    assert open_clip.get_pretrained_cfg("ViT-L-14", "openai").get("quick_gelu") is True


def _vit_l14_openai_files():
    """(open_clip's cached file, OpenAI's ViT-L-14.pt, the clip module, what is missing)."""
    cfg = open_clip.get_pretrained_cfg("ViT-L-14", "openai")
    missing = []
    repo_id, filename = os.path.split(cfg["hf_hub"].rstrip())
    hub_file = hf_cached(repo_id, safe_first(filename or "open_clip_pytorch_model.bin"))
    if not hub_file:
        missing.append(f"open_clip's weights for ViT-L-14/openai in the Hugging Face cache (hf-hub:{repo_id})")
    openai_file = url_cached(cfg["url"], os.path.expanduser("~/.cache/clip"))
    if not openai_file:
        missing.append(f"OpenAI's ~/.cache/clip/{os.path.basename(cfg['url'])} (from {cfg['url']})")
    try:
        import clip
    except ImportError:
        clip = None
        missing.append("the OpenAI `clip` package (pip install openai-clip, or git+https://github.com/openai/CLIP)")
    return hub_file, openai_file, clip, missing


@pytest.mark.slow
def test_open_clip_vit_l14_openai_matches_the_openai_release(monkeypatch):
    hub_file, openai_file, clip, missing = _vit_l14_openai_files()
    if missing:
        pytest.skip("needs " + "; ".join(missing))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    model, _, tokenizer, weights = B.create_clip("ViT-L-14", pretrained="openai")
    assert (weights.source, weights.path) == ("hub", hub_file)
    ref, _ = clip.load(openai_file, device="cpu", jit=False)
    ref = ref.float().eval()
    g = torch.Generator().manual_seed(0)
    images = B.clip_normalize(torch.rand(2, 3, 224, 224, generator=g))
    texts = ["a photo of a cat", "a red striped circle on a dark background"]
    tokens = tokenizer(texts)
    assert tokens.tolist() == clip.tokenize(texts).tolist()   # clip.tokenize gives int32
    with torch.no_grad():
        pairs = [(model.encode_image(images), ref.encode_image(images)),
                 (model.encode_text(tokens), ref.encode_text(tokens))]
    for ours, theirs in pairs:
        cos = torch.nn.functional.cosine_similarity(ours.float(), theirs.float(), dim=-1)
        assert (cos > 0.9999).all(), cos
