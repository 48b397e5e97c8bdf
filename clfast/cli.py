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
    amp = args.amp
    if amp != "auto" and args.suite not in ("train", "all"):
        return _fail(f"bench: --amp {amp} sets the training steps' precision; suite {args.suite!r} has none "
                     "(the op suites time each precision side by side)")
    if amp == "bf16" and args.write:
        return _fail("bench: --write with --amp bf16 would replace BENCHMARKS.md's train_step table, which holds "
                     "amp=auto's run (the engine's default: bf16 where the hardware computes it); run without "
                     "--write and the table is printed")
    if args.k and args.write:
        return _fail(f"bench: --write with -k {args.k!r} would replace BENCHMARKS.md's tables with the selected "
                     "cases only; run the whole suite to write, or drop --write and the table is printed")
    tag = ("quick" if args.quick else "full") + ("" if amp == "auto" else f"_{amp}")
    out_json = results / f"{args.suite}_{tag}.json"
    ops = sorted(str(p) for p in bench.glob("bench_ops*.py"))
    train = [str(bench / "bench_train.py")]
    busy = [str(bench / "bench_busy.py")]
    files = {"ops": ops, "train": train, "busy": busy, "all": ops + busy + train}[args.suite]
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider",
           "--benchmark-enable", "--benchmark-only", f"--benchmark-json={out_json}",
           "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name"]
    if args.quick:
        cmd.append("--quick")
    if args.k:
        cmd += ["-k", args.k]
    env = dict(os.environ, CLFAST_BENCH_AMP=amp)     # bench_train.py's precision (amp=auto: the engine's default)
    rc = subprocess.call(cmd, cwd=bench.parent, env=env)
    if rc != 0:
        return rc
    report = [sys.executable, str(bench / "report.py"), str(out_json)]
    if args.write:
        report.append("--write")
    if amp == "none":       # fp32 everywhere: its own table beside amp=auto's (``train_step_fp32``)
        report += ["--train-block", "train_step_fp32"]
    return subprocess.call(report, cwd=bench.parent)


def _fail(msg: str, rc: int = 2) -> int:
    print(f"clfast: error: {msg}", file=sys.stderr)
    return rc


def _run_trainer(trainer) -> int:
    from clfast.data.readers import ImageReadError
    from clfast.engine.distributed import lost_contact
    from clfast.engine.io import CheckpointWriteError
    from clfast.engine.trainer import Interrupted

    try:
        trainer.fit()
    except Interrupted as e:
        print(f"clfast: {e}", file=sys.stderr)
        return 130 if trainer.interrupted else 0
    except CheckpointWriteError as e:   # a full disk: the message names the file, the errno and what to do
        return _fail(str(e), rc=1)
    except ImageReadError as e:
        return _fail(_image_error(e))
    except RuntimeError as e:
        if trainer.world == 1 or not lost_contact(e):
            raise
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        return _fail(f"rank {trainer.rank} of {trainer.world} lost contact with another process (it died, or did not "
                     f"answer within dist_timeout_s={trainer.procs.timeout_s:g} s): {first}\nThe checkpoints "
                     f"already written are intact; continue the run with the same launcher and --resume "
                     f"{trainer.run_dir}", rc=1)
    return 0


def cmd_train(args) -> int:
    from clfast.engine.config import load_config
    from clfast.engine.io import RunDirectoryError
    from clfast.engine.trainer import Trainer

    command = _command_line(args)
    try:
        if args.resume:
            if args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
                return _fail(f"--out {args.out} and --resume {args.resume} name different run directories")
            overrides = dict(parse for parse in (_parse(o) for o in args.overrides))
            # the original command line with --resume added: what it names must match the run
            for key in ("method", "dataset", "preset", "data_root"):
                if getattr(args, key) is not None:
                    overrides[key] = getattr(args, key)
            if args.quiet:
                overrides["quiet"] = True
            trainer = Trainer.resume(args.resume, command=command, **overrides)
        else:
            if not args.method or not args.dataset:
                return _fail("train needs --method and --dataset (or --resume DIR)")
            cfg = load_config(args.method, args.dataset, args.preset, args.overrides,
                              data_root=args.data_root, quiet=True if args.quiet else None)
            trainer = Trainer(cfg, out=args.out, command=command)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, RunDirectoryError) as e:
        return _fail(str(e))
    return _run_trainer(trainer)


def _image_error(e: Exception) -> str:
    """An ImageReadError's message; re-raised from a DataLoader worker it ends with the worker's traceback,
    whose last line is the original message."""
    return str(e).rsplit("ImageReadError: ", 1)[-1].strip()


def _command_line(args) -> str:
    """The command as typed, for the run record (``python -m clfast`` and torchrun launches included)."""
    import shlex

    return " ".join(["clfast"] + [shlex.quote(a) for a in args.argv])


def _parse(text: str):
    from clfast.engine.config import parse_override

    return parse_override(text)


def cmd_eval(args) -> int:
    from clfast.data.readers import ImageReadError
    from clfast.engine.evaluate import evaluate_run
    from clfast.engine.io import RunDirectoryError

    try:
        return evaluate_run(args.run, quiet=args.quiet)
    except ImageReadError as e:
        return _fail(_image_error(e))
    except (ValueError, FileNotFoundError, RunDirectoryError) as e:   # a damaged checkpoint is a ValueError
        return _fail(str(e))


