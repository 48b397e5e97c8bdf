"""What the property-based tests of the ops (tests/ops/test_fuzz_*.py) share: how many cases they ran, which
backends claim an input, inputs drawn as shapes, dtypes and memory layouts, comparisons that treat NaN and Inf
as the float64 reference does, and the checks of rejected input.

Hypothesis draws the shapes, dtypes, layouts and option flags (what it shrinks to a minimal failing case); the
values come from a seeded generator (their exact digits are not what breaks a strided kernel). The number of
examples per test is the loaded profile's ``max_examples`` (tests/conftest.py: ``fast`` by default, ``fuzz``
for ``make fuzz``) times the test's weight, see :func:`budget`.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st

from clfast.ops import _dispatch, use_backend
from tests.ops._util import INTERPRETED, lowp_slack, magnitude

# Generated cases run in this process (every call of a @counted test body); tests/conftest.py prints it.
CASES = {"run": 0}

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LOWP = (torch.bfloat16, torch.float16)
LAYOUTS = ("contiguous", "strided", "permuted", "expanded")


def counted(test):
    """Counts each generated case the test runs (put it under ``@given``)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        CASES["run"] += 1
        return test(*args, **kwargs)
    return run


def budget(weight: float = 1.0) -> settings:
    """Settings of a test that runs ``weight`` times the profile's number of examples (cheap tests more, the
    ones that run every backend with gradients fewer)."""
    return settings(max_examples=max(1, round(settings.default.max_examples * weight)))


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------

# The Triton interpreter takes 30-250 ms per tiny call with its backward; it joins a case only when every size
# of the case is at most this (the strategies draw most cases that small), so the fast profile stays fast.
TRITON_MAX_SIZE = 8


def claiming(op: str, inputs, *, tiny: bool) -> list[str]:
    """The backends of ``op`` that claim ``inputs`` (an op's ``Inputs``), as dispatch decides it when each is
    forced: available here, the device, the dtype and every input limit. Interpreted backends only when ``tiny``."""
    names = []
    for name, cls in sorted(_dispatch.backends(op).items()):
        if name in INTERPRETED and not tiny:
            continue
        with use_backend(name, op=op):
            if not cls.not_supported_reasons(inputs):
                names.append(name)
    return sorted(names, key=lambda n: n != "reference")  # the reference first: at 16 bits it is the peer


@st.composite
def emptied(draw, **sizes: int) -> dict:
    """``sizes`` with, in about one case in four, one of them set to 0 (an empty dimension). Drawing each size
    from 0 up would make most cases empty: hypothesis favours the bounds."""
    if draw(st.integers(0, 3)) == 3:
        sizes[draw(st.sampled_from(sorted(sizes)))] = 0
    return sizes


def is_tiny(*sizes: int) -> bool:
    return max(sizes, default=0) <= TRITON_MAX_SIZE


# --------------------------------------------------------------------------------------------------
# Inputs: shapes, layouts, values
# --------------------------------------------------------------------------------------------------


def dtypes(allowed=FLOATS):
    return st.sampled_from(allowed)


@st.composite
def layouts(draw, ndim: int):
    """A memory layout: contiguous; ``strided`` (every dim a step-2 slice of a NaN-filled buffer, so a read
    out of bounds shows); ``permuted`` (dims stored in a drawn order, e.g. transposed); ``expanded`` (a
    stride-0 broadcast along one dim). Returns (layout, a dim order or a dim to expand)."""
    kind = draw(st.sampled_from(LAYOUTS))
    if kind == "permuted":
        return kind, tuple(draw(st.permutations(range(ndim))))
    if kind == "expanded":
        return kind, draw(st.integers(0, max(0, ndim - 1)))
    return kind, None


def normal(scale: float = 1.0):
    return lambda shape, g: torch.randn(shape, generator=g, dtype=torch.float64) * scale


def uniform(low: float, high: float):
    return lambda shape, g: torch.rand(shape, generator=g, dtype=torch.float64) * (high - low) + low


