"""bench_busy.py's twin rank: one process for the session that runs the asked case in a loop until it is set idle."""

import os
import time

import pytest

from benchmarks.bench_busy import _Twin


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads CPU time from /proc (Linux)")
def test_twin_runs_the_asked_case_until_idle():
    twin = _Twin(quick=True)
    try:
        twin.ask("prefix_attention cpu", "ready")
        busy0 = _cpu_seconds(twin.proc.pid)
        time.sleep(1.0)
        busy = _cpu_seconds(twin.proc.pid) - busy0
        assert busy > 0.3, f"the twin used {busy:.2f} CPU s in 1 s while running its case: it is not looping"
        twin.ask("idle", "idle")
        idle0 = _cpu_seconds(twin.proc.pid)
        time.sleep(1.0)
        idle = _cpu_seconds(twin.proc.pid) - idle0
        assert idle < 0.1, f"the twin used {idle:.2f} CPU s in 1 s while idle"
        twin.ask("mahalanobis torch", "ready")          # the same process takes the next case
        twin.ask("idle", "idle")
        with pytest.raises(RuntimeError, match="answered ''"):
            twin.ask("no_such_op cpu", "ready")             # its case fails to build: the process ends, we say so
    finally:
        twin.close()
    assert twin.proc.poll() is not None
