"""What the CPU is, as /proc/cpuinfo says (Linux): its model, its feature flags, and the vector/matrix ISA extensions
clfast's CPU kernels can use among them. ``clfast info`` prints them; benchmarks/report.py heads every table with
them (the machines this project runs on vary: AVX2 only, AVX-512, AMX)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Optional

# the extensions the kernels (or oneDNN under them) can use, in the order they are printed
KERNEL_ISA = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


CPUINFO = "/proc/cpuinfo"


def cpuinfo(field: str, path: str = CPUINFO) -> Optional[str]:
    """The value of ``field`` in /proc/cpuinfo (``path``; its first processor); None where it cannot be read."""
    try:
        for line in Path(path).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == field:
                return value.strip()
    except OSError:
        pass
    return None


def cpu_model(path: str = CPUINFO) -> str:
    return cpuinfo("model name", path) or platform.processor() or "unknown"


def cpu_flags(path: str = CPUINFO) -> Optional[set[str]]:
    """The CPU's feature flags as /proc/cpuinfo names them (its first processor); None where it cannot be read."""
    flags = cpuinfo("flags", path)
    return None if flags is None else set(flags.split())


def isa_flags(path: str = CPUINFO) -> str:
    """The :data:`KERNEL_ISA` extensions this CPU has, space-separated ("unknown" without /proc/cpuinfo)."""
    have = cpu_flags(path)
    if have is None:
        return "unknown"
    return " ".join(f for f in KERNEL_ISA if f in have) or "none of " + " ".join(KERNEL_ISA)
