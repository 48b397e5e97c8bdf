"""Where prefix_attention's CPU time goes on this machine, at the ViT-B/16 shape, per precision: the measurements
of issue 18's AMX item in one command.

    python -m benchmarks.probe_attention [--quick] [--dtypes fp32 bf16] [--rounds 7] [--write]
    make bench-probe

Four tables, each per precision (fp32, bf16):

- ``rate``: a 2048² ``torch.matmul`` (``--quick``: 512²), GFLOP/s: what this CPU's GEMMs reach in that precision,
  the yardstick of the rest (on a CPU without bf16 arithmetic PyTorch emulates bf16, the rate shows it, and the
  product stays at 512²).
- ``op``: the op forward and forward+backward at B 16, H 12, N 197, d 64, P 20 (``--quick``: B 2, H 3, N 65,
  P 5), three ways in paired rounds (each round runs every way once, the order reversed every other round): clfast's
  kernel (``cpu`` backend), the naive composition of the official codes (``peer``: concatenation, matmul, softmax)
  and stock PyTorch's best (``torch``: SDPA, its flash-attention CPU kernel, on the concatenated keys); median ms,
  GFLOP/s (forward 4·B·H·N·(N+P)·d, forward+backward 14·B·H·N·(N+P)·d: two GEMMs, then five) and the share of
  the ``rate``.
- ``phases``: clfast's kernel under :func:`clfast.ops.cpu_phases`, forward and backward apart: each phase's share
  of the threads' busy time (``task``: the parallel tasks' bodies; ``other`` what the tasks spend outside the named
  phases), per section µs, and the GEMMs' own rate per thread against the ``rate`` per core. Whether the
  element-wise softmax, the packing or the GEMM calls' fixed cost dominates shows here.
- ``onednn``: one forward+backward of ``peer`` and of ``cpu`` in a child process with ``ONEDNN_VERBOSE=1``:
  the ISA oneDNN dispatches to (AMX shows as ``avx512_core_amx``), its primitives by implementation (calls, ms) and
  the brgemm micro-kernels clfast's kernel runs (calls, distinct shapes, ms per call). oneDNN's own timings add its
  logging to each call: compare calls and implementations, not their absolute times.

``--write`` puts the tables into BENCHMARKS.md between the ``probe_attention`` markers, with the machine's header
(report.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch

from benchmarks.harness import DTYPES, implementation, paired, step
from benchmarks.peers import prefix_attention_peer
from clfast.ops import cpu_phases, prefix_attention, use_backend

SHAPE = dict(B=16, H=12, N=197, d=64, P=20)
QUICK_SHAPE = dict(B=2, H=3, N=65, d=64, P=5)
IMPLS = ("cpu", "torch", "peer")
MODES = ("fwd", "fwd+bwd")
MARK = "probe-mark"
ROOT = Path(__file__).resolve().parents[1]


def matmul_rate(dtype: torch.dtype, n: int, rounds: int = 3) -> tuple[float, int]:
    """(GFLOP/s, size used) of an n x n by n x n ``torch.matmul`` in ``dtype``, median of ``rounds`` after a warm-up.
    Where a 512² product already runs below 10 GFLOP/s (a precision PyTorch emulates here), it stays at 512²: the
    large one would take minutes."""
    g = torch.Generator().manual_seed(0)

    def median_s(m: int) -> float:
        a, b = (torch.randn(m, m, generator=g).to(dtype) for _ in range(2))
        torch.matmul(a, b)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    small = min(n, 512)
    t = median_s(small)
    if n > small and 2 * small ** 3 / t / 1e9 >= 10:
        return 2 * n ** 3 / median_s(n) / 1e9, n
    return 2 * small ** 3 / t / 1e9, small


def inputs(shape: dict, dtype: torch.dtype, grad: bool) -> tuple[torch.Tensor, ...]:
    """(q, k, v, prefix_k, prefix_v, dout) of ``shape`` in ``dtype``."""
    B, H, N, d, P = (shape[k] for k in ("B", "H", "N", "d", "P"))
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_(grad)  # noqa: E731
    return mk(B, H, N, d), mk(B, H, N, d), mk(B, H, N, d), mk(B, H, P, d), mk(B, H, P, d), \
        torch.randn(B, H, N, d, generator=g).to(dtype)


def op_fn(impl: str, mode: str, tensors: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    q, k, v, pk, pv, dout = tensors
    scale = q.shape[-1] ** -0.5
    run = implementation("prefix_attention", impl, prefix_attention,
                         peer=lambda *a, scale: prefix_attention_peer(*a, scale))
    return step(lambda: run(q, k, v, pk, pv, scale=scale), mode, (q, k, v, pk, pv), dout)


def flops(shape: dict, mode: str) -> float:
    B, H, N, d, P = (shape[k] for k in ("B", "H", "N", "d", "P"))
    return (4 if mode == "fwd" else 14) * B * H * N * (N + P) * d


def paired_ms(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median ms per function over ``rounds`` paired rounds (one warm-up call each first)."""
    for f in fns.values():
        f()
    return {n: 1e3 * statistics.median(t) for n, t in paired(fns, rounds).items()}


