"""Where a training step's time goes: one step of each configuration of a method under ``torch.profiler``, split into
phases and ops, side by side.

    python -m benchmarks.profile_train [-m dualprompt l2p ...] [--configs peer clfast compile] [--rounds 3]
                                       [--quick] [--top 8] [--write]
    make bench-profile          (every configuration, clfast with compile=true included, --write)

For each method of :data:`benchmarks.steps.VARIANTS` (default: all but the VLM's ``clumo``, whose step is the frozen
image tower) the step of :mod:`benchmarks.steps` is set up once (a second time with ``compile=true`` for the
``compile`` configuration), every configuration warmed up by one step (for ``compile``: the compile, its time
reported), then ``--rounds`` paired rounds of unprofiled steps (one step of each configuration per round, the order
reversed every other round: the machine's drift reaches every configuration alike; the speed-up over ``peer`` is the
median of the rounds' ratios), then one step of each profiled (CPU activities). Each profiled op's own
time (its self CPU time: the time in the op minus the ops it called; on the CPU every op runs on the calling thread,
its intra-op threads inside it) goes to one phase:

- ``query``: inside the frozen query pass (``ViTBackbone.query``, STAR-Prompt's ``clip_query``, the peers' own;
  wrapped for the run: :func:`labelled_query`);
- ``backward``: inside the autograd engine (``autograd::engine::evaluate_function``);
- ``optimizer``: inside ``Optimizer.step``;
- ``forward``: everything else (the prompted forward, the loss, zero_grad, the method's own per-step work).

The table per method: the paired wall times, the phases' seconds per configuration, then the ``--top`` (phase, op) pairs by the largest
time in any configuration. ``--write`` puts the tables into BENCHMARKS.md between the ``profile`` markers, with the
machine's header (report.py).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from benchmarks import steps
from benchmarks.harness import paired

PHASES = ("query", "forward", "backward", "optimizer")
QUERY_LABEL = "bench::query"
DEFAULT_METHODS = tuple(m for m, v in steps.VARIANTS.items() if not v.vlm)


@dataclass
class Profile:
    """One configuration of a method: its wall seconds per paired round (no profiler), the profiled step's seconds,
    and that step's own time (seconds) per phase and per (phase, op name)."""

    wall_s: list[float]
    profiled_s: float
    phases: dict[str, float] = field(default_factory=dict)
    ops: dict[tuple[str, str], float] = field(default_factory=dict)


def phase_of(event) -> str:
    """The phase of a profiler ``FunctionEvent`` from its own name and its ancestors' (innermost match wins)."""
    e = event
    while e is not None:
        name = e.name
        if name.startswith("autograd::engine::evaluate_function"):
            return "backward"
        if name.startswith("Optimizer.step"):
            return "optimizer"
        if name == QUERY_LABEL:
            return "query"
        e = e.cpu_parent
    return "forward"


def op_name(name: str) -> str:
    """An event's name as the table shows it: a compiled graph's call without its hash."""
    return "[compiled graph]" if name.startswith("## Call CompiledFxGraph") else name


def breakdown(events) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """Own seconds per phase and per (phase, op) of a profiler's events; the labels this module and torch add
    (``bench::``, ``autograd::engine::``, ``Optimizer.step``) keep none of their own time (it goes to ``(phase,
    "[python]")``: the interpreter between ops)."""
    phases: dict[str, float] = defaultdict(float)
    ops: dict[tuple[str, str], float] = defaultdict(float)
    for e in events:
        ph = phase_of(e)
        own = e.self_cpu_time_total / 1e6
        label = e.name.startswith(("bench::", "autograd::engine::", "Optimizer."))
        phases[ph] += own
        ops[(ph, "[python]" if label else op_name(e.name))] += own
    return dict(phases), dict(ops)


@contextlib.contextmanager
def labelled_query(method) -> Iterator[None]:
    """The frozen query pass of ``method`` inside a ``bench::query`` profiler range for the duration of the block:
    clfast's ``backbone.query`` and ``clip_query`` (STAR-Prompt's CLIP query), the peers' ``vit.query`` and
    ``star_prompt._clip_query``."""
    from benchmarks.peers import star_prompt as peer_star
    from benchmarks.peers import vit as peer_vit

    def wrap(fn: Callable) -> Callable:
        def call(*args, **kwargs):
            with torch.profiler.record_function(QUERY_LABEL):
                return fn(*args, **kwargs)
        return call

    sites = [(peer_vit, "query", True), (peer_star, "_clip_query", True)]
    sites += [(obj, "query", False) for obj in [getattr(method, "backbone", None)] if hasattr(obj, "query")]
    sites += [(method, "clip_query", False)] if hasattr(method, "clip_query") else []
    saved = [(obj, attr, getattr(obj, attr), module) for obj, attr, module in sites]
    for obj, attr, fn, _ in saved:
        setattr(obj, attr, wrap(fn))
    try:
        yield
    finally:
        for obj, attr, fn, module in saved:
            if module:
                setattr(obj, attr, fn)
            else:
                delattr(obj, attr)      # the instance attribute: the class's method again


