"""Turn a pytest-benchmark JSON file into the ratio tables of BENCHMARKS.md.

    python benchmarks/report.py benchmarks/results/ops_full.json [--write] [--allow-dirty]

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
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench:{name}:begin -->", "<!-- bench:{name}:end -->"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _isa_flags() -> str:
    """The vector/matrix ISA extensions the CPU kernels can use, as /proc/cpuinfo names them."""
    want = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f for f in want if f in have) or "none of " + " ".join(want)
    except OSError:
        pass
    return "unknown"


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
    return (f"Machine: {_cpu_model()} ({_isa_flags()}), {os.cpu_count()} cores, torch threads "
            f"{os.environ.get('CLFAST_BENCH_THREADS', '2')}{gpu}. "
            f"Versions: Python {platform.python_version()}, torch {torch.__version__}, triton {triton_v}. "
            f"Commit: {_commit_text(data)}. Date: {data.get('datetime', '')[:19]}.")


def _train_step_rows(case: str, meds: dict[str, float], images: int) -> list[str]:
    """Training steps: seconds per step, images/s, the multiple of the backbone's own step (``floor``) and the
    speed-up over the reference backends."""
    rows = []
    for impl, med in sorted(meds.items(), key=lambda kv: kv[1], reverse=True):
        floor = f"{med / meds['floor']:.2f}×" if "floor" in meds else "–"
        vs_ref = f"{meds['reference'] / med:.2f}×" if "reference" in meds else "–"
        rows.append(f"| {case} | {impl} | {med:.2f} | {images / med:.2f} | {floor} | {vs_ref} |")
    return rows


def tables(data: dict) -> dict[str, str]:
    """op name -> markdown table."""
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    op_of: dict[str, str] = {}
    images: dict[str, int] = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        groups[b["group"]][info["impl"]] = b["stats"]["median"]
        op_of[b["group"]] = info["op"]
        if "images" in info:
            images[b["group"]] = int(info["images"])
    out: dict[str, list[str]] = defaultdict(list)
    for group in groups:
        op = op_of[group]
        if group in images:
            if not out[op]:
                out[op] += ["| case | impl | median s/step | images/s | × backbone floor | speed-up vs reference |",
                            "|---|---|---:|---:|---:|---:|"]
            out[op] += _train_step_rows(group[len(op):].strip(), groups[group], images[group])
            continue
        if not out[op]:
            out[op] += ["| case | impl | median ms | speed-up vs peer | speed-up vs torch |",
                        "|---|---|---:|---:|---:|"]
        meds = groups[group]
        case = group[len(op):].strip()
        for impl, med in sorted(meds.items(), key=lambda kv: kv[1], reverse=True):
            vs_peer = f"{meds['peer'] / med:.2f}×" if "peer" in meds else "–"
            vs_torch = f"{meds['torch'] / med:.2f}×" if "torch" in meds else "–"
            out[op].append(f"| {case} | {impl} | {med * 1e3:.2f} | {vs_peer} | {vs_torch} |")
    return {op: "\n".join(rows) for op, rows in out.items()}


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
    args = p.parse_args(argv)
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
        print(f"\n## {op}\n{tab}")
        if args.write:
            write(args.out, op, f"### {op}\n\n{head}\n\n{tab}")
    if args.write:
        print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
