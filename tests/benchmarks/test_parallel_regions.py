"""The fused Gaussian kernels open few parallel regions per call (benchmarks/parallel_regions.py counts them).

Each region ends at a barrier where the calling thread waits for its slowest worker; with more runnable threads
than cores each can cost a scheduler slice. The triangular GEMMs run row-parallel in one region each (their ATen
GEMMs on the calling thread), so mahalanobis fwd+bwd at B 128, K 200, D 768 opens 19 regions (78 when every
column block was its own multi-threaded GEMM) and gaussian_kl 22 (57).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def regions(case: str) -> int:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "parallel_regions.py"), "--threads", "2",
                          "--only", case], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith(f"| {case} |")]
    assert len(rows) == 1, out.stdout
    m = re.fullmatch(r"\| .* \| (\d+) \|", rows[0])
    assert m, rows[0]
    return int(m.group(1))


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc) to build the counting shim")
@pytest.mark.parametrize("case, most", [("mahalanobis fwd+bwd [cpu]", 25), ("gaussian_kl fwd+bwd [cpu]", 28)])
def test_gaussian_kernels_open_few_parallel_regions(case, most):
    n = regions(case)
    assert 0 < n <= most, f"{case}: {n} parallel regions per call (at most {most})"
