"""The ``clfast`` command line (also ``python -m clfast``)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def _repo_benchmarks() -> Path:
    """benchmarks/ of the source checkout clfast is installed from (editable installs)."""
    root = Path(__file__).resolve().parents[1]
    bench = root / "benchmarks"
    if not (bench / "bench_ops.py").exists():
        raise SystemExit("clfast bench: the benchmark suites live in the source checkout (benchmarks/); "
                         f"none found under {root}. Run from a clone installed with `pip install -e .`.")
    return bench


def cmd_info(args) -> int:
    from clfast.info import main

    return main()


def cmd_bench(args) -> int:
    bench = _repo_benchmarks()
    results = bench / "results"
    results.mkdir(exist_ok=True)
    tag = "quick" if args.quick else "full"
    out_json = results / f"ops_{tag}.json"
    cmd = [sys.executable, "-m", "pytest", *sorted(str(p) for p in bench.glob("bench_ops*.py")), "-q", "-p", "no:cacheprovider",
           "--benchmark-enable", "--benchmark-only", f"--benchmark-json={out_json}",
           "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name"]
    if args.quick:
        cmd.append("--quick")
    if args.k:
        cmd += ["-k", args.k]
    env = dict(os.environ)
    rc = subprocess.call(cmd, cwd=bench.parent, env=env)
    if rc != 0:
        return rc
    report = [sys.executable, str(bench / "report.py"), str(out_json)]
    if args.write:
        report.append("--write")
    return subprocess.call(report, cwd=bench.parent)


def cmd_demo(args) -> int:
    # Until the CL engine lands, the demo shows what runs here and how fast the ops are.
    rc = cmd_info(args)
    if rc:
        return rc
    print()
    return cmd_bench(argparse.Namespace(quick=True, k=None, write=False))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clfast", description=__doc__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    s = sub.add_parser("info", help="versions, build flags, devices and the backends of every op")
    s.set_defaults(fn=cmd_info)
    s = sub.add_parser("bench", help="run the pytest-benchmark suites and print the ratio table")
    s.add_argument("suite", choices=["ops"], help="which suite")
    s.add_argument("--quick", action="store_true", help="small shapes only (a minute on 2 cores)")
    s.add_argument("-k", default=None, help="pytest -k expression to select cases")
    s.add_argument("--write", action="store_true", help="also write the table into BENCHMARKS.md")
    s.set_defaults(fn=cmd_bench)
    s = sub.add_parser("demo", help="the default job on the data that ships with clfast")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
