"""prefix_attention: multi-head attention whose keys/values are prefixed by prompt tokens.

    out = softmax(scale · q · [prefix_k ; k]ᵀ, masked keys excluded) · [prefix_v ; v]

This one op serves prefix tuning (DualPrompt, CODA-Prompt, ConvPrompt), GPLS's generated prompts (the
prompt rows are dropped after each block, which is exactly a per-sample prefix), STAR-Prompt's concat
mode, CluMo's prompt on the fusion cross-attention memory and ATLAS's single-query coefficient attention.

Layers, as for every clfast op: :func:`reference` (the spec) → backends (``torch``: SDPA on the
concatenation, the bar to beat; ``cpu``: C++ in csrc/prefix_attention; ``triton``: kernels/prefix_attention.py)
→ the registered ops ``clfast::prefix_attention`` (the C++ kernels, a custom_op) and
``clfast::prefix_attention_triton`` (a triton_op, which torch.compile traces into), each with its backward op,
fake and autograd, so torch.compile traces a model that uses them without graph breaks → the public
:func:`prefix_attention` and the module :class:`PromptedAttention`.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from clfast import _triton
from clfast.ops import _backends, _dispatch
from clfast.ops._backends import define_op
from clfast.ops._checks import check_float_tensor, shape_str
from clfast.ops._dispatch import register_backend

__all__ = ["prefix_attention", "reference", "PromptedAttention", "PromptContext", "FusedMultiheadAttention",
           "fuse_self_attention"]

OP = "prefix_attention"


class Inputs(NamedTuple):
    """What backends look at to decide whether they can run a call."""

    device: torch.device
    dtype: torch.dtype
    batch: int
    heads: int
    q_len: int
    k_len: int
    prefix_len: int
    head_dim: int
    shared_prefix: bool
    masked: bool


# ---------------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------------


def _expand_prefix(prefix: Optional[Tensor], batch: int) -> Optional[Tensor]:
    if prefix is None or prefix.dim() == 4:
        return prefix
    return prefix.unsqueeze(0).expand(batch, *prefix.shape)


def _full_mask(q: Tensor, k: Tensor, prefix_len: int, kv_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(B,1,1,P+Nk) attend-mask over the concatenated keys, with empty rows opened up (their output is
    zeroed afterwards, so softmax never sees an all -inf row and no NaN reaches the gradients), and the
    (B,1,1,1) bool saying which rows had anything to attend."""
    B, Nk = q.shape[0], k.shape[2]
    if kv_mask is None:
        kv_mask = torch.ones(B, Nk, dtype=torch.bool, device=q.device)
    pm = torch.ones(B, prefix_len, dtype=torch.bool, device=q.device)
    full = torch.cat([pm, kv_mask], dim=1)
    any_valid = full.any(dim=1)
    full = full | ~any_valid[:, None]
    return full[:, None, None, :], any_valid[:, None, None, None]


def _zero_padding(t: Tensor, kv_mask: Optional[Tensor]) -> Tensor:
    """``t`` (B,H,Nk,d) with the masked keys' rows zeroed: padding may hold anything (NaN), and a -inf score
    alone does not stop a NaN (0 · NaN in the weighted sum of values, or in the gradients)."""
    return t if kv_mask is None else t.masked_fill(~kv_mask[:, None, :, None], 0.0)


def softmax_scale(head_dim: int, scale: Optional[float] = None) -> float:
    """The softmax scale every path uses: ``scale`` when given, else ``head_dim ** -0.5``."""
    return float(head_dim ** -0.5 if scale is None else scale)


