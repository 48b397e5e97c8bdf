"""Small pretrained backbones that ship with clfast (weights in ``clfast/assets/``).

- ``vit_tiny_synth``: a timm ``VisionTransformer`` (32×32 input, patch 4, width 192, depth 6, 3 heads
  of 64, MLP ratio 2, CLS token), pretrained by supervised classification on ``synth-pretrain``.
  Importing :mod:`clfast.backbones` registers it with timm, so
  ``timm.create_model("vit_tiny_synth", pretrained=True)`` loads the shipped file offline.
- ``clip_tiny_synth``: an open_clip ``CLIP`` with an image tower of the same size and a 4-layer,
  128-wide text transformer over a closed word vocabulary, pretrained contrastively on
  ``synth-pretrain`` captions. :func:`create_clip_tiny_synth` returns ``(model, preprocess, tokenizer)``
  through ``open_clip.create_model_and_transforms`` with the registered config and the local file.

Both are stored as fp16 safetensors and load as fp32. Normalisation follows the real weights they
stand in for: ``vit_tiny_synth`` uses mean = std = 0.5 (like timm's ``augreg_in21k`` ViTs), the
CLIP uses OpenAI's mean/std (open_clip's default), so the usual preprocessing applies unchanged.
``scripts/pretrain_embedded.py`` reproduces both files; ``clfast/assets/README.md`` records them.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from ..utils.files import sha256_file
from .tokenizer import WordTokenizer

try:
    from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("clfast.backbones needs timm: pip install timm") from e

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
VIT_TINY_SYNTH_FILE = os.path.join(ASSET_DIR, "vit_tiny_synth.safetensors")
CLIP_TINY_SYNTH_FILE = os.path.join(ASSET_DIR, "clip_tiny_synth.safetensors")
CLIP_TINY_SYNTH_CONFIG = os.path.join(ASSET_DIR, "clip_tiny_synth.json")
CLIP_TINY_SYNTH_VOCAB = os.path.join(ASSET_DIR, "clip_tiny_synth_vocab.json")
CHECKSUMS_FILE = os.path.join(ASSET_DIR, "checksums.json")
PRETRAIN_COMMAND = "python scripts/pretrain_embedded.py --out clfast/assets"

VIT_TINY_SYNTH_ARGS = dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3,
                           mlp_ratio=2.0, num_classes=100)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

default_cfgs = generate_default_cfgs({
    "vit_tiny_synth.synth_pretrain": {
        "file": VIT_TINY_SYNTH_FILE,
        "num_classes": 100, "input_size": (3, 32, 32), "pool_size": None,
        "crop_pct": 1.0, "interpolation": "bilinear", "fixed_input_size": True,
        "mean": INCEPTION_MEAN, "std": INCEPTION_STD,
        "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "apache-2.0",
        "notes": ("clfast's procedural synth-pretrain data, supervised; "
                  f"reproduce with `{PRETRAIN_COMMAND}`",),
    },
})


def missing_weights(path: str, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} weights not found at {path}. They ship inside the clfast package (package data "
        f"'assets/*'); in a source checkout, regenerate them with `{PRETRAIN_COMMAND}`.")


@register_model
def vit_tiny_synth(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Tiny-ish for 32×32 inputs, pretrained on clfast's synth-pretrain (100 classes).

    ``pretrained=True`` loads the shipped safetensors (fp16 on disk, fp32 in memory); a different
    ``num_classes`` drops the head, ``pretrained_cfg_overlay=dict(file=...)`` loads another file.
    """
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained:
        path = overlay.get("file") or VIT_TINY_SYNTH_FILE
        if not os.path.isfile(path):   # timm's own error here has an empty message
            raise missing_weights(path, "vit_tiny_synth")
    model_args = dict(VIT_TINY_SYNTH_ARGS, **kwargs)
    return build_model_with_cfg(VisionTransformer, "vit_tiny_synth", pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=3, feature_cls="getter"), **model_args)


# --------------------------------------------------------------------------------------------------
# open_clip


