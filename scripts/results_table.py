"""Write a markdown report (accuracy matrices, A_N, F_N, commands) from finished clfast run directories.

    python scripts/results_table.py runs/results/linear runs/results/l2p ... --out docs/results.md

Each run directory must hold summary.json, acc_matrix.csv, config.yaml and record.json (what
`clfast train` writes). The report lists the headline tables first (mean ± std over seeds when a
method has several runs), then the matrix and exact command (from record.json) of each method's first run.
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
    n, cols = len(acc), len(acc[0])
    joint = cols == 1 and n > 1          # a joint run: one column, every task evaluated after it
    lines = ["| task \\ after | " + ("all (joint)" if joint else " | ".join(str(j + 1) for j in range(n))) + " |",
             "|---" * (cols + 1) + "|"]
    for i in range(n):
        cells = [f"{acc[i][j]:.1f}" if j >= i or joint else "" for j in range(cols)]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _label(rec: dict) -> str:
    """The method as the tables name it; a joint run names its base, e.g. ``joint[linear]``."""
    base = (rec.get("method_record") or {}).get("joint_base")
    return f"{rec['method']}[{base}]" if base else rec["method"]


def _mean_std(xs: list[float]) -> str:
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{m:.2f}"
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5
    return f"{m:.2f} ± {sd:.2f}"


def report(runs: list[dict], title: str, preamble: str = "") -> str:
    """Headline tables, then the accuracy matrix and command of the first run of each method.

    With several runs of a method (different ``seed``), a first table gives each method's mean ± sample
    standard deviation over its runs; the per-run table follows.
    """
    out = [f"# {title}", ""]
    if preamble:
        out += [preamble.strip(), ""]
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        by_method.setdefault(_label(r["record"]), []).append(r)
    if any(len(rs) > 1 for rs in by_method.values()):
        out += ["| method | seeds | A_N (%) | F_N (%) | BWT |", "|---|---|---|---|---|"]
        for m, rs in by_method.items():
            seeds = ", ".join(str(r["record"]["seed"]) for r in rs)
            cells = [_mean_std([r["summary"][k] for r in rs]) for k in ("A_N", "F_N", "BWT")]
            out.append(f"| `{m}` | {seeds} | " + " | ".join(cells) + " |")
        out += ["", "Each run:", ""]
    out += ["| method | seed | A_N (%) | F_N (%) | BWT | sample-weighted (%) | wall time (s) | images/s (train) |",
            "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        s = r["summary"]
        out.append(f"| `{_label(r['record'])}` | {r['record']['seed']} | {s['A_N']:.2f} | {s['F_N']:.2f} | "
                   f"{s['BWT']:.2f} | {s['sample_weighted_accuracy']:.2f} | {s['wall_time_s']:.0f} | "
                   f"{s['images_per_s']:.0f} |")
    for rs in by_method.values():
        r = rs[0]
        rec = r["record"]
        out += ["", f"## `{_label(rec)}` on `{rec['dataset']}`", "",
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
