"""``clfast info`` / ``python -m clfast.info``: versions, build flags, devices, and per op which backends
can run here and why the others cannot."""

from __future__ import annotations

import importlib
import platform
import sys

import torch

from clfast import __version__, _ext, _triton
from clfast.ops import backend_summary, backends
from clfast.utils.cpu import cpu_model, isa_flags

__all__ = ["report", "backend_summary", "main"]  # backend_summary: an alias of clfast.ops.backend_summary


def _version(mod: str) -> str:
    try:
        return getattr(importlib.import_module(mod), "__version__", "installed")
    except Exception:
        return "not installed"


def report() -> str:
    lines = [f"clfast {__version__}",
             f"python {platform.python_version()} ({sys.executable})",
             f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}), "
             f"threads {torch.get_num_threads()}"]
    for mod in ("triton", "timm", "open_clip", "faiss", "numpy"):
        lines.append(f"{mod} {_version(mod)}")
    lines.append(f"cpu: {cpu_model()} ({isa_flags()})")
    lines.append(f"extension clfast._C: {_ext.build_info()}")
    lines.append(f"cpu kernels here: {_ext.cpu_kernels_info()}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"devices: cpu, cuda ({names})")
    else:
        lines.append("devices: cpu (no CUDA device)")
    lines.append(f"triton interpreter: {'on' if _triton.INTERPRET else 'off'}")
    for op, summary in backend_summary().items():
        lines.append("")
        forced = summary["forced"]
        lines.append(f"op {op}" + (f"  [forced: {forced}]" if forced else ""))
        for device, order in summary["priority"].items():
            lines.append(f"  priority on {device}: {' > '.join(order)}")
        for name, cls in sorted(backends(op).items()):
            why = summary["unavailable"].get(name)
            status = "available" if why is None else f"unavailable: {why}"
            dtypes = ", ".join(str(d).replace("torch.", "") for d in cls.DTYPES)
            lines.append(f"  {name:<10} devices={','.join(cls.devices())} dtypes={dtypes}  {status}")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
