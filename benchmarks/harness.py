"""The body every op benchmark shares: which implementations run here, the function to time (a peer, or clfast
with one backend forced), a forward or forward+backward step, and one pytest-benchmark group per case whose
figures carry their metadata (op, impl, dtype, mode, shape, device) for report.py; and the peak memory of a
call (:func:`peak_memory`); paired rounds of several callables (:class:`PairedRounds`, :func:`paired`)."""

from __future__ import annotations

import ctypes
import os
import threading
import time
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


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    """Hand glibc's free heap pages back to the system (so the RSS before a step is not padded by memory a previous
    step freed); a no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable, interval_s: float = 0.001) -> dict:
    """Runs ``fn()`` once and returns how much memory it needed above what was in use when it started.

    On a GPU: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at the start (``peak_mem_kind``
    ``"cuda_allocated"``: tensors of the caching allocator, exact). On the CPU: the process's resident set size,
    sampled every ``interval_s`` from ``/proc/self/statm`` by a thread while ``fn`` runs, peak minus the value at
    the start after ``malloc_trim`` (``"cpu_rss_sampled"``). It counts every page the step touched (tensors, the
    allocator's and the libraries' scratch), can miss a peak shorter than the interval, and misses memory that a
    free heap page reused without a fault: a lower bound of the step's working memory, honest to about
    ``interval_s`` of allocation. Returns ``{"peak_mem_mb": float, "peak_mem_kind": str}``.
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return {"peak_mem_mb": (torch.cuda.max_memory_allocated() - base) / 2**20, "peak_mem_kind": "cuda_allocated"}
    if not os.path.exists("/proc/self/statm"):
        return {"peak_mem_mb": float("nan"), "peak_mem_kind": "unavailable"}
    _malloc_trim()
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            done.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], _rss_bytes())
    return {"peak_mem_mb": (peak[0] - base) / 2**20, "peak_mem_kind": "cpu_rss_sampled"}


class PairedRounds:
    """Paired rounds of several callables (name -> fn): each call runs one round, one call of every fn, in their
    order in even rounds and reversed in odd ones, so that a slow drift of the machine reaches every one alike; each
    call's wall seconds go to ``seconds[name]``. Ratios of the same round are what a drifting machine can resolve."""

    def __init__(self, fns: dict[str, Callable[[], object]]):
        self.fns = dict(fns)
        self.seconds: dict[str, list[float]] = {n: [] for n in self.fns}
        self.rounds = 0

    def __call__(self) -> None:
        order = list(self.fns)
        for name in (order if self.rounds % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            self.fns[name]()
            self.seconds[name].append(time.perf_counter() - t0)
        self.rounds += 1


def paired(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Wall seconds of ``rounds`` :class:`PairedRounds` of ``fns``, per name."""
    run = PairedRounds(fns)
    for _ in range(rounds):
        run()
    return run.seconds
