"""class_select: STAR-Prompt's per-layer class selection by modulated cosine, with its argmax gradient.

Per layer l, sample b and seen class c (spec: methods/star_prompt.md §2 "Level 2", §3 "Argmax gradient")::

    a[l,c]    = softmax_d(A[l,c])                                  A: (L, C, Dc) modulators
    s[l,b,c]  = scale · <normalize(q[b] ⊙ a[l,c]), k[c]>            q: (B, Dc) raw CLIP query, k: (C, Dc) keys
    c*[l,b]   = argmax_c s[l,b,c]                                   (ties: the lower index)
    π[l,b]    = w[l,b] · P[l,c*]      w = s[l,b,c*] (confidence=True) or 1      P: (L, C, E) values

``normalize`` is F.normalize's (the norm clamped to at least 1e-12). The keys are used as given, exactly as the
official code does (``einsum('bcd,cd->bc', normalize(q ⊙ a), keys) * 5``): STAR-Prompt's keys are unit-norm
CLIP text features, and then ``s`` is ``scale`` times the cosine of ``q ⊙ a`` and ``k``; for keys of other
norms ``s`` is still the official score (the inner product with the key), not a cosine.

Two-GEMM form (exact). With ``M[l,c] = a[l,c] ⊙ k[c]``::

    <q ⊙ a, k> = q · M       and       |q ⊙ a|² = q² · a²
    s[l] = scale · (q Mᵀ) / sqrt(max(q² (a²)ᵀ, eps²))

so every score of every layer comes from two GEMMs ``(B, Dc) @ (Dc, L·C)``; the ``(L, B, C, Dc)`` tensor of
modulated queries that the official code builds (then normalises and contracts with the keys) is never formed.
``q² · a²`` sums non-negative terms, so the norm is as accurate as the explicit one.

Gradient of the selection. The official code writes the argmax mask into ``s`` in place under ``no_grad`` and
forms ``π = masked_s @ P``; autograd then sends ``∂s[l,b,c] = <∂π[l,b], P[l,c]>`` to *every* class c
(straight-through to all modulators), while ``P`` gets gradient on the selected rows only
(``∂P[l,c] = Σ_{b: c*[l,b]=c} w[l,b]·∂π[l,b]``). ``strict_grad=False`` (default) reproduces this;
``strict_grad=True`` is the gradient of a gather: ``∂s`` non-zero at ``c*`` only. With ``confidence=False`` the
weight is the constant 1 (the official code binarises the mask), so nothing reaches ``s`` from ``π``. The
gradient of ``s`` then flows to ``A`` (through the softmax), ``q`` and ``k`` by the two-GEMM formula's own
GEMMs. A gradient of the returned ``scores`` is added to ``∂s``.

Why no C++ or Triton kernel. Two GEMMs in the forward and at most six in the backward are the whole of the
arithmetic (at STAR's shapes, B = 16 and 12×200 classes of Dc = 768, each is about 60 MFLOP), and BLAS/cuBLAS
already run GEMMs at their best; what is left is a few elementwise passes over ``(L, C, Dc)`` (softmax,
``a ⊙ k``, ``a²``, the softmax backward) and an argmax over ``(L, B, C)``. A fused kernel could only fold those
passes into the GEMMs' operand loads, on an op that costs tens of milliseconds per step on a 2-core CPU, against
seconds for the ViT-B step it feeds (the backward is plain torch code, whose passes torch.compile can fuse). So the
op has two backends: ``reference`` (the explicit official form, the spec) and ``torch`` (the two-GEMM form inside
the registered op ``clfast::class_select``, a custom_op with a fake implementation and a hand-written backward
for both gradient modes, so torch.compile traces a model that uses it without graph breaks).

Edge cases. Exactly equal scores select the lower index (torch.argmax's first maximum); a NaN score is selected,
as in the official code. Without confidence the weight is 1 whatever the score (the official binarisation
``masked != 0`` would also zero a prompt whose selected score is exactly 0).

Public: :func:`class_select` (prompts, indices, scores) and :func:`modulated_cosine` (the differentiable
scores alone, two GEMMs, plain autograd).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from clfast.ops import _backends, _dispatch
from clfast.ops._backends import LOWP, define_op
from clfast.ops._checks import check_float_tensor, shape_str
from clfast.ops._dispatch import register_backend

__all__ = ["class_select", "modulated_cosine", "reference", "reference_scores"]

OP = "class_select"
NORM_EPS = 1e-12  # F.normalize's eps: |q ⊙ a| is clamped to at least this
_EPS2 = NORM_EPS * NORM_EPS  # the same clamp on the squared norm (1e-24 is a normal float32)


class Inputs(NamedTuple):
    """What backends look at to decide whether they can run a call."""

    device: torch.device
    dtype: torch.dtype
    layers: int
    batch: int
    classes: int
    dim: int
    value_dim: int


# ---------------------------------------------------------------------------------------------------
# The spec: the official computation over the explicit (L, B, C, Dc) tensor
# ---------------------------------------------------------------------------------------------------


def reference_scores(query: Tensor, modulators: Tensor, keys: Tensor, scale: float = 5.0) -> Tensor:
    """``(L, B, C)`` scores as the official code computes them: the modulated queries ``q ⊙ a`` as an
    ``(L, B, C, Dc)`` tensor, F.normalize over Dc, contracted with the keys, times ``scale``. Differentiable."""
    a = torch.softmax(modulators, dim=-1)                        # (L, C, Dc)
    x = query[None, :, None, :] * a[:, None, :, :]              # (L, B, C, Dc)
    return torch.einsum("lbcd,cd->lbc", F.normalize(x, dim=-1, eps=NORM_EPS), keys) * scale


def reference(query: Tensor, modulators: Tensor, keys: Tensor, values: Tensor, *, scale: float = 5.0,
              confidence: bool = True, strict_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The spec, in the inputs' dtype, differentiable by autograd: :func:`reference_scores`, then the official
    selection: the argmax mask written in place under ``no_grad`` (non-selected scores set to 0) and
    ``π = masked_s @ P``, which gives the official (straight-through) gradient; with ``strict_grad``, a
    ``gather`` of the selected score instead. With ``confidence=False`` the mask is binary (``π = P[c*]``).
    Returns ``(prompts (L,B,E), indices (L,B) int64, scores (L,B,C))``."""
    s = reference_scores(query, modulators, keys, scale)
    idx = s.detach().argmax(dim=-1)                             # torch.argmax: the first maximum
    if not confidence:
        onehot = F.one_hot(idx, s.shape[-1]).to(values.dtype)  # a constant: no gradient reaches s
        return onehot @ values, idx, s
    if strict_grad:
        w = s.gather(-1, idx[..., None])                        # (L, B, 1)
        rows = values.gather(1, idx[..., None].expand(-1, -1, values.shape[-1]))
        return w * rows, idx, s
    masked = s.clone()
    with torch.no_grad():  # the official in-place mask: autograd does not see it
        keep = F.one_hot(idx, s.shape[-1]).bool()
        masked[~keep] = 0.0
    return masked @ values, idx, s


