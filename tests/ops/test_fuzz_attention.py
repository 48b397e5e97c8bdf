"""Property-based tests of clfast.ops.prefix_attention and PromptedAttention (hypothesis; profiles in
tests/conftest.py).

Properties: every backend that claims an input (dtype, shape, layout: contiguous, strided in a NaN buffer,
permuted, expanded) gives the float64 reference's output and gradients of all five tensors within its
tolerances, and writes nothing into its inputs; masked keys never matter, whatever they hold (NaN padding); a
NaN or Inf anywhere else comes out where the reference puts it; every invalid input raises ValueError or
TypeError naming the argument, and the C++ kernels called directly with it raise instead of reading it;
PromptedAttention equals the explicit math for every prefix form."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from clfast.ops import PromptContext, PromptedAttention, _dispatch, prefix_attention, use_backend
from clfast.ops import attention as pa_mod
from tests.ops._fuzz import (FLOATS, LOWP, as_float64, assert_close, assert_kernel_rejects, assert_rejected,
                             assert_unchanged, budget, claiming, counted, dtypes, emptied, grads_of, is_tiny, layouts,
                             leaves, make_tensor, seeds, shape_mutations, snapshot)
from tests.ops._util import runnable_backends

OP = "prefix_attention"
NAMES = ("q", "k", "v", "prefix_k", "prefix_v")
HAS_KERNEL = "cpu" in runnable_backends(OP)
# crossing the C++ kernel's tiles (up to 256 keys / queries) and SIMD widths of the head dim
lengths = st.one_of(st.integers(1, 12), st.sampled_from([15, 16, 17, 63, 64, 65, 255, 256, 257]))
head_dims = st.one_of(st.integers(1, 20), st.sampled_from([31, 32, 33, 59, 64, 65, 128, 129]))


@st.composite
def cases(draw, dtype=None, small=False):
    """A valid call: (tensors q, k, v, prefix_k, prefix_v as laid out, kv_mask, scale, dtype)."""
    dtype = dtype or draw(dtypes())
    B, H = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    Nq = draw(st.integers(1, 6) if small else lengths)
    Nk = draw(st.integers(1, 6) if small else lengths)
    B, H, Nq, Nk = draw(emptied(B=B, H=H, Nq=Nq, Nk=Nk)).values()
    d = draw(st.integers(1, 8) if small else head_dims)
    # large d and long sequences: one of them at a time (the float64 reference stays cheap)
    if Nq * Nk * d > 40_000:
        d = min(d, 8)
    prefix = draw(st.sampled_from(["none", "per_sample", "shared"]))
    P = draw(st.integers(0, 6))
    seed = draw(seeds)
    shapes = {"q": (B, H, Nq, d), "k": (B, H, Nk, d), "v": (B, H, Nk, d)}
    if prefix != "none":
        shapes["prefix_k"] = shapes["prefix_v"] = (B, H, P, d) if prefix == "per_sample" else (H, P, d)
    t = {n: make_tensor(s, dtype, draw(layouts(len(s))), seed + i) for i, (n, s) in enumerate(shapes.items())}
    mask_kind = draw(st.sampled_from(["none", "random", "empty_rows", "all_off"]))
    kv_mask = None
    if mask_kind != "none":
        g = torch.Generator().manual_seed(seed)
        kv_mask = torch.rand(B, Nk, generator=g) > 0.4
        if mask_kind == "empty_rows" and B:
            kv_mask[draw(st.integers(0, B - 1))] = False
        elif mask_kind == "all_off":
            kv_mask[:] = False
        if draw(st.booleans()):  # a non-contiguous mask
            buf = torch.zeros(B, 2 * Nk, dtype=torch.bool)
            buf[:, ::2] = kv_mask
            kv_mask = buf[:, ::2]
    scale = draw(st.one_of(st.none(), st.just(0.0), st.floats(0.01, 2.0), st.floats(-2.0, -0.01)))
    return [t.get(n) for n in NAMES], kv_mask, scale, dtype


def run_backend(name, tensors, kv_mask, scale):
    with use_backend(name, op=OP):
        return prefix_attention(*tensors, kv_mask=kv_mask, scale=scale)


def reference64(tensors, kv_mask, scale, dout):
    x = as_float64(tensors)
    out = pa_mod.reference(*x, kv_mask=kv_mask, scale=scale)
    return out.detach(), grads_of(out, x, dout.double())


def _attention64(tensors, kv_mask, scale):
    """The float64 pieces of the attention: (q, keys and values with the prefix in front and padding zeroed,
    probabilities (a row with nothing to attend: zeros, as the reference), the scale, P, and a function giving each
    present input's gradient from the query and the concatenated key/value gradients)."""
    q, k, v, pk, pv = (None if t is None else t.detach().double() for t in tensors)
    B, d = q.shape[0], q.shape[-1]
    s = scale if scale is not None else d ** -0.5
    P = 0 if pk is None else pk.shape[-2]
    full = lambda t: t if t.dim() == 4 else t.expand(B, -1, -1, -1)
    kc = k if pk is None else torch.cat([full(pk), k], 2)
    vc = v if pv is None else torch.cat([full(pv), v], 2)
    keep = torch.ones(B, kc.shape[2], dtype=torch.bool)
    if kv_mask is not None:
        keep[:, P:] = kv_mask
    keep = keep[:, None, :, None]
    kc, vc = kc.masked_fill(~keep, 0.0), vc.masked_fill(~keep, 0.0)
    scores = (q @ kc.transpose(-1, -2) * s).masked_fill(~keep.transpose(-1, -2), float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)

    def split(dq, dkc, dvc):
        fold = lambda g, like: g if like.dim() == 4 else g.sum(0)   # a shared prefix gets the sum over the batch
        grads = {"q": dq, "k": dkc[:, :, P:], "v": dvc[:, :, P:]}
        if pk is not None:
            grads.update(prefix_k=fold(dkc[:, :, :P], pk), prefix_v=fold(dvc[:, :, :P], pv))
        return [grads[n] for n, t in zip(NAMES, tensors) if t is not None]

    return q, kc, vc, probs, s, split


def flash_rounded_grads64(tensors, kv_mask, scale, dout, dtype, out):
    """The float64 gradients with the roundings a flash-attention backward makes below float32, as the Triton kernels
    do (kernels/prefix_attention.py, for the tensor cores): P rounded to ``dtype`` before ``dV = Pᵀ dO``, dS rounded
    before ``dQ = dS K`` and ``dK = dSᵀ Q``, and ``delta = rowsum(dO ∘ O)`` from ``out``, the output the backend
    stored (its forward rounds P before ``P V`` too). The error model of that backend's 16-bit gradients: its peer
    (STYLE.md §8), the reference for the rest."""
    q, kc, vc, probs, s, split = _attention64(tensors, kv_mask, scale)
    rnd = lambda t: t.to(dtype).double()
    do = dout.double()
    delta = (do * out.detach().double()).sum(-1, keepdim=True)
    ds = rnd(probs * (do @ vc.transpose(-1, -2) - delta))
    return split(s * ds @ kc, s * ds.transpose(-1, -2) @ q, rnd(probs).transpose(-1, -2) @ do)


def gradient_terms64(tensors, kv_mask, scale, dout):
    """For each gradient of the reference, the largest sum of its terms' magnitudes in float64 (``dQ = s·dS K``:
    ``s·|dS| |K|``; ``dK = s·dSᵀ Q``: ``s·|dS|ᵀ |Q|``; ``dV = Pᵀ dO``: ``Pᵀ |dO|``; a shared prefix summed over the
    batch): the scale below which no summation order is exact (``dS`` sums to zero over keys, so a gradient can be
    a small difference of large terms)."""
    q, kc, vc, probs, s, split = _attention64(tensors, kv_mask, scale)
    do = dout.double()
    dp = do @ vc.transpose(-1, -2)
    ads = probs * (dp.abs() + (probs * dp).sum(-1, keepdim=True).abs())     # |dS| bounded term by term
    s = abs(s)
    terms = split(s * ads @ kc.abs(), s * ads.transpose(-1, -2) @ q.abs(), probs.transpose(-1, -2) @ do.abs())
    return [float(t.max()) if t.numel() else 0.0 for t in terms]


def _t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


NAN, INF = float("nan"), float("inf")


@budget(1.0)
@given(case=cases(small=True) | cases())  # small half the time: the Triton interpreter joins those
# found by this property: the C++ backward returned a shared prefix's gradient uninitialised when B = 0
@example(case=([torch.randn(0, 2, 3, 4), torch.randn(0, 2, 2, 4), torch.randn(0, 2, 2, 4), torch.randn(2, 3, 4),
                torch.randn(2, 3, 4)], None, None, torch.float32))
@counted
def test_every_backend_matches_the_float64_reference(case):
    tensors, kv_mask, scale, dtype = case
    inputs = pa_mod._validate(*tensors, kv_mask, scale)
    tiny = is_tiny(*tensors[0].shape, tensors[1].shape[2], inputs.prefix_len)
    names = claiming(OP, inputs, tiny=tiny)
    assert "reference" in names
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(tensors[0].shape, generator=g, dtype=torch.float64).to(dtype)
    ref, ref_grads = reference64(tensors, kv_mask, scale, dout)
    terms = gradient_terms64(tensors, kv_mask, scale, dout)   # the gradients are sums: their terms' scale
    # Below float64 the reference backend is stock PyTorch at that dtype: its errors are the peer's (STYLE.md §8).
    peer = [None] * 6
    for name in names:
        cls = _dispatch.backends(OP)[name]
        x = leaves(tensors)
        snap = snapshot(x)
        out = run_backend(name, x, kv_mask, scale)
        assert out.dtype == dtype and out.shape == tensors[0].shape, name
        got = [out, *grads_of(out, x, dout)]
        if name == "reference" and dtype != torch.float64:
            peer = got + [None] * (6 - len(got))
        assert_close(out, ref, cls.ATOL[dtype], f"{name} out", peer=peer[0])
        grad_peers = peer[1:]
        if name == "triton" and dtype in LOWP:   # its documented 16-bit roundings (make fuzz found dq 3-5 ulps off)
            grad_peers = flash_rounded_grads64(tensors, kv_mask, scale, dout, dtype, out)
        for n, gr, r, p, m in zip([n for n, t in zip(NAMES, x) if t is not None], got[1:], ref_grads, grad_peers,
                                  terms):
            assert gr.dtype == dtype, (name, n)
            assert_close(gr, r, cls.GRAD_ATOL[dtype], f"{name} d{n}", peer=p, terms=m)
        assert_unchanged(snap)


@st.composite
def poisoned_cases(draw):
    """A valid call with one entry of one tensor set to NaN, +Inf or -Inf, and whether that entry is padding (a
    key kv_mask switches off)."""
    tensors, kv_mask, scale, dtype = draw(cases(dtype=draw(dtypes((torch.float32, torch.float64))), small=True))
    present = [i for i, t in enumerate(tensors) if t is not None and t.numel()]
    if not present:
        return tensors, kv_mask, scale, dtype, None, False
    i = draw(st.sampled_from(present))
    t = tensors[i].detach().clone()  # storage of its own: an expanded input would change a whole broadcast row
    pos = [draw(st.integers(0, s - 1)) for s in t.shape]
    t[tuple(pos)] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    tensors = list(tensors)
    tensors[i] = t
    padding = NAMES[i] in ("k", "v") and kv_mask is not None and not bool(kv_mask[pos[0], pos[2]])
    return tensors, kv_mask, scale, dtype, NAMES[i], padding


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on NaN/Inf
@budget(1.0)
@given(case=poisoned_cases())
# found by this property: PyTorch's fused SDPA (the torch backend) gave zeros for a NaN query row; the Triton
# kernel gave zeros for a row whose every score is -inf; padding NaN reached the reference's, the torch and the
# Triton backends' outputs and gradients
@example(case=([_t([[[NAN]]]), _t([[[0.66]]]), _t([[[0.39]]]), None, None], None, None, torch.float32, "q", False))
@example(case=([_t([[[-INF]]]), _t([[[0.66]]]), _t([[[0.39]]]), None, None], None, None, torch.float32, "q", False))
@example(case=([_t([[[0.5, 1.0], [1.0, -1.0]]]), _t([[[0.3, 0.2], [1.0, 2.0]]]), _t([[[0.1, 0.4], [NAN, 1.0]]]),
                None, None], torch.tensor([[True, False]]), None, torch.float32, "v", True))
@example(case=([_t([[[0.5, 1.0], [1.0, -1.0]]]), _t([[[0.3, 0.2], [NAN, 2.0]]]), _t([[[0.1, 0.4], [0.2, 1.0]]]),
                None, None], torch.tensor([[True, False]]), None, torch.float32, "k", True))
# found by this property on an AVX2-only CPU: the AVX2 exp clamped a NaN score to exp(88), so a NaN query row with
# 8 keys (one full vector) gave a finite output
@example(case=([_t([[[NAN]]]), _t([[[0.66], [0.27], [0.06], [0.62], [-0.45]]]),
                _t([[[0.39], [-0.22], [-0.32], [-1.21], [1.04]]]), _t([[[0.80], [0.17], [0.09]]]),
                _t([[[-1.61], [0.23], [2.24]]])], None, None, torch.float32, "q", False))
# found by this property: the torch backend's all -inf rows may be NaN as well as 0 (the exemption above)
@example(case=([_t([[[INF]]]), _t([[[-1.91]]]), _t([[[0.43]]]), _t([[[-0.84]]]), _t([[[0.63]]])],
               torch.tensor([[False]]), None, torch.float32, "q", False))
@counted
def test_masked_keys_never_matter_and_nan_inf_propagate_as_the_reference(case):
    """Padding (a masked key or value) never reaches the output or a gradient, whatever it holds; a NaN or Inf
    anywhere else gives NaN/Inf exactly where the reference has them."""
    tensors, kv_mask, scale, dtype, poisoned, padding = case
    inputs = pa_mod._validate(*tensors, kv_mask, scale)
    names = claiming(OP, inputs, tiny=True)
    dout = torch.ones(tensors[0].shape, dtype=dtype)
    ref, _ = reference64(tensors, kv_mask, scale, dout)
    if padding:
        clean = [t.nan_to_num(0.0, 0.0, 0.0) if n == poisoned else t for n, t in zip(NAMES, tensors)]
        ref_clean, ref_clean_grads = reference64(clean, kv_mask, scale, dout)
        assert torch.equal(ref, ref_clean), "the reference let padding through"
    for name in names:
        cls = _dispatch.backends(OP)[name]
        x = leaves(tensors)
        out = run_backend(name, x, kv_mask, scale)
        expected = ref
        if name == "torch":
            # PyTorch's SDPA returns zeros or NaN (depending on the masked keys) for a row whose attended scores are
            # all -inf (an infinite entry of q or k); the reference and the fused backends give softmax's 0/0 = NaN.
            # Left as PyTorch defines it.
            rows = all_scores_minus_inf(tensors, kv_mask, scale)[..., None].expand(out.shape)
            assert bool(((out[rows] == 0) | out[rows].isnan()).all()), "torch: an all -inf row neither 0 nor NaN"
            out, expected = out.masked_fill(rows, 0.0), ref.masked_fill(rows, 0.0)
        assert_close(out, expected, cls.ATOL[dtype], f"{name} out with a non-finite {poisoned}")
        if padding:
            for n, gr, r in zip([n for n, t in zip(NAMES, x) if t is not None], grads_of(out, x, dout),
                                ref_clean_grads):
                assert_close(gr, r, cls.GRAD_ATOL[dtype], f"{name} d{n} with non-finite padding in {poisoned}")


def all_scores_minus_inf(tensors, kv_mask, scale):
    """(B,H,Nq) bool: the rows that attend some key and score every key they attend -inf (float64)."""
    q, k, _, pk, _ = (None if t is None else t.detach().double() for t in tensors)
    B, H, _, d = q.shape
    keys = k if pk is None else torch.cat([pk.expand(B, H, *pk.shape[-2:]), k], 2)
    s = q @ keys.transpose(-2, -1) * pa_mod.softmax_scale(d, scale)
    P = keys.shape[2] - k.shape[2]
    attend = torch.ones(B, keys.shape[2], dtype=torch.bool)
    if kv_mask is not None:
        attend[:, P:] = kv_mask
    attend = attend[:, None, None, :].expand_as(s)
    return attend.any(-1) & (s.masked_fill(~attend, float("-inf")) == float("-inf")).all(-1)


def valid_shapes(shapes: dict) -> bool:
    """The spec of prefix_attention's shapes, written here independently of the op's checks."""
    q, k, v, pk, pv, m = (shapes.get(n) for n in (*NAMES, "kv_mask"))
    if len(q) != 4 or q[3] < 1 or len(k) != 4 or k[:2] != q[:2] or k[3] != q[3] or v != k:
        return False
    if (pk is None) != (pv is None):
        return False
    if pk is not None:
        B, H, _, d = q
        if pv != pk or not ((len(pk) == 4 and pk[:2] == (B, H) and pk[3] == d) or
                            (len(pk) == 3 and pk[0] == H and pk[2] == d)):
            return False
    return m is None or m == (q[0], k[2])


SPEC = {"q": "B H Nq d", "k": "B H Nk d", "v": "B H Nk d", "kv_mask": "B Nk"}


INVALID = ["shape", "no_head_dim", "dtype", "int", "not_tensor", "mask", "scale", "lone_prefix"]


def invalid_calls(kind, args, dtype, data):
    """Changed copies of the valid ``args`` that the op must reject: (args, exception, names it may quote)."""
    out = []
    if kind == "shape":
        spec = dict(SPEC)
        if args["prefix_k"] is not None:
            spec["prefix_k"] = spec["prefix_v"] = "B H P d" if args["prefix_k"].dim() == 4 else "H P d"
        name, shape, names = data.draw(shape_mutations(spec, args))
        bad = dict(args)
        bad[name] = (torch.rand(shape) > 0.5) if name == "kv_mask" else torch.randn(shape).to(args[name].dtype)
        out.append((bad, ValueError, names))
    elif kind == "no_head_dim":  # d = 0 in every tensor: consistent shapes, but no head to attend with
        out.append(({n: (t[..., :0] if n in NAMES and t is not None else t) for n, t in args.items()}, ValueError,
                    {"q"}))
    elif kind in ("dtype", "int", "not_tensor"):
        for name in (n for n in NAMES if args[n] is not None):
            bad = dict(args)
            if kind == "dtype":
                bad[name] = args[name].to(data.draw(st.sampled_from([d for d in FLOATS if d != dtype])))
                names = {name, "q"} if name != "q" else set(NAMES)
            elif kind == "int":
                bad[name] = args[name].to(data.draw(st.sampled_from([torch.int64, torch.int32, torch.bool])))
                names = {name} if name in ("q", "k", "v") else {name, "q"}
            else:
                bad[name], names = args[name].tolist(), {name}
            out.append((bad, TypeError, names))
    elif kind == "mask":
        B, Nk = args["q"].shape[0], args["k"].shape[2]
        for m in (torch.ones(B, Nk), torch.ones(B, Nk, dtype=torch.int64), [[True] * Nk] * B):
            out.append(({**args, "kv_mask": m}, TypeError, {"kv_mask"}))
    elif kind == "scale":
        for sc in (float("nan"), float("inf"), -float("inf"), "0.5", True, torch.tensor(0.5), [0.5]):
            out.append(({**args, "scale": sc}, TypeError, {"scale"}))
    else:
        q = args["q"]
        for name, other in (("prefix_k", "prefix_v"), ("prefix_v", "prefix_k")):
            lone = torch.randn(q.shape[1], 2, q.shape[3]).to(dtype)
            out.append(({**args, name: lone, other: None}, ValueError, {"prefix_k", "prefix_v"}))
    return out


@pytest.mark.parametrize("kind", INVALID)
@budget(1.0)
@given(case=cases(small=True), data=st.data())
@counted
def test_invalid_input_raises_naming_the_argument(kind, case, data):
    """Each kind of invalid input (all its values, for the scalar and mask kinds) raises ValueError/TypeError
    naming the argument; a changed shape that is still valid (by the spec written here) runs. The C++ kernel
    called directly with the same input raises."""
    tensors, kv_mask, scale, dtype = case
    args = dict(zip(NAMES, tensors), kv_mask=kv_mask, scale=scale)
    for bad, exc, names in invalid_calls(kind, args, dtype, data):
        call = [bad[n] for n in NAMES]
        if kind == "shape" and valid_shapes({n: tuple(t.shape) for n, t in bad.items()
                                             if isinstance(t, torch.Tensor)}):
            run_and_check_valid(bad)
            continue
        assert_rejected(lambda: prefix_attention(*call, kv_mask=bad["kv_mask"], scale=bad["scale"]), exc, names,
                        "prefix_attention:")
        if HAS_KERNEL and (kind != "scale" or isinstance(bad["scale"], float)):
            sc = 1.0 if bad["scale"] is None else bad["scale"]
            assert_kernel_rejects(torch.ops._clfast_C.prefix_attention_fwd, *call, bad["kv_mask"], sc)


def run_and_check_valid(args):
    """A changed shape that is still valid (e.g. a shared prefix made per-sample): the op runs on it."""
    out = prefix_attention(*(args[n] for n in NAMES), kv_mask=args["kv_mask"], scale=args["scale"])
    assert out.shape == args["q"].shape


@st.composite
def module_cases(draw):
    B, N, H, d = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 3)), draw(st.integers(1, 9))
    P = draw(st.integers(0, 5))
    form = draw(st.sampled_from(["none", "B P C", "P C", "B H P d", "H P d"]))
    masked = draw(st.booleans())
    return B, N, H, d, P, form, masked, draw(seeds)


