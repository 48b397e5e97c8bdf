"""What a run writes about itself: the run record (``record.json``) and the printed summary."""

from __future__ import annotations

import platform
from typing import Any, Optional

import torch

__all__ = ["run_record", "format_summary", "clfast_version"]


def clfast_version() -> str:
    from .. import __version__

    return __version__


def run_record(cfg, method, scenario, device: torch.device, world: int, *, command: Optional[str] = None,
               init_from: Optional[dict] = None) -> dict[str, Any]:
    """``record.json``: everything needed to reproduce the run and to know what produced it (the command,
    seeds, class order, weight tags and sha256s, split manifests, the method's own flags, library
    versions, the device and the op backends)."""
    import numpy
    import timm

    from ..ops import backend_summary

    backbone = getattr(method, "backbone", None)
    weights = getattr(backbone, "weights", None)
    return {
        "clfast_version": clfast_version(),
        "command": command,
        "method": cfg.method,
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "scenario": scenario.record(),
        "backbone": weights.to_dict() if weights is not None else {"name": cfg.backbone},
        "extra_weights": list(method.extra_weights()),
        "init_from": init_from,
        "method_record": dict(method.record()),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                     "numpy": numpy.__version__},
        "device": {"type": device.type, "name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                                 else platform.processor() or platform.machine()),
                   "world_size": world, "threads": torch.get_num_threads()},
        "amp": cfg.amp,
        "op_backends": backend_summary(),
    }


def format_summary(m, summary: dict, run_dir: Optional[str] = None) -> str:
    """The accuracy matrix (rows: task evaluated, columns: after task) and the headline figures."""
    n, cols = len(m), len(m[0])
    joint = cols == 1 and n > 1   # a joint run: every task trained at once, one column
    lines = ["accuracy matrix (%, row = task evaluated, column = after training task"
             + ("; joint training: one task holding every task's data):" if joint else "):"),
             "        " + (f"{'all':>6}" if joint else " ".join(f"{j + 1:>6d}" for j in range(n)))]
    for i in range(n):
        cells = " ".join(("{:6.1f}".format(m[i][j]) if j >= i or joint else "     ·") for j in range(cols))
        lines.append(f"task {i + 1:>2d} {cells}")
    lines.append(f"A_N {summary['A_N']:.2f}   F_N {summary['F_N']:.2f}   BWT {summary['BWT']:.2f}   "
                 f"sample-weighted {summary['sample_weighted_accuracy']:.2f}   "
                 f"({summary.get('wall_time_s', 0):.0f} s, {summary.get('images_per_s', 0):.0f} images/s)")
    if run_dir:
        lines.append(f"run directory: {run_dir} (acc_matrix.csv, summary.json, acc_matrix.png, accuracy_curve.png)")
    return "\n".join(lines)
