"""clfast.ops.class_select / modulated_cosine: STAR-Prompt's per-layer class selection.

Oracles, written here independently of the module, one per layer as the official code runs (mammoth
``second_stage_model.py``: ``compute_maps``, ``get_masked_clip_out``, ``compute_super_prompts``):
- scores: ``scale · cos(q ⊙ softmax(A_c), k_c)`` over a ``(B, C, Dc)`` tensor (F.cosine_similarity);
- official gradient: the argmax mask written IN PLACE into the scores under ``no_grad``, then ``masked_s @ P``;
- strict gradient: ``gather`` of the selected score times the selected row of P.
Both backends (``torch``: the two-GEMM registered op, ``reference``: the module's spec) are held to them on odd
shapes, in float64 and float32; then gradcheck, opcheck, torch.compile, 16-bit and non-contiguous inputs,
bad input.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.gradcheck import GradcheckError

from clfast.ops import class_select, modulated_cosine, use_backend
from clfast.ops import selection as sel
from tests.ops._util import assert_compiles_like_eager, cast, max_err, opcheck, runnable_backends

OP = "class_select"
BACKENDS = runnable_backends(OP)
SCALE = 5.0
E = 11
SHAPES = list(itertools.product((1, 3), (1, 5), (1, 7), (9, 33)))  # (L, B, C, Dc)
SHAPE_IDS = [f"L{L}B{B}C{C}D{D}" for L, B, C, D in SHAPES]
# float32 against a float64 oracle: scores are O(SCALE) sums of Dc products
TOL = {torch.float64: 1e-11, torch.float32: 2e-5}


def make_case(L, B, C, Dc, *, seed=0, unit_keys=True):
    """float64 (query, modulators, keys, values). The query is raw-CLIP-like (entries of a few units, its scale
    cancels), modulators N(0, 1) so that the softmax is far from uniform, keys unit-norm unless told."""
    g = torch.Generator().manual_seed(seed + 1000 * L + 100 * B + 10 * C + Dc)
    q = 3.0 * torch.randn(B, Dc, generator=g, dtype=torch.float64)
    A = torch.randn(L, C, Dc, generator=g, dtype=torch.float64)
    k = torch.randn(C, Dc, generator=g, dtype=torch.float64)
    if unit_keys:
        k = F.normalize(k, dim=-1)
    P = torch.randn(L, C, E, generator=g, dtype=torch.float64)
    return q, A, k, P


# ---------------------------------------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------------------------------------


def cosine_oracle(q, A, k, scale=SCALE):
    """(L, B, C): per layer, ``scale · cos(q ⊙ softmax(A_c), k_c)`` over the explicit (B, C, Dc) tensor."""
    out = []
    for layer in range(A.shape[0]):
        x = q[:, None, :] * torch.softmax(A[layer], dim=-1)[None]           # (B, C, Dc)
        out.append(scale * F.cosine_similarity(x, k[None], dim=-1))
    return torch.stack(out)


def _official_maps(q, A_l, k, scale):
    """The official ``compute_maps``: expand, modulate, F.normalize, einsum with the keys, times 5."""
    a = torch.softmax(A_l, dim=-1)
    x = q.unsqueeze(1).expand(q.shape[0], A_l.shape[0], q.shape[-1]) * a[None]
    return torch.einsum("bcd,cd->bc", F.normalize(x, dim=-1), k) * scale


def official_scores(q, A, k, scale=SCALE):
    """(L, B, C): the official ``compute_maps`` of every layer."""
    return torch.stack([_official_maps(q, A[layer], k, scale) for layer in range(A.shape[0])])


def official_oracle(q, A, k, P, *, confidence=True, scale=SCALE):
    """(prompts (L,B,E), indices (L,B)) exactly as the official code: the argmax mask written into the scores in
    place under no_grad, binarised without confidence modulation, then ``masked_s @ P``."""
    prompts, indices = [], []
    for layer in range(A.shape[0]):
        s = _official_maps(q, A[layer], k, scale)
        indices.append(s.argmax(dim=1))
        with torch.no_grad():
            mask = torch.ones_like(s, dtype=torch.bool)
            mask.scatter_(1, s.argmax(dim=1, keepdim=True), False)
            s[mask] = 0.0
        if not confidence:
            s = (s != 0).to(s.dtype)
        prompts.append(torch.einsum("bc,cd->bd", s, P[layer]))
    return torch.stack(prompts), torch.stack(indices)


def gather_oracle(q, A, k, P, *, scale=SCALE):
    """(prompts, indices) with the gradient of a gather: the selected score times the selected row."""
    prompts, indices = [], []
    for layer in range(A.shape[0]):
        s = _official_maps(q, A[layer], k, scale)
        idx = s.argmax(dim=1)
        prompts.append(s.gather(1, idx[:, None]) * P[layer][idx])
        indices.append(idx)
    return torch.stack(prompts), torch.stack(indices)


def _leaves(tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _grads(out, xs, dout):
    return torch.autograd.grad(out, xs, dout, allow_unused=True)


def _assert_margin(scores64):
    """The case's best class leads the runner-up by a margin far above float32 rounding (a float32 argmax that
    differed from the float64 one would make the comparison meaningless, not wrong): fail loudly otherwise."""
    if scores64.shape[-1] > 1:
        top2 = scores64.topk(2, dim=-1).values
        assert (top2[..., 0] - top2[..., 1]).min() > 1e-4, "near tie in the test case: change its seed"


# ---------------------------------------------------------------------------------------------------------
# 1. Scores: the two-GEMM form equals the explicit cosine, forward and gradient; same argmax
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_scores_equal_the_explicit_cosine(shape, dtype):
    L, B, C, Dc = shape
    case = make_case(L, B, C, Dc)
    x64 = _leaves([t.to(dtype).double() for t in case[:3]])  # the float64 oracle sees the values the op sees
    ref = cosine_oracle(*x64)
    dout = torch.randn(ref.shape, dtype=torch.float64)
    ref_grads = list(_grads(ref, x64, dout))
    # The keys enter as given (the official inner product with them), so their gradient has no projection onto
    # the unit sphere, unlike a cosine's: it is the official form's.
    k64 = x64[2].detach().requires_grad_(True)
    ref_grads[2] = torch.autograd.grad(official_scores(x64[0].detach(), x64[1].detach(), k64), k64, dout)[0]
    _assert_margin(ref)

    for name, fn in (("modulated_cosine", lambda q, A, k: modulated_cosine(q, A, k, scale=SCALE)),
                     ("class_select", lambda q, A, k: class_select(q, A, k, case[3].to(dtype), scale=SCALE,
                                                                   confidence=False)[2])):
        xs = _leaves([t.to(dtype) for t in case[:3]])
        out = fn(*xs)
        assert out.shape == (L, B, C) and out.dtype == dtype, name
        assert max_err(out, ref) <= TOL[dtype] * SCALE, name
        for what, g, r in zip(("query", "modulators", "keys"), _grads(out, xs, dout.to(dtype)), ref_grads):
            assert max_err(g, r) <= TOL[dtype] * max(1.0, r.abs().max().item()), f"{name}: d{what}"
    idx = class_select(*[t.to(dtype) for t in case], scale=SCALE)[1]
    assert idx.dtype == torch.int64 and torch.equal(idx, ref.argmax(-1))


def test_scores_with_non_unit_keys_are_the_official_inner_product():
    """Keys are used as given, as the official code uses them: <normalize(q ⊙ a), k>, not a cosine."""
    q, A, k, P = make_case(3, 5, 7, 33, unit_keys=False)
    assert (k.norm(dim=-1) - 1).abs().max() > 0.1
    expected = official_scores(q, A, k)
    assert max_err(modulated_cosine(q, A, k, scale=SCALE), expected) < 1e-12
    assert max_err(class_select(q, A, k, P, scale=SCALE)[2], expected) < 1e-12
    assert max_err(sel.reference_scores(q, A, k, SCALE), expected) < 1e-12


def test_scale_and_ties():
    q, A, k, P = make_case(1, 5, 3, 9)
    assert max_err(modulated_cosine(q, A, k, scale=2.5), cosine_oracle(q, A, k, scale=2.5)) < 1e-12
    # every class a copy of class 0: all scores tie exactly, and the lowest index wins
    A[:] = A[:, :1]
    k[:] = k[:1]
    prompts, idx, s = class_select(q, A, k, P)
    assert torch.equal(s, s[..., :1].expand_as(s)) and torch.equal(idx, torch.zeros_like(idx))
    assert torch.equal(prompts, s[..., :1] * P[:, :1].expand(1, 5, E))


# ---------------------------------------------------------------------------------------------------------
# 2. The selection's gradient: official (in-place mask) and strict (gather)
# ---------------------------------------------------------------------------------------------------------

GRAD_SHAPES = [(1, 1, 1, 9), (3, 5, 7, 33), (3, 1, 7, 9), (1, 5, 7, 33)]


def _run_backend(name, xs, **kw):
    with use_backend(name, op=OP):
        return class_select(*xs, scale=SCALE, **kw)


def _assert_p_grad_on_selected_rows_only(dP, idx):
    L, C = dP.shape[:2]
    selected = torch.zeros(L, C, dtype=torch.bool)
    selected[torch.arange(L)[:, None].expand_as(idx), idx] = True
    assert torch.all(dP[~selected] == 0), "P got gradient on a row that no sample selected"
    assert torch.all(dP[selected].abs().amax(-1) > 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=[f"L{a}B{b}C{c}D{d}" for a, b, c, d in GRAD_SHAPES])
@pytest.mark.parametrize("strict", [False, True], ids=["official", "strict"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_selection_gradient_matches_the_oracle(backend, strict, shape, dtype):
    case = [t.to(dtype) for t in make_case(*shape)]
    x64 = _leaves([t.double() for t in case])
    oracle = gather_oracle if strict else official_oracle
    ref, ref_idx = oracle(*x64)
    _assert_margin(cosine_oracle(*[t.detach() for t in x64[:3]]))
    dout = torch.randn(ref.shape, dtype=torch.float64)
    ref_grads = _grads(ref, x64, dout)

    xs = _leaves(case)
    prompts, idx, _ = _run_backend(backend, xs, strict_grad=strict)
    assert torch.equal(idx, ref_idx)
    assert prompts.shape == ref.shape and prompts.dtype == dtype
    assert max_err(prompts, ref) <= TOL[dtype] * max(1.0, ref.abs().max().item())
    got = _grads(prompts, xs, dout.to(dtype))
    for what, g, r in zip(("query", "modulators", "keys", "values"), got, ref_grads):
        assert max_err(g, r) <= TOL[dtype] * max(1.0, r.abs().max().item()), f"d{what}"
    _assert_p_grad_on_selected_rows_only(got[3], idx)
    if not strict and shape[2] > 1:
        # straight-through: every class's modulators move, not only the selected ones
        assert torch.all(got[1].abs().amax(-1) > 0)


def test_strict_gradient_reaches_only_selected_modulators():
    xs = _leaves(make_case(3, 1, 7, 9))
    prompts, idx, _ = class_select(*xs, strict_grad=True)
    dA = torch.autograd.grad(prompts.sum(), xs[1])[0]
    moved = dA.abs().amax(-1) > 0                                          # (L, C)
    assert torch.equal(moved, F.one_hot(idx[:, 0], 7).bool())


@pytest.mark.parametrize("strict", [False, True], ids=["official", "strict"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_without_confidence_prompts_are_the_selected_rows_and_a_gets_no_gradient(backend, strict):
    case = make_case(3, 5, 7, 33)
    xs = _leaves(case)
    prompts, idx, _ = _run_backend(backend, xs, confidence=False, strict_grad=strict)
    rows = case[3].gather(1, idx[..., None].expand(-1, -1, E))
    assert torch.equal(prompts, rows)
    ref, ref_idx = official_oracle(*case, confidence=False)
    assert torch.equal(idx, ref_idx) and torch.equal(prompts, ref)
    dq, dA, dk, dP = _grads(prompts, xs, torch.randn(prompts.shape, dtype=torch.float64))
    for g in (dq, dA, dk):
        assert g is None or torch.all(g == 0)
    _assert_p_grad_on_selected_rows_only(dP, idx)


@pytest.mark.parametrize("strict", [False, True], ids=["official", "strict"])
def test_score_gradient_adds_to_the_selection_gradient(strict):
    """A loss on both outputs: the torch backend's hand-written backward against autograd through the spec."""
    case = make_case(3, 5, 7, 9)
    douts = None
    results = []
    for name in ("torch", "reference"):
        xs = _leaves(case)
        prompts, _, scores = _run_backend(name, xs, strict_grad=strict)
        if douts is None:
            douts = (torch.randn(prompts.shape, dtype=torch.float64), torch.randn(scores.shape, dtype=torch.float64))
        results.append(torch.autograd.grad((prompts, scores), xs, douts))
    for g, r in zip(*results):
        assert max_err(g, r) < 1e-11