def profile(fn: Callable[[], float], method, walls: Sequence[float] = ()) -> Profile:
    """One profiled step of ``fn`` (a warmed-up step of ``method``); ``walls``: its unprofiled steps."""
    with labelled_query(method):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            fn()
            profiled = time.perf_counter() - t0
    phases, ops = breakdown(prof.events())
    return Profile(list(walls), profiled, phases, ops)


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(method: str, profiles: dict[str, Profile], top: int, first: Optional[dict[str, float]] = None) -> str:
    """The markdown table of one method: the paired wall times and speed-ups over ``peer`` (or, without one, the
    first configuration; the median of the rounds' ratios and their range), the ``first`` steps (a compiled
    configuration's: the compile), then the profiled step's phases and ``top`` (phase, op) pairs, seconds per
    configuration."""
    configs = list(profiles)
    rows = [f"| {method} | " + " | ".join(configs) + " |", "|---|" + "---:|" * len(configs)]

    def row(label: str, cells: Sequence[str]) -> None:
        rows.append(f"| {label} | " + " | ".join(cells) + " |")

    def num(v: Optional[float]) -> str:
        return "–" if v is None else f"{v:.3f}"

    n = max(len(p.wall_s) for p in profiles.values())
    row(f"step s, median of {n}", [f"{_median(p.wall_s):.3f}" if p.wall_s else "–" for p in profiles.values()])
    if n:
        ref = "peer" if "peer" in profiles else configs[0]
        base = profiles[ref].wall_s
        cells = []
        for p in profiles.values():
            ratios = sorted(a / b for a, b in zip(base, p.wall_s))
            cells.append(f"{_median(ratios):.2f}× ({ratios[0]:.2f}–{ratios[-1]:.2f})" if ratios else "–")
        row(f"speed-up vs {ref}, per round (range)", cells)
    if first:
        row("first step s (compile: the compile)", [num(first.get(c)) for c in configs])
    row("profiled step s", [num(p.profiled_s) for p in profiles.values()])
    for ph in PHASES:
        row(f"**{ph}**", [num(p.phases.get(ph, 0.0)) for p in profiles.values()])
    keys = {k for p in profiles.values() for k in p.ops}
    ranked = sorted(keys, key=lambda k: (-max(p.ops.get(k, 0.0) for p in profiles.values()), k))[:top]
    for ph, op in ranked:
        row(f"{ph}: `{op}`", [num(p.ops.get((ph, op))) for p in profiles.values()])
    return "\n".join(rows)


def run(methods: Sequence[str], configs: Sequence[str], *, quick: bool, top: int, rounds: int, out: str) -> dict[str, str]:
    """method -> its table. ``configs``: of :data:`benchmarks.steps.CONFIGS` and ``compile`` (the ``clfast`` step
    of a second setup with ``compile=true``)."""
    tables = {}
    for name in methods:
        s = steps.setup(name, quick=quick, batch_size=16, out=str(Path(out) / name))
        fns, first, owner = {}, {}, {}          # owner: the method object a configuration's step trains
        for c in configs:
            if c == "compile":
                sc = steps.setup(name, quick=quick, batch_size=16, out=str(Path(out) / f"{name}-compile"),
                                 overrides=("compile=true",))
                fns[c], owner[c] = steps.step_fn(sc, "clfast"), sc.method
            else:
                fns[c], owner[c] = steps.step_fn(s, c), s.method
            t0 = time.perf_counter()
            fns[c]()                                    # warm-up (a compiled configuration: the compile)
            first[c] = time.perf_counter() - t0
        walls = paired(fns, rounds)
        profiles = {c: profile(fns[c], owner[c], walls[c]) for c in configs}
        tables[name] = table(name, profiles, top, first if "compile" in configs else None)
        print(tables[name] + "\n", flush=True)
    return tables


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.profile_train", description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(steps.VARIANTS))
    ap.add_argument("--configs", nargs="+", default=list(steps.CONFIGS),
                    choices=[*steps.CONFIGS, *steps.AMP_CONFIGS, "compile"],
                    help="configurations side by side (compile: clfast with compile=true)")
    ap.add_argument("--rounds", type=int, default=3, help="paired rounds of unprofiled steps (default 3)")
    ap.add_argument("--quick", action="store_true", help="the shipped vit_tiny_synth instead of ViT-B/16")
    ap.add_argument("--top", type=int, default=8, help="(phase, op) rows per method (default 8)")
    ap.add_argument("--write", action="store_true", help="write the tables into BENCHMARKS.md (profile markers)")
    ap.add_argument("--path", default="BENCHMARKS.md", help="the file --write edits")
    args = ap.parse_args(argv)
    if args.top < 0:
        ap.error(f"--top must be >= 0, got {args.top}")
    if args.rounds < 0:
        ap.error(f"--rounds must be >= 0, got {args.rounds}")
    import os
    from datetime import datetime

    from benchmarks import report

    torch.set_num_threads(int(os.environ.get("CLFAST_BENCH_THREADS", "2")))   # as the pytest benchmarks run
    started = {"datetime": datetime.now().isoformat()}
    header = report.header(started)          # the commit as the run starts (+dirty: tracked files changed)
    with tempfile.TemporaryDirectory(prefix="clfast-profile-") as out:
        tables = run(args.methods, list(dict.fromkeys(args.configs)), quick=args.quick, top=args.top,
                     rounds=args.rounds, out=out)
    if args.write:
        shape = "vit_tiny_synth" if args.quick else "vit_base_patch16_224"
        body = (f"### profile\n\n{header} Shapes: {shape}, batch 16, augmentation on; per configuration one "
                f"warm-up step, {args.rounds} paired rounds (one step of each configuration per round, the "
                f"order reversed every other round), then one profiled step. Phases and ops: seconds of own (self) "
                f"CPU time in the profiled step.\n\n"
                + "\n\n".join(tables.values()))
        report.write(Path(args.path), "profile", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
