"""Triton kernels of clfast's fused ops (the GPU path): ``clfast.kernels``.

One module per op, ``kernels/<op>.py``, holding ``@triton.jit`` kernels and their launchers only; the
launchers are called by the ``triton`` backends of ``clfast.ops`` inside the registered custom ops
(``clfast::<op>``, with fake and autograd), and launch through ``torch.library.wrap_triton`` so that they
can also be registered as ``triton_op`` bodies. Nothing there imports clfast, and every module imports
cleanly wherever triton is importable, GPU or not.

Where the modules live. In the source tree they sit in the top-level ``kernels/`` folder, beside
``csrc/`` and ``clfast/`` (DESIGN.md §1). That folder has no ``__init__.py``: with the repository root on
``sys.path`` (pytest, ``python -m clfast`` from a checkout) it is at most an empty namespace portion, which
never wins over an installed package or module of that name (Hugging Face's ``kernels``, which
transformers imports), so the only name our kernels have is ``clfast.kernels``. A wheel
(``pip install .``) copies them next to this file (``build_py`` in setup.py); in a source checkout,
editable installs included, this package searches the checkout's ``kernels/`` folder instead.

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

import os as _os


def _search_path(here: str) -> list[str]:
    """Where ``clfast.kernels.<op>`` is found: here in a wheel, ``<checkout>/kernels`` in a source tree."""
    if any(f.endswith(".py") and f != "__init__.py" for f in _os.listdir(here)):
        return [here]  # installed: build_py copied the modules beside this file
    root = _os.path.dirname(_os.path.dirname(here))
    source = _os.path.join(root, "kernels")
    # the checkout marker keeps a broken install from searching site-packages/kernels (another package)
    if _os.path.isfile(_os.path.join(root, "setup.py")) and _os.path.isdir(source):
        return [source]
    return [here]


__path__ = _search_path(_os.path.dirname(_os.path.abspath(__file__)))
