"""Samplers that make runs resumable and DDP equal to one process.

:class:`EpochSampler` draws one permutation per (seed, task, stage, epoch) from its own generator —
never from the global RNG — so a resumed run sees the same order, and can start mid-epoch. Across
``world`` ranks, rank ``r`` takes positions ``r, r + world, ...`` of the (padded) permutation; with a
per-rank batch of ``batch_size / world`` the union of the ranks' i-th batches is exactly the i-th
batch of the single-process run, so averaged DDP gradients equal the single-process gradient (up to
floating-point reassociation).

:class:`ShardSampler` splits an evaluation set over ranks without padding, so no sample is counted
twice (``DistributedSampler`` pads by repeating samples).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from ..utils.seeding import derive_seed

__all__ = ["EpochSampler", "ShardSampler", "derive_seed"]


class EpochSampler(Sampler[int]):
    """Shuffled (or ordered) indices of one epoch for one rank, optionally starting at a batch.

    Args:
        n: dataset size.
        seed: the epoch's seed (e.g. ``derive_seed(run_seed, task, stage, epoch)``).
        shuffle: False keeps the natural order.
        rank, world: this process and the number of processes.
        skip: samples of this rank's sequence to skip (resume mid-epoch: batches done × per-rank batch).
    """

    def __init__(self, n: int, seed: int, *, shuffle: bool = True, rank: int = 0, world: int = 1, skip: int = 0):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world={world}), got {rank}")
        self.n, self.seed, self.shuffle, self.rank, self.world, self.skip = n, seed, shuffle, rank, world, skip

    def _order(self) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        pad = (-self.n) % self.world
        if pad:  # repeat the first samples so every rank gets the same number (as DistributedSampler)
            order = torch.cat([order, order[:pad]])
        return order[self.rank:: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._order()[self.skip:].tolist())

    def __len__(self) -> int:
        return max(0, -(-self.n // self.world) - self.skip)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of ``range(n)``: every sample on exactly one rank."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))
