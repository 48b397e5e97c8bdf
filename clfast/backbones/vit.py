"""Frozen pretrained timm ViTs with prompt-aware attention.

    backbone = create_vit("vit_base_patch16_224.augreg_in21k")            # hub (or its local cache)
    backbone = create_vit("vit_base_patch16_224.augreg_in21k", checkpoint_path="ViT-B_16.npz")
    tokens = backbone(images, prompt_tokens=p)                           # (B, N + L, C), images in [0, 1]
    feats = backbone.features(images, prefixes={0: (pk, pv), 1: (pk1, pv1)})   # (B, C)

The timm ``VisionTransformer`` is used as built by ``timm.create_model``; the only change is that each
block's ``attn`` becomes a :class:`~clfast.ops.PromptedAttention` holding the same weights, so the
state dict keeps timm's key names and any timm ViT name (with its weight tag) works.

Where the weights come from is recorded in a :class:`~clfast.backbones.weights.WeightsInfo` (name with
tag, source, file, sha256) for the run record (see :mod:`clfast.backbones.weights` for the offline rules).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import timm
import timm.data
from timm.models import load_checkpoint, load_state_dict
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from clfast.ops.attention import PromptContext, PromptedAttention

from ..utils.files import sha256_file
from . import zoo
from .weights import (WeightsInfo, check_file, close_matches, first_keys, hf_cached, hub_offline, logger, loud_warning,
                      pretrained_choice, safe_first, url_cached)

__all__ = ["ViTBackbone", "create_vit", "WeightsInfo", "hub_offline"]

_HEAD_KEYS = ("head.", "head_dist.")


# --------------------------------------------------------------------------------------------------
# timm ViT


def _resolve_vit_name(name: str) -> tuple[str, dict]:
    """``name`` → (``arch.tag``, timm's pretrained config as a dict); ValueError with close matches."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"create_vit: name must be a timm model name such as "
                        f"'vit_base_patch16_224.augreg_in21k', got {name!r}")
    arch, tag = timm.models.split_model_name_tag(name)
    if not timm.is_model(arch):
        raise ValueError(f"create_vit: unknown timm model {name!r}."
                         + close_matches(name, timm.list_models(pretrained=True) + timm.list_models()))
    tags = timm.list_pretrained(f"{arch}.*")
    if tag and f"{arch}.{tag}" not in tags:
        raise ValueError(f"create_vit: {arch!r} has no weight tag {tag!r}; known tags: "
                         f"{', '.join(tags) or 'none'}." + close_matches(name, tags))
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:  # an architecture without any pretrained config
        return arch, {}
    cfg = cfg.to_dict()
    full = f"{cfg.get('architecture') or arch}.{cfg['tag']}" if cfg.get("tag") else arch
    return full, cfg


def _hub_location(cfg: dict) -> str:
    if cfg.get("hf_hub_id"):
        return f"hf-hub:{cfg['hf_hub_id']}"
    return cfg.get("url") or ""


def _vit_hub_cached(cfg: dict) -> Optional[str]:
    """The file timm would load for ``cfg`` if it is already in the HF or torch.hub cache."""
    if cfg.get("hf_hub_id"):
        names = safe_first(cfg.get("hf_hub_filename") or "pytorch_model.bin")
        path = hf_cached(cfg["hf_hub_id"], names)
        if path:
            return path
    if cfg.get("url"):
        return url_cached(cfg["url"], os.path.join(torch.hub.get_dir(), "checkpoints"))
    return None


def _missing_weights(name: str, cfg: dict, reason: str) -> str:
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        fetch = (f"`huggingface-cli download {hub_id.split('@')[0]} "
                 f"{safe_first(cfg.get('hf_hub_filename') or 'pytorch_model.bin')[0]}`")
    elif cfg.get("url"):
        fetch = cfg["url"]
    else:
        fetch = "a checkpoint of this architecture"
    return (f"create_vit: pretrained weights for {name!r} are missing ({reason}). The backbone is RANDOMLY "
            f"INITIALISED, so results will not be those of pretrained weights. Fetch {fetch} where there is "
            f"network and pass create_vit({name!r}, checkpoint_path='/path/to/the/file') (.safetensors, .pth, "
            f".bin or big_vision .npz), or fill the Hugging Face cache and set HF_HUB_OFFLINE=1.")


