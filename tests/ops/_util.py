"""Helpers shared by the op tests."""

from __future__ import annotations

import torch

from clfast.ops import _dispatch


def runnable_backends(op: str, device: str = "cpu") -> list[str]:
    """Names of the backends of ``op`` that can run on ``device`` on this machine."""
    return sorted(name for name, cls in _dispatch.backends(op).items()
                  if cls.available() and device in cls.devices())


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def poisoned_view(shape, dtype, *, transpose_last_two: bool = False) -> torch.Tensor:
    """A non-contiguous view of random values inside a NaN-filled buffer: any read out of bounds shows."""
    big = list(shape)
    big[-1] = big[-1] * 2 + 3
    buf = torch.full(big, float("nan"), dtype=dtype)
    view = buf[..., 1:1 + 2 * shape[-1]:2]
    view.copy_(torch.randn(shape, dtype=torch.float64).to(dtype))
    assert not view.is_contiguous() or shape[-1] == 1
    return view


def assert_compiles_like_eager(model, params, x, *, backend: str, op: str | None, rtol: float = 1e-5,
                               atol: float = 1e-5) -> None:
    """``torch.compile(fullgraph=True)`` of ``model`` (a module or function) traces with no graph break
    and gives the eager loss and the eager gradients of ``params``, with ``backend`` forced."""
    from clfast.ops import use_backend

    torch._dynamo.reset()
    with use_backend(backend, op=op):
        expected = model(x)
        expected.backward()
        g_expected = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        got.backward()
    assert torch.allclose(got, expected, rtol=rtol, atol=atol)
    for p, g in zip(params, g_expected):
        assert torch.allclose(p.grad, g, rtol=rtol, atol=atol)
