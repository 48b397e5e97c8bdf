"""Backbones: timm ViTs and open_clip CLIP towers, and the small pretrained ones clfast ships.

Importing this package registers ``vit_tiny_synth`` with timm and ``clip_tiny_synth`` with open_clip
(when open_clip is installed), so both load offline:

    import clfast.backbones, timm
    vit = timm.create_model("vit_tiny_synth", pretrained=True, num_classes=0)
    clip, preprocess, tokenizer = clfast.backbones.create_clip_tiny_synth()

Promptable frozen ViTs and CLIPs with recorded weight provenance (:mod:`clfast.backbones.vit`):

    backbone = clfast.backbones.create_vit("vit_base_patch16_224.augreg_in21k", checkpoint_path=None)
    model, preprocess, tokenizer, weights = clfast.backbones.create_clip("clip_tiny_synth")

Class keys from CLIP's text encoder with a learnable context token per class (:mod:`clfast.backbones.clip_text`):

    keys = clfast.backbones.ClassTextEncoder(model, tokenizer, class_names)(context)   # (C, D_c)

The VLM of CluMo and ATLAS: frozen CLIP towers with token outputs, a prompt-prefixed fusion encoder and an
answer head (:mod:`clfast.backbones.vlm`):

    vlm = clfast.backbones.create_vlm("clip_tiny_synth", answers=answers)
    logits = vlm(images, tokens, prefix=pi)                                          # (B, n_A)
"""

from .tokenizer import WordTokenizer
from .zoo import (ASSET_DIR, CLIP_TINY_SYNTH_CONFIG, CLIP_TINY_SYNTH_FILE, CLIP_TINY_SYNTH_VOCAB,
                  VIT_TINY_SYNTH_FILE, clip_normalize, clip_tiny_synth_tokenizer, create_clip_tiny_synth,
                  list_pretrained, register_open_clip_configs, sha256_file, verify_assets, vit_normalize,
                  vit_tiny_synth)
from .sentence import DEFAULT_SENTENCE_ENCODER, embed_phrases, load_sentence_encoder
from .clip import create_clip
from .clip_text import ClassTextEncoder
from .vit import ViTBackbone, create_vit
from .vlm import (VLM, AnswerHead, CLIPTokenTowers, Encoded, FusionEncoder, PromptedCrossAttention, create_vlm,
                  load_vlm_checkpoint, pool_tokens)
from .weights import WeightsInfo, hub_offline

try:  # register the open_clip config when open_clip is present; create_clip_tiny_synth says if not
    register_open_clip_configs()
except ImportError:  # pragma: no cover - depends on the environment
    pass

__all__ = [
    "WordTokenizer", "vit_tiny_synth", "create_clip_tiny_synth", "clip_tiny_synth_tokenizer",
    "register_open_clip_configs", "clip_normalize", "vit_normalize", "verify_assets", "sha256_file",
    "list_pretrained", "load_sentence_encoder", "embed_phrases", "DEFAULT_SENTENCE_ENCODER",
    "ASSET_DIR", "VIT_TINY_SYNTH_FILE", "CLIP_TINY_SYNTH_FILE", "CLIP_TINY_SYNTH_CONFIG",
    "CLIP_TINY_SYNTH_VOCAB", "create_vit", "create_clip", "ClassTextEncoder", "ViTBackbone", "WeightsInfo",
    "hub_offline", "VLM", "AnswerHead", "CLIPTokenTowers", "Encoded", "FusionEncoder", "PromptedCrossAttention",
    "create_vlm", "pool_tokens", "load_vlm_checkpoint",
]
