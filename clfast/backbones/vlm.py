"""The clfast VLM of CluMo and ATLAS: frozen open_clip towers with token outputs, a fusion encoder whose
cross-attention memory takes a prompt prefix, and an answer head over a closed answer vocabulary
(methods/clumo.md §2, "clfast VLM").

    vlm = create_vlm("clip_tiny_synth", answers=["red", "blue", ...])     # towers frozen, fusion + head trainable
    enc = vlm.encode(images, tokens)             # frozen towers, no grad: image tokens, text tokens, mask, EOT
    h = vlm.fuse(enc, prefix=pi)                 # (B, width) fused state at the text EOT; pi (B, P, width)
    logits = vlm.head(h)                         # (B, n_A)

Pieces, each usable alone:

- :class:`CLIPTokenTowers`: any open_clip ``CLIP`` / ``CustomTextCLIP`` with a ``VisionTransformer`` image tower
  and an open_clip text transformer: image tokens after ``ln_post`` (class token first, before ``proj``),
  text tokens after ``ln_final`` with their padding mask and EOT position, the text input embeddings (token +
  position, CluMo's textual key), ``image_size`` to resample the position embeddings (ViT-B-16 at 384 px).
- :func:`pool_tokens`: the one masked mean/max pooling every caller uses (CluMo's keys).
- :class:`FusionEncoder` of :class:`FusionLayer` s (pre-LN: padding-masked self-attention over the text,
  cross-attention from the text to the image tokens, MLP), each attention a :class:`PromptedCrossAttention`
  that projects a prefix Π with its own K/V weights and runs :func:`clfast.ops.prefix_attention`. Adapter
  sites ``site_fns={"attn_out": f, "mlp_out": g}`` as on :class:`~clfast.backbones.ViTBackbone` (ATLAS).
- :class:`AnswerHead`: ``Linear → LN → GELU → Linear`` over the answers, or ``mode="rank"``: ⟨W h, e_a⟩ with
  e_a the text tower's embedding of each answer.

The VLM's state dict carries what a checkpoint of it must agree on: ``config_json`` (the architecture and the
towers' weights as UTF-8 JSON bytes) and ``answer_digests`` (a digest per answer string, in order).
:func:`load_vlm_checkpoint` loads the fusion encoder and head of a finished run (``vlm_finetune``'s) into a VLM,
checking both, the shapes and the file's content hash (the engine's reader, :mod:`clfast.utils.checkpoint_file`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clfast.ops import fuse_self_attention, prefix_attention
from clfast.utils.checkpoint_file import latest_task_checkpoint, read_checkpoint, tensor_digest
from clfast.utils.files import sha256_file

from .clip_text import text_tower as _find_text_tower
from .weights import WeightsInfo
from .zoo import OPENAI_MEAN, OPENAI_STD

__all__ = ["CLIPTokenTowers", "pool_tokens", "PromptedCrossAttention", "FusionLayer", "FusionEncoder",
           "AnswerHead", "VLM", "Encoded", "create_vlm", "fusion_defaults", "answer_digests", "load_vlm_checkpoint",
           "load_vlm_state", "ANSWER_MODES", "POOL_MODES", "ARCH_KEYS"]

POOL_MODES = ("mean", "max")
ANSWER_MODES = ("classify", "rank")
SITES = ("attn_out", "mlp_out")
DIGEST_BYTES = 16


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


# --------------------------------------------------------------------------------------------------
# Pooling


def pool_tokens(x: Tensor, mask: Optional[Tensor] = None, mode: str = "mean") -> Tensor:
    """Pool ``(B, N, D)`` tokens over the tokens where ``mask`` is True (CluMo's key embeddings, §2).

    Args:
        x: ``(B, N, D)`` float tokens; padding positions may hold anything (NaN too).
        mask: ``(B, N)`` bool, True = a real token; None pools every token.
        mode: ``"mean"`` or ``"max"`` (per channel).

    Returns:
        ``(B, D)``; a row without real tokens gives zeros. Invariant to the padding length.

    Equivalent PyTorch (rows with at least one real token)::

        torch.stack([x[b, mask[b]].mean(0) for b in range(B)])        # or .amax(0)
    """
    if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"pool_tokens: x must be a float tensor (B,N,D), got {_shape(x)}")
    if mode not in POOL_MODES:
        raise ValueError(f"pool_tokens: mode must be one of {POOL_MODES}, got {mode!r}")
    if mask is None:
        return x.mean(1) if mode == "mean" else x.amax(1)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"pool_tokens: mask must be a bool tensor (B,N) = {tuple(x.shape[:2])}, got "
                         f"{_shape(mask)}{'' if not isinstance(mask, Tensor) else ' of ' + str(mask.dtype)}")
    keep = mask[:, :, None]
    if mode == "mean":
        total = x.masked_fill(~keep, 0.0).sum(1)
        return total / mask.sum(1, keepdim=True).clamp(min=1).to(x.dtype)
    out = x.masked_fill(~keep, float("-inf")).amax(1)
    return out.masked_fill(~mask.any(1, keepdim=True), 0.0)


# --------------------------------------------------------------------------------------------------
# Frozen towers


class CLIPTokenTowers(nn.Module):
    """The frozen image and text towers of an open_clip model, returning tokens instead of pooled embeddings.

    Args:
        clip_model: an open_clip ``CLIP`` or ``CustomTextCLIP`` whose ``visual`` is open_clip's
            ``VisionTransformer`` (no attentional pooler) and whose text tower is open_clip's (``CLIP``'s own
            or a ``TextTransformer``, without a CoCa class token). Frozen (``requires_grad=False``) and kept in
            eval mode here, whatever a parent's ``.train()``; its ``nn.MultiheadAttention`` modules run the fused
            op (:func:`clfast.ops.fuse_self_attention`, in place: same weights and keys, ~20x faster in bf16).
        image_size: run the image tower at this size (int, square): the grid of position embeddings is
            resampled with open_clip's ``resize_pos_embed`` (bicubic; class token kept) and the model's
            ``image_size``/``grid_size``/preprocess size updated. None keeps the model's size.

    Attributes:
        clip, image_width (D_v), text_width (D_w), embed_dim (D_e, ``encode_text`` output), context_length,
        image_size (H, W), grid_size, num_image_tokens (1 + grid cells), mean/std (the model's normalisation).
    """

    def __init__(self, clip_model: nn.Module, image_size: Optional[int] = None):
        super().__init__()
        import open_clip.transformer as oct

        visual = getattr(clip_model, "visual", None)
        if not isinstance(visual, oct.VisionTransformer):
            raise TypeError(f"CLIPTokenTowers: clip_model.visual must be open_clip's VisionTransformer, got "
                            f"{type(visual).__name__} (model {type(clip_model).__name__})")
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError("CLIPTokenTowers: image towers with an attentional pooler (CoCa) are not supported")
        try:
            text = _find_text_tower(clip_model)
        except TypeError:
            text = None
        if text is None or not hasattr(text, "ln_final") or not hasattr(text, "transformer"):
            tt = getattr(clip_model, "text", None)
            raise TypeError(f"CLIPTokenTowers: the text tower must be open_clip's (CLIP's own or a TextTransformer), "
                            f"got {type(tt if tt is not None else clip_model).__name__}")
        if getattr(text, "cls_emb", None) is not None:
            raise ValueError("CLIPTokenTowers: text towers with an appended class token (CoCa) are not supported")
        if getattr(text, "use_pad_mask", False):
            raise ValueError("CLIPTokenTowers: bidirectional text towers with a pad mask are not supported")
        self.clip = clip_model.requires_grad_(False).eval()
        fuse_self_attention(self.clip)   # the towers' attention on the fused op (fast under bf16 autocast)
        self.image_width = int(visual.conv1.out_channels)
        self.text_width = int(text.token_embedding.embedding_dim)
        self.context_length = int(text.context_length)
        proj = text.text_projection
        self.embed_dim = (self.text_width if proj is None else proj.out_features if isinstance(proj, nn.Linear)
                          else int(proj.shape[-1]))
        if image_size is not None:
            self._resize(image_size)
        from open_clip.model import get_model_preprocess_cfg

        pp = get_model_preprocess_cfg(clip_model)
        self.mean_std = (tuple(float(m) for m in pp.get("mean", OPENAI_MEAN)),
                         tuple(float(s) for s in pp.get("std", OPENAI_STD)))
        self.register_buffer("mean", torch.tensor(self.mean_std[0], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(self.mean_std[1], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.interpolation = str(pp.get("interpolation", "bicubic"))

    # properties of the (possibly resized) image tower
    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def text(self) -> nn.Module:
        return _find_text_tower(self.clip)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.visual.image_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.visual.grid_size)

    @property
    def num_image_tokens(self) -> int:
        return 1 + self.grid_size[0] * self.grid_size[1]

    def _resize(self, image_size) -> None:
        from open_clip.model import resize_pos_embed

        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"CLIPTokenTowers: image_size must be a positive int or None, got {image_size!r}")
        v = self.visual
        ph, pw = (int(s) for s in v.patch_size)
        if image_size % ph or image_size % pw:
            raise ValueError(f"CLIPTokenTowers: image_size {image_size} must be a multiple of the patch size "
                             f"{(ph, pw)}")
        grid = (image_size // ph, image_size // pw)
        if grid == tuple(v.grid_size):
            return
        if tuple(v.grid_size)[0] != tuple(v.grid_size)[1]:
            raise ValueError(f"CLIPTokenTowers: resizing needs a square grid, the model has {tuple(v.grid_size)}")
        state = {"visual.positional_embedding": v.positional_embedding.detach()}
        old = (v.image_size, v.grid_size)
        v.image_size, v.grid_size = (image_size, image_size), grid
        try:
            resize_pos_embed(state, self.clip)
        except Exception:
            v.image_size, v.grid_size = old
            raise
        v.positional_embedding = nn.Parameter(state["visual.positional_embedding"].contiguous(), requires_grad=False)
        pp = getattr(v, "preprocess_cfg", None)
        if isinstance(pp, dict):
            pp["size"] = (image_size, image_size)

    def train(self, mode: bool = True) -> "CLIPTokenTowers":
        super().train(mode)
        self.clip.eval()   # frozen: no dropout whatever the parent's mode
        return self

    def normalize(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` float images in [0, 1] → normalised with the model's mean/std."""
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIPTokenTowers: images must have shape (B,3,H,W), got {_shape(images)}")
        if not images.is_floating_point():
            raise TypeError(f"CLIPTokenTowers: images must be float in [0, 1], got {images.dtype}")
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    @torch.no_grad()
    def image_tokens(self, images: Tensor, *, normalized: bool = False) -> Tensor:
        """``(B, 3, H, W)`` images in [0, 1] → ``(B, 1 + N, D_v)`` tokens after ``ln_post``, before ``proj``.

        Token 0 is the class token. ``H, W`` must equal :attr:`image_size`.

        Equivalent open_clip (``final_ln_after_pool=False``, ``pool_type='tok'``)::

            visual.output_tokens = True
            pooled, patches = visual(normalize(images))          # pooled = ln_post(x)[:, 0] @ proj
        """
        x = images if normalized else self.normalize(images)
        if tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(f"CLIPTokenTowers: images must be {self.image_size[0]}x{self.image_size[1]} (the image "
                             f"tower's size; image_size= resizes it), got {tuple(x.shape[-2:])}")
        v = self.visual
        x = v.conv1(x.to(v.conv1.weight.dtype) if not torch.is_autocast_enabled() else x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        x = v.ln_pre(x)
        x = v.transformer(x)
        return v.ln_post(x)

    def _check_tokens(self, tokens: Tensor) -> None:
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"CLIPTokenTowers: tokens must be an int64 tensor (B,L), got {_shape(tokens)}"
                             + (f" of {tokens.dtype}" if isinstance(tokens, Tensor) else ""))
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"CLIPTokenTowers: tokens have {tokens.shape[1]} positions, more than the text tower's "
                             f"context length {self.context_length}")

    @staticmethod
    def padding_mask(tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, L)`` tokens → (mask ``(B, L)`` bool, True up to and including EOT; EOT position ``(B,)``).

        EOT is the largest id of each row (open_clip's BPE and clfast's WordTokenizer), padding is 0.
        """
        eot = tokens.argmax(-1)
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] <= eot[:, None]
        return mask, eot

    @torch.no_grad()
    def text_input_embeddings(self, tokens: Tensor) -> Tensor:
        """``(B, L)`` tokens → ``(B, L, D_w)`` token + position embeddings, before the transformer."""
        self._check_tokens(tokens)
        t = self.text
        cast = t.transformer.get_cast_dtype()
        x = t.token_embedding(tokens).to(cast)
        return x + t.positional_embedding[: tokens.shape[1]].to(cast)

    @torch.no_grad()
    def text_tokens(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, L)`` tokens → (``(B, L, D_w)`` after ``ln_final``, padding mask ``(B, L)``, EOT position ``(B,)``).

        The text tower's own (causal) attention mask is used, cut to ``L`` positions, so ``L`` may be below the
        context length. Equivalent open_clip: ``ln_final(transformer(token_embedding(t) + pos, attn_mask))``;
        its row at EOT times ``text_projection`` is ``encode_text(t)``.
        """
        x = self.text_input_embeddings(tokens)
        t = self.text
        L = tokens.shape[1]
        mask = getattr(t, "attn_mask", None)
        if mask is not None:
            mask = mask[:L, :L]
        x = t.ln_final(t.transformer(x, attn_mask=mask))
        pad, eot = self.padding_mask(tokens)
        return x, pad, eot

    @torch.no_grad()
    def encode_text(self, tokens: Tensor) -> Tensor:
        """``(B, L)`` tokens → ``(B, D_e)`` the model's own ``encode_text``, L2-normalised."""
        self._check_tokens(tokens)
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    def extra_repr(self) -> str:
        return (f"image_size={self.image_size}, image_tokens={self.num_image_tokens}, image_width={self.image_width}, "
                f"text_width={self.text_width}, context_length={self.context_length}")