def _strip_common_prefix(sd: dict, prefixes=("module.", "backbone.", "vit.")) -> dict:
    """Unwrap DDP / ViTBackbone / ``backbone.`` state dicts (every key sharing the prefix)."""
    changed = True
    while changed and sd:
        changed = False
        for p in prefixes:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


def _load_vit_file(model: VisionTransformer, path: str, name: str) -> None:
    """Load a local checkpoint into ``model`` (built with ``num_classes=0``) through timm's loaders.

    ``.npz``/``.npy`` (big_vision / augreg) go to timm's ``load_checkpoint`` → ``model.load_pretrained``;
    anything else (``.safetensors``, ``.pth``, ``.pt``, ``.bin``, dicts wrapping ``state_dict`` or ``model``)
    is read by timm's ``load_state_dict``, converted by the ViT ``checkpoint_filter_fn`` (resamples position
    embeddings, converts OpenAI-CLIP/DINOv2 layouts) and loaded strictly, classifier keys excepted.
    """
    if os.path.splitext(path)[1].lower() in (".npz", ".npy"):
        try:
            load_checkpoint(model, path)
        except (KeyError, ValueError) as e:
            raise ValueError(f"create_vit: weights file {path!r} is not a big_vision/augreg .npz that fits "
                             f"{name!r}: {e}") from e
        return
    try:
        sd = load_state_dict(path)
    except Exception as e:
        raise ValueError(f"create_vit: could not read weights file {path!r} "
                         f"({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"create_vit: weights file {path!r} must hold a state dict of tensors (optionally "
                         f"under 'state_dict' or 'model'), got {type(sd).__name__}")
    sd = checkpoint_filter_fn(_strip_common_prefix(sd), model)
    if model.num_classes == 0:  # the backbone has no classifier: a checkpoint's head is not ours to load
        sd = {k: v for k, v in sd.items() if not k.startswith(_HEAD_KEYS)}
    own = model.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    mismatched = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(sd) if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = [f"missing keys [{first_keys(missing)}]" if missing else "",
                 f"unexpected keys [{first_keys(unexpected)}]" if unexpected else "",
                 f"shape mismatches [{first_keys(mismatched)}]" if mismatched else ""]
        raise ValueError(f"create_vit: weights file {path!r} does not fit {name!r}: "
                         + "; ".join(p for p in parts if p))
    model.load_state_dict(sd, strict=True)


def create_vit(name: str, *, pretrained: Union[bool, str] = True, checkpoint_path: Optional[str] = None,
               prompt_layers: Union[str, int, Iterable[int], None] = "all", img_size=None,
               drop_path_rate: float = 0.0, train_backbone: bool = False) -> "ViTBackbone":
    """Build a timm ViT by name, load its weights, and wrap it as a promptable, frozen :class:`ViTBackbone`.

    Weights, in this order:

    1. ``checkpoint_path``: that local file (``.npz`` from big_vision/augreg, ``.safetensors``,
       ``.pth``/``.pt``/``.bin``, possibly wrapping a ``state_dict``/``model`` key); source ``"file"``.
    2. ``pretrained`` true: the model's registered local file (``vit_tiny_synth``: source ``"shipped"``), else
       the hub: the cached file if there is one, else a download unless ``HF_HUB_OFFLINE`` is set (source
       ``"hub"``). If that fails, random initialisation with a loud warning (source ``"random"``).
    3. ``pretrained`` false or ``"none"``: random initialisation (source ``"random"``).

    The classifier is dropped (``num_classes=0``); the weight tag still selects the normalisation.

    Args:
        name: a timm ViT name, best with its weight tag, e.g. ``"vit_base_patch16_224.augreg_in21k"``,
            ``"vit_base_patch16_224.augreg2_in21k_ft_in1k"``, ``"vit_base_patch16_224.orig_in21k"``,
            ``"vit_tiny_synth"``. Without a tag timm's default tag is used (and recorded).
        pretrained: True / ``"default"`` for the tag's weights; False / ``"none"`` for random weights.
        checkpoint_path: a local weights file; overrides ``pretrained``.
        prompt_layers: blocks whose attention takes prefixes: ``"all"``, None / ``"none"``, an int or ints.
        img_size: input resolution if not the tag's (position embeddings are resampled on load).
        drop_path_rate: stochastic depth, only active with ``train_backbone=True`` in train mode.
        train_backbone: leave the ViT trainable (and following ``.train()``) instead of frozen in eval mode.

    Returns:
        A :class:`ViTBackbone`; ``.weights`` says where the weights came from.

    Raises:
        ValueError: unknown model name or tag (with close matches), a model that is not a timm
            ``VisionTransformer`` with a class token, or a checkpoint whose keys or shapes do not fit.
        FileNotFoundError: ``checkpoint_path`` does not exist.
    """
    full, cfg = _resolve_vit_name(name)
    choice = pretrained_choice(pretrained, "create_vit")
    if isinstance(choice, str):
        raise ValueError(f"create_vit: pretrained must be True, False, 'default' or 'none', got {pretrained!r}; "
                         f"pass a local file as checkpoint_path=")
    kwargs = dict(num_classes=0, drop_path_rate=drop_path_rate)
    if img_size is not None:
        kwargs["img_size"] = img_size

    probe = _meta_vit(name, kwargs)

    def build(load: bool) -> VisionTransformer:
        return timm.create_model(name, pretrained=load, **kwargs)

    def from_file(path: str) -> VisionTransformer:
        # A state dict that passes the strict key check below sets every tensor of the meta-built model,
        # so its random initialisation (seconds for a ViT-B) is skipped; .npz loading sets what it knows.
        npz = path.lower().endswith((".npz", ".npy"))
        persistent = set(probe.state_dict())
        model = probe.to_empty(device="cpu") if not npz and all(
            k in persistent for k, _ in probe.named_buffers()) else build(False)
        _load_vit_file(model, path, full)
        return model

    if checkpoint_path is not None:
        path = check_file(checkpoint_path, "create_vit")
        weights = WeightsInfo(full, "file", path, sha256_file(path), "checkpoint_path")
        model = from_file(path)
    elif not choice:
        model = build(False)
        weights = WeightsInfo(full, "random", note=f"pretrained={pretrained!r}: randomly initialised")
        logger.warning("create_vit: %s is randomly initialised (pretrained=%r)", full, pretrained)
    elif cfg.get("file"):  # registered with a local file: the shipped vit_tiny_synth
        path = os.path.abspath(cfg["file"])
        if not os.path.isfile(path):
            raise zoo.missing_weights(path, full)
        asset_dir = os.path.abspath(zoo.ASSET_DIR)
        shipped = os.path.commonpath([path, asset_dir]) == asset_dir
        weights = WeightsInfo(full, "shipped" if shipped else "file", path, sha256_file(path),
                              "shipped with clfast" if shipped else "registered local file")
        model = from_file(path)
    elif not (cfg.get("hf_hub_id") or cfg.get("url")):
        loud_warning(_missing_weights(full, cfg, "timm has no pretrained weights for this name"))
        model = build(False)
        weights = WeightsInfo(full, "random", note="timm lists no pretrained weights; randomly initialised")
    else:
        model, weights = _vit_from_hub(full, cfg, build, from_file)
    logger.info("create_vit: %s", weights)
    return ViTBackbone(model, weights=weights, prompt_layers=prompt_layers, train_backbone=train_backbone)


def vit_depth(name: str) -> int:
    """The number of blocks of the timm ViT ``name``, from a build on the meta device (no weights, no
    memory); ValueError for an unknown name or a model that is not a class-token ViT."""
    _resolve_vit_name(name)
    return len(_meta_vit(name, dict(num_classes=0)).blocks)


def _meta_vit(name: str, kwargs: dict) -> VisionTransformer:
    """The model built on the meta device (no memory, no init), checked to be a class-token ViT before
    anything is downloaded."""
    with torch.device("meta"):
        probe = timm.create_model(name, pretrained=False, **kwargs)
    if not isinstance(probe, VisionTransformer):
        raise ValueError(f"create_vit: name must be a timm VisionTransformer, {name!r} builds {type(probe).__name__}")
    if probe.cls_token is None or probe.global_pool != "token":
        raise ValueError(f"create_vit: name must be a ViT with a class token and global_pool='token' (prompt "
                         f"methods read the CLS token); {name!r} has class token {probe.cls_token is not None}, "
                         f"global_pool={probe.global_pool!r}")
    return probe


def _vit_from_hub(full: str, cfg: dict, build, from_file) -> tuple[VisionTransformer, WeightsInfo]:
    where = _hub_location(cfg)
    cached = _vit_hub_cached(cfg)
    if cached:  # read the cached file directly: no network, whatever HF_HUB_OFFLINE says
        return from_file(cached), WeightsInfo(full, "hub", cached, sha256_file(cached), f"{where} (local cache)")
    if hub_offline():
        reason = f"HF_HUB_OFFLINE is set and {where} is not in the local cache"
    else:
        try:
            model = build(True)
        except OSError as e:  # no network, no such file on the hub, ... (hub errors are OSErrors)
            reason = f"download from {where} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        else:
            path = _vit_hub_cached(cfg)
            return model, WeightsInfo(full, "hub", path, sha256_file(path) if path else None, where)
    loud_warning(_missing_weights(full, cfg, reason), depth=2)
    return build(False), WeightsInfo(full, "random", note=f"pretrained weights missing: {reason}")


def _resolve_layers(prompt_layers, depth: int) -> tuple[int, ...]:
    if prompt_layers is None or (isinstance(prompt_layers, str) and prompt_layers.lower() == "none"):
        return ()
    if isinstance(prompt_layers, str):
        if prompt_layers.lower() == "all":
            return tuple(range(depth))
        raise ValueError(f"prompt_layers must be 'all', 'none', an int or a sequence of ints, got {prompt_layers!r}")
    layers = (prompt_layers,) if isinstance(prompt_layers, int) else tuple(prompt_layers)
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth]
    if bad:
        raise ValueError(f"prompt_layers must be block indices in [0, {depth}), got {bad}")
    return tuple(sorted(set(layers)))