def cmd_demo(args) -> int:
    import time

    from clfast.engine.config import load_config
    from clfast.engine.io import RunDirectoryError
    from clfast.engine.trainer import Trainer

    args.method = args.method or _default_method()
    out = args.out or os.path.join("runs", f"demo_{args.method}_{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        cfg = load_config(args.method, "synth-shapes", "fast", args.overrides, quiet=True if args.quiet else None)
        trainer = Trainer(cfg, out=out, command=_command_line(args))
    except (ValueError, FileNotFoundError, FileExistsError, RunDirectoryError) as e:
        return _fail(str(e))
    print(f"clfast demo: {args.method} on synth-shapes (10 tasks x 10 classes, shipped with clfast) with the "
          f"shipped vit_tiny_synth backbone, on {trainer.device}; results in {trainer.run_dir}", flush=True)
    rc = _run_trainer(trainer)
    if rc == 0 and args.quiet:  # the summary goes to the log, which --quiet silences: print it
        import json

        from clfast.engine.metrics import read_acc_csv
        from clfast.engine.record import format_summary

        m = read_acc_csv(os.path.join(trainer.run_dir, "acc_matrix.csv"))
        with open(os.path.join(trainer.run_dir, "summary.json"), encoding="utf-8") as f:
            print(format_summary(m, json.load(f), trainer.run_dir))
    return rc


def cmd_datasets(args) -> int:
    from clfast.data import describe_datasets

    for d in describe_datasets(args.data_root):
        if d.get("ships"):
            found = "ships with clfast"
        else:
            found = {True: f"found under {args.data_root}", False: "NOT FOUND",
                     None: "on disk: pass --data-root to check"}[d["found"]]
        n = f"{d['num_classes']:>4}" if d["num_classes"] else "   ?"        # 0: read from the data (e.g. an answer list)
        print(f"{d['name']:<16} {d['kind']:<15} {n} {'answers' if d['kind'] == 'vqa' else 'classes'}, "
              f"{d['default_tasks']:>2} tasks  [{found}]")
        if d.get("description"):
            print(f"    {d['description']}")
        if d["needs_root"] and d.get("layout") and d["found"] is not True:
            for line in d["layout"].rstrip().splitlines():
                print(f"    {line}")
            if d.get("missing"):
                print(f"    missing: {', '.join(map(str, d['missing'][:3]))}")
    return 0


def _default_method() -> str:
    from clfast.engine.config import DEFAULT_METHOD

    return DEFAULT_METHOD


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clfast", description=__doc__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    s = sub.add_parser("info", help="versions, build flags, devices and the backends of every op")
    s.set_defaults(fn=cmd_info)
    s = sub.add_parser("bench", help="run the pytest-benchmark suites and print the ratio table")
    s.add_argument("suite", choices=["ops", "train", "busy", "all"],
                   help="ops: every op against its peers; train: a training step of each method against its official "
                        "code's way, the reference backends and the backbone's floors (bench_train.py); busy: each "
                        "op's fused and stock backends quiet and beside one busy neighbour process (bench_busy.py); "
                        "all: the three")
    s.add_argument("--quick", action="store_true",
                   help="small shapes only (`all --quick`: at most 3 minutes on 2 idle cores)")
    s.add_argument("-k", default=None, help="pytest -k expression to select cases")
    s.add_argument("--write", action="store_true",
                   help="also write the tables into BENCHMARKS.md (the whole suite only, not with -k; the training "
                        "steps of --amp none into their own table, train_step_fp32)")
    s.add_argument("--amp", choices=["auto", "bf16", "none"], default="auto",
                   help="precision of the training steps (train, all): the engine's amp for the reference and clfast "
                        "configurations, peer_amp and the floors (default auto: bf16 where the hardware computes it, "
                        "else fp32; none: fp32 everywhere); the peer always runs fp32")
    s.set_defaults(fn=cmd_bench)
    s = sub.add_parser("demo", help="a continual-learning run on the data and backbone that ship with clfast")
    s.add_argument("--method", default=None, help=f"method to run (default: {_default_method()})")
    s.add_argument("--out", default=None, help="run directory (default: runs/demo_<method>_<time>)")
    s.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch log")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. epochs=1")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("train", help="train a method on a continual-learning benchmark")
    s.add_argument("--method", help="a registered method (l2p, dualprompt, coda_prompt, linear, ...)")
    s.add_argument("--dataset", help="a registered dataset (`clfast datasets` lists them)")
    s.add_argument("--data-root", default=None, help="folder holding the dataset on local disk")
    s.add_argument("--preset", default=None,
                   help="preset name (cifar100, imagenet_r, fast) or a YAML file; default: the dataset's "
                        "preset if the method has one, else fast")
    s.add_argument("--out", default=None, help="run directory (default: runs/<method>_<dataset>_<time>)")
    s.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR from its last checkpoint")
    s.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch log")
    s.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides: epochs=3 optimizer.lr=0.01 method_args.pool_size=20 ...")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("eval", help="evaluate a run's newest checkpoint on every task it has seen")
    s.add_argument("--run", required=True, metavar="DIR", help="a run directory")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("datasets", help="every dataset, its expected layout on disk, and whether it is found")
    s.add_argument("--data-root", default=None, help="folder to look for the datasets in")
    s.set_defaults(fn=cmd_datasets)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come after options too (`--out DIR seed=3`), which argparse's "*"
    # positional does not collect once an option has ended it
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
