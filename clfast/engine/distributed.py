"""Processes and devices: torchrun's environment, the process group, this rank's device, and the few
cross-rank exchanges the loop makes (a stop flag over a CPU group, gathering Python objects, barriers).

Everything is a no-op in one process. The engine is the only part of clfast that knows about processes.

A rank that dies or stops answering: every collective (DDP's gradient all-reduce, the stop flag,
gathers, barriers) runs under the process group's timeout (``dist_timeout_s``, default 600 s). On gloo
the death of a peer process is seen at once (its sockets close: "Connection closed by peer"); a peer
that is alive but stuck fails the waiting ranks after the timeout ("Timed out waiting ... for recv").
Either way the other ranks raise instead of hanging, and :func:`lost_contact` recognises the error so
that the command line can say what happened and how to continue (``--resume`` from the last checkpoint).
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Optional

import torch

__all__ = ["Processes", "lost_contact", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 600.0


class Processes:
    """This process's place among torchrun's workers (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).

    Under DDP it joins the process group (NCCL when CUDA is available and wanted, else gloo); the stop
    flag goes over a CPU (gloo) group, so checking it never waits for the GPU.
    """

    def __init__(self, device_pref: str = "auto", timeout_s: Optional[float] = None):
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.timeout_s = float(DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)
        if not self.timeout_s > 0:
            raise ValueError(f"dist_timeout_s must be > 0 seconds, got {timeout_s!r}")
        self.flag_group = None
        if self.world > 1:
            import torch.distributed as dist

            timeout = datetime.timedelta(seconds=self.timeout_s)
            if not dist.is_initialized():
                backend = "nccl" if torch.cuda.is_available() and device_pref != "cpu" else "gloo"
                dist.init_process_group(backend, timeout=timeout)
            self.flag_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)

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


# what gloo and NCCL say when a peer process is gone or does not answer within the timeout
_LOST_MARKERS = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out waiting",
                 "timeout", "nccl communicator was aborted", "remote worker")


def lost_contact(exc: BaseException) -> bool:
    """Whether ``exc`` says that a collective failed because another rank died or stopped answering."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistNetworkError", ())):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return ("gloo" in text or "nccl" in text or isinstance(exc, getattr(dist, "DistError", ()))) and \
        any(m in text for m in _LOST_MARKERS)
