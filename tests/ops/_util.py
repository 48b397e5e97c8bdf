"""Helpers shared by the op tests: which backends run here, errors and magnitudes, gradients of a call, inputs in
another dtype or as poisoned views, the low-precision rule (STYLE.md §8), opcheck of a backend's registered ops,
torch.compile checks, and two-process gloo runs."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from clfast.ops import _dispatch, use_backend

# Without a CUDA device the triton backends run under the Triton interpreter (tests/conftest.py), about 1000x
# slower than torch: they get small shapes, and no torch.compile (FakeTensors have no data pointer to launch on).
INTERPRETED = frozenset({"triton"} if not torch.cuda.is_available() else ())
CUDA = torch.cuda.is_available()


def runnable_backends(op: str, device: str = "cpu") -> list[str]:
    """Names of the backends of ``op`` that can run on ``device`` on this machine."""
    return sorted(name for name, cls in _dispatch.backends(op).items()
                  if cls.available() and device in cls.devices())


def fused_backends(op: str, device: str = "cpu") -> list[str]:
    """The runnable backends of ``op`` whose kernels run inside a registered op (``cls.registered``)."""
    return [n for n in runnable_backends(op, device) if getattr(_dispatch.backends(op)[n], "FUSED", False)]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def magnitude(t: torch.Tensor) -> float:
    """max(1, max|t|): what tolerances are relative to (absolute below 1)."""
    return max(1.0, t.abs().max().item()) if t.numel() else 1.0


def poisoned_view(shape, dtype, *, transpose_last_two: bool = False) -> torch.Tensor:
    """A non-contiguous view of random values inside a NaN-filled buffer: any read out of bounds shows."""
    big = list(shape)
    big[-1] = big[-1] * 2 + 3
    buf = torch.full(big, float("nan"), dtype=dtype)
    view = buf[..., 1:1 + 2 * shape[-1]:2]
    view.copy_(torch.randn(shape, dtype=torch.float64).to(dtype))
    assert not view.is_contiguous() or shape[-1] == 1
    return view


def cast(tensors, dtype, *, noncontig: bool = False, min_dim: int = 1) -> list[torch.Tensor]:
    """``tensors`` in ``dtype``; with ``noncontig``, those of at least ``min_dim`` dims as poisoned views."""
    out = []
    for t in tensors:
        if noncontig and t.dim() >= min_dim:
            v = poisoned_view(t.shape, dtype)
            v.copy_(t.to(dtype))
            out.append(v)
        else:
            out.append(t.to(dtype))
    return out


def grads(fn, tensors, dout):
    """(output, gradients of every tensor) of ``fn(*tensors)`` for the output gradient ``dout``, on fresh leaves."""
    xs = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*xs)
    return out.detach(), list(torch.autograd.grad(out, xs, dout))


def forced(op: str, name: str, fn):
    """``fn`` run with the backend ``name`` forced for ``op``."""
    def call(*args, **kwargs):
        with use_backend(name, op=op):
            return fn(*args, **kwargs)
    return call


def lowp_slack(dtype: torch.dtype) -> float:
    """Absolute slack of the low-precision rule, for errors too small for a ratio to mean anything."""
    return 2e-3 if dtype == torch.bfloat16 else 3e-4


def assert_within_2x_of_pytorch(err: float, peer_err: float, dtype: torch.dtype, scale: float = 1.0,
                                what: str = "") -> None:
    """STYLE.md §8: the error of a 16-bit result against a float64 oracle is at most twice that of stock PyTorch
    computing the same thing at that dtype (``peer_err``, against the same oracle), plus a small slack."""
    bound = 2 * peer_err + lowp_slack(dtype) * scale
    assert err <= bound, f"{what}: error {err:.3g} > 2 x stock PyTorch's {peer_err:.3g} + slack = {bound:.3g}"


def assert_low_precision(cls, dtype: torch.dtype, result, reference, peer, *, out_scale: float | None = None) -> None:
    """A 16-bit ``result`` = (out, [gradients]) against the float64 ``reference`` and stock PyTorch's ``peer`` (the
    same computation at ``dtype``), both (out, [gradients]): every tensor is in ``dtype``, within the backend
    ``cls``'s ATOL (GRAD_ATOL) and within 2x of the peer's error (STYLE.md §8). Tolerances are relative to the
    largest reference value (``out_scale`` overrides it for the output)."""
    (out, got), (ref, ref_grads), (peer_out, peer_grads) = result, reference, peer
    scale = magnitude(ref) if out_scale is None else out_scale
    checks = [("out", out, ref, peer_out, cls.ATOL[dtype], scale)]
    checks += [(f"gradient {i}", g, r, p, cls.GRAD_ATOL[dtype], magnitude(r))
               for i, (g, r, p) in enumerate(zip(got, ref_grads, peer_grads))]
    for what, t, r, p, atol, scale in checks:
        assert t.dtype == dtype, what
        err = max_err(t, r)
        assert err <= atol * scale, f"{what}: error {err:.3g} > the backend's tolerance {atol * scale:.3g}"
        assert_within_2x_of_pytorch(err, max_err(p, r), dtype, scale, what)


# Where TRITON_INTERPRET=1, torch.compile and opcheck's FakeTensor tests over a triton_op fail: its body is its fake
# implementation, and the interpreter launches kernels on the FakeTensors' (missing) data. Those parts run on GPUs.
OPCHECK_INTERPRETED = ("test_schema", "test_autograd_registration")


def opcheck(op, args, *, interpreted: bool = False) -> None:
    """``torch.library.opcheck`` of the op overload ``op`` on ``args`` (under the Triton interpreter, the parts
    that can run there)."""
    if interpreted:
        torch.library.opcheck(op, args, test_utils=OPCHECK_INTERPRETED)
    else:
        torch.library.opcheck(op, args)


def _compile_like_eager(model, params, x, *, backend: str, op: str | None, compile_backend, rtol: float,
                        atol: float) -> None:
    """Loss and gradients of ``params`` from ``torch.compile(model, fullgraph=True, backend=compile_backend)``
    equal eager's, with the clfast backend ``backend`` forced (no graph break, or fullgraph raises)."""
    torch._dynamo.reset()
    with use_backend(backend, op=op):
        expected = model(x)
        expected.backward()
        g_expected = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        got = torch.compile(model, fullgraph=True, backend=compile_backend)(x)
        got.backward()
    assert torch.allclose(got, expected, rtol=rtol, atol=atol)
    for p, g in zip(params, g_expected):
        assert torch.allclose(p.grad, g, rtol=rtol, atol=atol)


