"""Each op's fused CPU backend and its stock-PyTorch composition, quiet, beside one busy neighbour, and beside a twin
rank.

    python -m pytest benchmarks/bench_busy.py --benchmark-enable --benchmark-only --benchmark-json=busy.json
    python benchmarks/report.py busy.json          # the `busy_neighbour` table: quiet ms, busy ms, slowdown

The neighbour is one pure-Python loop in another process (one runnable thread), started before a case's warm-up and
killed after its rounds: on a 2-core machine at 2 torch threads, three runnable threads on two cores. Every parallel
region of an op ends at a barrier where the calling thread waits for its slowest worker, and a worker that shares
its core with the neighbour may wait a scheduler slice (milliseconds) to run: an op that opens many short regions
collapses, one with few regions of enough work slows like the stock ops (at most 2×, the core it lost).
``benchmarks/parallel_regions.py`` counts the regions per call. The goal (the performance issue): each fused op
degrades no worse than the stock composition it replaces.

Load ``rank``: the neighbour is a second process (one for the session, idle between cases) running the same case
with the same backend and thread count in a loop, as the other rank of a two-process DDP run on the same cores does
(``torchrun`` gives each rank ``OMP_NUM_THREADS=1``: run with ``CLFAST_BENCH_THREADS=1`` for that setting; at the
default 2 threads the two ranks oversubscribe the two cores, the case a user meets who sets ``threads=2`` per rank).

Cases, at each op's acceptance shape of BENCHMARKS.md (``--quick``: the same ops at small shapes), forward and
backward: mahalanobis B 128, K 200, D 768; gaussian_kl B 128, D 768; prefix_attention B 16, H 12, N 197, d 64,
P 20; prompt_conv one ConvPrompt layer (H 24 of 36×80, 17×17 kernels, B 8, F 5); retrieve (forward) B 128,
M 200,000, D 768, k 5. ``impl`` is the backend (``cpu`` fused, ``torch`` the stock composition), ``load`` quiet or
busy; report.py sets the two loads of each side by side.
"""

from __future__ import annotations

import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from benchmarks.bench_ops_gaussian import _chol
from benchmarks.harness import available, implementation, step, time_case
from clfast.ops import gaussian_kl, mahalanobis, prefix_attention, prompt_conv, retrieve

ROUNDS = dict(rounds=10, warmup=2)
IMPLS = ["cpu", "torch"]
LOADS = ["quiet", "busy", "rank"]