def phase_times(tensors: tuple[torch.Tensor, ...], rounds: int) -> dict[str, dict]:
    """clfast's kernel under cpu_phases: {"forward"|"backward": {"wall_s", phase name -> PhaseTime}} summed over
    ``rounds`` calls (after a warm-up)."""
    q, k, v, pk, pv, dout = tensors
    out_ = {}
    with use_backend("cpu"):
        prefix_attention(q, k, v, pk, pv).backward(dout)
        for part in ("forward", "backward"):
            sums: dict = defaultdict(lambda: [0.0, 0, 0])
            wall = 0.0
            for _ in range(rounds):
                out = prefix_attention(q, k, v, pk, pv) if part == "backward" else None
                with cpu_phases() as ph:
                    t0 = time.perf_counter()
                    if part == "forward":
                        with torch.no_grad():
                            prefix_attention(q, k, v, pk, pv)
                    else:
                        out.backward(dout)
                    wall += time.perf_counter() - t0
                for name, p in ph.items():
                    s = sums[name]
                    s[0] += p.seconds
                    s[1] += p.sections
                    s[2] += p.work
            out_[part] = {"wall_s": wall, **{n: tuple(s) for n, s in sums.items()}}
    return out_


# ----------------------------------------------------------------------------------------------- oneDNN verbose

def onednn_child(dtype_name: str, quick: bool) -> None:
    """Runs one forward+backward of ``peer`` then ``cpu``, a mark line before each (the parent sets
    ONEDNN_VERBOSE=1 and reads this process's stdout)."""
    tensors = inputs(QUICK_SHAPE if quick else SHAPE, DTYPES[dtype_name], grad=True)
    for impl in ("peer", "cpu"):
        print(f"{MARK},{impl}", flush=True)
        op_fn(impl, "fwd+bwd", tensors)()
        sys.stdout.flush()


def parse_onednn(text: str) -> dict:
    """Summary of ONEDNN_VERBOSE output: ``isa`` (the info line's), and per mark (the impl that ran) the primitives'
    executions by (kind, implementation): [calls, ms], and the micro-kernels' executions by (kind, source type):
    [calls, ms, set of shapes]."""
    isa = None
    current = None
    prims: dict = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
    ukernels: dict = defaultdict(lambda: defaultdict(lambda: [0, 0.0, set()]))
    for line in text.splitlines():
        if line.startswith(MARK + ","):
            current = line.split(",", 1)[1].strip()
            continue
        f = line.split(",")
        if len(f) < 4 or f[0] != "onednn_verbose":
            continue
        body = f[2:] if f[1].startswith("v") else f[1:]        # "v1" field in oneDNN >= 3.5
        if body[0] == "info" and len(body) > 2 and body[2].startswith("isa:"):
            isa = line.split("isa:", 1)[1].strip()             # the ISA's name may hold commas
        elif body[0] == "primitive" and body[1] == "exec" and current is not None:
            kind, impl, ms = body[3], body[4], float(body[-1])
            c = prims[current][(kind, impl)]
            c[0] += 1
            c[1] += ms
        elif body[0] == "ukernel" and body[1] == "exec" and current is not None:
            kind, ms = body[3], float(body[-1])
            src = next((x.split(":")[1] for x in body if x.startswith("src:")), "?")
            c = ukernels[current][(kind, src)]
            c[0] += 1
            c[1] += ms
            c[2].add(body[-2])
    return {"isa": isa, "primitives": prims, "ukernels": ukernels}


def onednn_summary(dtype_name: str, quick: bool) -> dict:
    env = dict(os.environ, ONEDNN_VERBOSE="1")
    cmd = [sys.executable, "-m", "benchmarks.probe_attention", "--onednn-child", dtype_name] + (["--quick"] * quick)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)   # where `-m benchmarks` resolves
    if res.returncode != 0:
        raise RuntimeError(f"probe_attention: the ONEDNN_VERBOSE child failed:\n{res.stderr[-2000:]}")
    return parse_onednn(res.stdout)


# ----------------------------------------------------------------------------------------------- tables