# ---------------------------------------------------------------------------------------------------
# The two-GEMM form
# ---------------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """16-bit inputs are computed in float32; float32 and float64 as they are."""
    return torch.float32 if dtype in LOWP else dtype


def _numerator_and_sq_norm(q: Tensor, a: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    """``<q ⊙ a, k>`` and ``|q ⊙ a|²``, each ``(L, B, C)``, by two GEMMs ``(B, Dc) @ (Dc, L·C)``."""
    L, C, Dc = a.shape
    B = q.shape[0]
    num = q @ (a * keys).reshape(L * C, Dc).T                   # (B, L·C)
    sq = (q * q) @ (a * a).reshape(L * C, Dc).T
    return num.view(B, L, C).transpose(0, 1), sq.view(B, L, C).transpose(0, 1)


def _norm(sq: Tensor) -> Tensor:
    """max(|x|, eps) from |x|², clamped before the root so that a zero norm has a zero (not NaN) gradient."""
    return sq.clamp_min(_EPS2).sqrt()


def _scores(q: Tensor, a: Tensor, keys: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(scores, squared norms), each ``(L, B, C)``."""
    num, sq = _numerator_and_sq_norm(q, a, keys)
    return num * scale / _norm(sq), sq


def _select_forward(query: Tensor, modulators: Tensor, keys: Tensor, values: Tensor, scale: float,
                    confidence: bool, strict_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Body of ``clfast::class_select``: (prompts (L,B,E) values' dtype, indices (L,B) int64, scores (L,B,C)
    query's dtype, sq (L,B,C) the squared norms |q ⊙ a|² in the compute dtype, kept for the backward).
    ``strict_grad`` matters to the backward only."""
    acc = _acc_dtype(query.dtype)
    a = torch.softmax(modulators.to(acc), dim=-1)
    s, sq = _scores(query.to(acc), a, keys.to(acc), scale)
    idx = s.argmax(dim=-1).contiguous()                         # (L, B), the first maximum
    rows = values.gather(1, idx[..., None].expand(-1, -1, values.shape[-1]))  # (L, B, E): P[l, c*]
    if confidence:
        rows = (s.gather(-1, idx[..., None]) * rows.to(acc)).to(values.dtype)
    return rows.contiguous(), idx, s.to(query.dtype).contiguous(), sq.contiguous()


def _fake(query, modulators, keys, values, scale, confidence, strict_grad):
    L, B, C, E = modulators.shape[0], query.shape[0], keys.shape[0], values.shape[-1]
    acc = _acc_dtype(query.dtype)
    return (values.new_empty((L, B, E)), query.new_empty((L, B), dtype=torch.int64), query.new_empty((L, B, C)),
            query.new_empty((L, B, C), dtype=acc))


_SCHEMA = ("(Tensor query, Tensor modulators, Tensor keys, Tensor values, float scale, bool confidence, "
           "bool strict_grad) -> (Tensor, Tensor, Tensor, Tensor)")
_op = define_op(OP, _SCHEMA, _select_forward, _fake)


def _setup_context(ctx, inputs, output):
    query, modulators, keys, values, scale, confidence, strict_grad = inputs
    _prompts, idx, scores, sq = output
    ctx.save_for_backward(query, modulators, keys, values, idx, scores, sq)
    ctx.scale, ctx.confidence, ctx.strict_grad = scale, confidence, strict_grad
    ctx.mark_non_differentiable(idx, sq)
    # unused outputs (often the scores) arrive as None rather than as zero-filled (L, B, C) tensors
    ctx.set_materialize_grads(False)


def _score_grad_from_prompts(g: Tensor, values: Tensor, idx: Tensor, acc: torch.dtype, strict: bool) -> Tensor:
    """``∂s`` ``(L, B, C)`` from ``∂π = g`` ``(L, B, E)`` (confidence on). Official: ``<g[l,b], P[l,c]>`` for every
    c, one batched GEMM. Strict: the same at ``c*`` only (the gradient of a gather)."""
    if not strict:
        return torch.bmm(g, values.to(acc).transpose(1, 2))
    L, B = idx.shape
    rows = values.gather(1, idx[..., None].expand(-1, -1, values.shape[-1])).to(acc)
    ds = g.new_zeros((L, B, values.shape[1]))
    return ds.scatter_(-1, idx[..., None], (g * rows).sum(-1, keepdim=True))


def _backward(ctx, d_prompts, _d_idx, d_scores, _d_sq):
    query, modulators, keys, values, idx, scores, sq = ctx.saved_tensors
    need_q, need_a, need_k, need_p = ctx.needs_input_grad[:4]
    acc = _acc_dtype(query.dtype)
    s = scores.to(acc)
    dq = da_out = dk = dp = None

    if need_p and d_prompts is not None:
        # π = masked_s @ P  ⇒  ∂P = masked_sᵀ @ ∂π: non-zero on the selected rows only (one deterministic bmm)
        w = s.gather(-1, idx[..., None]) if ctx.confidence else s.new_ones(idx.shape + (1,))
        masked = s.new_zeros(s.shape).scatter_(-1, idx[..., None], w)
        dp = torch.bmm(masked.transpose(1, 2), d_prompts.to(acc)).to(values.dtype)

    ds = None
    if ctx.confidence and d_prompts is not None:
        ds = _score_grad_from_prompts(d_prompts.to(acc), values, idx, acc, ctx.strict_grad)
    if d_scores is not None:
        ds = d_scores.to(acc) if ds is None else ds + d_scores.to(acc)

    if ds is not None and (need_q or need_a or need_k):
        L, B, C = s.shape
        Dc = query.shape[1]
        q, k = query.to(acc), keys.to(acc)
        a = torch.softmax(modulators.to(acc), dim=-1)
        n = _norm(sq)
        # s = scale·num/n:  ∂num = scale·∂s/n;  ∂(|x|²) = −∂s·s/(2n²) where the clamp is inactive
        u = ds * (ctx.scale / n)
        v = torch.where(sq >= _EPS2, ds * s / (-2.0 * n * n), 0.0)
        u2 = u.transpose(0, 1).reshape(B, L * C)                # (B, L·C): one GEMM sums over the layers
        v2 = v.transpose(0, 1).reshape(B, L * C)
        if need_q:
            dq = u2 @ (a * k).reshape(L * C, Dc) + 2.0 * q * (v2 @ (a * a).reshape(L * C, Dc))
            dq = dq.to(query.dtype)
        if need_a or need_k:
            dm = (u2.T @ q).view(L, C, Dc)                      # ∂M, M = a ⊙ k
            if need_k:
                dk = (dm * a).sum(0).to(keys.dtype)
            if need_a:
                da = dm * k + 2.0 * a * (v2.T @ (q * q)).view(L, C, Dc)
                # softmax backward. s does not change when a is scaled, so Σ_d ∂a·a = 0 wherever the norm clamp is
                # inactive; the term is kept for the clamped case (|q ⊙ a| < eps), where s is linear in a.
                da_out = (a * (da - (da * a).sum(-1, keepdim=True))).to(modulators.dtype)
    return dq, da_out, dk, dp, None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------


class _Tolerances:
    # Scores are O(scale) = O(5) sums of Dc products: GEMM rounding differs from the explicit form's only.
    ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}
    GRAD_ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@register_backend
class ReferenceBackend(_Tolerances, _backends.Reference):
    """The official form over the explicit (L, B, C, Dc) tensor, differentiated by autograd."""

    OP = OP

    @staticmethod
    def run(query, modulators, keys, values, scale, confidence, strict_grad):
        return reference(query, modulators, keys, values, scale=scale, confidence=confidence,
                         strict_grad=strict_grad)


@register_backend
class TorchBackend(_Tolerances, _backends.Torch):
    """The two-GEMM form inside ``clfast::class_select`` with its hand-written backward."""

    OP = OP

    @staticmethod
    def run(query, modulators, keys, values, scale, confidence, strict_grad):
        prompts, idx, scores, _sq = _op(query, modulators, keys, values, float(scale), confidence, strict_grad)
        return prompts, idx, scores


_backends.set_priorities(OP, cpu=["torch", "reference"], cuda=["torch", "reference"])


# ---------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------


def _check_flag(fn: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {type(value).__name__}")


def _check_scale(fn: str, scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{fn}: scale must be a float, got {type(scale).__name__}")


def _validate_scores(fn: str, query, modulators, keys, scale) -> tuple[int, int, int, int]:
    """(L, B, C, Dc) after checking query (B,Dc), modulators (L,C,Dc), keys (C,Dc): one dtype, one device."""
    check_float_tensor(fn, "query", query, shape="(B,Dc)", dim=2)
    B, Dc = query.shape
    if Dc < 1:
        raise ValueError(f"{fn}: query must have shape (B,Dc) with Dc >= 1, got {shape_str(query)}")
    check_float_tensor(fn, "modulators", modulators, shape=f"(L,C,Dc) = (L,C,{Dc})", dim=3)
    L, C = modulators.shape[:2]
    if modulators.shape[2] != Dc:
        raise ValueError(f"{fn}: modulators must have shape (L,C,Dc) = (L,C,{Dc}) to match query "
                         f"{shape_str(query)}, got {shape_str(modulators)}")
    if C < 1:
        raise ValueError(f"{fn}: modulators must have shape (L,C,Dc) with C >= 1 (classes to select from), "
                         f"got {shape_str(modulators)}")
    check_float_tensor(fn, "keys", keys, shape=f"(C,Dc) = ({C},{Dc})", dim=2)
    if tuple(keys.shape) != (C, Dc):
        raise ValueError(f"{fn}: keys must have shape (C,Dc) = ({C},{Dc}) to match modulators "
                         f"{shape_str(modulators)}, got {shape_str(keys)}")
    for name, t in (("modulators", modulators), ("keys", keys)):
        if t.dtype != query.dtype:
            raise TypeError(f"{fn}: {name} must have query's dtype {query.dtype}, got {t.dtype}")
        if t.device != query.device:
            raise ValueError(f"{fn}: {name} must be on query's device {query.device}, got {t.device}")
    _check_scale(fn, scale)
    return L, B, C, Dc


def modulated_cosine(query: Tensor, modulators: Tensor, keys: Tensor, *, scale: float = 5.0) -> Tensor:
    """STAR-Prompt's modulated scores of every (layer, sample, class), by two GEMMs.

    Args:
        query: ``(B, Dc)`` raw CLIP image features (their scale cancels); float32, float64, bfloat16 or float16.
        modulators: ``(L, C, Dc)`` modulator logits A (softmax over Dc gives the modulation); query's dtype and
            device.
        keys: ``(C, Dc)`` class keys (STAR-Prompt's are unit-norm; used as given, see the module docstring).
        scale: the score scale (STAR-Prompt: 5).

    Returns:
        ``(L, B, C)`` scores in query's dtype (16-bit inputs are computed in float32), differentiable w.r.t. all
        three inputs by autograd through the two GEMMs.

    Equivalent PyTorch (the official form, ``(L, B, C, Dc)`` in memory)::

        a = torch.softmax(modulators, -1)
        x = F.normalize(query[None, :, None] * a[:, None], dim=-1)
        scores = scale * torch.einsum("lbcd,cd->lbc", x, keys)
    """
    _validate_scores("modulated_cosine", query, modulators, keys, scale)
    acc = _acc_dtype(query.dtype)
    a = torch.softmax(modulators.to(acc), dim=-1)
    return _scores(query.to(acc), a, keys.to(acc), float(scale))[0].to(query.dtype)


def _validate(query, modulators, keys, values, scale, confidence, strict_grad) -> Inputs:
    fn = "class_select"
    L, B, C, Dc = _validate_scores(fn, query, modulators, keys, scale)
    check_float_tensor(fn, "values", values, shape=f"(L,C,E) = ({L},{C},E)", dim=3)
    if tuple(values.shape[:2]) != (L, C):
        raise ValueError(f"{fn}: values must have shape (L,C,E) = ({L},{C},E) to match modulators "
                         f"{shape_str(modulators)}, got {shape_str(values)}")
    if values.dtype != query.dtype:
        raise TypeError(f"{fn}: values must have query's dtype {query.dtype}, got {values.dtype}")
    if values.device != query.device:
        raise ValueError(f"{fn}: values must be on query's device {query.device}, got {values.device}")
    _check_flag(fn, "confidence", confidence)
    _check_flag(fn, "strict_grad", strict_grad)
    return Inputs(query.device, query.dtype, L, B, C, Dc, values.shape[2])


def class_select(query: Tensor, modulators: Tensor, keys: Tensor, values: Tensor, *, scale: float = 5.0,
                 confidence: bool = True, strict_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """STAR-Prompt's level-2 prompts: per layer, the class whose modulated key best matches the query, and its
    value prompt weighted by that score.

    Args:
        query: ``(B, Dc)`` raw CLIP image features; float32, float64, bfloat16 or float16 (16-bit inputs are
            computed in float32).
        modulators: ``(L, C, Dc)`` modulator logits A of the C seen classes; query's dtype and device. Past
            classes that must not train are passed detached (``torch.cat([A[:, :past].detach(), A[:, past:]], 1)``).
        keys: ``(C, Dc)`` class keys, used as given (STAR-Prompt's are unit-norm).
        values: ``(L, C, E)`` value prompts P (E = 768 residual; concat mode flattens ``(C, 10, 768)`` per layer to
            E = 7680); any E.
        scale: the score scale (STAR-Prompt: 5).
        confidence: weight the selected prompt by its score (STAR's confidence modulation); False: weight 1, and
            nothing flows from the prompts back to the scores.
        strict_grad: False (default): the official straight-through gradient, ``∂s[l,b,c] = <∂π[l,b], P[l,c]>``
            for every class c; True: the gradient of a gather (``c*`` only). Either way P gets gradient on the
            selected rows only.

    Returns:
        ``(prompts, indices, scores)``: prompts ``(L, B, E)`` in values' dtype, ``π[l,b] = w·P[l, c*[l,b]]``;
        indices ``(L, B)`` int64, ``c*`` (ties: the lower index); scores ``(L, B, C)`` in query's dtype,
        differentiable (their gradient adds to the selection's).

    Equivalent PyTorch (the official code; ``strict_grad=False``, ``confidence=True``)::

        a = torch.softmax(modulators, -1)
        s = scale * torch.einsum("lbcd,cd->lbc", F.normalize(query[None, :, None] * a[:, None], dim=-1), keys)
        masked = s.clone()
        with torch.no_grad():
            masked[~F.one_hot(s.argmax(-1), C).bool()] = 0
        prompts, indices, scores = masked @ values, s.argmax(-1), s

    The ``torch`` backend computes the scores by two GEMMs (the module docstring) inside ``clfast::class_select``
    and never forms the ``(L, B, C, Dc)`` tensor; ``use_backend("reference", op="class_select")`` runs the code
    above.
    """
    inputs = _validate(query, modulators, keys, values, scale, confidence, strict_grad)
    backend = _dispatch.select(OP, inputs)
    return backend.run(query, modulators, keys, values, float(scale), confidence, strict_grad)