def assert_compiles_like_eager(model, params, x, *, backend: str, op: str | None, rtol: float = 1e-5,
                               atol: float = 1e-5) -> None:
    """``torch.compile(fullgraph=True)`` of ``model`` (a module or function) traces with no graph break
    and gives the eager loss and the eager gradients of ``params``, with ``backend`` forced."""
    _compile_like_eager(model, params, x, backend=backend, op=op, compile_backend="aot_eager", rtol=rtol, atol=atol)


def backward_op(op):
    """The backward op ``clfast::<name>_backward`` (an overload) of the registered op packet ``op``."""
    name = op._qualified_op_name.split("::")[1]
    return getattr(torch.ops.clfast, f"{name}_backward").default


def triton_kernels_in_compiled_graph(model, params, x, *, backend: str, op: str | None, rtol: float = 1e-4,
                                     atol: float = 1e-4) -> set[str]:
    """As :func:`assert_compiles_like_eager` (aot_eager, recording the forward and backward graphs), then checks
    that no clfast op stayed opaque and returns the names of the Triton kernels the graphs launch."""
    from torch._dynamo.backends.debugging import aot_eager, boxed_nop
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    graphs = []

    def record(gm, inputs):
        graphs.append(gm)
        return boxed_nop(gm, inputs)

    _compile_like_eager(model, params, x, backend=backend, op=op, rtol=rtol, atol=atol,
                        compile_backend=lambda gm, inputs: aot_eager(gm, inputs, fw_compiler=record,
                                                                     bw_compiler=record))
    launched = set()
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            assert not str(node.target).startswith("clfast."), f"{node.target} stayed an opaque op"
            if "triton_kernel_wrapper" in str(node.target):
                launched.add(kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__)
    return launched


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(worker, args, *, nprocs: int = 2, timeout: float = 180.0) -> None:
    """``worker(rank, *args)`` in ``nprocs`` spawned processes; fails the test if they take over ``timeout`` s."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{worker.__name__}: workers did not finish within {timeout:.0f} s")
