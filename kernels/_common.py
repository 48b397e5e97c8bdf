"""What every kernel module of clfast shares: how fp32 ``tl.dot`` runs, whether the kernels are interpreted, and the
signatures of the ahead-of-time compile cases.

Launchers call ``wrap_triton(<kernel>)[grid](...)`` with the kernel named literally: torch follows that call from
a ``torch.library.triton_op`` body to the kernel's source (it keys torch.compile's caches on it).
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
import triton
import triton.language as tl

__all__ = ["FP32_DOT_PRECISION", "INTERPRETED", "TL_DTYPE", "aot_case"]

# tl.dot precision for fp32 inputs (16-bit inputs ignore it): 3xTF32 splits each operand into a TF32 head and tail
# and keeps three products, close to fp32 (about 2^-22 relative) on tensor cores, where plain TF32 (2^-11) would
# not be "fp32" and "ieee" runs on the FMA units, several times slower.
FP32_DOT_PRECISION = "tf32x3"


@triton.jit
def _probe(x_ptr):
    tl.store(x_ptr, 0)


# TRITON_INTERPRET=1 (read by triton.jit at decoration) makes every kernel an interpreted function that runs on CPU
# tensors: launchers then take small tiles, so that test shapes still cross block boundaries.
INTERPRETED = not isinstance(_probe, triton.runtime.JITFunction)

TL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def aot_case(fn, constexprs: Mapping[str, object], options: Optional[Mapping[str, int]] = None, *,
             types: Optional[Callable[[str], Optional[str]]] = None, pointer: str = "*fp32",
             scalar: str = "i32") -> tuple:
    """One ``(jit_fn, signature, constexprs, options)`` case for tests/kernels/test_triton_aot.py: every argument
    named in ``constexprs`` is a constexpr; ``types(name)`` may name the type of any other (None: the default),
    which is ``pointer`` for ``*_ptr`` arguments and ``scalar`` otherwise."""
    sig = {}
    for name in fn.arg_names:
        given = types(name) if types is not None else None
        if name in constexprs:
            sig[name] = "constexpr"
        elif given is not None:
            sig[name] = given
        else:
            sig[name] = pointer if name.endswith("_ptr") else scalar
    return fn, sig, dict(constexprs), dict(options or {})