def reference(q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor] = None,
              prefix_v: Optional[Tensor] = None, kv_mask: Optional[Tensor] = None,
              scale: Optional[float] = None) -> Tensor:
    """Explicit math on the concatenated keys/values; the definition every backend is tested against.

    Rows with nothing to attend (no prefix and every key masked) give zeros, as flash attention does.
    """
    B, _, _, d = q.shape
    scale = softmax_scale(d, scale)
    k, v = _zero_padding(k, kv_mask), _zero_padding(v, kv_mask)
    pk, pv = _expand_prefix(prefix_k, B), _expand_prefix(prefix_v, B)
    if pk is not None:
        k = torch.cat([pk, k], dim=2)
        v = torch.cat([pv, v], dim=2)
    P = 0 if pk is None else pk.shape[2]
    mask, any_valid = _full_mask(q, k[:, :, P:], P, kv_mask)
    scores = (q @ k.transpose(-2, -1)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    out = scores.softmax(dim=-1) @ v
    return out.masked_fill(~any_valid, 0.0)


# ---------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------

# PyTorch's own low-precision error grows with the reduction length; these are the slack the tests allow
# on top of "2x stock PyTorch's error at the same dtype", which is checked separately.
_LOWP_ATOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3}


class _Tolerances:
    ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, **_LOWP_ATOL}
    GRAD_ATOL = {torch.float64: 1e-10, torch.float32: 1e-4, **_LOWP_ATOL}


@register_backend
class ReferenceBackend(_Tolerances, _backends.Reference):
    OP = OP
    run = staticmethod(reference)


def _torch_prefix_attention(q, k, v, prefix_k, prefix_v, kv_mask, scale):
    B = q.shape[0]
    P = 0 if prefix_k is None else prefix_k.shape[-2]
    k, v = _zero_padding(k, kv_mask), _zero_padding(v, kv_mask)
    if P:
        k = torch.cat([_expand_prefix(prefix_k, B), k], dim=2)
        v = torch.cat([_expand_prefix(prefix_v, B), v], dim=2)
    # On the CPU always with a mask: without one, PyTorch's fused kernel turns a row whose scores are all NaN (a NaN
    # in q, or in its only key) into zeros, and one without keys into NaN if q holds a NaN anywhere; with a mask it
    # gives what the math gives, at the same speed.
    if kv_mask is None and q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    mask, any_valid = _full_mask(q, k[:, :, P:], P, kv_mask)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.masked_fill(~any_valid, 0.0)


@register_backend
class TorchBackend(_Tolerances, _backends.Torch):
    """``F.scaled_dot_product_attention`` on the concatenated K/V: the best stock-PyTorch composition."""

    OP = OP
    run = staticmethod(_torch_prefix_attention)


class _Fused:
    """Runs the registered op ``registered`` (set below, with the op), which returns ``(out, lse)``."""

    registered = None

    @classmethod
    def run(cls, q, k, v, prefix_k, prefix_v, kv_mask, scale):
        return cls.registered(q, k, v, prefix_k, prefix_v, kv_mask, scale)[0]


@register_backend
class CpuBackend(_Fused, _backends.Cpp):
    """C++ (csrc/prefix_attention): blocked online softmax, bf16 GEMM tiles with fp32 accumulation."""

    OP, KERNEL = OP, "prefix_attention_fwd"
    ATOL = {torch.float32: 2e-5, **_LOWP_ATOL}
    GRAD_ATOL = {torch.float32: 1e-4, **_LOWP_ATOL}

    @staticmethod
    def forward(q, k, v, prefix_k, prefix_v, kv_mask, scale):
        return torch.ops._clfast_C.prefix_attention_fwd(q, k, v, prefix_k, prefix_v, kv_mask, scale)

    @staticmethod
    def backward(dout, q, k, v, prefix_k, prefix_v, kv_mask, out, lse, scale):
        return torch.ops._clfast_C.prefix_attention_bwd(dout, q, k, v, prefix_k, prefix_v, kv_mask, out, lse,
                                                        scale)