def open_clip_module():
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("clip_tiny_synth needs open_clip: pip install open_clip_torch") from e
    if "clip_tiny_synth" not in open_clip.list_models():
        open_clip.add_model_config(CLIP_TINY_SYNTH_CONFIG)
    return open_clip


def register_open_clip_configs() -> None:
    """Make ``clip_tiny_synth`` an open_clip model name (idempotent)."""
    open_clip_module()


def clip_tiny_synth_tokenizer(context_length: Optional[int] = None) -> WordTokenizer:
    """The tiny CLIP's word tokenizer (open_clip's interface: ``tok(texts) -> (N, L) int64``)."""
    tok = WordTokenizer.from_file(CLIP_TINY_SYNTH_VOCAB)
    if context_length is not None:
        tok.context_length = int(context_length)
    return tok


def create_clip_tiny_synth(pretrained: bool = True, device="cpu", checkpoint_path: Optional[str] = None,
                           **kwargs):
    """Build the tiny CLIP through ``open_clip.create_model_and_transforms``.

    Args:
        pretrained: load the shipped weights (``checkpoint_path`` overrides the file); False gives a
            randomly initialised model of the same architecture.
        device: where to put the model.
        **kwargs: passed to ``open_clip.create_model_and_transforms``.

    Returns:
        ``(model, preprocess, tokenizer)``: an open_clip ``CLIP`` in eval mode (fp32), open_clip's
        validation transform for PIL images (32×32, OpenAI mean/std), and a :class:`WordTokenizer`.
        Images from :mod:`clfast.data` are already 32×32 tensors in [0, 1]: normalise them with
        :func:`clip_normalize` instead of ``preprocess``.
    """
    open_clip = open_clip_module()
    path = None
    if pretrained:
        path = checkpoint_path or CLIP_TINY_SYNTH_FILE
        if not os.path.isfile(path):
            raise missing_weights(path, "clip_tiny_synth")
    model, _, preprocess = open_clip.create_model_and_transforms(
        "clip_tiny_synth", pretrained=path, device=device, **kwargs)
    model.eval()
    return model, preprocess, clip_tiny_synth_tokenizer()


def clip_normalize(images: torch.Tensor) -> torch.Tensor:
    """OpenAI normalisation of ``(B, 3, H, W)`` images in [0, 1] (what the tiny CLIP expects)."""
    mean = images.new_tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def vit_normalize(images: torch.Tensor) -> torch.Tensor:
    """mean = std = 0.5 normalisation of ``(B, 3, H, W)`` images in [0, 1] (vit_tiny_synth's)."""
    return (images - 0.5) / 0.5


# --------------------------------------------------------------------------------------------------
# Integrity



def verify_assets() -> dict[str, str]:
    """Check the shipped files against ``assets/checksums.json``; returns {file: sha256}.

    Raises:
        FileNotFoundError: a file is missing. ValueError: a checksum differs.
    """
    with open(CHECKSUMS_FILE, encoding="utf-8") as f:
        expected = json.load(f)
    out = {}
    for name, digest in expected.items():
        path = os.path.join(ASSET_DIR, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shipped asset {path} is missing")
        got = sha256_file(path)
        if got != digest:
            raise ValueError(f"{name}: sha256 {got} differs from the recorded {digest}")
        out[name] = got
    return out


def list_pretrained() -> list[str]:
    """The backbones that ship with clfast."""
    return ["vit_tiny_synth.synth_pretrain", "clip_tiny_synth"]


__all__ = [
    "vit_tiny_synth", "create_clip_tiny_synth", "clip_tiny_synth_tokenizer", "register_open_clip_configs",
    "clip_normalize", "vit_normalize", "verify_assets", "sha256_file", "list_pretrained",
    "VIT_TINY_SYNTH_FILE", "CLIP_TINY_SYNTH_FILE", "CLIP_TINY_SYNTH_CONFIG", "CLIP_TINY_SYNTH_VOCAB",
    "ASSET_DIR",
]
