"""Where the compiled CPU kernels spend their time, phase by phase (counters of csrc/common/phases.h).

    with clfast.ops.cpu_phases() as phases:
        out = prefix_attention(q, k, v, prefix_k, prefix_v)
        out.sum().backward()
    phases["gemm"].seconds, phases["gemm"].sections, phases["gemm"].work      # summed over every thread

Phases: ``gemm`` (each GEMM call, its work the multiply-adds M·N·K), ``pack`` (packing operands; work: elements
read), ``elementwise`` (the code between the GEMMs: the online softmax, the backward's P, dS and Di; work:
elements), ``store`` (writing results and reducing partial gradients; work: elements) and ``task`` (each parallel
task's whole body: the named phases are inside it, the rest of it is loop and bookkeeping code; wall time outside
every task is the parallel region's start-up, imbalance and the serial code around it). Times are wall-clock per
section, summed over threads: on 2 threads a phase can add up to twice the wall time. prefix_attention's CPU
kernel is instrumented (benchmarks/probe_attention.py reads it). The timers are off outside the block, where each
costs one atomic load; blocks do not nest.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from clfast import _ext

_active = False


@dataclass(frozen=True)
class PhaseTime:
    """One phase's sums over every thread: seconds, timed sections, and their work (multiply-adds for ``gemm``,
    elements for the others)."""

    seconds: float
    sections: int
    work: int


def _read() -> dict[str, PhaseTime]:
    names = torch.ops._clfast_C.cpu_phase_names()
    rows = torch.ops._clfast_C.cpu_phase_counters().tolist()
    return {n: PhaseTime(ns * 1e-9, int(sec), int(work)) for n, (ns, sec, work) in zip(names, rows)}


@contextlib.contextmanager
def cpu_phases() -> Iterator[dict[str, PhaseTime]]:
    """Times the compiled CPU kernels' phases while the block runs; the yielded dict is filled when it ends
    (phase name -> :class:`PhaseTime`). Raises RuntimeError where the extension is not loaded or when nested."""
    global _active
    reason = _ext.missing_op_reason("cpu_phase_counters")
    if reason is not None:
        raise RuntimeError(f"cpu_phases: needs the compiled kernels' counters: {reason}")
    if _active:
        raise RuntimeError("cpu_phases: blocks do not nest (the counters are process-wide)")
    result: dict[str, PhaseTime] = {}
    _active = True
    torch.ops._clfast_C.cpu_phase_timing(True)
    try:
        yield result
        result.update(_read())
    finally:
        torch.ops._clfast_C.cpu_phase_timing(False)
        _active = False