@budget(0.5)
@given(case=module_cases())
@counted
def test_prompted_attention_equals_the_explicit_math(case):
    """PromptedAttention around timm's Attention, prefixes in every accepted form, on every backend that claims
    float32: the qkv projection, the float64 reference on the head-split prefixes, the output projection."""
    from timm.models.vision_transformer import Attention

    B, N, H, d, P, form, masked, seed = case
    C = H * d
    torch.manual_seed(seed)
    attn = Attention(C, num_heads=H, qkv_bias=True).eval()
    ctx = PromptContext()
    layer = PromptedAttention(attn, layer=0, context=ctx)
    x = torch.randn(B, N, C)
    shape = {"B P C": (B, P, C), "P C": (P, C), "B H P d": (B, H, P, d), "H P d": (H, P, d)}.get(form)
    pk = pv = None
    if shape is not None:
        pk, pv = torch.randn(shape), torch.randn(shape)
    kv_mask = (torch.rand(B, N) > 0.3) if masked else None

    def heads(t):  # to (B,H,P,d) or (H,P,d), float64
        if form == "B P C":
            return t.reshape(B, P, H, d).transpose(1, 2).double()
        if form == "P C":
            return t.reshape(P, H, d).transpose(0, 1).double()
        return t.double()

    a64 = Attention(C, num_heads=H, qkv_bias=True).double().eval()
    a64.load_state_dict({k: v.double() for k, v in attn.state_dict().items()})
    with torch.no_grad():
        q, k, v = a64.qkv(x.double()).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
        ref = pa_mod.reference(q, k, v, None if pk is None else heads(pk), None if pv is None else heads(pv),
                               kv_mask=kv_mask, scale=attn.scale)
        expected = a64.proj(ref.transpose(1, 2).reshape(B, N, C))
    inputs = pa_mod._validate(torch.empty(B, H, N, d), torch.empty(B, H, N, d), torch.empty(B, H, N, d),
                              None if pk is None else heads(pk).float(), None if pv is None else heads(pv).float(),
                              kv_mask, attn.scale)
    for name in claiming(OP, inputs, tiny=is_tiny(B, H, N, P, d)):
        cls = _dispatch.backends(OP)[name]
        prompts = {} if pk is None else {0: (pk, pv)}
        with use_backend(name, op=OP), ctx.prompts(prompts, kv_mask=kv_mask), torch.no_grad():
            got = layer(x)
        # the float32 projections before and after attention add their own rounding: 10x the op's tolerance
        assert_close(got, expected, 10 * cls.ATOL[torch.float32], f"{name} PromptedAttention ({form})")
        if pk is None and kv_mask is None:
            with torch.no_grad():
                assert_close(got, attn(x).double(), 10 * cls.ATOL[torch.float32], f"{name} vs timm")

