"""OpenMP parallel regions per call of each op, at the acceptance shapes of BENCHMARKS.md: the figure behind an op's
collapse on a busy machine.

    python benchmarks/parallel_regions.py [--threads 2]

Every ``at::parallel_for`` that splits its work, every ATen element-wise op over more than its grain, and every
threaded GEMM opens a region; a region ends at a barrier where the calling thread waits for the slowest worker. On
an idle machine a region costs microseconds; with more runnable threads than cores a region can wait a scheduler
slice (milliseconds) for a descheduled or sleeping worker. Whether it does depends also on how long the workers
sleep between regions, so a count is a diagnostic to set beside a busy-neighbour timing (benchmarks/bench_busy.py),
not a prediction. The count does not depend on load, so it can be compared on any machine.

How: a shim preloaded into a child process wraps libgomp's ``GOMP_parallel*`` entry points (the ones PyTorch's
``at::parallel_for``, clfast's kernels and MKL's GNU-threaded GEMMs call) and counts the outermost ones: a region
opened inside another (an ATen op or GEMM called from a parallel body) runs on its calling thread, nesting being
off, and waits for no one. (An earlier version counted those too: 8,464 "regions" for cat + SDPA fwd+bwd at the ViT-B
shape, of which 16 are outermost.) The shim is compiled here with the system C compiler. Each case runs twice
before three counted calls.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
static long count = 0;
long clfast_gomp_count(void) { return __atomic_load_n(&count, __ATOMIC_RELAXED); }
/* outermost regions only: one opened inside another runs on its calling thread (nesting is off), no barrier */
static void tally(void) {
  static int (*in_parallel)(void) = 0;
  if (!in_parallel) in_parallel = (int (*)(void))dlsym(RTLD_DEFAULT, "omp_in_parallel");
  if (!in_parallel || !in_parallel()) __atomic_add_fetch(&count, 1, __ATOMIC_RELAXED);
}
typedef void (*gp_t)(void (*)(void*), void*, unsigned, unsigned);
void GOMP_parallel(void (*fn)(void*), void* data, unsigned n, unsigned flags) {
  static gp_t real = 0;
  if (!real) real = (gp_t)dlsym(RTLD_NEXT, "GOMP_parallel");
  tally();
  real(fn, data, n, flags);
}
typedef void (*gpl_t)(void (*)(void*), void*, unsigned, long, long, long, long, unsigned);
#define WRAP(name) void name(void (*fn)(void*), void* d, unsigned n, long s, long e, long i, long c, unsigned f) { \
  static gpl_t real = 0; if (!real) real = (gpl_t)dlsym(RTLD_NEXT, #name); \
  tally(); real(fn, d, n, s, e, i, c, f); }
WRAP(GOMP_parallel_loop_static)
WRAP(GOMP_parallel_loop_dynamic)
WRAP(GOMP_parallel_loop_guided)
WRAP(GOMP_parallel_loop_nonmonotonic_dynamic)
"""


def build_shim(directory: str) -> str:
    src, lib = os.path.join(directory, "gompcount.c"), os.path.join(directory, "libgompcount.so")
    Path(src).write_text(SHIM)
    subprocess.run([os.environ.get("CC", "cc"), "-O2", "-shared", "-fPIC", "-o", lib, src, "-ldl"], check=True)
    return lib


def cases():
    """name -> callable, at the acceptance shapes (fwd: no autograd; fwd+bwd: sum().backward())."""
    import torch
    import torch.nn.functional as F

    from clfast.ops import gaussian_kl, mahalanobis, prefix_attention, prompt_conv, retrieve, use_backend

    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    B, K, D = 128, 200, 768
    x, mu = r(B, D).requires_grad_(), r(K, D).requires_grad_()
    A = r(D, D) / D ** 0.5
    L = torch.linalg.cholesky(A @ A.T + torch.eye(D)).requires_grad_()
    lv = (0.1 * r(B, D)).requires_grad_()
    q, k, v = (r(16, 12, 197, 64).requires_grad_() for _ in range(3))
    pk, pv = (r(16, 12, 20, 64).requires_grad_() for _ in range(2))
    query, keys = r(128, 768), r(1000, 768)
    # prompt_conv, one layer of ConvPrompt's: H 24 (K and V heads) of 36×80, F 5 prompts of 17×17, B 8
    emb, w, b, pw = r(24, 36, 80).requires_grad_(), r(24, 5, 17, 17).requires_grad_(), r(24, 5).requires_grad_(), \
        r(8, 5).requires_grad_()

    def on(backend, fn):
        def call():
            with use_backend(backend):
                return fn()
        return call

    def backward(fn):
        return lambda: fn().float().sum().backward()

    out = {}
    for backend in ("cpu", "torch", "reference"):
        out[f"mahalanobis fwd+bwd [{backend}]"] = on(backend, backward(lambda: mahalanobis(x, mu, L)))
        out[f"gaussian_kl fwd+bwd [{backend}]"] = on(backend, backward(lambda: gaussian_kl(x, lv, mu[0], L)))
        out[f"prefix_attention fwd+bwd [{backend}]"] = on(backend, backward(lambda: prefix_attention(q, k, v, pk, pv)))
        out[f"retrieve M1000 fwd [{backend}]"] = on(backend, lambda: retrieve(query, keys, 5))
    out["mahalanobis fwd+bwd [stock: projected differences]"] = backward(
        lambda: ((x @ L.tril())[:, None] - (mu @ L.tril())[None]).pow(2).sum(-1))
    out["prefix_attention fwd+bwd [stock: cat + SDPA]"] = backward(
        lambda: F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2)))
    out["prefix_attention fwd+bwd [stock: cat + matmul + softmax]"] = backward(
        lambda: ((q @ torch.cat([pk, k], 2).transpose(-1, -2)) * 0.125).softmax(-1) @ torch.cat([pv, v], 2))
    for backend in ("cpu", "torch"):
        out[f"prompt_conv fwd+bwd [{backend}]"] = on(
            backend, backward(lambda: prompt_conv(emb, w, b, pw)))
    return out


def child(threads: int, only: str | None = None) -> int:
    import ctypes

    import torch

    torch.set_num_threads(threads)
    lib = ctypes.CDLL(None)
    lib.clfast_gomp_count.restype = ctypes.c_long
    print(f"| case | parallel regions per call ({threads} threads) |\n|---|---:|")
    for name, fn in cases().items():
        if only is not None and only not in name:
            continue
        try:
            fn(), fn()
        except Exception as e:   # a backend this machine lacks, or shapes an op refuses: say so, go on
            print(f"| {name} | – ({type(e).__name__}: {str(e).splitlines()[0][:80]}) |")
            continue
        c0 = lib.clfast_gomp_count()
        for _ in range(3):
            fn()
        print(f"| {name} | {(lib.clfast_gomp_count() - c0) / 3:.0f} |", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=None, help="the cases whose name contains this text")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.threads, args.only)
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, LD_PRELOAD=build_shim(tmp))
        only = ["--only", args.only] if args.only is not None else []
        return subprocess.call([sys.executable, __file__, "--child", "--threads", str(args.threads), *only], env=env)


if __name__ == "__main__":
    raise SystemExit(main())
