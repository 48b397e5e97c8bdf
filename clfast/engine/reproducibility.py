"""What makes a CPU run bitwise repeatable: deterministic kernels, and seeded random streams that leave
the global generators alone."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["deterministic_cpu", "cpu_rng_seeded"]


@contextlib.contextmanager
def deterministic_cpu(enabled: bool = True):
    """``torch.use_deterministic_algorithms`` inside the block (CPU runs), the caller's setting after.

    On the CPU a run with the same seed and thread count is then bitwise reproducible: the few stock
    ops that add atomically across threads (``index_put_`` with ``accumulate``, the backward of
    advanced indexing) take their sort-based deterministic kernels. ``warn_only``: an op with no
    deterministic kernel warns instead of failing. Uninitialised memory is not NaN-filled (a cost the
    numbers do not need). CUDA runs are left alone (cuBLAS would need ``CUBLAS_WORKSPACE_CONFIG``, and
    fused GPU backward kernels add atomically): they are reproducible only up to float reassociation.
    """
    if not enabled:
        yield
        return
    import torch.utils.deterministic as tud

    was = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           tud.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    tud.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
        tud.fill_uninitialized_memory = was[2]


@contextlib.contextmanager
def cpu_rng_seeded(seed: int):
    """Torch's default CPU generator seeded with ``seed`` inside the block, its state restored after
    (CUDA generators are not touched)."""
    state = torch.random.get_rng_state()
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)