def phase_rows(dt: str, ph: dict[str, dict], rounds: int, core_rate: float, threads: int) -> list[str]:
    """Rows of the phases table for one precision (``ph``: :func:`phase_times`; ``core_rate``: a core's matmul
    GFLOP/s in that precision)."""
    rows = []
    for part, d in ph.items():
        busy = d["task"][0]
        named = 0.0
        for name in ("gemm", "elementwise", "pack", "store"):
            sec, sections, work = d[name]
            named += sec
            rate = ""
            if name == "gemm" and sec > 0:
                gf = 2 * work / sec / 1e9
                rate = f"{gf:.1f} GFLOP/s per thread ({100 * gf / core_rate:.0f} % of a core's matmul)"
            rows.append(f"| {dt} | {part} | {name} | {100 * sec / busy:.0f} % | {1e6 * sec / max(sections, 1):.1f} | "
                        f"{sections // rounds} | {rate} |")
        rows.append(f"| {dt} | {part} | other (in tasks) | {100 * (busy - named) / busy:.0f} % | – | – | |")
        rows.append(f"| {dt} | {part} | busy / (threads × wall) | {100 * busy / (threads * d['wall_s']):.0f} % "
                    f"| – | – | |")
    return rows


def onednn_rows(dt: str, od: dict) -> list[str]:
    """Rows of the oneDNN table for one precision (``od``: :func:`parse_onednn`)."""
    rows = []
    for impl in ("peer", "cpu"):
        head = f"| {dt} | {impl} | {od['isa']} |"
        for (kind, name), (calls, ms) in sorted(od["primitives"].get(impl, {}).items()):
            rows.append(f"{head} primitive {kind} | {name} | {calls} | {ms:.2f} | – |")
        for (kind, src), (calls, ms, shapes) in sorted(od["ukernels"].get(impl, {}).items()):
            rows.append(f"{head} ukernel {kind} | src {src} | {calls} | {ms:.2f} | {len(shapes)} |")
        if not od["primitives"].get(impl) and not od["ukernels"].get(impl):
            rows.append(f"{head} none | (its GEMMs ran outside oneDNN) | 0 | – | – |")
    return rows


def run(dtypes: list[str], quick: bool, rounds: int) -> str:
    """The four tables (see the module docstring) as markdown."""
    shape = QUICK_SHAPE if quick else SHAPE
    threads = torch.get_num_threads()
    measured = {dt: matmul_rate(DTYPES[dt], 512 if quick else 2048) for dt in dtypes}
    rates = {dt: r for dt, (r, _) in measured.items()}
    s = ", ".join(f"{k} {v}" for k, v in shape.items())
    lines = [f"Shape {s}; {threads} threads; {rounds} paired rounds.", "",
             "| precision | matmul | GFLOP/s | per core |", "|---|---|---:|---:|"]
    lines += [f"| {dt} | {m}² | {r:.1f} | {r / threads:.1f} |" for dt, (r, m) in measured.items()]
    if "bf16" in rates and "fp32" in rates and rates["bf16"] < rates["fp32"]:
        lines += ["", "bf16 is slower than fp32 here: PyTorch emulates it, and clfast's kernel computes bf16 in fp32 "
                      "(the header's `bf16 GEMMs computed in fp32`), so its bf16 shares of the bf16 rate exceed "
                      "100 %: read its bf16 rows against the fp32 rate."]
    lines += ["", "| precision | mode | impl | ms | GFLOP/s | % of matmul rate | speed-up vs peer |",
              "|---|---|---|---:|---:|---:|---:|"]
    phases, onednn = [], []
    for dt in dtypes:
        for mode in MODES:
            tensors = inputs(shape, DTYPES[dt], grad=mode != "fwd")
            ms = paired_ms({impl: op_fn(impl, mode, tensors) for impl in IMPLS}, rounds)
            for impl in IMPLS:
                gf = flops(shape, mode) / ms[impl] / 1e6
                lines.append(f"| {dt} | {mode} | {impl} | {ms[impl]:.2f} | {gf:.1f} | {100 * gf / rates[dt]:.0f} % | "
                             f"{ms['peer'] / ms[impl]:.2f}× |")
        phases += phase_rows(dt, phase_times(inputs(shape, DTYPES[dt], grad=True), rounds), rounds,
                             rates[dt] / threads, threads)
        onednn += onednn_rows(dt, onednn_summary(dt, quick))
    lines += ["", "| precision | part | phase | share of busy thread time | µs per section | sections per call | "
              "GEMM rate |", "|---|---|---|---:|---:|---:|---|"] + phases
    lines += ["", "| precision | impl | oneDNN ISA | executed | implementation | calls | ms (verbose) | shapes |",
              "|---|---|---|---|---|---:|---:|---:|"] + onednn
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    p.add_argument("--onednn-child", choices=list(DTYPES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.onednn_child:
        onednn_child(args.onednn_child, args.quick)
        return 0
    from benchmarks import report

    body = run(args.dtypes, args.quick, args.rounds)
    head = report.header({"datetime": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(head + "\n\n" + body)
    if args.write:
        if report.commit({})[1]:
            print("probe_attention: the tree has uncommitted changes; BENCHMARKS.md quotes committed code only",
                  file=sys.stderr)
            return 2
        report.write(report.ROOT / "BENCHMARKS.md", "probe_attention", f"### probe_attention\n\n{head}\n\n{body}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