# --------------------------------------------------------------------------------------------------
# Fusion encoder


def _init_bert(module: nn.Module) -> None:
    """BERT's init: Linear weights trunc-normal(0.02), biases 0, LayerNorm weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PromptedCrossAttention(nn.Module):
    """Multi-head attention of queries ``x`` over a memory, whose keys/values may be prefixed by prompt tokens.

    ``q = x W_Q + b_Q``; memory and prefix Π share the K/V weights: ``K = M W_K + b_K``, ``P^K = Π W_K + b_K``
    (likewise V), split into ``heads`` of ``width / heads``; then :func:`clfast.ops.prefix_attention` with
    ``kv_mask`` = the memory's padding mask, and the output projection (methods/clumo.md §2, insertion).
    The fusion encoder's self-attention is this module with the text as its own memory.

    Args:
        width: query, memory and prefix width (the fusion width).
        heads: number of heads; ``width`` must be divisible by it.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"PromptedCrossAttention: width {width} must be divisible by heads {heads}")
        self.width, self.heads, self.head_dim = int(width), int(heads), int(width) // int(heads)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def _split(self, t: Tensor) -> Tensor:
        """(..., N, width) → (..., heads, N, d)."""
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(-3, -2)

    def project_kv(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, N, width)`` or shared ``(N, width)`` tokens → their keys and values ``(B, H, N, d)`` / ``(H, N, d)``.

        Equivalent PyTorch: ``K = tokens @ W_K.T + b_K`` split into heads (``W_K = kv.weight[:width]``).
        """
        if not isinstance(tokens, Tensor) or tokens.dim() not in (2, 3) or tokens.shape[-1] != self.width:
            raise ValueError(f"PromptedCrossAttention: prefix/memory must have shape (B,P,{self.width}) or "
                             f"(P,{self.width}), got {_shape(tokens)}")
        k, v = self.kv(tokens).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def forward(self, x: Tensor, memory: Tensor, *, prefix: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None) -> Tensor:
        """Attend from ``x`` to ``[Π ; memory]``.

        Args:
            x: ``(B, Nq, width)`` queries (already normalised by the caller's LayerNorm).
            memory: ``(B, Nk, width)``.
            prefix: Π per sample ``(B, P, width)`` or shared ``(P, width)``; None for none.
            memory_mask: ``(B, Nk)`` bool, True = attend (prefix tokens are always attended).

        Returns:
            ``(B, Nq, width)``.
        """
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.width:
            raise ValueError(f"PromptedCrossAttention: x must have shape (B,N,{self.width}), got {_shape(x)}")
        if not isinstance(memory, Tensor) or memory.dim() != 3 or memory.shape[0] != x.shape[0]:
            raise ValueError(f"PromptedCrossAttention: memory must have shape (B,Nk,{self.width}) with B = "
                             f"{x.shape[0]}, got {_shape(memory)}")
        q = self._split(self.q(x))
        k, v = self.project_kv(memory)
        pk = pv = None
        if prefix is not None:
            if prefix.dim() == 3 and prefix.shape[0] != x.shape[0]:
                raise ValueError(f"PromptedCrossAttention: a per-sample prefix must have shape (B,P,{self.width}) "
                                 f"with B = {x.shape[0]}, got {_shape(prefix)}")
            pk, pv = self.project_kv(prefix.to(q.dtype) if not torch.is_autocast_enabled() else prefix)
            pk, pv = pk.to(q.dtype), pv.to(q.dtype)
        out = prefix_attention(q, k.to(q.dtype), v.to(q.dtype), pk, pv, kv_mask=memory_mask)
        return self.proj(out.transpose(1, 2).flatten(2))


class FusionLayer(nn.Module):
    """One pre-LN fusion layer (methods/clumo.md §2): with ``h`` the text tokens,

        a = SelfAttn(LN1(h), mask = text padding);   h = h + site_attn_out(a)
        c = CrossAttn(LN2(h), [Π ; image tokens]);    h = h + c
        m = MLP(LN3(h));                              h = h + site_mlp_out(m)

    The MLP is ``Linear(width, mlp_ratio·width) → GELU → Linear``.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(round(width * mlp_ratio))
        self.ln1 = nn.LayerNorm(width)
        self.self_attn = PromptedCrossAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.cross_attn = PromptedCrossAttention(width, heads)
        self.ln3 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor, text_mask: Optional[Tensor], image: Tensor, *, image_mask: Optional[Tensor] = None,
                prefix: Optional[Tensor] = None, layer: int = 0, sites: Optional[dict] = None) -> Tensor:
        sites = sites or {}
        h = self.ln1(x)
        a = self.self_attn(h, h, memory_mask=text_mask)
        if "attn_out" in sites:
            a = sites["attn_out"](layer, a)
        x = x + a
        x = x + self.cross_attn(self.ln2(x), image, prefix=prefix, memory_mask=image_mask)
        m = self.mlp(self.ln3(x))
        if "mlp_out" in sites:
            m = sites["mlp_out"](layer, m)
        return x + m


