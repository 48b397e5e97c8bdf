"""Where a backbone's weights come from: provenance for the run record, and the helpers every loader
shares (the spellings of "random" and "default" weights, local hub caches, offline mode, loud warnings).

Pretrained weights that cannot be had (offline, nothing cached) give a randomly initialised model with a
loud warning that says which file is missing and how to pass it with ``checkpoint_path=``;
``HF_HUB_OFFLINE=1`` is honoured even when set after import.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import warnings
from typing import Iterable, Optional, Union
from urllib.parse import urlparse

__all__ = ["WeightsInfo", "logger", "SOURCES", "hub_offline", "pretrained_choice", "check_file", "hf_cached", "url_cached",
           "safe_first", "close_matches", "loud_warning", "first_keys"]

logger = logging.getLogger("clfast.backbones")

SOURCES = ("shipped", "hub", "file", "random", "unknown")
_RANDOM_WORDS = ("none", "random", "false", "scratch")
_PRETRAINED_WORDS = ("true", "default", "hub")


@dataclasses.dataclass(frozen=True)
class WeightsInfo:
    """Where a backbone's weights came from, for the run record.

    Attributes:
        name: the model name with its weight tag, e.g. ``"vit_base_patch16_224.augreg_in21k"`` (timm) or
            ``"ViT-B-16:openai"`` (open_clip).
        source: ``"shipped"`` (a file inside clfast), ``"hub"`` (downloaded or found in the hub cache),
            ``"file"`` (a local file given by the user), ``"random"`` (random initialisation) or
            ``"unknown"`` (a model handed to :class:`ViTBackbone` directly).
        path: the file the weights were read from, or None.
        sha256: hex digest of that file, or None.
        note: free text: why the weights are random, where they were downloaded from, ...
    """

    name: str
    source: str
    path: Optional[str] = None
    sha256: Optional[str] = None
    note: str = ""

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"WeightsInfo: source must be one of {SOURCES}, got {self.source!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Small helpers shared by the ViT and CLIP loaders


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set now or was set when
    huggingface_hub was imported (it reads the variable only once)."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if env.strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub comes with timm
        return False
    return bool(constants.HF_HUB_OFFLINE)


def safe_first(filename: str) -> list[str]:
    """The names a hub download tries for ``filename``, safetensors first (as timm and open_clip do)."""
    if filename == "pytorch_model.bin":
        return ["model.safetensors", filename]
    if filename == "open_clip_pytorch_model.bin":
        return ["open_clip_model.safetensors", filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def hf_cached(repo_id: str, filenames: Iterable[str]) -> Optional[str]:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    repo_id, _, revision = repo_id.partition("@")
    for filename in filenames:
        path = try_to_load_from_cache(repo_id, filename, revision=revision or None)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def url_cached(url: str, cache_dir: str) -> Optional[str]:
    path = os.path.join(cache_dir, os.path.basename(urlparse(url).path))
    return path if url and os.path.isfile(path) else None


def pretrained_choice(pretrained: Union[bool, str, None], fn: str) -> Union[bool, str, None]:
    """Map the spellings of "random" to False and of "the default weights" to True."""
    if isinstance(pretrained, str):
        word = pretrained.strip().lower()
        if word in _RANDOM_WORDS or word == "":
            return False
        if word in _PRETRAINED_WORDS:
            return True
    elif not (pretrained is None or isinstance(pretrained, bool)):
        raise TypeError(f"{fn}: pretrained must be a bool or a str, got {type(pretrained).__name__}")
    return pretrained


def close_matches(name: str, candidates: Iterable[str], n: int = 5) -> str:
    matches = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)
    return f" Did you mean: {', '.join(matches)}?" if matches else ""


def loud_warning(msg: str, depth: int = 1) -> None:
    """Log and warn; ``depth`` = how many clfast frames lie between the caller's code and this function's caller."""
    logger.warning(msg)
    warnings.warn(msg, UserWarning, stacklevel=2 + depth)


def first_keys(keys: list[str], n: int = 8) -> str:
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_file(path: str, fn: str) -> str:
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{fn}: checkpoint_path {path!r} does not exist")
    return path