@register_backend
class TritonBackend(_Fused, _backends.Triton):
    """Flash-style Triton kernels (kernels/prefix_attention.py) in the triton_op ``clfast::prefix_attention_triton``;
    the default on CUDA."""

    OP = OP
    # fp32 tl.dot may use TF32 on GPUs: looser than the C++ backend. Below fp32 the backward rounds P and dS to the
    # input dtype before its products (as flash-attention does, for the tensor cores): a dq can then be several ulps
    # off at its own scale (a cancelling sum); tests/ops/test_fuzz_attention.py bounds it by that rounding's error.
    ATOL = {torch.float32: 2e-3 if _triton.CUDA else 2e-5, **_LOWP_ATOL}
    GRAD_ATOL = {torch.float32: 5e-3 if _triton.CUDA else 1e-4, **_LOWP_ATOL}

    @classmethod
    def extra_reasons(cls, inputs):
        return [f"head_dim {inputs.head_dim} > 256"] if inputs.head_dim > 256 else []


_backends.set_priorities(OP)


# ---------------------------------------------------------------------------------------------------
# The registered ops: clfast::prefix_attention (C++) and clfast::prefix_attention_triton, each with its backward
# op, fake implementations and autograd
# ---------------------------------------------------------------------------------------------------

_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? prefix_k, Tensor? prefix_v, Tensor? kv_mask, float scale) "
           "-> (Tensor, Tensor)")
_BACKWARD_SCHEMA = ("(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? prefix_k, Tensor? prefix_v, Tensor? kv_mask, "
                    "Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")


def _fake(q, k, v, prefix_k, prefix_v, kv_mask, scale):
    """(out (B,H,Nq,d) in q's dtype, lse (B,H,Nq) float32). ``lse`` is saved for the backward and is not
    differentiable."""
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _backward_fake(dout, q, k, v, prefix_k, prefix_v, kv_mask, out, lse, scale):
    """(dq, dk, dv, dprefix_k, dprefix_v); the prefix grads are empty when there is no prefix."""
    def like(t):
        return q.new_empty((0,)) if t is None else t.new_empty(t.shape)

    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), like(prefix_k), like(prefix_v)


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, kv_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, kv_mask, out, lse)
    ctx.scale = scale
    # lse is an auxiliary output nobody differentiates: do not fill a (B,H,Nq) zero gradient for it
    # (that fill cost several ms per call on the CPU).
    ctx.set_materialize_grads(False)


def _register(name: str, forward, backward, *, triton: bool = False):
    """``clfast::<name>`` computed by ``forward``, and ``clfast::<name>_backward`` by ``backward``, tied by
    autograd. Returns the forward op."""
    op = define_op(name, _SCHEMA, forward, _fake, triton=triton)
    backward_op = define_op(f"{name}_backward", _BACKWARD_SCHEMA, backward, _backward_fake, triton=triton)

    def _backward(ctx, dout, _dlse):
        if dout is None:  # only lse was used downstream (never in clfast); nothing flows back
            return (None,) * 7
        q, k, v, prefix_k, prefix_v, kv_mask, out, lse = ctx.saved_tensors
        dq, dk, dv, dpk, dpv = backward_op(dout, q, k, v, prefix_k, prefix_v, kv_mask, out, lse, ctx.scale)
        if prefix_k is None:
            dpk = dpv = None
        return dq, dk, dv, dpk, dpv, None, None

    op.register_autograd(_backward, setup_context=_setup_context)
    return getattr(torch.ops.clfast, name)


CpuBackend.registered = _register(OP, CpuBackend.forward, CpuBackend.backward)
if _backends.TRITON_OPS:
    from clfast.kernels import prefix_attention as _kern

    TritonBackend.registered = _register(f"{OP}_triton", _kern.prefix_attention_fwd, _kern.prefix_attention_bwd,
                                         triton=True)


# ---------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------