class FusionEncoder(nn.Module):
    """Text tokens attend to image tokens through ``depth`` pre-LN :class:`FusionLayer` s (methods/clumo.md §2).

    Text tokens are projected ``text_width → width``; image tokens ``image_width → width`` (the identity when
    the widths are equal, as for ViT-B-16's 768), so the image memory and a prompt prefix Π share each layer's
    K/V weights. A final LayerNorm closes the stack. Initialised like BERT (trunc-normal 0.02, zero biases,
    LayerNorm ones).

    Args:
        depth, width, heads: number of layers, fusion width, heads per attention (``width % heads == 0``).
        text_width, image_width: the towers' token widths (D_w, D_v).
        mlp_ratio: MLP hidden width / width.
    """

    def __init__(self, depth: int, width: int, heads: int, text_width: int, image_width: int, mlp_ratio: float = 4.0):
        super().__init__()
        for name, v in (("depth", depth), ("width", width), ("heads", heads), ("text_width", text_width),
                        ("image_width", image_width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"FusionEncoder: {name} must be a positive int, got {v!r}")
        if width % heads:
            raise ValueError(f"FusionEncoder: width {width} must be divisible by heads {heads}")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
            raise ValueError(f"FusionEncoder: mlp_ratio must be a number > 0, got {mlp_ratio!r}")
        self.depth, self.width, self.heads = depth, width, heads
        self.head_dim = width // heads
        self.text_width, self.image_width, self.mlp_ratio = text_width, image_width, float(mlp_ratio)
        self.text_proj = nn.Linear(text_width, width)
        self.image_proj = nn.Identity() if image_width == width else nn.Linear(image_width, width)
        self.layers = nn.ModuleList(FusionLayer(width, heads, mlp_ratio) for _ in range(depth))
        self.ln_final = nn.LayerNorm(width)
        _init_bert(self)

    def _check_sites(self, site_fns) -> dict:
        if not site_fns:
            return {}
        if not isinstance(site_fns, dict):
            raise TypeError(f"FusionEncoder: site_fns must be a dict site -> fn(layer, out), got {type(site_fns).__name__}")
        bad = [k for k in site_fns if k not in SITES]
        if bad:
            raise ValueError(f"FusionEncoder: unknown site_fns {bad}; sites are {list(SITES)}")
        not_callable = [k for k, f in site_fns.items() if not callable(f)]
        if not_callable:
            raise TypeError(f"FusionEncoder: site_fns {not_callable} must be callables f(layer, out) -> out")
        return dict(site_fns)

    def _layer_prefixes(self, prefix) -> list:
        if prefix is None or isinstance(prefix, Tensor):
            if isinstance(prefix, Tensor) and (prefix.dim() not in (2, 3) or prefix.shape[-1] != self.width):
                raise ValueError(f"FusionEncoder: prefix must have shape (B,P,{self.width}) or (P,{self.width}), "
                                 f"got {_shape(prefix)}")
            return [prefix] * self.depth
        if not isinstance(prefix, (list, tuple)) or len(prefix) != self.depth:
            raise ValueError(f"FusionEncoder: prefix must be a tensor (used in every layer), or a sequence of "
                             f"{self.depth} entries (tensor or None), one per layer, got "
                             f"{type(prefix).__name__}{' of ' + str(len(prefix)) if isinstance(prefix, (list, tuple)) else ''}")
        for i, p in enumerate(prefix):
            if p is not None and (not isinstance(p, Tensor) or p.dim() not in (2, 3) or p.shape[-1] != self.width):
                raise ValueError(f"FusionEncoder: prefix[{i}] must be None or have shape (B,P,{self.width}) or "
                                 f"(P,{self.width}), got {_shape(p)}")
        return list(prefix)

    def forward(self, text: Tensor, text_mask: Optional[Tensor], image: Tensor, *,
                image_mask: Optional[Tensor] = None,
                prefix: Union[Tensor, Sequence[Optional[Tensor]], None] = None,
                site_fns: Optional[dict] = None) -> Tensor:
        """Fuse text with image tokens.

        Args:
            text: ``(B, L, text_width)`` text tokens; ``text_mask`` ``(B, L)`` bool (True = real token) or None.
            image: ``(B, N, image_width)`` image tokens; ``image_mask`` ``(B, N)`` bool or None (all real).
            prefix: Π for every layer's cross-attention memory, ``(B, P, width)`` per sample or ``(P, width)``
                shared; or a sequence of ``depth`` such tensors / None, one per layer.
            site_fns: ``{"attn_out": f, "mlp_out": g}``, ``f(layer, out) -> out`` applied to the self-attention
                / MLP output ``(B, L, width)`` of every layer before its residual add (Houlsby adapters, ATLAS);
                the cross-attention is not adapted.

        Returns:
            ``(B, L, width)`` fused text tokens after the final LayerNorm.
        """
        if not isinstance(text, Tensor) or text.dim() != 3 or text.shape[-1] != self.text_width:
            raise ValueError(f"FusionEncoder: text must have shape (B,L,{self.text_width}), got {_shape(text)}")
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[-1] != self.image_width \
                or image.shape[0] != text.shape[0]:
            raise ValueError(f"FusionEncoder: image must have shape (B,N,{self.image_width}) with B = {text.shape[0]}, "
                             f"got {_shape(image)}")
        prefixes = self._layer_prefixes(prefix)
        sites = self._check_sites(site_fns)
        if not torch.is_autocast_enabled():   # towers in another precision than the fusion weights
            dtype = self.text_proj.weight.dtype
            text, image = text.to(dtype), image.to(dtype)
        x = self.text_proj(text)
        mem = self.image_proj(image)
        for i, layer in enumerate(self.layers):
            x = layer(x, text_mask, mem, image_mask=image_mask, prefix=prefixes[i], layer=i, sites=sites)
        return self.ln_final(x)


# --------------------------------------------------------------------------------------------------
# Answer head


def answer_digests(answers: Sequence[str]) -> Tensor:
    """``(n_A, 16)`` uint8: the first 16 bytes of the sha256 of each answer's UTF-8 text (a vocabulary's
    fingerprint for checkpoints, fixed-size per answer)."""
    rows = [list(hashlib.sha256(a.encode("utf-8")).digest()[:DIGEST_BYTES]) for a in answers]
    return torch.tensor(rows, dtype=torch.uint8).reshape(len(rows), DIGEST_BYTES)


class AnswerHead(nn.Module):
    """Scores over a closed answer vocabulary from the fused state h at the text EOT (methods/clumo.md §2).

    ``mode="classify"``: ``z = Linear(hidden, n_A)(GELU(LN(Linear(width, hidden)(h))))``.
    ``mode="rank"``: ``z_a = ⟨W h, e_a⟩`` with ``W = Linear(width, D_e, bias=False)`` and ``e_a`` the
    L2-normalised text-tower embedding of answer a, a buffer ``answer_embeddings`` ``(n_A, D_e)`` filled once
    by :meth:`set_answer_embeddings` (not saved: it follows from the towers and the answers).

    Args:
        width: fused width; num_answers: n_A; hidden: MLP width (default ``2·width``, spec: 768→1536→n_A);
        mode: ``"classify"`` or ``"rank"``; answer_dim: D_e (rank mode).
    """

    def __init__(self, width: int, num_answers: int, hidden: Optional[int] = None, *, mode: str = "classify",
                 answer_dim: Optional[int] = None):
        super().__init__()
        if isinstance(num_answers, bool) or not isinstance(num_answers, int) or num_answers < 1:
            raise ValueError(f"AnswerHead: num_answers must be a positive int, got {num_answers!r}")
        if mode not in ANSWER_MODES:
            raise ValueError(f"AnswerHead: mode must be one of {ANSWER_MODES}, got {mode!r}")
        self.width, self.num_answers, self.mode = int(width), num_answers, mode
        self.hidden = int(hidden) if hidden is not None else 2 * self.width
        if mode == "classify":
            self.mlp = nn.Sequential(nn.Linear(width, self.hidden), nn.LayerNorm(self.hidden), nn.GELU(),
                                     nn.Linear(self.hidden, num_answers))
        else:
            if isinstance(answer_dim, bool) or not isinstance(answer_dim, int) or answer_dim < 1:
                raise ValueError(f"AnswerHead: mode='rank' needs answer_dim (the text embedding width), got {answer_dim!r}")
            self.answer_dim = answer_dim
            self.proj = nn.Linear(width, answer_dim, bias=False)
            self.register_buffer("answer_embeddings", torch.zeros(num_answers, answer_dim), persistent=False)
            self.embeddings_set = False
        _init_bert(self)

    @torch.no_grad()
    def set_answer_embeddings(self, embeddings: Tensor) -> None:
        """Rank mode: store ``(n_A, D_e)`` answer embeddings (copied; not trained)."""
        if self.mode != "rank":
            raise ValueError("AnswerHead.set_answer_embeddings: only mode='rank' uses answer embeddings")
        if not isinstance(embeddings, Tensor) or tuple(embeddings.shape) != tuple(self.answer_embeddings.shape):
            raise ValueError(f"AnswerHead: answer embeddings must have shape (n_A, D_e) = "
                             f"{tuple(self.answer_embeddings.shape)}, got {_shape(embeddings)}")
        self.answer_embeddings.copy_(embeddings)
        self.embeddings_set = True

    def forward(self, h: Tensor) -> Tensor:
        """``(B, width)`` fused states → ``(B, n_A)`` answer scores."""
        if not isinstance(h, Tensor) or h.dim() != 2 or h.shape[-1] != self.width:
            raise ValueError(f"AnswerHead: h must have shape (B,{self.width}), got {_shape(h)}")
        if self.mode == "classify":
            return self.mlp(h)
        if not self.embeddings_set:
            raise RuntimeError("AnswerHead: mode='rank' needs the answer embeddings: give the VLM its answers "
                               "(create_vlm(answers=...) or VLM.set_answers)")
        w = self.proj(h)
        return w @ self.answer_embeddings.to(w.dtype).T

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, num_answers={self.num_answers}"


# --------------------------------------------------------------------------------------------------
# The VLM


class Encoded(NamedTuple):
    """What the frozen towers give the fusion encoder (no gradients)."""

    image: Tensor        # (B, 1 + N, D_v) image tokens after ln_post
    text: Tensor         # (B, L, D_w) text tokens after ln_final
    text_mask: Tensor    # (B, L) bool, True up to and including EOT
    eot: Tensor          # (B,) int64 EOT position


class VLM(nn.Module):
    """Frozen CLIP towers + trainable fusion encoder + answer head (methods/clumo.md §2).

    Args:
        towers: :class:`CLIPTokenTowers`.
        fusion: :class:`FusionEncoder` with ``text_width``/``image_width`` of the towers.
        head: :class:`AnswerHead` of the fusion width, or None to build it later with :meth:`build_head` (a method
            learns the number of answers only from the run's data).
        answer_mode: the head's mode when it is built later (``head`` given: its own).
        tokenizer: the CLIP's tokenizer (``list[str] -> (N, L) int64``); the engine tokenizes questions with it.
        answers: the answer vocabulary in label order (``len == head.num_answers``), or None to name it later with
            :meth:`set_answers` (e.g. from ``ctx.class_names``).
        config: the settings that built it (:func:`create_vlm`'s), recorded in the state dict's ``config_json``.
        weights: the towers' :class:`~clfast.backbones.WeightsInfo`.

    Attributes:
        data_config (timm's keys: input_size, mean, std, interpolation, crop_pct), tokenizer, weights, answers,
        width, num_answers, config.
    """

    def __init__(self, towers: CLIPTokenTowers, fusion: FusionEncoder, head: Optional[AnswerHead] = None, *,
                 answer_mode: str = "classify", tokenizer=None, answers: Optional[Sequence[str]] = None,
                 config: Optional[dict] = None, weights: Optional[WeightsInfo] = None):
        super().__init__()
        if not isinstance(towers, CLIPTokenTowers):
            raise TypeError(f"VLM: towers must be CLIPTokenTowers, got {type(towers).__name__}")
        if not isinstance(fusion, FusionEncoder):
            raise TypeError(f"VLM: fusion must be a FusionEncoder, got {type(fusion).__name__}")
        if (fusion.text_width, fusion.image_width) != (towers.text_width, towers.image_width):
            raise ValueError(f"VLM: the fusion encoder takes text/image widths {(fusion.text_width, fusion.image_width)}, "
                             f"the towers give {(towers.text_width, towers.image_width)}")
        self.towers, self.fusion = towers, fusion
        self.answer_mode = head.mode if head is not None else answer_mode
        if self.answer_mode not in ANSWER_MODES:
            raise ValueError(f"VLM: answer_mode must be one of {ANSWER_MODES}, got {answer_mode!r}")
        self.tokenizer = tokenizer
        self.weights = weights or WeightsInfo(type(towers.clip).__name__, "unknown",
                                              note="model handed to VLM directly; origin not recorded")
        self.config = dict(config or {})
        self.config.update(depth=fusion.depth, width=fusion.width, heads=fusion.heads, mlp_ratio=fusion.mlp_ratio,
                           answer_mode=self.answer_mode, image_size=towers.image_size[0],
                           towers_sha256=self.weights.sha256)
        self.head: Optional[AnswerHead] = None
        self.answers: Optional[list[str]] = None
        if head is not None:
            self._attach_head(head)
            if answers is not None:
                self.set_answers(answers)
        elif answers is not None:
            self.build_head(len(answers), answers)
        h, w = towers.image_size
        self.data_config = {"input_size": (3, h, w), "mean": towers.mean_std[0], "std": towers.mean_std[1],
                            "interpolation": towers.interpolation, "crop_pct": 1.0}

    def _attach_head(self, head: AnswerHead) -> None:
        if not isinstance(head, AnswerHead):
            raise TypeError(f"VLM: head must be an AnswerHead, got {type(head).__name__}")
        if head.width != self.fusion.width:
            raise ValueError(f"VLM: the head reads width {head.width}, the fusion encoder gives {self.fusion.width}")
        if head.mode == "rank" and head.answer_dim != self.towers.embed_dim:
            raise ValueError(f"VLM: a rank head needs answer_dim = the text embedding width {self.towers.embed_dim}, "
                             f"got {head.answer_dim}")
        dev = self.fusion.text_proj.weight.device
        self.head = head.to(dev)
        self.answer_mode = head.mode
        self.config.update(hidden=head.hidden, answer_mode=head.mode, num_answers=head.num_answers)
        blob = json.dumps(self.config, sort_keys=True).encode("utf-8")
        self.register_buffer("config_json", torch.tensor(list(blob), dtype=torch.uint8, device=dev))
        self.register_buffer("answer_digests", torch.zeros(head.num_answers, DIGEST_BYTES, dtype=torch.uint8,
                                                           device=dev))
        self.answers = None

    def build_head(self, num_answers: int, answers: Optional[Sequence[str]] = None, *,
                   hidden: Optional[int] = None) -> AnswerHead:
        """Build (or rebuild) the answer head for ``num_answers`` answers in the VLM's answer mode (fresh weights,
        answers unnamed unless ``answers`` is given); returns it."""
        self._attach_head(AnswerHead(self.fusion.width, num_answers, hidden, mode=self.answer_mode,
                                     answer_dim=self.towers.embed_dim if self.answer_mode == "rank" else None))
        if answers is not None:
            self.set_answers(answers)
        return self.head

    def _need_head(self, what: str) -> AnswerHead:
        if self.head is None:
            raise RuntimeError(f"VLM.{what}: the VLM has no answer head yet: call build_head(num_answers)")
        return self.head

    @property
    def width(self) -> int:
        return self.fusion.width

    @property
    def num_answers(self) -> Optional[int]:
        return None if self.head is None else self.head.num_answers

    @property
    def answers_named(self) -> bool:
        """Whether ``answer_digests`` holds a vocabulary (named here or loaded from a checkpoint)."""
        return self.head is not None and bool(self.answer_digests.any(1).all())

    def set_answers(self, answers: Sequence[str]) -> None:
        """Name the answers (label order): fills ``answer_digests`` and, in rank mode, the head's embeddings
        (the text tower's ``encode_text`` of each answer, computed once here).

        If the VLM already holds a vocabulary (named before, or loaded by :func:`load_vlm_checkpoint`), ``answers``
        must be that vocabulary: a ValueError names the positions that differ.
        """
        head = self._need_head("set_answers")
        if isinstance(answers, str) or not all(isinstance(a, str) for a in answers):
            raise TypeError(f"VLM.set_answers: answers must be a sequence of str, got {type(answers).__name__}")
        answers = list(answers)
        if len(answers) != head.num_answers:
            raise ValueError(f"VLM.set_answers: the head has {head.num_answers} answers, got {len(answers)}")
        if len(set(answers)) != len(answers):
            dup = sorted({a for a in answers if answers.count(a) > 1})
            raise ValueError(f"VLM.set_answers: answers must be unique, repeated: {dup[:5]}")
        digests = answer_digests(answers).to(self.answer_digests.device)
        if self.answers_named:
            differ = (digests != self.answer_digests).any(1).nonzero().flatten().tolist()
            if differ:
                raise ValueError(f"VLM.set_answers: the VLM's answer vocabulary (its checkpoint's, or named before) "
                                 f"differs at {len(differ)} of {len(answers)} positions, e.g. "
                                 + ", ".join(f"{i}: {answers[i]!r}" for i in differ[:5])
                                 + "; the answers must be the same strings in the same order")
        with torch.no_grad():
            self.answer_digests.copy_(digests)
        if head.mode == "rank":
            if self.tokenizer is None:
                raise ValueError("VLM.set_answers: mode='rank' needs the tokenizer to embed the answers")
            tokens = torch.as_tensor(self.tokenizer(answers), dtype=torch.long).to(self.answer_digests.device)
            head.set_answer_embeddings(self.towers.encode_text(tokens).float())
        self.answers = answers

    def train(self, mode: bool = True) -> "VLM":
        super().train(mode)
        self.towers.train(mode)   # keeps the CLIP in eval
        return self

    def encode(self, images: Tensor, tokens: Tensor, *, image_tokens=None) -> Encoded:
        """The frozen towers (no gradients): images ``(B, 3, H, W)`` in [0, 1], tokens ``(B, L)`` int64.

        ``image_tokens``: a callable ``images -> (B, 1 + N, D_v)`` standing in for the image tower (e.g. a cache of
        :meth:`CLIPTokenTowers.image_tokens`' results), or None to run the tower."""
        if images.shape[0] != tokens.shape[0]:
            raise ValueError(f"VLM.encode: images and tokens must have the same batch size, got {images.shape[0]} "
                             f"and {tokens.shape[0]}")
        text, mask, eot = self.towers.text_tokens(tokens)
        img = self.towers.image_tokens(images) if image_tokens is None else image_tokens(images)
        if tuple(img.shape[:1]) != tuple(images.shape[:1]) or img.dim() != 3:
            raise ValueError(f"VLM.encode: image_tokens must give (B, 1 + N, D_v) with B = {images.shape[0]}, got "
                             f"{tuple(img.shape)}")
        return Encoded(img, text, mask, eot)

    def fuse(self, encoded: Encoded, prefix: Union[Tensor, Sequence[Optional[Tensor]], None] = None,
             site_fns: Optional[dict] = None, *, image_mask: Optional[Tensor] = None) -> Tensor:
        """``(B, width)`` fused state at each sample's EOT; ``prefix``/``site_fns`` as in :meth:`FusionEncoder.forward`."""
        x = self.fusion(encoded.text, encoded.text_mask, encoded.image, image_mask=image_mask, prefix=prefix,
                        site_fns=site_fns)
        return x[torch.arange(x.shape[0], device=x.device), encoded.eot]

    def forward(self, images: Tensor, tokens: Tensor, prefix: Union[Tensor, Sequence[Optional[Tensor]], None] = None,
                site_fns: Optional[dict] = None) -> Tensor:
        """``(B, n_A)`` answer scores."""
        return self._need_head("forward")(self.fuse(self.encode(images, tokens), prefix, site_fns))

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The fusion encoder's and the head's tensors plus ``config_json``/``answer_digests`` (a VLM checkpoint)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("towers.")}