def test_reference_backward_is_the_in_place_mask():
    """The module's reference (vectorised over layers) against the per-layer oracle, both gradient modes."""
    case = make_case(3, 5, 7, 9)
    for strict, oracle in ((False, official_oracle), (True, gather_oracle)):
        x1, x2 = _leaves(case), _leaves(case)
        got = sel.reference(*x1, scale=SCALE, strict_grad=strict)[0]
        ref = oracle(*x2)[0]
        dout = torch.randn(ref.shape, dtype=torch.float64)
        for g, r in zip(_grads(got, x1, dout), _grads(ref, x2, dout)):
            assert max_err(g, r) < 1e-12


# ---------------------------------------------------------------------------------------------------------
# 3. gradcheck, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------------------


def test_gradcheck_modulated_cosine():
    xs = _leaves(make_case(2, 3, 4, 5)[:3])
    assert torch.autograd.gradcheck(lambda q, A, k: modulated_cosine(q, A, k, scale=SCALE), xs)


@pytest.mark.parametrize("confidence", [True, False], ids=["confidence", "no-confidence"])
@pytest.mark.parametrize("strict", [False, True], ids=["official", "strict"])
def test_gradcheck_class_select(strict, confidence):
    """Finite differences see the argmax as constant, i.e. the strict gradient. The official gradient is the
    derivative of the straight-through definition  π_ST = (m ⊙ s) @ P + ((1 − m) ⊙ s) @ P₀  (m the one-hot of
    c*, P₀ the values held at the evaluation point): the second term's value is added as a constant, so that
    the numerical derivative is π_ST's while the analytic one is the op's alone. Both outputs (prompts,
    scores) are checked."""
    case = make_case(2, 3, 4, 5)
    xs = _leaves(case)
    with torch.no_grad():
        _, idx, _ = class_select(*case, strict_grad=strict, confidence=confidence)
    rest = 1.0 - F.one_hot(idx, 4).double()                                 # (1 − m)
    P0 = case[3]

    def fn(q, A, k, P):
        prompts, _, scores = class_select(q, A, k, P, scale=SCALE, strict_grad=strict, confidence=confidence)
        if not strict and confidence:
            s = official_scores(q, A, k)  # detached below: only its value (under perturbation) counts
            prompts = prompts + (torch.bmm(rest * s, P0)).detach()
        return prompts, scores

    assert torch.autograd.gradcheck(fn, xs, atol=1e-6)


