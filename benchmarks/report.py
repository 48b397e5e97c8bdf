"""Turn a pytest-benchmark JSON file into the ratio tables of BENCHMARKS.md (op tables, and the per-method
training-step table of bench_train.py).

    python benchmarks/report.py benchmarks/results/ops_full.json [--write] [--allow-dirty] [--train-block NAME]

Each group is one case (op, shape, dtype, mode); within it every implementation's median is quoted with
its speed-up over ``peer`` (the way the official codes compute it) and over ``torch`` (the best stock
PyTorch composition). Speed-up = other median / this median, so > 1 means faster.

Figures carry the commit they were measured at (pytest-benchmark's ``commit_info``). BENCHMARKS.md takes figures
from committed code only: ``--write`` refuses results measured in a tree with uncommitted changes (``+dirty``)
unless ``--allow-dirty`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Optional

from clfast.utils.cpu import cpu_model, isa_flags

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench:{name}:begin -->", "<!-- bench:{name}:end -->"


def _kernel_forms() -> str:
    """Which forms clfast's CPU kernels run here (chosen at run time; the build's baseline is AVX2)."""
    from clfast import _ext

    k = _ext.cpu_kernels()
    if "error" in k:    # no extension: say so rather than fail the report
        return "unknown (no extension)"
    return f"{k.get('simd', '?')}, bf16 GEMMs {k.get('bf16', '?')}"


def _git_commit() -> tuple[str, bool]:
    """(short sha, dirty) of the checkout report.py lives in; tracked files only."""
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return sha, bool(dirty)


def commit(data: dict) -> tuple[str, bool]:
    """(commit, dirty) the figures were measured at: the results' own ``commit_info`` (pytest-benchmark runs
    ``git describe --dirty``), else this checkout as it is now."""
    info = data.get("commit_info") or {}
    if info.get("id") and info["id"] not in ("unknown", "unversioned"):
        return info["id"][:7], bool(info.get("dirty"))
    try:
        return _git_commit()
    except Exception:
        return "unknown", False


def _commit_text(data: dict) -> str:
    sha, dirty = commit(data)
    return sha + ("+dirty" if dirty else "")


def header(data: dict) -> str:
    import torch

    extra = data.get("benchmarks", [{}])[0].get("extra_info", {}) if data.get("benchmarks") else {}
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = "n/a"
    dev = extra.get("device", "cpu")
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if dev == "cuda" and torch.cuda.is_available() else ""
    return (f"Machine: {cpu_model()} ({isa_flags()}; kernels: {_kernel_forms()}), {os.cpu_count()} cores, "
            f"torch threads "
            f"{os.environ.get('CLFAST_BENCH_THREADS', '2')}{gpu}. "
            f"Versions: Python {platform.python_version()}, torch {torch.__version__}, triton {triton_v}. "
            f"Commit: {_commit_text(data)}. Date: {data.get('datetime', '')[:19]}.")


_ORDER = {"peer": 0, "peer_amp": 1, "reference": 2, "clfast": 3, "cpu": 3, "floor": 4, "floor_head": 5}
_AMP = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
MEMORY_KINDS = {
    "cpu_rss_sampled": "the process's resident set size above its value at the step's start, sampled every ms "
                       "during one extra step (CPU: a lower bound of the step's working memory)",
    "cuda_allocated": "torch.cuda.max_memory_allocated above memory_allocated at the step's start (one extra step)",
}


def _x(num: Optional[float], den: Optional[float]) -> str:
    return f"{num / den:.2f}×" if num is not None and den else "–"


def paired_speedups(seconds: dict[str, list[float]], impl: str, base: str = "peer") -> Optional[list[float]]:
    """Per paired round, ``base``'s seconds over ``impl``'s (None where either did not run every round)."""
    a, b = seconds.get(base), seconds.get(impl)
    if not a or not b or len(a) != len(b):
        return None
    return [x / y for x, y in zip(a, b)]


def _ratio_cells(ratios: Optional[list[float]], fallback: str) -> tuple[str, str]:
    """(median of per-round ratios, their range), or (``fallback``, "–") without paired rounds."""
    if not ratios:
        return fallback, "–"
    return f"{statistics.median(ratios):.2f}×", f"{min(ratios):.2f}–{max(ratios):.2f}"


def train_step_table(benches: list[dict]) -> str:
    """The per-method table of ``train_step`` figures (bench_train.py): per method and configuration its precision,
    the seconds per step, images/s, peak memory, the speed-up over ``peer`` (the official code as it runs, fp32),
    over ``peer_amp`` where the run has it (the official code under the engine's autocast: equal precision; the
    columns appear only then) and the multiple of the floor the method's step must pay.

    Where the group holds paired rounds (``impl`` ``paired``: one step of each configuration per round), the seconds
    are their medians per configuration and each speed-up the median of the rounds' ratios, with the rounds' range
    beside it; else each configuration's own median. Where those rounds also ran the method's own floor (``floor``
    in ``paired_s``: its frozen query pass, then the backbone's forward and backward as deep as its shallowest
    prompted block), it gets a ``floor`` row and ``× floor`` is the median of the rounds' ratios to it, with their
    range; else ``× floor`` is the multiple of the same run's ``floors`` group (the bare backbone's forward and
    backward through every block), or, in older files (bench_train_step.py), of the group's own ``floor``."""
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    floors: dict[str, dict[str, float]] = defaultdict(dict)
    for b in benches:
        info = b.get("extra_info", {})
        groups[b["group"]][info["impl"]] = {"median": b["stats"]["median"], **info}
        if info.get("method") == "floors":
            floors[info["floors"]][info["impl"]] = b["stats"]["median"]
    amp_peer = any("peer_amp" in g for g in groups.values())
    head = ["case", "impl", "amp", "median s/step", "images/s", "peak memory MB", "speed-up vs peer", "per round",
            *(["vs peer_amp", "per round"] if amp_peer else []), "× floor", "per round"]
    align = ["---", "---", "---", "---:", "---:", "---:", "---:", "---", *(["---:", "---"] if amp_peer else []),
             "---:", "---"]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    kinds, pays = set(), defaultdict(list)
    for group in sorted(groups, key=lambda g: (" floors " in g, g)):
        impls = dict(groups[group])
        paired_info = impls.pop("paired", {})
        paired = paired_info.get("paired_s", {})
        case = group[len("train_step"):].strip()
        if paired.get("floor"):
            impls["floor"] = {"images": paired_info.get("images", 0), "amp": paired_info.get("amp"),
                              "peak_mem_mb": paired_info.get("floor_peak_mem_mb"),
                              "peak_mem_kind": paired_info.get("floor_peak_mem_kind", "")}
            pays[paired_info.get("pays", "?").replace("+", " + ")].append(case.split()[0])

        def median(impl: str) -> Optional[float]:
            if paired.get(impl):
                return statistics.median(paired[impl])
            return impls.get(impl, {}).get("median")

        def versus(base: str, impl: str) -> tuple[str, str]:
            if impl == "floor" or base not in impls:
                return "–", "–"
            if impl == base:
                return _x(median(base), median(impl)), "–"
            return _ratio_cells(paired_speedups(paired, impl, base=base), _x(median(base), median(impl)))

        for impl in sorted(impls, key=lambda i: (_ORDER.get(i, 9), i)):
            info = impls[impl]
            med = median(impl)
            fl = floors.get(info.get("floors", ""), {})
            floor = median("floor") if paired.get("floor") else fl.get("floor", impls.get("floor", {}).get("median"))
            mem = info.get("peak_mem_mb")
            if mem is not None:
                kinds.add(info.get("peak_mem_kind", ""))
            mem_s = f"{mem:.0f}" if isinstance(mem, (int, float)) and mem == mem else "–"
            images = int(info.get("images", 0))
            ips = f"{images / med:.2f}" if images else "–"
            by_floor, floor_spread = _ratio_cells(paired_speedups(paired, "floor", base=impl) if impl != "floor"
                                                  else None, _x(med, floor))
            cells = [case, impl, _AMP.get(info.get("amp"), info.get("amp") or "–"), f"{med:.3f}", ips, mem_s,
                     *versus("peer", impl), *(versus("peer_amp", impl) if amp_peer else ()), by_floor, floor_spread]
            rows.append("| " + " | ".join(cells) + " |")
    notes = [f"Peak memory: {MEMORY_KINDS.get(k, k)}." for k in sorted(kinds) if k]
    if amp_peer:
        notes.append("`peer_amp`: the peer with the engine's autocast wrapped around its step by hand (its official "
                     "code runs fp32): `vs peer_amp` compares at equal precision.")
    if pays:
        parts = "; ".join(f"{', '.join(sorted(ms))}: {p}" for p, ms in sorted(pays.items()))
        notes.append("`floor` rows: the floor each method's step must pay, in its paired rounds (" + parts + "; "
                     "query: the method's frozen query pass of the batch; floor: the bare backbone's forward and "
                     "backward through every block; floor_head: its frozen forward and a head's backward).")
    return "\n".join(rows + ([""] + notes if notes else []))


