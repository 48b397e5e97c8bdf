"""Write a markdown report (accuracy matrices, A_N, F_N, commands) from finished clfast run directories.

    python scripts/results_table.py runs/results/linear runs/results/l2p ... --out docs/results.md

Each run directory must hold summary.json, acc_matrix.csv, config.yaml and record.json (what
`clfast train` writes). The report lists the headline table first, then every run's matrix and the
exact command that produced it (from record.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, ROOT)

from clfast.engine.io import atomic_write_text  # noqa: E402
from clfast.engine.metrics import read_acc_csv  # noqa: E402


def _load(run: str) -> dict:
    with open(os.path.join(run, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    with open(os.path.join(run, "record.json"), encoding="utf-8") as f:
        record = json.load(f)
    return {"dir": run, "summary": summary, "record": record, "acc": read_acc_csv(os.path.join(run, "acc_matrix.csv"))}


def _matrix_md(acc) -> str:
    n = len(acc)
    lines = ["| task \\ after | " + " | ".join(str(j + 1) for j in range(n)) + " |",
             "|---" * (n + 1) + "|"]
    for i in range(n):
        cells = [f"{acc[i][j]:.1f}" if j >= i else "" for j in range(n)]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(runs: list[dict], title: str, preamble: str = "") -> str:
    out = [f"# {title}", ""]
    if preamble:
        out += [preamble.strip(), ""]
    out += ["| method | A_N (%) | F_N (%) | BWT | sample-weighted (%) | wall time (s) | images/s (train) |",
            "|---|---|---|---|---|---|---|"]
    for r in runs:
        s = r["summary"]
        out.append(f"| `{r['record']['method']}` | {s['A_N']:.2f} | {s['F_N']:.2f} | {s['BWT']:.2f} | "
                   f"{s['sample_weighted_accuracy']:.2f} | {s['wall_time_s']:.0f} | {s['images_per_s']:.0f} |")
    for r in runs:
        rec = r["record"]
        out += ["", f"## `{rec['method']}` on `{rec['dataset']}`", "",
                f"Command: `{rec.get('command') or '(not recorded)'}`  ",
                f"Backbone: `{rec['backbone'].get('name')}` ({rec['backbone'].get('source')}, sha256 "
                f"`{(rec['backbone'].get('sha256') or '')[:16]}…`); class order seed "
                f"{rec['scenario'].get('class_order_seed')}; seed {rec['seed']}; torch {rec['versions']['torch']}; "
                f"{rec['device']['type']} × {rec['device']['world_size']}, {rec['device']['threads']} threads.", "",
                "Accuracy (%) on each task (rows) after training each task (columns):", "", _matrix_md(r["acc"])]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default=None, help="markdown file to write (default: stdout)")
    p.add_argument("--title", default="Results")
    p.add_argument("--preamble", default="", help="text (or @file) placed under the title")
    args = p.parse_args(argv)
    pre = args.preamble
    if pre.startswith("@"):
        with open(pre[1:], encoding="utf-8") as f:
            pre = f.read()
    text = report([_load(r) for r in args.runs], args.title, pre)
    if args.out:
        atomic_write_text(args.out, text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
