"""clfast.ops.prompt_conv: the reference (ConvPrompt's per-prompt loop) against scipy's correlate2d, every
backend against the float64 reference at ConvPrompt's shapes (H=12, 36×80 embeddings, 17×17 kernels,
F ∈ {1, 5, 18}) and odd ones, both plans of the C++ backend, gradients of all four inputs (at 16 bits against
the official loop's own error at that dtype), registration (opcheck of every registered op, torch.compile), the
nn.Module, bad input."""

from __future__ import annotations

import pytest
import torch
from scipy.signal import correlate2d

from benchmarks.peers import prompt_conv_peer
from clfast.ops import PromptConv, _dispatch, prompt_conv, use_backend
from clfast.ops import conv as pc_mod
from tests.ops._util import (CUDA, INTERPRETED, assert_compiles_like_eager, assert_low_precision,
                             backward_op, cast, forced, fused_backends, grads, magnitude, max_err, opcheck,
                             runnable_backends, triton_kernels_in_compiled_graph)

OP = "prompt_conv"
BACKENDS = runnable_backends(OP)
FUSED = fused_backends(OP)


def make_case(H, Lin, Din, Fn, kh, kw, B, *, seed=0):
    """ConvPrompt-like values: embeddings U(−1,1), kernels and biases U(±1/sqrt(kh·kw)), raw-cosine weights
    in [−1, 1] (negative ones included)."""
    g = torch.Generator().manual_seed(seed + 7 * H + Fn + B)
    bound = (kh * kw) ** -0.5
    E = torch.rand(H, Lin, Din, generator=g, dtype=torch.float64) * 2 - 1
    W = (torch.rand(H, Fn, kh, kw, generator=g, dtype=torch.float64) * 2 - 1) * bound
    b = (torch.rand(H, Fn, generator=g, dtype=torch.float64) * 2 - 1) * bound
    pw = torch.rand(B, Fn, generator=g, dtype=torch.float64) * 2 - 1
    return E, W, b, pw


def _runner(name, mix_first=None):
    """The backend ``name`` through the public function, or (mix_first given) its registered op with that plan."""
    if mix_first is not None:
        op = _dispatch.backends(OP)[name].registered
        return lambda *a: op(*a, mix_first)[0]
    return forced(OP, name, prompt_conv)


# --------------------------------------------------------------------------------------------------
# The reference against an independent oracle
# --------------------------------------------------------------------------------------------------


def test_reference_matches_scipy_correlate2d():
    E, W, b, pw = make_case(3, 9, 13, 4, 3, 5, 2)
    out = pc_mod.reference(E, W, b, pw)
    assert out.shape == (2, 3, 7, 9)
    for h in range(3):
        C = [correlate2d(E[h].numpy(), W[h, f].numpy(), mode="valid") + b[h, f].item() for f in range(4)]
        for bb in range(2):
            expected = sum(pw[bb, f].item() * C[f] for f in range(4))
            assert abs(out[bb, h].numpy() - expected).max() < 1e-12


def test_reference_gradcheck():
    tensors = [t.requires_grad_() for t in make_case(2, 5, 6, 3, 2, 3, 2)]
    assert torch.autograd.gradcheck(pc_mod.reference, tensors)


_REF_CACHE: dict = {}


def ref64(case, dout):
    """Float64 output and gradients of the reference loop for ``case`` (cached: the loop's float64 backward at
    ConvPrompt's shapes takes seconds)."""
    key = (case, dout.shape)
    if key not in _REF_CACHE:
        H, Lin, Din, Fn, kh, kw, B, _ = case
        _REF_CACHE[key] = grads(pc_mod.reference, make_case(H, Lin, Din, Fn, kh, kw, B), dout)
    return _REF_CACHE[key]


def _dout(case):
    H, Lin, Din, Fn, kh, kw, B, _ = case
    g = torch.Generator().manual_seed(5)
    return torch.randn(B, H, Lin - kh + 1, Din - kw + 1, generator=g, dtype=torch.float64)


def test_torch_float64_equals_the_loop():
    """The grouped-conv composition of the torch backend equals the official loop in float64, to rounding: forward
    at F = 18, forward and every gradient at F = 5."""
    big = make_case(12, 36, 80, 18, 17, 17, 1)
    assert max_err(pc_mod._torch_prompt_conv(*big), pc_mod.reference(*big)) < 1e-12
    case = CONVPROMPT[1]
    dout = _dout(case)
    ref_out, ref_g = ref64(case, dout)
    out, got = grads(pc_mod._torch_prompt_conv, make_case(*case[:7]), dout)
    assert max_err(out, ref_out) < 1e-12
    for a, b in zip(got, ref_g):
        assert max_err(a, b) < 1e-10 * magnitude(b)


