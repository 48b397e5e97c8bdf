"""The body every op benchmark shares: which implementations run here, the function to time (a peer, or clfast
with one backend forced), a forward or forward+backward step, and one pytest-benchmark group per case whose
figures carry their metadata (op, impl, dtype, mode, shape, device) for report.py."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from clfast.ops import _dispatch, use_backend

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def available(op: str, impl: str) -> bool:
    """Peers always run; a backend where it can run on this machine's device (triton on GPUs only: the
    interpreter is no benchmark)."""
    if impl.startswith("peer"):
        return True
    cls = _dispatch.backends(op).get(impl)
    return (cls is not None and cls.available() and device() in cls.devices()
            and not (impl == "triton" and not torch.cuda.is_available()))


def implementation(op: str, impl: str, fn: Callable, peer: Optional[Callable]) -> Callable:
    """What to time: ``peer`` for a peer, else clfast's ``fn`` with the backend ``impl`` forced for ``op``."""
    if impl.startswith("peer"):
        return peer

    def call(*args, **kwargs):
        with use_backend(impl, op=op):
            return fn(*args, **kwargs)
    return call


def step(forward: Callable, mode: str, inputs: Sequence[torch.Tensor] = (), grad_outputs=None) -> Callable:
    """One timed call: ``forward()`` without autograd ("fwd"), or with the gradients of ``inputs`` for
    ``grad_outputs`` ("fwd+bwd"; None: of the output's sum)."""
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                forward()
    elif grad_outputs is None:
        def fn():
            torch.autograd.grad(forward().sum(), tuple(inputs))
    else:
        def fn():
            torch.autograd.grad(forward(), tuple(inputs), grad_outputs)
    return fn


def time_case(benchmark, fn: Callable, *, group: str, rounds: int, warmup: int = 2,
              measure: Optional[Callable] = None, **info) -> Callable:
    """Times ``fn`` (synchronised on CUDA) as one member of ``group``, recording ``info`` with the figure;
    ``measure`` may wrap the timed call (e.g. to record memory). Returns the timed callable."""
    dev = device()

    def once():
        fn()
        if dev == "cuda":
            torch.cuda.synchronize()

    timed = measure(once) if measure is not None else once
    benchmark.group = group
    benchmark.extra_info.update(device=dev, **info)
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
    return timed