def small_integers(shape, g):
    """Integers in [-2, 2]: exact in every dtype, and sums of their products are exact in float32 (exact ties)."""
    return torch.randint(-2, 3, shape, generator=g).double()


def make_tensor(shape, dtype, layout, seed: int, fill=normal()) -> torch.Tensor:
    """A tensor of ``shape`` in ``dtype`` laid out as ``layout`` (from :func:`layouts`), holding
    ``fill(shape, generator)`` (float64; for an expanded layout, of the shape before the broadcast) rounded to
    ``dtype``."""
    kind, arg = layout
    shape = tuple(shape)
    base_shape = list(shape)
    if kind == "expanded" and shape:
        base_shape[arg] = min(1, shape[arg])
    vals = fill(tuple(base_shape), torch.Generator().manual_seed(seed)).to(dtype)
    if kind == "expanded":
        return vals.expand(shape)
    if kind == "strided":
        buf = torch.full([2 * s + 1 for s in shape], float("nan"), dtype=dtype)
        view = buf[tuple(slice(1, 1 + 2 * s, 2) for s in shape)]
        view.copy_(vals)
        return view
    if kind == "permuted" and shape:
        order = arg
        stored = torch.empty([shape[i] for i in order], dtype=dtype)
        view = stored.permute(*[order.index(i) for i in range(len(shape))])
        view.copy_(vals)
        return view
    return vals.contiguous()


seeds = st.integers(0, 2 ** 31 - 1)


def leaves(tensors):
    """Fresh leaves requiring grad, same layout (``None`` stays ``None``)."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
        else:
            leaf = t.detach()
            out.append(leaf.requires_grad_(True))
    return out


def as_float64(tensors):
    """Contiguous float64 copies requiring grad: the reference's inputs (the rounding to the tested dtype is
    the caller's, not the backend's, error)."""
    return [None if t is None else t.detach().double().contiguous().requires_grad_(True) for t in tensors]


def grads_of(out: torch.Tensor, inputs, dout: torch.Tensor):
    """Gradients of ``(out * dout).sum()`` with respect to the non-None ``inputs`` (zeros where unused)."""
    xs = [t for t in inputs if t is not None]
    if not xs:
        return []
    got = torch.autograd.grad(out, xs, dout, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(got, xs)]


def snapshot(tensors):
    """Copies of the inputs (with their NaN padding, for strided views) to check that nothing is written to them."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
        else:
            base = t.detach()
            while base._base is not None:
                base = base._base
            out.append((base, base.clone()))
    return out


def assert_unchanged(snap) -> None:
    for item in snap:
        if item is not None:
            base, copy = item
            assert torch.equal(base.nan_to_num(), copy.nan_to_num()) and torch.equal(base.isnan(), copy.isnan()), \
                "an op wrote into its input"


# --------------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------------