# --------------------------------------------------------------------------------------------------
# Builder

#: fusion (depth, width, heads) by CLIP name; others get the spec's ALBEF-sized 6 × 768 × 12
_FUSION_DEFAULTS = {"clip_tiny_synth": (2, 192, 3)}


def fusion_defaults(clip_name: str) -> tuple[int, int, int]:
    """(depth, width, heads) of the fusion encoder for ``clip_name``: small for ``clip_tiny_synth`` (its image
    width, 3 heads of 64), ALBEF's 6 × 768 × 12 otherwise (methods/clumo.md §2)."""
    return _FUSION_DEFAULTS.get(str(clip_name).replace("/", "-"), (6, 768, 12))


def create_vlm(clip_name: str = "clip_tiny_synth", *, pretrained=None, checkpoint_path: Optional[str] = None,
               num_answers: Optional[int] = None, answers: Optional[Sequence[str]] = None,
               depth: Optional[int] = None, width: Optional[int] = None, heads: Optional[int] = None,
               mlp_ratio: float = 4.0, image_size: Optional[int] = None, answer_mode: str = "classify",
               device: Union[str, torch.device] = "cpu") -> VLM:
    """Build the VLM on an open_clip model (:func:`clfast.backbones.create_clip`), towers frozen.

    Args:
        clip_name, pretrained, checkpoint_path: as for :func:`~clfast.backbones.create_clip` (``clip_tiny_synth``
            loads its shipped weights; ``"ViT-B-16"`` with ``pretrained="openai"`` in the paper presets).
        num_answers: n_A; may be left out when ``answers`` is given; neither: no head yet (:meth:`VLM.build_head`).
        answers: the answer strings in label order (needed by ``answer_mode="rank"``, or later via ``set_answers``).
        depth, width, heads: fusion shape; None takes :func:`fusion_defaults`.
        mlp_ratio: fusion MLP ratio.
        image_size: image-tower input size (e.g. 384 for ViT-B-16: 577 tokens); None keeps the model's.
        answer_mode: ``"classify"`` or ``"rank"``.

    Returns:
        A :class:`VLM` (fusion encoder and head trainable, in train mode as ``nn.Module`` s start).
    """
    from .clip import create_clip

    if answers is not None:
        if num_answers is not None and int(num_answers) != len(answers):
            raise ValueError(f"create_vlm: num_answers={num_answers} but {len(answers)} answers given")
        num_answers = len(answers)
    if answer_mode not in ANSWER_MODES:
        raise ValueError(f"create_vlm: answer_mode must be one of {ANSWER_MODES}, got {answer_mode!r}")
    d0, w0, h0 = fusion_defaults(clip_name)
    depth, width, heads = depth or d0, width or w0, heads or h0
    model, _, tokenizer, weights = create_clip(clip_name, pretrained=pretrained, checkpoint_path=checkpoint_path,
                                               device=device)
    towers = CLIPTokenTowers(model, image_size=image_size)
    fusion = FusionEncoder(depth, width, heads, towers.text_width, towers.image_width, mlp_ratio)
    config = {"clip_name": clip_name.replace("/", "-"), "clip_weights": weights.name}
    vlm = VLM(towers, fusion, answer_mode=answer_mode, tokenizer=tokenizer, config=config, weights=weights)
    if num_answers is not None:
        vlm.build_head(int(num_answers), answers)
    return vlm.to(device)