def _validate(q, k, v, prefix_k, prefix_v, kv_mask, scale) -> Inputs:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor("prefix_attention", name, t, shape="(B,H,N,d)", dim=4)
    B, H, Nq, d = q.shape
    if d < 1:
        raise ValueError(f"prefix_attention: q must have shape (B,H,N,d) with d >= 1, got {shape_str(q)}")
    if k.shape[:2] != (B, H) or k.shape[3] != d:
        raise ValueError(f"prefix_attention: k must have shape (B,H,Nk,d) = ({B},{H},Nk,{d}) to match q, got {shape_str(k)}")
    if v.shape != k.shape:
        raise ValueError(f"prefix_attention: v must have the shape of k {shape_str(k)}, got {shape_str(v)}")
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_attention: prefix_k and prefix_v must be given together (got only "
                         f"{'prefix_k' if prefix_v is None else 'prefix_v'})")
    P, shared = 0, False
    if prefix_k is not None:
        for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            if not isinstance(t, Tensor):
                raise TypeError(f"prefix_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
            ok = (t.dim() == 4 and t.shape[:2] == (B, H) and t.shape[3] == d) or (
                t.dim() == 3 and t.shape[0] == H and t.shape[2] == d)
            if not ok:
                raise ValueError(f"prefix_attention: {name} must have shape (B,H,P,d) = ({B},{H},P,{d}) or "
                                 f"(H,P,d) = ({H},P,{d}), got {shape_str(t)}")
        if prefix_v.shape != prefix_k.shape:
            raise ValueError(f"prefix_attention: prefix_v must have the shape of prefix_k {shape_str(prefix_k)}, "
                             f"got {shape_str(prefix_v)}")
        P, shared = prefix_k.shape[-2], prefix_k.dim() == 3
    tensors = [("q", q), ("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)]
    for name, t in tensors[1:]:
        if t is None:
            continue
        if t.dtype != q.dtype:
            raise TypeError(f"prefix_attention: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"prefix_attention: {name} must be on q's device {q.device}, got {t.device}")
    if kv_mask is not None:
        if not isinstance(kv_mask, Tensor) or kv_mask.dtype != torch.bool:
            raise TypeError("prefix_attention: kv_mask must be a bool tensor (True = attend), got "
                            f"{getattr(kv_mask, 'dtype', type(kv_mask).__name__)}")
        if kv_mask.shape != (B, k.shape[2]):
            raise ValueError(f"prefix_attention: kv_mask must have shape (B,Nk) = ({B},{k.shape[2]}), "
                             f"got {shape_str(kv_mask)}")
        if kv_mask.device != q.device:
            raise ValueError(f"prefix_attention: kv_mask must be on q's device {q.device}, got {kv_mask.device}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise TypeError(f"prefix_attention: scale must be a finite float or None, got {scale!r}")
    return Inputs(q.device, q.dtype, B, H, Nq, k.shape[2], P, d, shared, kv_mask is not None)


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor] = None,
                     prefix_v: Optional[Tensor] = None, *, kv_mask: Optional[Tensor] = None,
                     scale: Optional[float] = None) -> Tensor:
    """Attention over prompt-prefixed keys and values, without materialising the concatenation.

    Args:
        q: ``(B, H, Nq, d)`` queries; float32, bfloat16 or float16 (float64 on the reference/torch backends).
        k: ``(B, H, Nk, d)`` keys, same dtype and device as ``q``.
        v: ``(B, H, Nk, d)`` values.
        prefix_k: prompt keys, per sample ``(B, H, P, d)`` or shared by the batch ``(H, P, d)``; P may be 0.
        prefix_v: prompt values, the shape of ``prefix_k``. Give both or neither.
        kv_mask: ``(B, Nk)`` bool, True = attend. Masks sequence keys only; prefix keys are always attended.
            A row with nothing to attend returns zeros (and zero gradients).
        scale: softmax scale, default ``d ** -0.5``.

    Returns:
        ``(B, H, Nq, d)`` in the dtype of ``q``. Differentiable w.r.t. q, k, v, prefix_k and prefix_v
        (a shared prefix receives the sum over the batch).

    Equivalent PyTorch::

        kc = torch.cat([prefix_k.expand(B, -1, -1, -1), k], dim=2)
        vc = torch.cat([prefix_v.expand(B, -1, -1, -1), v], dim=2)
        mask = torch.cat([torch.ones(B, P, dtype=torch.bool), kv_mask], dim=1)[:, None, None]
        out = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=scale)

    The backend is chosen per call (see ``clfast info``); force one with ``clfast.ops.use_backend(name)``
    or ``CLFAST_BACKEND=name``.
    """
    inputs = _validate(q, k, v, prefix_k, prefix_v, kv_mask, scale)
    scale = softmax_scale(inputs.head_dim, scale)
    backend = _dispatch.select(OP, inputs)
    return backend.run(q, k, v, prefix_k, prefix_v, kv_mask, scale)


# ---------------------------------------------------------------------------------------------------
# nn.Module: a drop-in for timm's Attention
# ---------------------------------------------------------------------------------------------------


class PromptContext:
    """Carries the prefixes of one forward pass to the :class:`PromptedAttention` layers that share it.

    A model owns one context; its forward sets the prefixes for the layers it prompts::

        with ctx.prompts({0: (pk0, pv0), 3: (pk3, pv3)}):
            logits = vit(x)

    Prefixes are given per layer index as ``(prefix_k, prefix_v)``, each ``(B,P,C)`` / ``(P,C)`` in model
    width C (split into heads by the layer) or already ``(B,H,P,d)`` / ``(H,P,d)``. Layers without an entry
    run unprompted. Optional ``kv_mask`` (B, N) applies to every prompted layer.
    """

    def __init__(self) -> None:
        self._prefixes: dict[int, tuple[Tensor, Tensor]] = {}
        self.kv_mask: Optional[Tensor] = None

    def get(self, layer: int) -> Optional[tuple[Tensor, Tensor]]:
        return self._prefixes.get(layer)

    class _Scope:
        def __init__(self, ctx, prefixes, kv_mask):
            self.ctx, self.new = ctx, (dict(prefixes), kv_mask)

        def __enter__(self):
            self.old = (self.ctx._prefixes, self.ctx.kv_mask)
            self.ctx._prefixes, self.ctx.kv_mask = self.new
            return self.ctx

        def __exit__(self, *exc):
            self.ctx._prefixes, self.ctx.kv_mask = self.old
            return False

    def prompts(self, prefixes: dict[int, tuple[Tensor, Tensor]], kv_mask: Optional[Tensor] = None):
        """Context manager installing ``prefixes`` (layer -> (prefix_k, prefix_v)) for one forward."""
        return PromptContext._Scope(self, prefixes, kv_mask)


class PromptedAttention(torch.nn.Module):
    """timm ``Attention`` with prompt prefixes, reusing the wrapped module's qkv/proj weights.

    Args:
        attn: a ``timm.models.vision_transformer.Attention`` (or anything with ``qkv``, ``proj``,
            ``num_heads``, ``head_dim``, ``scale``, ``q_norm``, ``k_norm``, ``attn_drop``, ``proj_drop``).
        layer: this block's index, the key into the :class:`PromptContext`.
        context: the shared :class:`PromptContext`; a fresh private one if None.

    With no prefix for this layer the output equals the wrapped module's. Prefix keys/values enter after the
    qkv projection and are not normalised by ``k_norm`` (prefix tuning, as DualPrompt defines it).
    """

    def __init__(self, attn: torch.nn.Module, layer: int = 0, context: Optional[PromptContext] = None) -> None:
        super().__init__()
        for name in ("qkv", "proj", "num_heads", "head_dim", "scale"):
            if not hasattr(attn, name):
                raise TypeError(f"PromptedAttention: attn must look like timm's Attention (missing .{name}), "
                                f"got {type(attn).__name__}")
        self.qkv, self.proj = attn.qkv, attn.proj
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = getattr(attn, "attn_dim", self.num_heads * self.head_dim)
        self.q_norm = getattr(attn, "q_norm", torch.nn.Identity())
        self.k_norm = getattr(attn, "k_norm", torch.nn.Identity())
        self.norm = getattr(attn, "norm", torch.nn.Identity())
        self.gate = getattr(attn, "gate", None)
        self.attn_drop = getattr(attn, "attn_drop", torch.nn.Dropout(0.0))
        self.proj_drop = getattr(attn, "proj_drop", torch.nn.Dropout(0.0))
        self.layer = layer
        self.context = context if context is not None else PromptContext()

    def _heads(self, t: Tensor, batch: int, name: str) -> Tensor:
        H, d = self.num_heads, self.head_dim
        if t.dim() == 4 or (t.dim() == 3 and t.shape[0] == H and t.shape[-1] == d):
            return t
        if t.shape[-1] != H * d:
            raise ValueError(f"PromptedAttention(layer {self.layer}): {name} must have width {H * d} "
                             f"((B,P,C) or (P,C)) or be head-split ((B,H,P,d) or (H,P,d)), got {shape_str(t)}")
        if t.dim() == 2:
            return t.reshape(t.shape[0], H, d).transpose(0, 1)
        return t.reshape(t.shape[0], t.shape[1], H, d).transpose(1, 2)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        prefix = self.context.get(self.layer)
        pk = pv = None
        if prefix is not None:
            pk, pv = self._heads(prefix[0], B, "prefix_k"), self._heads(prefix[1], B, "prefix_v")
            pk, pv = pk.to(q.dtype), pv.to(q.dtype)
        dropout = self.attn_drop.p if self.training else 0.0
        if attn_mask is not None or is_causal or dropout > 0.0:
            # Rare paths (timm masks, causal, attention dropout): SDPA on the concatenation.
            if pk is not None:
                if is_causal:
                    raise ValueError("PromptedAttention: is_causal=True with a prompt prefix is ambiguous")
                k = torch.cat([_expand_prefix(pk, B), k], dim=2)
                v = torch.cat([_expand_prefix(pv, B), v], dim=2)
                if attn_mask is not None:
                    P = pk.shape[-2]
                    pad = (P, 0)
                    attn_mask = (F.pad(attn_mask, pad, value=True) if attn_mask.dtype == torch.bool
                                 else F.pad(attn_mask, pad, value=0.0))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout,
                                                 is_causal=is_causal, scale=self.scale)
        else:
            out = prefix_attention(q, k, v, pk, pv, kv_mask=self.context.kv_mask, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


# ---------------------------------------------------------------------------------------------------
# nn.MultiheadAttention: batch-first self-attention on the fused op
# ---------------------------------------------------------------------------------------------------


# Largest score matrix (B·H·L·S elements) masked_attention computes explicitly: 32 Mi elements, 64 MiB in bf16.
EXPLICIT_MAX_SCORES = 1 << 25


def masked_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                     is_causal: bool = False) -> Tensor:
    """``softmax(q·kᵀ/√d + attn_mask)·v`` for ``(B, H, L, d)`` heads with an additive ``(L, S)`` float mask in
    ``q``'s dtype, or the causal mask (``is_causal``, ``attn_mask`` None): the masked attention of
    :class:`FusedMultiheadAttention` (CLIP's text tower). SDPA's results, rows whose keys are all masked included
    (zeros).

    On the CPU in bf16, PyTorch's SDPA kernel (its flash-attention CPU path) is slower than the same attention
    as a ``baddbmm``, a softmax and a ``bmm``: 3.5–6× fwd+bwd and 1.6–2.2× forward at B 10–100, H 12, L 77–197,
    d 64 on an AMD EPYC with AVX512-BF16, 2 threads (bench_ops.py's ``masked_attention`` cases; SDPA's bf16
    backward there is about 3× its fp32 one), with errors against float64 of the same size. There, while the scores fit
    in :data:`EXPLICIT_MAX_SCORES` elements, the attention runs explicitly (``torch.compile`` traces it in one
    graph); everywhere else (fp32, GPUs, longer sequences) it is SDPA."""
    B, H, L, d = q.shape
    S = k.shape[-2]
    if not (q.device.type == "cpu" and q.dtype == torch.bfloat16 and B * H * L * S <= EXPLICIT_MAX_SCORES):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    keyless = None
    if is_causal:       # SDPA's causal mask: aligned at the top left (row i sees keys 0..i: never keyless)
        attn_mask = torch.zeros(L, S, dtype=q.dtype, device=q.device).masked_fill_(
            torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    else:
        # A row with no key gets SDPA's zeros (and zero gradients), not softmax's NaN: its mask row set finite, its
        # output row zeroed. That fill costs a pass over the output (4–30 % of the call at text-tower shapes), so eager
        # calls pay it only when such a row exists; a compiled graph takes it always (no branch on data; fused there).
        keyless = torch.isneginf(attn_mask).all(-1, keepdim=True)
        if torch.compiler.is_compiling() or bool(keyless.any()):
            attn_mask = attn_mask.masked_fill(keyless, 0.0)
        else:
            keyless = None
    scores = torch.baddbmm(attn_mask.expand(B * H, L, S), q.reshape(B * H, L, d),
                           k.reshape(B * H, S, d).transpose(1, 2), alpha=d ** -0.5)
    out = torch.bmm(scores.softmax(-1), v.reshape(B * H, S, v.shape[-1])).view(B, H, L, v.shape[-1])
    return out if keyless is None else out.masked_fill(keyless, 0.0)


class FusedMultiheadAttention(torch.nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose batch-first self-attention runs :func:`prefix_attention` (no prefix).

    Same parameters and state-dict keys as the module it replaces, and its results up to rounding (see
    :func:`fuse_self_attention`); any call it does not cover — cross-attention, ``need_weights=True``,
    ``key_padding_mask``, attention dropout while training, separate k/v projections, ``bias_k`` or
    ``add_zero_attn`` — runs PyTorch's own forward. With an ``attn_mask`` (or ``is_causal``) the attention itself is
    :func:`masked_attention` (SDPA, or its explicit form on the CPU in bf16).

    Why: PyTorch's module transposes a batch-first input to ``(L, B, D)`` before its in-projection, and that
    strided 3-D ``linear`` becomes a ``bmm`` against the weight copied ``L`` times whenever it cannot be folded
    into one matrix product — which is the case under bf16 autocast with a bf16 input (every frozen open_clip
    tower under ``amp``): a ViT-B/16 block at 577 tokens took 1.1 s instead of 0.03 s. In fp32 the module's
    fused inference path is skipped too, and the projections here are plain 2-D matrix products.
    """

    def _covers(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask, need_weights: bool,
                attn_mask) -> bool:
        return (query is key and key is value and self.batch_first and query.dim() == 3
                and not need_weights and key_padding_mask is None and self._qkv_same_embed_dim
                and self.bias_k is None and not self.add_zero_attn
                and (not self.training or self.dropout == 0.0)
                and (attn_mask is None or attn_mask.dim() == 2))

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if not self._covers(query, key, value, key_padding_mask, need_weights, attn_mask):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        B, L, D = query.shape
        H = self.num_heads
        qkv = F.linear(query.reshape(B * L, D), self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        if is_causal:   # nn.MultiheadAttention: is_causal is a hint that attn_mask is the causal mask
            out = masked_attention(q, k, v, None, is_causal=True)
        elif attn_mask is not None:
            if attn_mask.dtype == torch.bool:   # nn.MultiheadAttention's True = masked out (SDPA's is the reverse)
                attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
                    attn_mask, float("-inf"))
            out = masked_attention(q, k, v, attn_mask.to(q.dtype))
        else:
            out = prefix_attention(q, k, v)
        out = F.linear(out.transpose(1, 2).reshape(B * L, D), self.out_proj.weight, self.out_proj.bias)
        return out.view(B, L, D), None


def fuse_self_attention(model: torch.nn.Module) -> int:
    """Turn every ``nn.MultiheadAttention`` in ``model`` into a :class:`FusedMultiheadAttention`, in place.

    The modules keep their identity, parameters, hooks and state-dict keys (only their class changes), so
    optimizers, checkpoints and references to them stay valid. Subclasses of ``nn.MultiheadAttention`` are
    left alone (their forward may differ). Returns how many modules were changed; calling it twice is harmless.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fuse_self_attention: model must be an nn.Module, got {type(model).__name__}")
    n = 0
    for m in model.modules():
        if type(m) is torch.nn.MultiheadAttention:
            m.__class__ = FusedMultiheadAttention
            n += 1
    return n
