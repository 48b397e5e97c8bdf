"""Processes and devices: torchrun's environment, the process group, this rank's device, and the few
cross-rank exchanges the loop makes (a stop flag over a CPU group, gathering Python objects, barriers).

Everything is a no-op in one process. The engine is the only part of clfast that knows about processes.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["Processes"]


class Processes:
    """This process's place among torchrun's workers (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).

    Under DDP it joins the process group (NCCL when CUDA is available and wanted, else gloo); the stop
    flag goes over a CPU (gloo) group, so checking it never waits for the GPU.
    """

    def __init__(self, device_pref: str = "auto"):
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.flag_group = None
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                backend = "nccl" if torch.cuda.is_available() and device_pref != "cpu" else "gloo"
                dist.init_process_group(backend)
            self.flag_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, want: str) -> torch.device:
        """The device for ``want`` (``auto``, ``cpu``, ``cuda[:N]``); under DDP each rank takes its local GPU."""
        spelled = want
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ValueError(f"device {spelled!r}: no CUDA device is available here; use device=cpu")
            dev = torch.device("cuda", self.local_rank if self.world > 1 else torch.device(want).index or 0)
            torch.cuda.set_device(dev)
            return dev
        if want != "cpu":
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {spelled!r}")
        return torch.device("cpu")

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (the same answer on every rank)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.flag_group)
        return bool(t.item())

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj`` (a list indexed by rank); ``[obj]`` in one process."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
