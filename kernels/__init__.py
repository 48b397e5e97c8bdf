"""Triton kernels of clfast's fused ops (the GPU path), installed as ``clfast.kernels``.

One module per op, ``kernels/<op>.py``, holding ``@triton.jit`` kernels and their launchers only; the
launchers are called by the ``triton`` backends of ``clfast.ops`` inside the registered custom ops
(``clfast::<op>``, with fake and autograd), and launch through ``torch.library.wrap_triton`` so that they
can also be registered as ``triton_op`` bodies. Nothing here imports
clfast, and every module imports cleanly wherever triton is importable, GPU or not.

Conventions shared by the modules:

* A launchable kernel's name ends in ``_kernel``; other ``@triton.jit`` functions are device helpers
  inlined into the kernels.
* Each module exposes ``AOT_CASES``: a list of ``(jit_fn, signature, constexprs[, options])`` tuples,
  or a function returning one, covering every kernel with each dtype and ``tl.constexpr``
  combination its launchers use. ``tests/kernels/test_triton_aot.py`` compiles every case ahead of
  time for sm_80 and sm_90 (no GPU needed) with ``triton.compile(ASTSource(...))``; ``options`` holds
  ``num_warps``/``num_stages``. Pointer arguments are compiled as 16-byte aligned, as the JIT would
  specialise them for torch allocations.
* Under ``TRITON_INTERPRET=1`` (CPU tensors) the launchers upcast 16-bit ``tl.dot`` operands to fp32
  after rounding them to the storage dtype (the interpreter's bf16 ``tl.dot`` is wrong), and use
  small blocks so that tiny test shapes still cross block boundaries.
"""

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: the repository root is on sys.path (``python -m ...`` or
    # pytest from a source checkout) and this folder shadows any installed distribution of that name,
    # e.g. Hugging Face's ``kernels``, which transformers (under sentence-transformers) imports. Hand
    # the name over to the installed one when there is one; otherwise stay an (empty) namespace.
    import importlib.machinery as _machinery
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _rest = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _rest)
    if _spec is not None and _spec.loader is not None:
        import importlib.util as _util

        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module  # the import statement returns sys.modules["kernels"]
        _spec.loader.exec_module(_module)