class ViTBackbone(nn.Module):
    """A timm ``VisionTransformer`` whose attention layers take prompt prefixes, frozen by default.

    Each prompted block's ``attn`` is replaced by a :class:`~clfast.ops.PromptedAttention` over the same
    weights; all of them share :attr:`context`. Without prompts the output equals timm's
    ``forward_features``. The parameters are frozen and the ViT stays in eval mode (no dropout or drop
    path) even when a parent module calls ``.train()``, unless ``train_backbone=True``.

    Args:
        vit: a timm ``VisionTransformer`` with a class token and ``global_pool="token"``.
        weights: where its weights came from (source ``"unknown"`` if None).
        prompt_layers: blocks to prompt: ``"all"``, None / ``"none"``, an int or ints.
        train_backbone: keep the ViT trainable and following ``.train()``.

    Attributes:
        vit, context, embed_dim (C), num_layers, num_heads (H), head_dim (d), num_prefix_tokens (class +
        register tokens), num_tokens (N: prefix tokens + patches entering every block, 197 for ViT-B/16 at
        224), prompt_layers, data_config (timm's: input_size, mean, std, interpolation, crop_pct,
        crop_mode), weights.
    """

    def __init__(self, vit: VisionTransformer, *, weights: Optional[WeightsInfo] = None,
                 prompt_layers: Union[str, int, Iterable[int], None] = "all", train_backbone: bool = False):
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"ViTBackbone: vit must be a timm VisionTransformer, got {type(vit).__name__}")
        if vit.cls_token is None or vit.global_pool != "token":
            raise ValueError(f"ViTBackbone: vit must have a class token and global_pool='token' (prompt methods "
                             f"read the CLS token), got class token {vit.cls_token is not None}, "
                             f"global_pool={vit.global_pool!r}")
        self.vit = vit
        self.context = PromptContext()
        self.prompt_layers = _resolve_layers(prompt_layers, len(vit.blocks))
        for i in self.prompt_layers:
            attn = vit.blocks[i].attn
            if isinstance(attn, PromptedAttention):
                attn.layer, attn.context = i, self.context
            else:
                vit.blocks[i].attn = PromptedAttention(attn, layer=i, context=self.context)
        attn0 = vit.blocks[0].attn
        self.embed_dim: int = vit.embed_dim
        self.num_layers: int = len(vit.blocks)
        self.num_heads: int = attn0.num_heads
        self.head_dim: int = attn0.head_dim
        self.num_prefix_tokens: int = vit.num_prefix_tokens
        self.num_tokens: int = int(vit.patch_embed.num_patches) + self.num_prefix_tokens
        cfg = dict(timm.data.resolve_model_data_config(vit))
        cfg["input_size"] = (3, *vit.patch_embed.img_size)  # the built size, also when img_size= changed it
        self.data_config: dict = cfg
        self.weights = weights or WeightsInfo(
            _model_name(vit), "unknown", note="model handed to ViTBackbone directly; origin not recorded")
        self.train_backbone = bool(train_backbone)
        self.grad_checkpointing = False
        self.vit.requires_grad_(self.train_backbone)
        self.register_buffer("mean", torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ViTBackbone":
        super().train(mode)
        if not self.train_backbone:
            self.vit.eval()  # frozen: no dropout / drop path, whatever the parent's mode
        return self

    def set_trainable(self, mode: bool = True) -> "ViTBackbone":
        """Train the ViT's weights (``requires_grad`` on, following ``.train()``: dropout and drop path
        when the model has them) or freeze them again; as ``train_backbone`` at construction."""
        self.train_backbone = bool(mode)
        self.vit.requires_grad_(self.train_backbone)
        return self.train(self.training)

    def set_grad_checkpointing(self, enable: bool = True) -> "ViTBackbone":
        """Recompute each block in the backward instead of keeping its activations (while grad is on).

        Saves most activation memory for about one extra forward. Each block's prefixes are arguments of
        its checkpointed call, so the recomputation sees the forward's prompts (the prompt context has
        been left by then). timm's own ``set_grad_checkpointing`` does not apply: :meth:`forward` runs the
        blocks itself.
        """
        self.grad_checkpointing = bool(enable)
        return self

    def normalize(self, images: Tensor) -> Tensor:
        """Normalise ``(B, 3, H, W)`` float images in [0, 1] with the weights' mean/std (``data_config``).

        Equivalent PyTorch::

            (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        """
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"ViTBackbone: images must have shape (B,3,H,W), got "
                             f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"ViTBackbone: images must be float in [0, 1], got {images.dtype} "
                            f"(divide uint8 images by 255)")
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def _insert_prompts(self, x: Tensor, prompt_tokens: Tensor) -> Tensor:
        B, _, C = x.shape
        p = prompt_tokens
        if p.dim() == 2:
            p = p.unsqueeze(0).expand(B, -1, -1)
        if p.dim() != 3 or p.shape[0] != B or p.shape[2] != C:
            raise ValueError(f"ViTBackbone: prompt_tokens must have shape (B,L,C) = ({B},L,{C}) or (L,C) = "
                             f"(L,{C}), got {tuple(prompt_tokens.shape)}")
        n = self.num_prefix_tokens
        return torch.cat([x[:, :n], p.to(x.dtype), x[:, n:]], dim=1)

    def _check_prefixes(self, prefixes) -> dict:
        if prefixes is None:
            return {}
        if not isinstance(prefixes, dict):
            raise TypeError(f"ViTBackbone: prefixes must be a dict layer -> (prefix_k, prefix_v), "
                            f"got {type(prefixes).__name__}")
        bad = [k for k in prefixes if k not in self.prompt_layers]
        if bad:
            raise ValueError(f"ViTBackbone: prefixes given for layers {bad}, which are not prompted "
                             f"(prompt_layers={self.prompt_layers})")
        for k, v in prefixes.items():
            if not (isinstance(v, (tuple, list)) and len(v) == 2):
                raise ValueError(f"ViTBackbone: prefixes[{k}] must be a pair (prefix_k, prefix_v)")
        return prefixes

    def forward(self, images: Tensor, *, prompt_tokens: Optional[Tensor] = None,
                prefixes: Optional[dict] = None, normalized: bool = False,
                block_fn: Optional[Callable[[int, Tensor], Any]] = None,
                site_fns: Optional[dict] = None) -> Tensor:
        """The final-norm token sequence, with optional prompt tokens and prefixes.

        Args:
            images: ``(B, 3, H, W)`` float in [0, 1] (or already normalised, with ``normalized=True``).
            prompt_tokens: L2P/VPT-style tokens ``(B, L, C)`` or shared ``(L, C)``, inserted after the
                class/register tokens once position embeddings have been added (prompts get none).
            prefixes: DualPrompt/CODA-style prefix tuning: ``{layer: (prefix_k, prefix_v)}``, each
                ``(B, P, C)`` / ``(P, C)`` or head-split ``(B, H, P, d)`` / ``(H, P, d)`` (see
                :class:`~clfast.ops.PromptContext`). Layers must be in ``prompt_layers``.
            normalized: ``images`` are already normalised.
            block_fn: prefixes that depend on the hidden state: ``block_fn(layer, x)`` is called with the
                ``(B, N', C)`` tokens entering each block and returns that block's ``(prefix_k, prefix_v)``
                or None (GPLS-style prompts, queries from a block's input). A layer may not get a
                prefix both here and in ``prefixes``.
            site_fns: ``{"attn_out": f, "mlp_out": g}``, each ``f(layer, out) -> out`` applied to the
                attention / MLP branch output of every block before its residual add (adapters).
                Needs timm's ``Block`` layout (norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2).

            All of these are recomputed correctly under :meth:`set_grad_checkpointing` (the prefix of
            each block is an argument of its checkpointed call; ``site_fns`` run inside it).

        Returns:
            ``(B, N + L, C)`` tokens: class/register tokens, the L prompts, then the patches.

        Equivalent timm (no prompts)::

            vit.forward_features(normalize(images))
        """
        vit = self.vit
        x = images if normalized else self.normalize(images)
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        if prompt_tokens is not None:
            x = self._insert_prompts(x, prompt_tokens)
        x = vit.norm_pre(x)
        prefixes = self._check_prefixes(prefixes)
        sites = self._check_sites(site_fns)
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        if block_fn is None and not sites and not ckpt:
            with self.context.prompts(prefixes):
                x = vit.blocks(x)
            return vit.norm(x)
        for i, block in enumerate(vit.blocks):
            prefix = prefixes.get(i)
            if block_fn is not None:
                dynamic = block_fn(i, x)
                if dynamic is not None:
                    if prefix is not None:
                        raise ValueError(f"ViTBackbone: layer {i} got a prefix from both prefixes and block_fn")
                    prefix = self._check_prefixes({i: dynamic})[i]
            if ckpt:
                x = checkpoint(self._prompted_block, block, i, x, prefix, sites, use_reentrant=False)
            else:
                x = self._prompted_block(block, i, x, prefix, sites)
        return vit.norm(x)

    _SITES = ("attn_out", "mlp_out")
    _BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")

    def _check_sites(self, site_fns) -> dict:
        if not site_fns:
            return {}
        if not isinstance(site_fns, dict):
            raise TypeError(f"ViTBackbone: site_fns must be a dict site -> fn(layer, out), got {type(site_fns).__name__}")
        bad = [k for k in site_fns if k not in self._SITES]
        if bad:
            raise ValueError(f"ViTBackbone: unknown site_fns {bad}; sites are {list(self._SITES)}")
        block = self.vit.blocks[0]
        missing = [p for p in self._BLOCK_PARTS if not hasattr(block, p)]
        if missing:
            raise TypeError(f"ViTBackbone: site_fns need timm's Block layout; {type(block).__name__} lacks {missing}")
        return dict(site_fns)

    def _prompted_block(self, block: nn.Module, layer: int, x: Tensor, prefix, sites=None) -> Tensor:
        with self.context.prompts({} if prefix is None else {layer: prefix}):
            if not sites:
                return block(x)
            a = block.attn(block.norm1(x))
            if "attn_out" in sites:
                a = sites["attn_out"](layer, a)
            x = x + block.drop_path1(block.ls1(a))
            m = block.mlp(block.norm2(x))
            if "mlp_out" in sites:
                m = sites["mlp_out"](layer, m)
            return x + block.drop_path2(block.ls2(m))

    def prompt_kv(self, layer: int, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens → the key/value prefix they would give block ``layer`` if they were inserted into its input.

        Inserting ``P`` tokens into a block's input sequence and dropping their rows after the block (GPLS,
        DAP, VPT-deep) changes the real rows' outputs only through the keys and values the tokens add to
        the attention: the block has no positional embedding and attention ignores the order of keys. So
        the real rows' outputs equal those of prefix attention with the prefix returned here, and only the
        real rows need computing (``forward(..., block_fn=...)`` returning this pair).

        Args:
            layer: the block index.
            tokens: ``(B, P, C)`` per-sample tokens or ``(P, C)`` shared ones, in model width C.

        Returns:
            ``(prefix_k, prefix_v)``, each ``(B, H, P, d)`` (or ``(H, P, d)`` for shared tokens): the block's
            LayerNorm ``norm1``, then the key and value slices of its ``qkv`` projection (with bias), split
            into heads, and the attention's ``k_norm`` on the keys (identity in plain ViTs), as the inserted
            tokens would get. Differentiable w.r.t. ``tokens``.

        Equivalent PyTorch (timm ``Attention``, ``A = H·d``)::

            y = block.norm1(tokens)
            k = y @ W_qkv[A:2A].T + b_qkv[A:2A]          # (B, P, A) -> (B, H, P, d)
            v = y @ W_qkv[2A:].T + b_qkv[2A:]
        """
        if not 0 <= int(layer) < self.num_layers:
            raise ValueError(f"ViTBackbone.prompt_kv: layer must be in [0, {self.num_layers}), got {layer}")
        if not isinstance(tokens, Tensor) or tokens.dim() not in (2, 3) or tokens.shape[-1] != self.embed_dim:
            raise ValueError(f"ViTBackbone.prompt_kv: tokens must have shape (B,P,C) or (P,C) with C = "
                             f"{self.embed_dim}, got {tuple(tokens.shape) if isinstance(tokens, Tensor) else tokens!r}")
        block = self.vit.blocks[int(layer)]
        attn = block.attn
        H, d = attn.num_heads, attn.head_dim
        A = H * d
        shared = tokens.dim() == 2
        y = block.norm1(tokens.unsqueeze(0) if shared else tokens)              # (B, P, C)
        w, b = attn.qkv.weight, attn.qkv.bias
        kv = torch.nn.functional.linear(y, w[A:], None if b is None else b[A:])  # (B, P, 2A)
        B, P = kv.shape[:2]
        k, v = kv.reshape(B, P, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)      # (B, H, P, d) each
        k = getattr(attn, "k_norm", torch.nn.Identity())(k)
        return (k[0], v[0]) if shared else (k, v)

    def cls(self, tokens: Tensor) -> Tensor:
        """``(B, N', C)`` tokens → ``(B, C)`` class token (index 0)."""
        if tokens.dim() != 3:
            raise ValueError(f"ViTBackbone.cls: tokens must have shape (B,N,C), got {tuple(tokens.shape)}")
        return tokens[:, 0]

    def features(self, images: Tensor, **kwargs) -> Tensor:
        """``(B, C)`` class token after the final norm; ``kwargs`` as for :meth:`forward`.

        Equivalent timm (no prompts)::

            vit.forward_head(vit.forward_features(normalize(images)), pre_logits=True)
        """
        return self.vit.fc_norm(self.cls(self(images, **kwargs)))

    def query(self, images: Tensor, *, normalized: bool = False) -> Tensor:
        """``(B, C)`` unprompted features without gradients: the L2P/DualPrompt query."""
        with torch.no_grad():
            return self.features(images, normalized=normalized)


def _model_name(vit: nn.Module) -> str:
    cfg = getattr(vit, "pretrained_cfg", None) or {}
    arch, tag = cfg.get("architecture") or type(vit).__name__, cfg.get("tag")
    return f"{arch}.{tag}" if tag else arch


# --------------------------------------------------------------------------------------------------
# open_clip CLIP