def _case(op: str, quick: bool) -> tuple[str, Callable, tuple, str, Callable]:
    """(shape text, op function, inputs, mode, forward(fn) -> output)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if op == "mahalanobis":
        B, K, D = (16, 10, 64) if quick else (128, 200, 768)
        x, mu, L = r(B, D), r(K, D), _chol(D, "cpu", torch.float32, g)
        return f"B{B} K{K} D{D}", mahalanobis, (x, mu, L), "fwd+bwd", lambda f: f(x, mu, L)
    if op == "gaussian_kl":
        B, D = (12, 64) if quick else (128, 768)
        m, lv, prior, L = r(B, D), 0.3 * r(B, D), r(D), _chol(D, "cpu", torch.float32, g)
        return f"B{B} D{D}", gaussian_kl, (m, lv, prior, L), "fwd+bwd", lambda f: f(m, lv, prior, L)
    if op == "prefix_attention":
        B, H, N, d, P = (2, 3, 17, 16, 5) if quick else (16, 12, 197, 64, 20)
        q, k, v, pk, pv = r(B, H, N, d), r(B, H, N, d), r(B, H, N, d), r(B, H, P, d), r(B, H, P, d)
        return f"B{B} H{H} N{N} d{d} P{P}", prefix_attention, (q, k, v, pk, pv), "fwd+bwd", \
            lambda f: f(q, k, v, pk, pv)
    if op == "prompt_conv":
        H, Lin, Din, kh, kw, B, F = (4, 12, 16, 5, 5, 2, 3) if quick else (24, 36, 80, 17, 17, 8, 5)
        e, w, b, pw = r(H, Lin, Din), r(H, F, kh, kw) / kh, r(H, F), r(B, F)
        return f"H{H} {Lin}x{Din} k{kh} B{B} F{F}", prompt_conv, (e, w, b, pw), "fwd+bwd", lambda f: f(e, w, b, pw)
    if op == "retrieve":
        B, M, D = (16, 2000, 64) if quick else (128, 200_000, 768)
        qr, keys = r(B, D), r(M, D)
        return f"B{B} M{M} D{D} k5", retrieve, (qr, keys), "fwd", lambda f: f(qr, keys, 5)
    raise ValueError(op)


OPS = ["mahalanobis", "gaussian_kl", "prefix_attention", "prompt_conv", "retrieve"]


def _call(op: str, impl: str, quick: bool) -> tuple[str, str, Callable[[], None]]:
    """(shape text, mode, one timed call) of case ``op`` with backend ``impl``."""
    shape, fn, inputs, mode, forward = _case(op, quick)
    run = implementation(op, impl, fn, peer=None)
    grad_inputs = tuple(t.requires_grad_(mode != "fwd") for t in inputs)
    out = forward(run)
    out = out[0] if isinstance(out, tuple) else out
    dout = torch.randn_like(out) if mode != "fwd" else None
    return shape, mode, step(lambda: forward(run), mode, grad_inputs, dout)


def twin(quick: bool, threads: int) -> None:
    """The ``rank`` neighbour's process, one per session: at ``threads`` threads it reads ``"<op> <impl>"`` lines from
    standard input and runs that case in a loop (answering ``ready`` once it has built it and run it once) until the
    next line; ``idle`` stops it (answered ``idle``); end of input ends the process. One process for every case, so
    that a case pays no interpreter start and import (about 2 s each)."""
    torch.set_num_threads(threads)
    call = None
    while True:
        if call is not None:
            call()
            if not select.select([sys.stdin], [], [], 0)[0]:
                continue
        line = sys.stdin.readline()
        if not line:
            return
        words = line.split()
        if words == ["idle"]:
            call = None
            print("idle", flush=True)
            continue
        op, impl = words
        _, _, call = _call(op, impl, quick)
        call()
        print("ready", flush=True)


class _Twin:
    """The session's twin process (:func:`twin`), asked for one case at a time."""

    def __init__(self, quick: bool):
        code = f"from benchmarks.bench_busy import twin; twin({bool(quick)}, {torch.get_num_threads()})"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=str(Path(__file__).resolve().parent.parent))

    def ask(self, line: str, answer: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        got = self.proc.stdout.readline().strip()
        if got != answer:
            self.close()
            raise RuntimeError(f"bench_busy: the twin rank answered {got!r} to {line!r}, not {answer!r} "
                               f"(exit {self.proc.returncode})")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="session")
def twin_rank(quick):
    """The twin process of the ``rank`` cases, started by the first of them, killed at the end of the session."""
    t = _Twin(quick)
    yield t
    t.close()


@pytest.fixture
def neighbour(request, quick, op, impl):
    """For load "busy" one busy pure-Python loop in another process, killed afterwards; for "rank" the session's twin
    process (:func:`twin`) running the same case once it has built it, set idle afterwards. A backend not available
    here skips the case before any starts."""
    if not available(op, impl):
        pytest.skip(f"{op}: backend {impl!r} is not available here")
    proc = rank = None
    if request.param == "busy":
        proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.3)
    elif request.param == "rank":
        rank = request.getfixturevalue("twin_rank")
        rank.ask(f"{op} {impl}", "ready")
    try:
        yield request.param
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        if rank is not None:
            rank.ask("idle", "idle")


@pytest.mark.parametrize("neighbour", LOADS, indirect=True)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_busy_neighbour(benchmark, quick, op, impl, neighbour):
    shape, mode, call = _call(op, impl, quick)
    time_case(benchmark, call, group=f"busy_neighbour {op} {shape} fp32 {mode}", **ROUNDS,
              op="busy_neighbour", case_op=op, impl=impl, load=neighbour, threads=torch.get_num_threads(),
              mode=mode)
