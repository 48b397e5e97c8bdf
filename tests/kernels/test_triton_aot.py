"""Every Triton kernel in kernels/ compiles, ahead of time, for sm_80 and sm_90 (no GPU needed).

Convention: each ``kernels/<op>.py`` exposes ``AOT_CASES``, a list of
``(jit_fn, signature, constexprs[, options])`` tuples or a function returning one (see
``clfast/kernels/__init__.py``). Every ``@triton.jit`` function whose name ends in ``_kernel`` must appear in
at least one case. Each case is compiled with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))``,
pointers marked 16-byte aligned as the JIT would see torch allocations, and its shared memory is checked
against the architecture's per-block limit (a launch beyond it fails with "out of resources").

The compiles run in subprocesses without ``TRITON_INTERPRET`` (the suite sets it on machines without
CUDA, and interpreted kernels cannot be compiled); this file is also the subprocess's entry point. Jobs
(module × arch × shard) run in parallel, one per CPU. Compiled kernels land in Triton's cache, so a
second run takes seconds.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import importlib.machinery
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNELS_DIR = ROOT / "kernels"
ARCHS = (80, 90)
# Largest shared memory one block may use (opt-in), bytes: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SMEM_LIMIT = {80: 166912, 90: 232448}
MODULES = sorted(p.stem for p in KERNELS_DIR.glob("*.py") if not p.stem.startswith("_"))
_PKG = "_clfast_kernels_aot"


# ---------------------------------------------------------------------------------------------------
# Subprocess side: compile one shard of one module's cases for one arch, print one JSON line per case.
# ---------------------------------------------------------------------------------------------------


def _load_module(name: str):
    """kernels/<name>.py by path, inside a package so that relative imports work; clfast itself is not
    imported (a kernel module must not depend on it)."""
    spec = importlib.machinery.ModuleSpec(_PKG, None, is_package=True)
    spec.submodule_search_locations = [str(KERNELS_DIR)]
    sys.modules[_PKG] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f"{_PKG}.{name}")


def _cases(mod) -> list:
    cases = getattr(mod, "AOT_CASES", None)
    if cases is None:
        raise AttributeError(f"kernels/{mod.__name__.rsplit('.', 1)[-1]}.py defines no AOT_CASES")
    return list(cases() if callable(cases) else cases)


def _describe(fn, signature: dict, constexprs: dict, options: dict) -> str:
    ptr_types = sorted({t for t in signature.values() if t.startswith("*")})
    consts = {k: v for k, v in constexprs.items() if signature.get(k) == "constexpr" and not k.startswith("stride_")}
    return f"{fn.__name__} ptrs={','.join(ptr_types)} {consts} {options}"


def _cpu_seconds() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _compile_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--module", required=True)
    ap.add_argument("--arch", type=int, required=True)
    ap.add_argument("--shard", type=int, default=0)
    ap.add_argument("--shards", type=int, default=1)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(json.dumps({"fatal": "TRITON_INTERPRET is set: interpreted kernels cannot be compiled"}))
        return 2
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        mod = _load_module(args.module)
        cases = _cases(mod)
        kernels = sorted(n for n, obj in vars(mod).items()
                         if isinstance(obj, triton.runtime.JITFunction) and n.endswith("_kernel")
                         and getattr(obj, "module", mod.__name__) == mod.__name__)
        covered = {c[0].__name__ for c in cases}
        print(json.dumps({"kernels": kernels, "covered": sorted(covered), "n_cases": len(cases)}), flush=True)
    except Exception:
        print(json.dumps({"fatal": traceback.format_exc()}), flush=True)
        return 1
    target = GPUTarget("cuda", args.arch, 32)
    for i, case in enumerate(cases):
        if i % args.shards != args.shard:
            continue
        fn, signature, constexprs = case[:3]
        options = dict(case[3]) if len(case) > 3 else {}
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items() if t.startswith("*")}
        rec = {"index": i, "case": _describe(fn, signature, constexprs, options)}
        t0, c0 = time.perf_counter(), _cpu_seconds()
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
            rec.update(ok=True, shared=int(compiled.metadata.shared))
        except Exception as exc:  # reported, with the case, by the test
            rec.update(ok=False, error=f"{type(exc).__name__}: {exc}"[-4000:])
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        rec["cpu_seconds"] = round(_cpu_seconds() - c0, 2)  # ptxas included
        print(json.dumps(rec), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------
# pytest side
# ---------------------------------------------------------------------------------------------------


def _run_job(module: str, arch: int, shard: int, shards: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--module", module, "--arch", str(arch),
           "--shard", str(shard), "--shards", str(shards)]
    proc = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=900)
    header, records, fatal = None, [], None
    for line in proc.stdout.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "fatal" in rec:
            fatal = rec["fatal"]
        elif "kernels" in rec:
            header = rec
        elif "index" in rec:
            records.append(rec)
    if proc.returncode != 0 and fatal is None:
        fatal = f"exit status {proc.returncode}\n{proc.stderr[-4000:]}"
    return {"header": header, "records": records, "fatal": fatal}


@pytest.fixture(scope="module")
def aot_results() -> dict:
    """Compiles everything once, in parallel: {(module, arch): {"header", "records", "fatals"}}."""
    cpus = os.cpu_count() or 1
    # Two shards per CPU (round-robin over cases) balance slow and fast jobs; each costs an import (~2 s).
    shards = max(1, math.ceil(2 * cpus / max(1, len(MODULES) * len(ARCHS))))
    jobs = [(m, a, s, shards) for m in MODULES for a in ARCHS for s in range(shards)]
    out = {(m, a): {"header": None, "records": [], "fatals": []} for m in MODULES for a in ARCHS}
    with concurrent.futures.ThreadPoolExecutor(max_workers=cpus) as pool:
        for (m, a, _, _), res in zip(jobs, pool.map(lambda j: _run_job(*j), jobs)):
            slot = out[(m, a)]
            slot["header"] = slot["header"] or res["header"]
            slot["records"] += res["records"]
            if res["fatal"]:
                slot["fatals"].append(res["fatal"])
    return out


def test_kernel_modules_found():
    assert "prefix_attention" in MODULES, f"kernels/ modules found: {MODULES}"


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("module", MODULES)
def test_kernels_compile(aot_results, module, arch):
    res = aot_results[(module, arch)]
    assert not res["fatals"], f"kernels/{module}.py: AOT compile job failed:\n" + "\n".join(res["fatals"])
    header = res["header"]
    assert header is not None and header["n_cases"] > 0, f"kernels/{module}.py: AOT_CASES is empty"
    uncovered = sorted(set(header["kernels"]) - set(header["covered"]))
    assert not uncovered, f"kernels/{module}.py: kernels missing from AOT_CASES: {uncovered}"
    recs = sorted(res["records"], key=lambda r: r["index"])
    assert len(recs) == header["n_cases"], f"{len(recs)} of {header['n_cases']} cases reported"
    problems = [f"  case {r['index']} {r['case']}:\n    {r['error']}" for r in recs if not r["ok"]]
    problems += [f"  case {r['index']} {r['case']}: {r['shared']} B of shared memory > sm_{arch}'s "
                 f"{SMEM_LIMIT[arch]} B" for r in recs if r["ok"] and r["shared"] > SMEM_LIMIT[arch]]
    assert not problems, f"kernels/{module}.py failed to compile for sm_{arch}:\n" + "\n".join(problems)


if __name__ == "__main__":
    sys.exit(_compile_main(sys.argv[1:]))
