"""Property-based tests of clfast.ops.prompt_conv and PromptConv (hypothesis; profiles in tests/conftest.py).

Properties: every backend that claims an input (dtype, shapes from 1x1 kernels to kernels the size of the
embeddings, F = 1, B = 0 or 1, layouts), and both plans of the C++ backend, give the float64 reference's output
and the gradients of all four inputs within their tolerances and write nothing into their inputs; a NaN or Inf
entry comes out where the reference puts it; invalid input raises ValueError/TypeError naming the argument and
the C++ kernel called directly with it raises; PromptConv with the first f of its prompts equals the op on the
sliced (non-contiguous) kernels, and rejects f = 0 or f > prompts."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from clfast.ops import PromptConv, _dispatch, prompt_conv, use_backend
from clfast.ops import conv as pc_mod
from tests.ops._fuzz import (FLOATS, as_float64, assert_close, assert_kernel_rejects, assert_rejected,
                             assert_unchanged, budget, claiming, counted, dtypes, emptied, grads_of, is_tiny, layouts,
                             leaves, make_tensor, seeds, shape_mutations, snapshot, uniform)
from tests.ops._util import runnable_backends

OP = "prompt_conv"
NAMES = ("embeddings", "weight", "bias", "prompt_weights")
HAS_KERNEL = "cpu" in runnable_backends(OP)
# crossing the C++ kernel's 8-wide register blocks
extents = st.one_of(st.integers(1, 10), st.sampled_from([15, 16, 17, 24, 25, 36]))


@st.composite
def cases(draw, small=False, dtype=None):
    dtype = dtype or draw(dtypes())
    H = draw(st.integers(1, 3))
    Lin, Din = draw(st.integers(1, 6) if small else extents), draw(st.integers(1, 6) if small else extents)
    kh, kw = draw(st.integers(1, Lin)), draw(st.integers(1, Din))
    Fn = draw(st.integers(1, 4) if small else st.one_of(st.integers(1, 5), st.just(18)))
    B = draw(emptied(B=draw(st.integers(1, 3) if small else st.one_of(st.integers(1, 5), st.just(9)))))["B"]
    seed = draw(seeds)
    bound = (kh * kw) ** -0.5
    E = make_tensor((H, Lin, Din), dtype, draw(layouts(3)), seed, uniform(-1, 1))
    W = make_tensor((H, Fn, kh, kw), dtype, draw(layouts(4)), seed + 1, uniform(-bound, bound))
    b = make_tensor((H, Fn), dtype, draw(layouts(2)), seed + 2, uniform(-bound, bound))
    pw = make_tensor((B, Fn), dtype, draw(layouts(2)), seed + 3, uniform(-1, 1))
    return [E, W, b, pw], dtype


def runners(name):
    """(label, function) pairs running backend ``name``: the public op, and for the C++ backend each plan."""
    out = [(name, functools.partial(_forced, name))]
    if name == "cpu":
        out += [(f"cpu mix_first={m}", functools.partial(_plan, m)) for m in (False, True)]
    return out


def _plan(mix_first, *tensors):
    return _dispatch.backends(OP)["cpu"].registered(*tensors, mix_first)[0]


def _forced(name, *tensors):
    with use_backend(name, op=OP):
        return prompt_conv(*tensors)


def out_shape(tensors):
    E, W, _, pw = tensors
    return (pw.shape[0], E.shape[0], E.shape[1] - W.shape[2] + 1, E.shape[2] - W.shape[3] + 1)


@budget(1.0)
@given(case=cases(small=True) | cases())  # small half the time: the Triton interpreter joins those
@counted
def test_every_backend_and_plan_matches_the_float64_reference(case):
    tensors, dtype = case
    inputs = pc_mod._validate(*tensors)
    shape = out_shape(tensors)
    g = torch.Generator().manual_seed(5)
    dout = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    x64 = as_float64(tensors)
    ref = pc_mod.reference(*x64)
    ref_grads = grads_of(ref, x64, dout.double())
    names = claiming(OP, inputs, tiny=is_tiny(*tensors[0].shape, inputs.prompts, inputs.batch))
    assert "reference" in names
    # Below float64 the reference backend is stock PyTorch at that dtype: its errors are the peer's (STYLE.md §8).
    peer = [None] * 5
    for name in names:
        cls = _dispatch.backends(OP)[name]
        for label, fn in runners(name):
            x = leaves(tensors)
            snap = snapshot(x)
            out = fn(*x)
            assert out.dtype == dtype and out.shape == shape, label
            got = grads_of(out, x, dout)
            if name == "reference" and dtype != torch.float64:
                peer = [out, *got]
            assert_close(out, ref, cls.ATOL[dtype], f"{label} out", peer=peer[0])
            for n, gr, r, p in zip(NAMES, got, ref_grads, peer[1:]):
                assert gr.dtype == dtype, (label, n)
                assert_close(gr, r, cls.GRAD_ATOL[dtype], f"{label} d{n}", peer=p)
            assert_unchanged(snap)


@st.composite
def poisoned_cases(draw):
    tensors, dtype = draw(cases(small=True, dtype=draw(dtypes((torch.float32, torch.float64)))))
    tensors = [t.detach().clone() for t in tensors]
    present = [i for i, t in enumerate(tensors) if t.numel()]
    i = draw(st.sampled_from(present))
    pos = tuple(draw(st.integers(0, s - 1)) for s in tensors[i].shape)
    tensors[i][pos] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    if draw(st.booleans()) and tensors[3].numel():  # a zero prompt weight: 0 · NaN is NaN in the reference too
        tensors[3][0, 0] = 0.0
    return tensors, dtype


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on NaN/Inf
@budget(1.0)
@given(case=poisoned_cases())
@counted
def test_nan_and_inf_propagate_as_the_reference(case):
    tensors, dtype = case
    inputs = pc_mod._validate(*tensors)
    ref = pc_mod.reference(*as_float64(tensors)).detach()
    for name in claiming(OP, inputs, tiny=True):
        cls = _dispatch.backends(OP)[name]
        for label, fn in runners(name):
            with torch.no_grad():
                out = fn(*tensors)
            # non-finite exactly where the reference is; which kind may differ on the C++ backend, whose mix-first
            # plan (the public op's choice when B is small) mixes kernels and biases before convolving: Inf - Inf
            # (NaN) in the reference's order can be Inf in its own, and the other way round
            assert_close(out, ref, cls.ATOL[dtype], f"{label} with a non-finite input",
                         same_nan=not (name == "cpu" and label != "cpu mix_first=False"))


def valid_shapes(s):
    E, W, b, pw = (s[n] for n in NAMES)
    return (len(E) == 3 and E[0] >= 1 and len(W) == 4 and W[0] == E[0] and min(W[1:]) >= 1 and W[2] <= E[1]
            and W[3] <= E[2] and b == W[:2] and len(pw) == 2 and pw[1] == W[1])


SPEC = {"embeddings": "H Lin Din", "weight": "H F kh kw", "bias": "H F", "prompt_weights": "B F"}


INVALID = ["shape", "kernel_too_big", "no_heads", "dtype", "int", "not_tensor"]


def invalid_calls(kind, args, dtype, data):
    """Changed copies of the valid ``args`` that the op must reject: (args, exception, names it may quote)."""
    if kind == "shape":
        name, shape, names = data.draw(shape_mutations(SPEC, args))
        return [({**args, name: torch.randn(shape).to(dtype)}, ValueError, names)]
    if kind == "kernel_too_big":  # kh > Lin or kw > Din, by one or two
        E, W = args["embeddings"], args["weight"]
        out = []
        for dim in (2, 3):
            shape = list(W.shape)
            shape[dim] = E.shape[dim - 1] + data.draw(st.integers(1, 2))
            out.append(({**args, "weight": torch.randn(shape).to(dtype)}, ValueError, {"weight", "embeddings"}))
        return out
    if kind == "no_heads":
        return [({**args, "embeddings": args["embeddings"][:0]}, ValueError, {"embeddings", "weight"}),
                ({**args, **{n: args[n][:0] for n in ("embeddings", "weight", "bias")}}, ValueError, {"embeddings"})]
    if kind == "dtype":
        other = data.draw(st.sampled_from([d for d in FLOATS if d != dtype]))
        return [({**args, n: args[n].to(other)}, TypeError, {n, "embeddings"}) for n in NAMES]
    return [({**args, n: args[n].to(torch.int64) if kind == "int" else args[n].tolist()}, TypeError,
             {n, "embeddings"} if kind == "int" else {n}) for n in NAMES]


@pytest.mark.parametrize("kind", INVALID)
@budget(1.0)
@given(case=cases(small=True), data=st.data())
@counted
def test_invalid_input_raises_naming_the_argument(kind, case, data):
    """Each kind of invalid input (for every argument) raises ValueError/TypeError naming the argument; a changed
    shape that is still valid runs. The C++ kernel called directly with the same input raises (except for H = 0,
    which it computes: an empty result)."""
    tensors, dtype = case
    args = dict(zip(NAMES, tensors))
    for bad, exc, names in invalid_calls(kind, args, dtype, data):
        call = [bad[n] for n in NAMES]
        if kind == "shape" and valid_shapes({n: tuple(t.shape) for n, t in bad.items()}):
            assert prompt_conv(*call).shape == out_shape(call)
            continue
        assert_rejected(lambda: prompt_conv(*call), exc, names, "prompt_conv:")
        if HAS_KERNEL and kind != "no_heads":
            assert_kernel_rejects(torch.ops._clfast_C.prompt_conv_fwd, *call, data.draw(st.booleans()))


@st.composite
def module_cases(draw):
    H, prompts = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    Lin, Din = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    kernel = (draw(st.integers(1, Lin)), draw(st.integers(1, Din)))
    f, B = draw(st.integers(0, prompts + 1)), draw(st.integers(0, 3))
    return H, prompts, Lin, Din, kernel, f, B, draw(seeds)


@budget(1.0)
@given(case=module_cases())
@counted
def test_prompt_conv_module_uses_its_first_f_prompts(case):
    H, prompts, Lin, Din, kernel, f, B, seed = case
    torch.manual_seed(seed)
    layer = PromptConv(H, prompts, Lin, Din, kernel)
    pw = torch.rand(B, f) * 2 - 1
    if not 1 <= f <= prompts:
        assert_rejected(lambda: layer(pw), ValueError, {"prompt_weights"}, "PromptConv:")
        return
    out = layer(pw)
    E, W, b = (p.detach().double() for p in (layer.embeddings, layer.weight, layer.bias))
    ref = pc_mod.reference(E, W[:, :f], b[:, :f], pw.double())
    assert_close(out, ref, 2e-5, "PromptConv")
    out.sum().backward()
    assert bool((layer.weight.grad[:, f:] == 0).all()) and bool((layer.bias.grad[:, f:] == 0).all()), \
        "prompts beyond the first f got gradients"
