"""SIGKILL at random points of a run, then ``--resume`` until it finishes: the final accuracy matrix and every
trained tensor are bitwise those of the uninterrupted run with the same seed.

Kills land inside a training step, inside evaluation and inside a checkpoint write. Which one is chosen
through the crash points of :mod:`clfast.engine.faults`: the process that reaches the chosen point sends
itself SIGKILL (nothing runs after it: no handler, no ``finally``), and the crash log says where it died.
Some cycles also damage the newest checkpoint after the kill (a flipped bit): the next resume must skip it,
say so, and still end bitwise equal. The slow versions draw the points at random (seeded, printed), and the
command-line version also kills from outside at random times.

The default suite runs one short cycle set in forked children of the test process (no interpreter start-up:
a second per cycle); ``make test-kill`` runs the slow ones.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from clfast.engine import Trainer
from clfast.engine import faults
from clfast.engine import io as rio
from tests.engine.crashkit import flip_tensor_bit, partial_files, toy_cfg, toy_full  # noqa: F401 (a fixture)
from tests.engine.test_resume import CLI, dual_cfg, differing, final_state, matrix

STEP_CKPT = ["checkpoint_every_steps=1"]   # a step checkpoint after every step: a kill loses at most one step


# --- launching one process of a run ----------------------------------------------------------------------------

def _fork_child(run: str, crash_at: Optional[str], log: str, resume: bool) -> None:
    faults.arm(crash_at, log)
    if resume:
        Trainer.resume(run).fit()
    else:
        Trainer(toy_cfg(STEP_CKPT), out=run).fit()


def launch_fork(run: Path, crash_at: Optional[str], log: Path, resume: bool, kill_after: Optional[float] = None) -> int:
    """Run (or resume) the toy run in a forked child; its exit code (``-9``: killed)."""
    p = multiprocessing.get_context("fork").Process(target=_fork_child, args=(str(run), crash_at, str(log), resume))
    p.start()
    p.join(timeout=300)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail(f"the run in {run} did not end within 300 s")
    return p.exitcode


def launch_cli(run: Path, crash_at: Optional[str], log: Path, resume: bool, kill_after: Optional[float] = None) -> int:
    """Run (or ``--resume``) dualprompt with ``python -m clfast train``; its exit code (``-9``: killed).
    ``kill_after``: SIGKILL it from outside that many seconds after it reaches its first crash point."""
    args = [*CLI, "--out", str(run), *STEP_CKPT] + (["--resume", str(run)] if resume else [])
    env = dict(os.environ, CLFAST_CRASH_LOG=str(log), PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("CLFAST_CRASH_AT", None)
    if crash_at:
        env["CLFAST_CRASH_AT"] = crash_at
    start = log.stat().st_size if log.exists() else 0
    proc = subprocess.Popen([sys.executable, "-m", "clfast", "train", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        if kill_after is not None:
            deadline = time.time() + 300
            while proc.poll() is None and time.time() < deadline and not (log.exists() and log.stat().st_size > start):
                time.sleep(0.02)
            time.sleep(kill_after)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"the run in {run} did not end within 300 s")
    if proc.returncode not in (0, -signal.SIGKILL):
        pytest.fail(f"the run in {run} failed ({proc.returncode}): {err[-3000:]}")
    return proc.returncode


# --- the cycles ------------------------------------------------------------------------------------------------

def _last_point(log: Path, start: int) -> str:
    """Where the process that wrote ``log`` from byte ``start`` on died: the KILL line's point, else the last
    crash point it passed (a kill from outside), as ``phase/where``."""
    lines = log.read_text()[start:].split("\n") if log.exists() else []
    lines = [ln.split() for ln in lines if ln.strip()]
    kill = [ln for ln in lines if ln[0] == "KILL"]
    if kill:
        return f"{kill[-1][1]}/{kill[-1][3]}"
    return f"{lines[-1][0]}/{lines[-1][2]}" if lines else "start-up"


def _damage_newest(run: Path) -> Optional[str]:
    """Flip a bit in the newest checkpoint if an older intact one remains to fall back to; its path."""
    found = rio.checkpoint_candidates(run)
    if len([p for p in found[1:] if rio.checkpoint_problem(p) is None]) < 1 or rio.checkpoint_problem(found[0]):
        return None
    flip_tensor_bit(found[0])
    return found[0]


def kill_and_resume(launch: Callable, reference: Path, root: Path, plan: list[tuple], final_check=None) -> dict:
    """Run ``plan`` (``(crash_at or None, kill_after or None, damage)`` per cycle) against fresh runs under
    ``root``: each cycle starts the run (or resumes it, once it has a checkpoint) and lets it be killed; a run
    that finishes is compared with ``reference`` and the next cycle starts a new one; after the plan, the last
    run is resumed to its end and compared too. Returns the record of what happened."""
    log = root / "crash.log"
    record = {"cycles": 0, "kills": Counter(), "timed_kills": [], "not_reached": 0, "damaged_then_skipped": 0,
              "runs_compared": 0}
    jobs = 0
    run = root / f"run{jobs}"
    pending_damage = None

    def finished_and_compared():
        nonlocal jobs, run
        assert differing(final_state(run), final_state(reference)) == [], f"{run}: trained tensors differ"
        torch.testing.assert_close(matrix(run), matrix(reference), rtol=0, atol=0, equal_nan=True)
        assert partial_files(run) == [], f"{run}: partial files left: {partial_files(run)}"
        record["runs_compared"] += 1
        jobs += 1
        run = root / f"run{jobs}"

    def check_skipped(path):
        text = (run / "train.log").read_text()
        assert f"--resume: skipping {path}:" in text and "does not match the sha256" in text, text[-3000:]
        record["damaged_then_skipped"] += 1

    for crash_at, kill_after, damage in plan:
        start = log.stat().st_size if log.exists() else 0
        resume = bool(rio.checkpoint_candidates(run))
        rc = launch(run, crash_at, log, resume, kill_after)
        record["cycles"] += 1
        if pending_damage:
            check_skipped(pending_damage)
            pending_damage = None
        if rc == 0:   # the chosen point lay beyond the end of the run
            record["not_reached"] += 1
            finished_and_compared()
            continue
        assert rc == -signal.SIGKILL, rc
        point = _last_point(log, start)
        record["kills"][point] += 1
        if crash_at is None:
            record["timed_kills"].append({"after_s": kill_after, "last_point_passed": point})
        if damage:
            pending_damage = _damage_newest(run)
    if rio.checkpoint_candidates(run) or pending_damage:
        assert launch(run, None, log, True) == 0
        if pending_damage:
            check_skipped(pending_damage)
        finished_and_compared()
    record["kills"] = dict(sorted(record["kills"].items()))
    record["outcome"] = (f"all {record['runs_compared']} finished runs bitwise equal to the uninterrupted run "
                         f"(accuracy matrix and every trained tensor), no partial file left")
    return record


def _report(name: str, record: dict, seed=None, seconds=None) -> None:
    out = {"test": name, "seed": seed, "seconds": seconds, **record}
    print(f"\nkill/resume record: {json.dumps(out)}")
    if os.environ.get("CLFAST_KILL_RECORD"):
        with open(os.environ["CLFAST_KILL_RECORD"], "a", encoding="utf-8") as f:
            f.write(json.dumps(out) + "\n")


def _phases(record: dict) -> set[str]:
    return {k.split("/")[0] for k in record["kills"]}


# --- the short version (default suite) ---------------------------------------------------------------------------

def test_killed_in_a_step_in_evaluation_and_in_a_checkpoint_write_resumes_bitwise(toy_full, tmp_path):
    """Three kills (in the third step's backward, in the first evaluation, half-way through writing the
    second checkpoint of that process), the newest checkpoint then damaged, resumed to the end: bitwise the
    uninterrupted run."""
    plan = [("step/backward:3", None, False), ("eval:1", None, False), ("checkpoint/payload:2", None, True)]
    t0 = time.time()
    rec = kill_and_resume(launch_fork, toy_full, tmp_path, plan)
    _report("short", rec, seconds=round(time.time() - t0, 1))
    assert rec["kills"] == {"step/backward": 1, "eval/batch": 1, "checkpoint/payload": 1}
    assert rec["damaged_then_skipped"] == 1 and rec["runs_compared"] == 1 and rec["not_reached"] == 0


def test_kills_inside_a_checkpoint_write_leave_no_damage_that_resume_does_not_handle(toy_full, tmp_path):
    """A kill half-way through the payload leaves a half-written temporary file (so the crash point is where
    it claims to be), never a file under a checkpoint's name; a kill between the two renames that keep the
    previous step checkpoint leaves no step.pt at all (latest.json names a missing file) and step.prev.pt.
    Each resume removes the partial files, says so, and the run still ends bitwise equal."""
    run, log, ck = tmp_path / "run", tmp_path / "crash.log", tmp_path / "run" / "checkpoints"
    assert launch_fork(run, "checkpoint/payload:2", log, False) == -signal.SIGKILL
    left = partial_files(run)
    assert len(left) == 1 and left[0].startswith(".step.pt.")
    assert 0 < os.path.getsize(ck / left[0]) < os.path.getsize(ck / "step.pt")
    assert rio.load_checkpoint(ck / "step.pt")["global_step"] == 1
    assert launch_fork(run, "checkpoint/rotated:1", log, True) == -signal.SIGKILL
    assert f"removed 1 partial file(s) a killed run left in {ck}: {left[0]}" in (run / "train.log").read_text()
    assert not (ck / "step.pt").exists() and json.loads((ck / "latest.json").read_text()) == {"checkpoint": "step.pt"}
    assert rio.load_checkpoint(ck / "step.prev.pt")["global_step"] == 1 and len(partial_files(run)) == 1
    assert launch_fork(run, None, log, True) == 0
    text = (run / "train.log").read_text()
    assert f"--resume: skipping {ck / 'step.pt'}: latest.json names it but it does not exist" in text
    assert f"--resume: resuming from {ck / 'step.prev.pt'} instead" in text
    assert partial_files(run) == []
    assert differing(final_state(run), final_state(toy_full)) == []
    torch.testing.assert_close(matrix(run), matrix(toy_full), rtol=0, atol=0, equal_nan=True)


# --- the slow versions (make test-kill) ------------------------------------------------------------------------

POINTS = [("step", 8), ("step/backward", 4), ("step/update", 4), ("eval", 2), ("eval/batch", 2),
          ("checkpoint", 6), ("checkpoint/payload", 3), ("checkpoint/rotated", 2), ("checkpoint/pointer", 3)]


def random_plan(rnd: random.Random, cycles: int, timed: int = 0) -> list[tuple]:
    """``cycles`` armed kills at random points (a point and its ``n``-th occurrence in that process), every
    fourth followed by damage to the newest checkpoint; then ``timed`` kills from outside at random times."""
    plan = []
    for i in range(cycles):
        point, most = rnd.choice(POINTS)
        plan.append((f"{point}:{rnd.randint(1, most)}", None, i % 4 == 3))
    plan += [(None, round(rnd.uniform(0.0, 2.5), 2), False) for _ in range(timed)]   # after the first point
    return plan


@pytest.mark.slow
def test_random_kills_in_forked_runs_resume_bitwise(toy_full, tmp_path):
    seed = int(os.environ.get("CLFAST_KILL_SEED", "0"))
    cycles = int(os.environ.get("CLFAST_KILL_CYCLES", "30"))
    t0 = time.time()
    rec = kill_and_resume(launch_fork, toy_full, tmp_path, random_plan(random.Random(seed), cycles))
    _report("fork", rec, seed, round(time.time() - t0, 1))
    assert sum(rec["kills"].values()) >= 20 and _phases(rec) == {"step", "eval", "checkpoint"}, rec


@pytest.fixture(scope="module")
def dual_full(tmp_path_factory):
    run = tmp_path_factory.mktemp("dual") / "full"
    Trainer(dual_cfg(), out=str(run)).fit()
    return run


@pytest.mark.slow
def test_random_kills_of_the_command_line_resume_bitwise(dual_full, tmp_path):
    """``python -m clfast train`` (dualprompt with augmentation, as test_resume), 24 kills at random crash
    points and 4 from outside at random times, each followed by ``--resume`` with the original command line."""
    seed = int(os.environ.get("CLFAST_KILL_SEED", "0"))
    cycles = int(os.environ.get("CLFAST_KILL_CYCLES", "24"))
    t0 = time.time()
    rec = kill_and_resume(launch_cli, dual_full, tmp_path, random_plan(random.Random(seed), cycles, timed=4))
    _report("cli", rec, seed, round(time.time() - t0, 1))
    assert sum(rec["kills"].values()) >= 20 and _phases(rec) == {"step", "eval", "checkpoint"}, rec