def test_gradcheck_catches_a_missing_straight_through_term():
    """Negative control of the construction above: the official op checked against the strict derivative (no
    correction term) must fail."""
    xs = _leaves(make_case(2, 3, 4, 5))
    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(lambda *x: class_select(*x, scale=SCALE)[0], xs, atol=1e-6)


@pytest.mark.parametrize("confidence,strict", [(True, False), (True, True), (False, False)],
                         ids=["official", "strict", "no-confidence"])
def test_opcheck(confidence, strict):
    case = make_case(3, 5, 7, 9)
    args = [t.float().requires_grad_(True) for t in case] + [SCALE, confidence, strict]
    opcheck(torch.ops.clfast.class_select.default, tuple(args))


def test_torch_compile_fullgraph_no_graph_break():
    q, A, k, P = (t.float() for t in make_case(3, 5, 7, 9))
    A, P = A.requires_grad_(True), P.requires_grad_(True)

    def model(query):
        prompts, _, scores = class_select(query, A, k, P, scale=SCALE)
        return prompts.square().sum() + scores.logsumexp(-1).sum()

    assert_compiles_like_eager(model, [A, P], q, backend="torch", op=OP)


# ---------------------------------------------------------------------------------------------------------
# Dtypes and memory layouts
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_16_bit_inputs_are_computed_in_float32(dtype):
    """16-bit in, computed in float32, rounded once: the float32 op on the same (rounded) values, rounded."""
    low = [t.to(dtype) for t in make_case(3, 5, 7, 33)]
    xs, xs32 = _leaves(low), _leaves([t.float() for t in low])
    prompts, idx, scores = class_select(*xs)
    p32, idx32, s32 = class_select(*xs32)
    assert prompts.dtype == scores.dtype == dtype
    assert torch.equal(idx, idx32)
    assert torch.equal(prompts, p32.to(dtype)) and torch.equal(scores, s32.to(dtype))
    dout = torch.randn(prompts.shape)
    for g, r in zip(_grads(prompts, xs, dout.to(dtype)), _grads(p32, xs32, dout.to(dtype).float())):
        assert g.dtype == dtype
        assert max_err(g, r) <= 1e-2 * max(1.0, r.abs().max().item())