# --------------------------------------------------------------------------------------------------
# Every backend against the float64 reference
# --------------------------------------------------------------------------------------------------

# (H, Lin, Din, F, kh, kw, B, noncontig): ConvPrompt's shapes first, then odd ones (Dout = 59, 1×1 and
# full-size kernels, B = 1, F = 1, non-square kernels, non-contiguous inputs).
CONVPROMPT = [(12, 36, 80, 1, 17, 17, 7, False), (12, 36, 80, 5, 17, 17, 2, False), (12, 36, 80, 18, 17, 17, 1, False)]
ODD = [(2, 20, 75, 4, 17, 17, 3, False), (3, 9, 21, 5, 3, 5, 4, True), (1, 4, 4, 1, 4, 4, 1, False),
       (2, 5, 11, 2, 1, 1, 5, False), (2, 12, 30, 7, 5, 9, 9, True)]
INTERP = [(2, 12, 30, 3, 5, 9, 3, False), (1, 4, 4, 1, 4, 4, 1, False), (2, 8, 21, 2, 3, 5, 2, True)]


def _ids(c):
    H, Lin, Din, Fn, kh, kw, B, nc = c
    return f"H{H}-{Lin}x{Din}-F{Fn}-k{kh}x{kw}-B{B}" + ("-nc" if nc else "")


def _grid():
    for name in BACKENDS:
        # the reference is the oracle at ConvPrompt's shapes; it runs through the op at the odd ones
        cases = INTERP if name in INTERPRETED else ODD if name == "reference" else CONVPROMPT + ODD
        for c in cases:
            yield pytest.param(name, None, c, id=f"{name}-{_ids(c)}")
        if name in FUSED and name not in INTERPRETED:
            for mix in (False, True):  # both plans, whatever the cost model would pick
                for c in (CONVPROMPT[1], ODD[1], ODD[4]):
                    yield pytest.param(name, mix, c, id=f"{name}-{'mix' if mix else 'per_prompt'}-{_ids(c)}")


@pytest.mark.parametrize("name,mix_first,case", list(_grid()))
def test_backend_fp32_matches_float64_reference(name, mix_first, case):
    H, Lin, Din, Fn, kh, kw, B, nc = case
    cls = _dispatch.backends(OP)[name]
    tensors = make_case(H, Lin, Din, Fn, kh, kw, B)
    dout = _dout(case)
    ref, ref_g = ref64(case, dout)
    fn = _runner(name, mix_first)
    out, got = grads(fn, cast(tensors, torch.float32, noncontig=nc), dout.float())
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert max_err(out, ref) <= cls.ATOL[torch.float32] * magnitude(ref)
    for gg, r in zip(got, ref_g):
        assert gg.shape == r.shape and torch.isfinite(gg).all()
        assert max_err(gg, r) <= cls.GRAD_ATOL[torch.float32] * magnitude(r)


def _lowp_grid():
    for name in BACKENDS:
        cls = _dispatch.backends(OP)[name]
        for dtype in (torch.bfloat16, torch.float16):
            if dtype in cls.DTYPES:
                cases = INTERP[:1] if name in INTERPRETED else [ODD[4]] + (
                    [CONVPROMPT[1]] if dtype == torch.bfloat16 else [])
                for c in cases:
                    yield pytest.param(name, dtype, c, id=f"{name}-{str(dtype)[6:]}-{_ids(c)}")


_PEER_CACHE: dict = {}


def peer(case, dtype, dout):
    """Output and gradients of ConvPrompt's released loop (benchmarks/peers.py, not clfast's code) in ``dtype``:
    stock PyTorch's own error at that precision, the bar of STYLE.md §8 (cached per case)."""
    key = (case, dtype)
    if key not in _PEER_CACHE:
        _PEER_CACHE.clear()
        _PEER_CACHE[key] = grads(prompt_conv_peer, cast(make_case(*case[:7]), dtype), dout.to(dtype))
    return _PEER_CACHE[key]


@pytest.mark.parametrize("name,dtype,case", list(_lowp_grid()))
def test_backend_low_precision_within_2x_of_pytorch_error(name, dtype, case):
    """bf16/fp16 error vs the float64 reference is within the backend's tolerance and at most twice that of stock
    PyTorch at the same dtype (ConvPrompt's released per-prompt loop run in bf16/fp16), plus a small slack."""
    dout = _dout(case)
    result = grads(_runner(name), cast(make_case(*case[:7]), dtype), dout.to(dtype))
    assert_low_precision(_dispatch.backends(OP)[name], dtype, result, ref64(case, dout), peer(case, dtype, dout))