# --------------------------------------------------------------------------------------------------
# Loading a trained VLM from a run's checkpoint

#: the settings a checkpoint's VLM must share with the VLM it is loaded into (``config_json``)
ARCH_KEYS = ("clip_name", "towers_sha256", "image_size", "depth", "width", "heads", "mlp_ratio", "hidden",
             "answer_mode", "num_answers")


def _config_of(blob: Tensor) -> dict:
    return json.loads(bytes(blob.to(torch.uint8).tolist()).decode("utf-8"))


def load_vlm_state(vlm: VLM, method_state: dict, unchanged: Optional[dict] = None, *, prefix: str = "backbone.",
                   source: str = "the checkpoint") -> list[str]:
    """Load the fusion encoder, head, ``config_json`` and ``answer_digests`` of a saved method state into ``vlm``.

    Args:
        vlm: a :class:`VLM` with its head built (towers are not loaded: ``config_json`` names their weights).
        method_state: a run checkpoint's ``method_state`` (the method holds its VLM as ``backbone``).
        unchanged: the checkpoint's ``method_unchanged`` ({key: digest} of tensors it left out because they still
            equalled the model as built); such a key loads only if ``vlm`` holds that very tensor already.
        prefix: where the VLM sits in the method's state dict.
        source: a name for errors.

    Returns:
        The VLM keys loaded (without the prefix).

    Raises:
        ValueError: a tensor missing or of another shape (naming the key and both shapes); architecture settings
        or tower weights that differ (``config_json``: each setting named with both values); another answer
        vocabulary (positions named); a left-out tensor that differs here.
    """
    head = vlm._need_head("load")
    own = {k: v for k, v in vlm.state_dict().items() if not k.startswith("towers.")
           and not (k.startswith("head.") and k.split(".")[-1] == "answer_embeddings")}
    unchanged = unchanged or {}
    missing, shapes, stale = [], [], []
    for k, mine in own.items():
        ck = prefix + k
        if ck in method_state:
            saved = method_state[ck]
            if k != "config_json" and tuple(saved.shape) != tuple(mine.shape):   # settings: compared below
                shapes.append(f"{ck}: checkpoint {tuple(saved.shape)} vs this VLM {tuple(mine.shape)}")
        elif ck in unchanged:
            if unchanged[ck] != tensor_digest(mine):
                stale.append(ck)
        else:
            missing.append(ck)
    differ = []
    if prefix + "config_json" in method_state:
        saved_cfg = _config_of(method_state[prefix + "config_json"])
        differ = [f"{k}: checkpoint {saved_cfg.get(k)!r} vs this VLM {vlm.config.get(k)!r}" for k in ARCH_KEYS
                  if saved_cfg.get(k) != vlm.config.get(k)]
    if missing or shapes or differ:
        parts = [f"shape mismatches {'; '.join(shapes[:5])}" if shapes else "",
                 f"settings differ ({'; '.join(differ)})" if differ else "",
                 f"missing {missing[:5]}{' and %d more' % (len(missing) - 5) if len(missing) > 5 else ''} under "
                 f"prefix {prefix!r}" if missing else ""]
        raise ValueError(f"load_vlm_checkpoint: {source} does not fit this VLM: " + "; ".join(p for p in parts if p))
    if stale:
        raise ValueError(f"load_vlm_checkpoint: {source} left out {stale[:3]} as unchanged since its run built "
                         f"them (so it holds no values for them), and this VLM's differ: the source run never "
                         f"trained them; load a checkpoint whose fusion encoder and head were trained")
    dkey = prefix + "answer_digests"
    vocab = method_state[dkey] if dkey in method_state else vlm.answer_digests
    if not bool(vocab.any(1).all()):
        raise ValueError(f"load_vlm_checkpoint: {source} holds no answer vocabulary (its answer_digests are unset)")
    if vlm.answers_named:
        differ = (vocab.to(vlm.answer_digests.device) != vlm.answer_digests).any(1).nonzero().flatten().tolist()
        if differ:
            names = vlm.answers or []
            raise ValueError(f"load_vlm_checkpoint: {source} was trained on another answer vocabulary: "
                             f"{len(differ)} of {head.num_answers} answers differ, at positions {differ[:8]}"
                             + (f" (here: {', '.join(repr(names[i]) for i in differ[:8])})" if names else ""))
    loaded = {k: method_state[prefix + k] for k in own if prefix + k in method_state}
    vlm.load_state_dict(loaded, strict=False)
    if head.mode == "rank" and vlm.answers is not None:
        vlm.set_answers(vlm.answers)
    return sorted(loaded)


