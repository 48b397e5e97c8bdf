"""The PNG plots of docs/img/, drawn from the tables in BENCHMARKS.md (the committed figures, so a plot never shows a
number the tables do not).

    python benchmarks/plots.py [--out docs/img] [--benchmarks BENCHMARKS.md]

- ``retrieve_pool_size.png``: ``retrieve`` time against the key-pool size M (B 128, D 768, k 5, fp32 forward), one
  line per implementation;
- ``prompt_conv_prompts.png``: ``prompt_conv`` time against the prompts per task F (forward + backward), one line
  per (implementation, batch);
- ``train_step_methods.png``: images/s of a full training step per method and configuration, each bar labelled
  with its precision (the ``train_step`` table between the markers: one run; without it, every table of
  BENCHMARKS.md whose first column is a training-step case: ``<method> <backbone> B<batch> ...``).

Each table row is ``| case | impl | median ... |``; cases are parsed by the regular expressions below, and a table
that lacks a plot's cases is an error naming the table (a renamed case must not silently drop a line).
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN = re.compile(r"<!-- bench:(?P<name>[\w-]+):begin -->")


def read_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Tables between ``<!-- bench:NAME:begin/end -->`` markers, and every other table under a ``### `` heading,
    as ``{name: [row as {header: cell}]}``; rows of several tables of one name are concatenated."""
    tables: dict[str, list[dict[str, str]]] = defaultdict(list)
    name, heading, cols = None, None, None
    for line in text.splitlines():
        m = BEGIN.match(line.strip())
        if m:
            name = m.group("name")
            continue
        if line.strip().startswith("<!-- bench:") and line.strip().endswith(":end -->"):
            name, cols = None, None
            continue
        if line.startswith("### "):
            heading, cols = line[4:].strip(), None
            continue
        if not line.startswith("|"):
            cols = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cols is None:
            cols = cells
            continue
        if all(set(c) <= set("-: ") for c in cells):
            continue
        tables[name or heading or ""].append(dict(zip(cols, cells)))
    return dict(tables)


def _number(cell: str) -> float | None:
    try:
        return float(cell.replace("×", "").strip())
    except ValueError:
        return None


RETRIEVE = re.compile(r"B128 M(?P<M>\d+) D768 k5 fp32 fwd$")
PROMPT_CONV = re.compile(r"\S+ B(?P<B>\d+) F(?P<F>\d+) fp32 fwd\+bwd$")
TRAIN = re.compile(r"(?P<method>[a-z_0-9]+) (?P<backbone>\S+) B(?P<B>\d+)\b")


def series(rows: list[dict[str, str]], pattern: re.Pattern, x: str, key, y: str = "median ms",
           table: str = "") -> dict[str, list[tuple[float, float]]]:
    """``{key(match, row): [(x, y) sorted by x]}`` over the rows whose case matches ``pattern``."""
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        m = pattern.search(row.get("case", ""))
        value = _number(row.get(y, ""))
        if m and value is not None:
            out[key(m, row)].append((float(m.group(x)), value))
    if not out:
        raise ValueError(f"plots: table {table!r} has no case matching {pattern.pattern!r} with a {y!r} column")
    return {k: sorted(v) for k, v in out.items()}


def _axes(title: str, xlabel: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_retrieve(tables, out: Path) -> Path:
    data = series(tables["retrieve"], RETRIEVE, "M", lambda m, r: r["impl"], table="retrieve")
    fig, ax = _axes("retrieve: B 128, D 768, k 5, fp32 forward", "keys in the pool M", "median ms")
    for impl, pts in sorted(data.items()):
        ax.plot(*zip(*pts), marker="o", label=impl)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend()
    return _save(fig, out / "retrieve_pool_size.png")


def plot_prompt_conv(tables, out: Path) -> Path:
    data = series(tables["prompt_conv"], PROMPT_CONV, "F", lambda m, r: f"{r['impl']} B{m.group('B')}",
                  table="prompt_conv")
    fig, ax = _axes("prompt_conv: 7 layers x (24 heads, 36x80, 17x17), fp32 fwd+bwd", "prompts per task F",
                    "median ms")
    for label, pts in sorted(data.items()):
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    return _save(fig, out / "prompt_conv_prompts.png")


LABELS = [(" vit_base_patch16_224+clip:ViT-L-14", " (ViT-B/16 + CLIP ViT-L/14)"), (" clip:ViT-L-14", " (CLIP ViT-L/14)"),
          (" vit_base_patch16_224+clip:clip_tiny_synth", " (ViT-B/16 + tiny CLIP)"),
          (" vit_base_patch16_224", " (ViT-B/16)"), (" vlm_ViT-B-16@384", " (VLM, 384 px)")]


def _label(case: str) -> str:
    """A training-step case as the plot's axis names it (the backbone in words)."""
    for name, words in LABELS:
        if name in case:
            return case.replace(name, words)
    return case


def train_rates(tables) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """(case -> impl -> images/s, impl -> its precision where the table names it) of the training-step rows of
    the ``train_step`` table between the markers (one run, one machine); without it, of every table whose rows are
    training-step cases."""
    rates: dict[str, dict[str, float]] = defaultdict(dict)
    amps: dict[str, str] = {}
    for name, rows in tables.items():
        if "train_step" in tables and name != "train_step":
            continue
        for row in rows:
            m = TRAIN.match(row.get("case", ""))
            value = _number(row.get("images/s", ""))
            if m and value is not None and "s/step" in " ".join(row):
                rates[row["case"]][row["impl"]] = value
                if row.get("amp", "–") != "–":
                    amps.setdefault(row["impl"], row["amp"])
    if not rates:
        raise ValueError("plots: no training-step table (case '<method> <backbone> B<batch> ...' with an "
                         "'images/s' column) in BENCHMARKS.md")
    return dict(rates), amps


def plot_train(tables, out: Path) -> Path:
    rates, amps = train_rates(tables)
    cases = sorted(rates, reverse=True)   # top to bottom in name order
    impls = [i for i in ("peer", "peer_amp", "reference", "clfast", "cpu", "floor", "floor_head")
             if any(i in r for r in rates.values())]
    impls += sorted({i for r in rates.values() for i in r} - set(impls))
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 0.55 * len(cases) + 1.6), dpi=110)
    ax.set_title("training step, images/s (log scale): compare bars within a method\n"
                 "(BENCHMARKS.md's train_step table: one run, paired rounds)", fontsize=10)
    ax.set_xlabel("images/s (higher is faster)")
    ax.grid(True, which="both", axis="x", alpha=0.3)
    height = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        ys = [i + 0.4 - (j + 0.5) * height for i, c in enumerate(cases) if impl in rates[c]]
        xs = [rates[c][impl] for c in cases if impl in rates[c]]
        ax.barh(ys, xs, height, label=f"{impl} ({amps[impl]})" if impl in amps else impl)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    # ticks at 1, 2 and 5 of each decade, written as plain numbers (the default writes 2×10⁰ at every minor tick)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks(range(len(cases)))
    ax.set_yticklabels([_label(c) for c in cases], fontsize=7)
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, out / "train_step_methods.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmarks", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--out", default=str(ROOT / "docs" / "img"))
    args = p.parse_args(argv)
    tables = read_tables(Path(args.benchmarks).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for fn in (plot_retrieve, plot_prompt_conv, plot_train):
        print(fn(tables, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