def test_non_contiguous_inputs():
    case = [t.float() for t in make_case(3, 5, 7, 33)]
    views = cast(case, torch.float32, noncontig=True)
    assert not any(v.is_contiguous() for v in views)
    xs, ys = _leaves(case), [v.detach().requires_grad_(True) for v in views]
    out, out_v = class_select(*xs), class_select(*ys)
    for a, b in zip(out, out_v):
        assert torch.equal(a, b)
    dout = torch.randn(out[0].shape)
    for g, r in zip(_grads(out_v[0], ys, dout), _grads(out[0], xs, dout)):
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# 4. Bad input
# ---------------------------------------------------------------------------------------------------------


def _bad(mutate):
    q, A, k, P = (t.float() for t in make_case(3, 5, 7, 9))
    args = dict(query=q, modulators=A, keys=k, values=P)
    kwargs = {}
    mutate(args, kwargs)
    return args, kwargs


BAD = [
    (lambda a, kw: a.update(query=a["query"][0]), ValueError, "query must have shape (B,Dc)"),
    (lambda a, kw: a.update(query=a["query"].long()), TypeError, "query must be float32"),
    (lambda a, kw: a.update(query=a["query"].tolist()), TypeError, "query must be a torch.Tensor"),
    (lambda a, kw: a.update(modulators=a["modulators"][..., :8]), ValueError, "modulators must have shape (L,C,Dc)"),
    (lambda a, kw: a.update(modulators=a["modulators"][0]), ValueError, "modulators must have shape (L,C,Dc)"),
    (lambda a, kw: a.update(modulators=a["modulators"][:, :0]), ValueError, "modulators must have shape (L,C,Dc) with C >= 1"),
    (lambda a, kw: a.update(modulators=a["modulators"].double()), TypeError, "modulators must have query's dtype"),
    (lambda a, kw: a.update(keys=a["keys"][:6]), ValueError, "keys must have shape (C,Dc) = (7,9)"),
    (lambda a, kw: a.update(keys=a["keys"][:, :8]), ValueError, "keys must have shape (C,Dc) = (7,9)"),
    (lambda a, kw: a.update(keys=a["keys"].half()), TypeError, "keys must have query's dtype"),
    (lambda a, kw: a.update(values=a["values"][:2]), ValueError, "values must have shape (L,C,E) = (3,7,E)"),
    (lambda a, kw: a.update(values=a["values"][:, :6]), ValueError, "values must have shape (L,C,E) = (3,7,E)"),
    (lambda a, kw: a.update(values=a["values"][0]), ValueError, "values must have shape (L,C,E)"),
    (lambda a, kw: a.update(values=a["values"].to(torch.int32)), TypeError, "values must be float32"),
    (lambda a, kw: a.update(values=a["values"].double()), TypeError, "values must have query's dtype"),
    (lambda a, kw: kw.update(scale="5"), TypeError, "scale must be a float"),
    (lambda a, kw: kw.update(scale=True), TypeError, "scale must be a float"),
    (lambda a, kw: kw.update(confidence=1), TypeError, "confidence must be a bool"),
    (lambda a, kw: kw.update(strict_grad=None), TypeError, "strict_grad must be a bool"),
]


@pytest.mark.parametrize("mutate,exc,needle", BAD, ids=[b[2] for b in BAD])
def test_bad_input_names_the_argument(mutate, exc, needle):
    args, kwargs = _bad(mutate)
    with pytest.raises(exc, match=f"^class_select: {re.escape(needle)}"):
        class_select(**args, **kwargs)
    if "values" not in needle and not any(n in needle for n in ("confidence", "strict_grad")):
        args.pop("values")
        with pytest.raises(exc, match=f"^modulated_cosine: {re.escape(needle)}"):
            modulated_cosine(**args, **kwargs)