def load_vlm_checkpoint(vlm: VLM, path: str, *, prefix: str = "backbone.") -> dict:
    """Load the trained fusion encoder and head of a finished run (``vlm_finetune``, or any method that holds the
    VLM as ``backbone``) into ``vlm``, checked (:func:`load_vlm_state`).

    Args:
        vlm: the VLM to load into (built with the same CLIP weights, fusion shape and number of answers).
        path: a clfast checkpoint file, or a run directory (its newest end-of-task checkpoint). Read with the
            engine's checked reader (content hash verified; a damaged file raises naming it).
        prefix: where the VLM sits in the source method's state dict.

    Returns:
        The record for ``record()``: ``path`` (absolute), ``sha256`` (of the file), ``method`` (the source run's),
        ``keys`` (number of VLM tensors loaded), ``config`` (the source VLM's ``config_json``).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_vlm_checkpoint: path must be a checkpoint file or run directory, got {type(path).__name__}")
    path = os.fspath(path)
    file = latest_task_checkpoint(path) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"load_vlm_checkpoint: {path} is neither a checkpoint file nor a run directory")
    state = read_checkpoint(file)
    if not isinstance(state.get("method_state"), dict):
        raise ValueError(f"load_vlm_checkpoint: {file} is not a clfast run checkpoint (no method_state)")
    keys = load_vlm_state(vlm, state["method_state"], state.get("method_unchanged", {}), prefix=prefix,
                          source=f"checkpoint {file} (method {state.get('method')!r})")
    cfg = state["method_state"].get(prefix + "config_json")
    return {"path": os.path.abspath(file), "sha256": sha256_file(file), "method": state.get("method"),
            "keys": len(keys), "config": _config_of(cfg) if cfg is not None else None}
