"""open_clip CLIP towers, loaded by name and tag or from a local file, with their weights' provenance."""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

from ..ops.attention import fuse_self_attention
from ..utils.files import sha256_file
from . import zoo
from .weights import (WeightsInfo, check_file, close_matches, hf_cached, hub_offline, logger, loud_warning,
                      pretrained_choice, safe_first, url_cached)

__all__ = ["create_clip"]


def _clip_cached(tag_cfg: dict) -> Optional[str]:
    """The file open_clip would load for a tag if it is in the HF or ~/.cache/clip cache."""
    if tag_cfg.get("file") and os.path.isfile(tag_cfg["file"]):
        return tag_cfg["file"]
    if tag_cfg.get("hf_hub"):
        repo_id, filename = os.path.split(tag_cfg["hf_hub"].rstrip())
        path = hf_cached(repo_id, safe_first(filename or "open_clip_pytorch_model.bin"))
        if path:
            return path
    if tag_cfg.get("url"):
        return url_cached(tag_cfg["url"], os.path.expanduser("~/.cache/clip"))
    return None


def create_clip(name: str, *, pretrained: Union[bool, str, None] = None, checkpoint_path: Optional[str] = None,
                device: Union[str, torch.device] = "cpu"):
    """Build an open_clip model through ``open_clip.create_model_and_transforms`` and record its weights.

    Weights: ``checkpoint_path`` (source ``"file"``); else for ``clip_tiny_synth`` the shipped file (source
    ``"shipped"``) unless ``pretrained`` is False / ``"none"``; else the open_clip tag ``pretrained`` (source
    ``"hub"``; the cached file if there is one). A tag whose weights cannot be had (``HF_HUB_OFFLINE`` and not
    cached, or a failed download) gives random weights with a loud warning, as does ``pretrained=None`` for a
    model other than ``clip_tiny_synth``.

    Args:
        name: an open_clip model name (``open_clip.list_models()``), e.g. ``"ViT-B-16"``, ``"clip_tiny_synth"``.
        pretrained: an open_clip tag (``open_clip.list_pretrained_tags_by_model(name)``), a local file,
            False / ``"none"`` for random weights, or None for the default (shipped file or random).
        checkpoint_path: a local weights file; overrides ``pretrained``.
        device: where to put the model.

    Returns:
        ``(model, preprocess, tokenizer, weights)``: the model in eval mode (its ``nn.MultiheadAttention``
        self-attention on clfast's fused op: :func:`clfast.ops.fuse_self_attention`), open_clip's validation
        transform for PIL images, the tokenizer (``tok(texts) -> (N, L) int64``) and a :class:`WeightsInfo`.

    Raises:
        ValueError: unknown model name or tag (with close matches). FileNotFoundError: missing checkpoint_path.
    """
    open_clip = zoo.open_clip_module()
    if not isinstance(name, str) or name.replace("/", "-") not in open_clip.list_models():
        raise ValueError(f"create_clip: unknown open_clip model {name!r}."
                         + close_matches(str(name), open_clip.list_models()))
    name = name.replace("/", "-")
    choice = pretrained_choice(pretrained, "create_clip")
    tags = open_clip.list_pretrained_tags_by_model(name)
    load, weights = None, None
    if checkpoint_path is not None:
        path = check_file(checkpoint_path, "create_clip")
        load, weights = path, WeightsInfo(name, "file", path, sha256_file(path), "checkpoint_path")
    elif isinstance(choice, str) and os.path.isfile(os.path.expanduser(choice)):
        path = os.path.abspath(os.path.expanduser(choice))
        load, weights = path, WeightsInfo(name, "file", path, sha256_file(path), "pretrained=<file>")
    elif name == "clip_tiny_synth" and choice in (None, True):
        path = zoo.CLIP_TINY_SYNTH_FILE
        if not os.path.isfile(path):
            raise zoo.missing_weights(path, "clip_tiny_synth")
        load, weights = path, WeightsInfo(name, "shipped", path, sha256_file(path), "shipped with clfast")
    elif choice is False:
        weights = WeightsInfo(name, "random", note=f"pretrained={pretrained!r}: randomly initialised")
        logger.warning("create_clip: %s is randomly initialised (pretrained=%r)", name, pretrained)
    elif choice is None or choice is True:
        loud_warning(f"create_clip: no pretrained tag given for {name!r}, so it is RANDOMLY INITIALISED. Pass "
              f"pretrained=<tag> (one of: {', '.join(tags) or 'none known'}), checkpoint_path=<file>, or "
              f"pretrained='none' to ask for random weights.")
        weights = WeightsInfo(name, "random", note="no pretrained tag given; randomly initialised")
    else:
        tag_cfg = open_clip.get_pretrained_cfg(name, choice)
        if not tag_cfg:
            raise ValueError(f"create_clip: {name!r} has no pretrained tag {choice!r} and no such file exists; "
                             f"known tags: {', '.join(tags) or 'none'}." + close_matches(choice, tags))
        load, weights = _clip_from_hub(open_clip, name, choice, tag_cfg)
    if load is None:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, device=device)
    else:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=load, device=device)
    model.eval()
    fuse_self_attention(model)
    tokenizer = zoo.clip_tiny_synth_tokenizer() if name == "clip_tiny_synth" else open_clip.get_tokenizer(name)
    logger.info("create_clip: %s", weights)
    return model, preprocess, tokenizer, weights


def _clip_from_hub(open_clip, name: str, tag: str, tag_cfg: dict) -> tuple[Optional[str], WeightsInfo]:
    """(what to pass as open_clip's ``pretrained``, WeightsInfo) for a tag; random if it cannot be had."""
    full = f"{name}:{tag}"
    where = f"hf-hub:{tag_cfg['hf_hub']}" if tag_cfg.get("hf_hub") else tag_cfg.get("url", "")
    cached = _clip_cached(tag_cfg)
    if cached:
        # Passing the tag (not the path) keeps the tag's preprocessing; open_clip finds the cached file.
        return tag, WeightsInfo(full, "hub", cached, sha256_file(cached), f"{where} (local cache)")
    if hub_offline():
        reason = f"HF_HUB_OFFLINE is set and {where} is not in the local cache"
    else:
        try:
            path = open_clip.download_pretrained(tag_cfg)
        except OSError as e:
            reason = f"download from {where} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        else:
            return tag, WeightsInfo(full, "hub", path, sha256_file(path) if path else None, where)
    loud_warning(depth=2, msg=f"create_clip: pretrained weights {full!r} are missing ({reason}). The model is RANDOMLY "
          f"INITIALISED. "
          f"Fetch {where} where there is network and pass create_clip({name!r}, checkpoint_path='/path/to/file'), "
          f"or fill the Hugging Face cache and set HF_HUB_OFFLINE=1.")
    return None, WeightsInfo(full, "random", note=f"pretrained weights missing: {reason}")