def test_low_precision_peer_matches_the_float64_reference():
    tensors = make_case(3, 9, 21, 5, 3, 5, 4)
    assert max_err(prompt_conv_peer(*tensors), pc_mod.reference(*tensors)) < 1e-12


@pytest.mark.parametrize("name", [n for n in BACKENDS if n not in INTERPRETED])
def test_batch_invariance(name):
    """A sample's prompts do not depend on the other samples in the batch (whatever plan the batch size picks)."""
    E, W, b, pw = cast(make_case(4, 20, 24, 6, 5, 5, 40), torch.float32)
    with use_backend(name, op=OP):
        full = prompt_conv(E, W, b, pw)
        for i in (0, 17, 39):
            assert max_err(prompt_conv(E, W, b, pw[i:i + 1])[0], full[i]) <= 1e-5 * magnitude(full)


@pytest.mark.parametrize("name", [n for n in FUSED if n not in INTERPRETED])
def test_fused_backend_is_deterministic(name):
    tensors = cast(make_case(3, 20, 30, 5, 5, 7, 4), torch.float32)
    dout = torch.randn(4, 3, 16, 24)
    a = grads(_runner(name), tensors, dout)
    b = grads(_runner(name), tensors, dout)
    assert torch.equal(a[0], b[0]) and all(torch.equal(p, q) for p, q in zip(a[1], b[1]))


def test_cpu_backend_is_the_default_on_cpu_and_float64_runs():
    if "cpu" not in BACKENDS:
        pytest.fail(f"the C++ backend is not available: {_dispatch.backends(OP)['cpu'].unavailable_reason()}")
    E, W, b, pw = make_case(2, 6, 7, 2, 3, 3, 2)
    assert _dispatch.select(OP, pc_mod._validate(E.float(), W.float(), b.float(), pw.float())).NAME == "cpu"
    assert max_err(prompt_conv(E, W, b, pw), pc_mod.reference(E, W, b, pw)) < 1e-12


def test_cpu_cost_model_picks_the_cheaper_plan():
    cls = _dispatch.backends(OP)["cpu"]
    shape = dict(device=torch.device("cpu"), dtype=torch.float32, heads=24, in_len=36, in_dim=80, kernel_h=17,
                 kernel_w=17)
    assert not cls.mix_first(pc_mod.Inputs(batch=8, prompts=5, **shape))  # few prompts: convolve each once
    assert cls.mix_first(pc_mod.Inputs(batch=2, prompts=50, **shape))  # few samples: mix the kernels first


# --------------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,mix_first", [(n, mix) for n in FUSED for mix in (False, True)
                                             if not (n == "triton" and mix)])  # triton: the per-prompt plan only
def test_opcheck(name, mix_first):
    """The backend's registered op and its backward op (under the Triton interpreter, the parts that run there)."""
    E, W, b, pw = (t.float().requires_grad_() for t in make_case(2, 6, 9, 3, 3, 4, 2))
    op = _dispatch.backends(OP)[name].registered
    interpreted = name in INTERPRETED
    opcheck(op.default, (E, W, b, pw, mix_first), interpreted=interpreted)
    with torch.no_grad():
        out, saved = op(E, W, b, pw, mix_first)
    args = (torch.randn_like(out), E.detach(), W.detach(), b.detach(), pw.detach(), saved, mix_first)
    opcheck(backward_op(op), args, interpreted=interpreted)


def _tiny_model():
    layer = PromptConv(heads=2, prompts=3, in_len=8, in_dim=10, kernel_size=3)
    query = torch.nn.Linear(4, 3)
    return layer, query, lambda x: layer(torch.tanh(query(x))).square().sum()


@pytest.mark.parametrize("name", [n for n in BACKENDS if n not in INTERPRETED])
def test_torch_compile_fullgraph_no_graph_break(name):
    layer, query, model = _tiny_model()
    params = list(layer.parameters()) + list(query.parameters())
    assert_compiles_like_eager(model, params, torch.randn(5, 4), backend=name, op=OP)


@pytest.mark.skipif(not CUDA, reason="compiling through a triton_op needs a GPU: under the Triton interpreter "
                                     "its FakeTensor trace launches kernels on tensors without data")
def test_torch_compile_sees_the_triton_kernels():
    """On CUDA, torch.compile(fullgraph=True) traces into clfast::prompt_conv_triton: the graphs launch its forward
    and backward Triton kernels (no opaque op), and loss and gradients match eager."""
    layer, query, model = _tiny_model()
    layer.cuda(), query.cuda()
    params = list(layer.parameters()) + list(query.parameters())
    launched = triton_kernels_in_compiled_graph(model, params, torch.randn(5, 4).cuda(), backend="triton", op=OP)
    assert {"_conv_fwd_kernel", "_conv_dw_kernel", "_conv_dx_kernel"} <= launched