def assert_close(got: torch.Tensor, ref: torch.Tensor, atol: float, what: str, *, same_nan: bool = True,
                 peer: torch.Tensor | None = None, terms: float | None = None) -> None:
    """``got`` equals the float64 ``ref`` within ``atol`` times ``max(1, max |ref|)`` (over its finite entries),
    has the same shape, and is non-finite exactly where ``ref`` is: NaN where it is NaN (``same_nan``), the same
    infinity where it is infinite.

    ``terms``: for a result that is a sum, the largest sum of its terms' magnitudes (float64): the scale is then at
    least that, the bound of any floating-point summation order (a cancelling sum of large terms is only as exact as
    its terms).

    ``peer``: below float64, the same result computed by stock PyTorch at that dtype (the reference run in it). The
    bar is then STYLE.md §8: within ``atol``, or within twice the peer's error (plus a small slack at 16 bits). A
    long cancelling reduction (a factor's gradient summed over B·K terms) can put stock PyTorch itself above a
    fixed ``atol``."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    dtype = got.dtype
    got, ref = got.detach().double(), ref.detach().double()
    rounded = ref.to(dtype).double()  # beyond the dtype's range, the correctly rounded result is infinite
    fin = torch.isfinite(rounded)
    assert torch.equal(torch.isfinite(got), fin), (
        f"{what}: non-finite entries differ from the reference's: got {(~torch.isfinite(got)).sum().item()} "
        f"non-finite, reference {(~fin).sum().item()}")
    if same_nan:
        # an overflow of the dtype may come out as Inf or NaN (overflowed terms summed: Inf - Inf)
        kept = ~(torch.isfinite(ref) & ~fin)
        assert torch.equal(torch.isnan(got)[kept], torch.isnan(rounded)[kept]), \
            f"{what}: NaN where the reference is not (or not NaN where it is)"
        inf = torch.isinf(rounded) & kept
        assert torch.equal(got[inf], rounded[inf]), f"{what}: infinities of the other sign"
    if fin.any():
        scale = magnitude(ref[fin]) if terms is None or not math.isfinite(terms) else max(magnitude(ref[fin]), terms)
        err = (got[fin] - ref[fin]).abs().max().item()
        bound = atol * scale
        if peer is not None:
            peer_err = (peer.detach().double()[fin] - ref[fin]).abs().nan_to_num(float("inf")).max().item()
            bound = max(bound, 2 * peer_err + (lowp_slack(dtype) * scale if dtype in LOWP else 0.0))
        assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g} ({atol:.2g} x {scale:.3g}, or 2 x stock PyTorch's)"


# --------------------------------------------------------------------------------------------------
# Rejected input
# --------------------------------------------------------------------------------------------------


def assert_rejected(call, exc, names, fn_name: str) -> str:
    """``call()`` raises ``exc`` (ValueError or TypeError) whose message starts with ``fn_name`` and names one of
    ``names`` (the argument changed, or one that must agree with it). Returns the message."""
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert msg.startswith(fn_name), f"the message does not name the function {fn_name}: {msg}"
    assert any(n in msg for n in names), f"the message names none of {sorted(names)}: {msg}"
    return msg


def assert_kernel_rejects(kernel, *args) -> None:
    """A C++ kernel called directly with input the public op rejects raises (``RuntimeError`` from TORCH_CHECK, or
    TypeError / ValueError from the schema) instead of computing on it: no crash, no read out of bounds."""
    with pytest.raises((RuntimeError, TypeError, ValueError)):
        kernel(*args)


@st.composite
def shape_mutations(draw, spec: dict[str, str], present: dict[str, torch.Tensor]):
    """One argument with one dimension changed by +-1 or +-2 (never below 0), or with a dimension added or removed,
    such that the arguments no longer agree. ``spec`` gives each argument's dimensions by name (``"B H Nq d"``);
    a dimension some other present argument shares is changed. Returns (argument, new shape, names an error may
    use: the argument and those sharing the dimension)."""
    args = [a for a in spec if present.get(a) is not None]
    shared = [(a, i, sym) for a in args for i, sym in enumerate(spec[a].split())
              if any(sym in spec[b].split() for b in args if b != a)]
    kind = draw(st.sampled_from(["dim", "rank"] if shared else ["rank"]))
    if kind == "dim":
        a, i, sym = draw(st.sampled_from(shared))
        shape = list(present[a].shape)
        delta = draw(st.sampled_from([d for d in (-2, -1, 1, 2) if shape[i] + d >= 0]))
        shape[i] += delta
        names = {a} | {b for b in args if sym in spec[b].split()}
        return a, tuple(shape), names
    a = draw(st.sampled_from(args))
    shape = list(present[a].shape)
    if shape and draw(st.booleans()):
        del shape[draw(st.integers(0, len(shape) - 1))]
    else:
        shape.insert(draw(st.integers(0, len(shape))), draw(st.integers(1, 3)))
    return a, tuple(shape), {a}