def busy_table(benches: list[dict]) -> str:
    """bench_busy.py: each op's backends quiet, beside one busy neighbour and beside a twin rank, and the slowdowns
    (busy / quiet, rank / quiet)."""
    groups: dict[str, dict[tuple[str, str], float]] = defaultdict(dict)
    for b in benches:
        info = b["extra_info"]
        groups[b["group"]][(info["impl"], info["load"])] = b["stats"]["median"]
    rows = ["| case | impl | quiet ms | busy ms | slowdown | twin rank ms | slowdown |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for group in sorted(groups):
        meds, case = groups[group], group[len("busy_neighbour"):].strip()
        for impl in sorted({i for i, _ in meds}):
            quiet, busy, rank = (meds.get((impl, load)) for load in ("quiet", "busy", "rank"))
            ms = lambda t: "–" if t is None else f"{t * 1e3:.2f}"  # noqa: E731
            rows.append(f"| {case} | {impl} | {ms(quiet)} | {ms(busy)} | {_x(busy, quiet)} | {ms(rank)} | "
                        f"{_x(rank, quiet)} |")
    return "\n".join(rows)


def tables(data: dict) -> dict[str, str]:
    """op name -> markdown table."""
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    op_of: dict[str, str] = {}
    train: list[dict] = []
    busy: list[dict] = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if info.get("op") in ("train_step", "busy_neighbour"):
            (train if info["op"] == "train_step" else busy).append(b)
            continue
        groups[b["group"]][info["impl"]] = b["stats"]["median"]
        op_of[b["group"]] = info["op"]
    out: dict[str, list[str]] = defaultdict(list)
    for group in groups:
        op = op_of[group]
        if not out[op]:
            out[op] += ["| case | impl | median ms | speed-up vs peer | speed-up vs torch |",
                        "|---|---|---:|---:|---:|"]
        meds = groups[group]
        case = group[len(op):].strip()
        for impl, med in sorted(meds.items(), key=lambda kv: kv[1], reverse=True):
            vs_peer = f"{meds['peer'] / med:.2f}×" if "peer" in meds else "–"
            vs_torch = f"{meds['torch'] / med:.2f}×" if "torch" in meds else "–"
            out[op].append(f"| {case} | {impl} | {med * 1e3:.2f} | {vs_peer} | {vs_torch} |")
    result = {op: "\n".join(rows) for op, rows in out.items()}
    if train:
        result["train_step"] = train_step_table(train)
    if busy:
        result["busy_neighbour"] = busy_table(busy)
    return result


def write(path: Path, name: str, body: str) -> None:
    text = path.read_text() if path.exists() else "# clfast benchmarks\n"
    begin, end = BEGIN.format(name=name), END.format(name=name)
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        text = pre + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".bench-", suffix=".md")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", type=Path)
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    p.add_argument("--allow-dirty", action="store_true",
                   help="let --write quote results measured in a tree with uncommitted changes")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--train-block", default="train_step", metavar="NAME",
                   help="the markers the training-step table goes between (default train_step, the engine's default "
                        "amp; `clfast bench train --amp none` names train_step_fp32)")
    args = p.parse_args(argv)
    if not re.fullmatch(r"[\w-]+", args.train_block):
        p.error(f"--train-block: expected a marker name of letters, digits, '_' or '-', got {args.train_block!r}")
    data = json.loads(args.json.read_text())
    sha, dirty = commit(data)
    if dirty and args.write and not args.allow_dirty:
        print(f"report.py: {args.json} was measured in a tree with uncommitted changes ({sha}+dirty); "
              f"BENCHMARKS.md quotes committed code only: commit and rerun, or pass --allow-dirty",
              file=sys.stderr)
        return 2
    if dirty:
        print(f"report.py: note: measured in a tree with uncommitted changes ({sha}+dirty)", file=sys.stderr)
    head = header(data)
    tabs = tables(data)
    if not tabs:
        print("no benchmark results in", args.json, file=sys.stderr)
        return 1
    print(head)
    for op, tab in tabs.items():
        name = args.train_block if op == "train_step" else op
        print(f"\n## {name}\n{tab}")
        if args.write:
            write(args.out, name, f"### {name}\n\n{head}\n\n{tab}")
    if args.write:
        print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