# --------------------------------------------------------------------------------------------------
# nn.Module
# --------------------------------------------------------------------------------------------------


def test_prompt_conv_module():
    torch.manual_seed(0)
    layer = PromptConv(heads=4, prompts=5, in_len=36, in_dim=80)
    assert layer.embeddings.shape == (4, 36, 80) and layer.weight.shape == (4, 5, 17, 17)
    assert layer.embeddings.abs().max() <= 1 and layer.weight.abs().max() <= 1 / 17 and layer.bias.abs().max() <= 1 / 17
    pw = torch.rand(3, 5) * 2 - 1
    out = layer(pw)
    assert out.shape == (3, 4, 20, 64)
    assert max_err(out, pc_mod.reference(layer.embeddings, layer.weight, layer.bias, pw)) < 1e-4
    # the first f kernels only: what a method that adds prompts over time passes (parameters never grow)
    few = layer(pw[:, :2])
    assert max_err(few, pc_mod.reference(layer.embeddings, layer.weight[:, :2], layer.bias[:, :2], pw[:, :2])) < 1e-4
    few.sum().backward()
    assert layer.weight.grad[:, 2:].abs().sum() == 0 and layer.weight.grad[:, :2].abs().sum() > 0
    with pytest.raises(ValueError, match=r"prompt_weights must have shape \(B,f\) with 1 <= f <= 5"):
        layer(torch.zeros(3, 6))
    assert not hasattr(layer, "extend") and "heads=4, prompts=5" in repr(layer)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mutate,exc,needle", [
    (lambda a: {**a, "embeddings": a["embeddings"][0]}, ValueError, "embeddings must have shape (H,Lin,Din)"),
    (lambda a: {**a, "weight": a["weight"][:1]}, ValueError, "weight must have shape (H,F,kh,kw) with H = 2"),
    (lambda a: {**a, "weight": a["weight"][:, :0]}, ValueError, "F, kh, kw >= 1"),
    (lambda a: {**a, "weight": torch.zeros(2, 3, 9, 3)}, ValueError, "weight's kernel (kh,kw) = (9,3) must fit"),
    (lambda a: {**a, "bias": a["bias"][:, :2]}, ValueError, "bias must have shape (H,F) = (2,3)"),
    (lambda a: {**a, "prompt_weights": a["prompt_weights"][:, :2]}, ValueError,
     "prompt_weights must have shape (B,F) with F = 3"),
    (lambda a: {**a, "prompt_weights": a["prompt_weights"][0]}, ValueError, "prompt_weights must have shape (B,F)"),
    (lambda a: {**a, "embeddings": a["embeddings"].long()}, TypeError, "embeddings must be float32"),
    (lambda a: {**a, "weight": a["weight"].double()}, TypeError, "weight must have the dtype of embeddings"),
    (lambda a: {**a, "bias": a["bias"].tolist()}, TypeError, "bias must be a torch.Tensor"),
    (lambda a: {**a, "prompt_weights": a["prompt_weights"].to("meta")}, ValueError,
     "prompt_weights must be on the device of embeddings"),
])
def test_bad_input_names_the_argument(mutate, exc, needle):
    E, W, b, pw = (t.float() for t in make_case(2, 6, 7, 3, 3, 3, 2))
    args = mutate(dict(embeddings=E, weight=W, bias=b, prompt_weights=pw))
    with pytest.raises(exc) as info:
        prompt_conv(args["embeddings"], args["weight"], args["bias"], args["prompt_weights"])
    assert needle in str(info.value)


def test_c_kernel_checks_its_own_preconditions():
    if "cpu" not in BACKENDS:
        pytest.fail("the C++ backend is not available")
    E, W, b, pw = (t.float() for t in make_case(2, 6, 7, 3, 3, 3, 2))
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops._clfast_C.prompt_conv_fwd(E, W, b[:, :2], pw, False)
    with pytest.raises(RuntimeError, match="must fit"):
        torch.ops._clfast_C.prompt_conv_fwd(E, torch.zeros(2, 3, 7, 3), b, pw, True)
    out, saved = torch.ops._clfast_C.prompt_conv_fwd(E, W, b, pw, False)
    with pytest.raises(RuntimeError, match="saved"):
        torch.ops._clfast_C.prompt_conv_bwd(out, E, W, b, pw, saved[:1], False)
