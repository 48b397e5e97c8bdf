"""A rank that dies or hangs in a multi-process run: the others fail within a bounded time with a message
saying so (never a hang), and `--resume` continues the run to the uninterrupted run's numbers.

The short tests use two bare processes around :class:`clfast.engine.distributed.Processes` (gloo, CPU);
the slow one trains with torchrun, SIGKILLs a rank after a step checkpoint and resumes.
"""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from clfast.engine.distributed import lost_contact
from clfast.engine.io import find_latest_checkpoint
from clfast.engine.metrics import read_acc_csv

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TWO_RANKS = """
import os, signal, sys, time
from clfast.engine.distributed import Processes, lost_contact

procs = Processes("cpu", timeout_s=float(sys.argv[2]))
procs.barrier()
if procs.rank == 1:
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(600)   # "hang": alive, never answers again
t = time.time()
try:
    procs.any(False)  # the stop-flag all-reduce the loop makes after every step
except RuntimeError as e:
    print(f"lost_contact={lost_contact(e)} after {time.time() - t:.2f} s: {e}", flush=True)
    os._exit(3)       # (the process group's destructor would wait for the hung peer)
print("no error", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.mark.parametrize("fault, timeout_s, bound", [("kill", 600, 10.0), ("hang", 3, 3 + 10.0)])
def test_a_collective_fails_when_the_other_rank_dies_or_hangs(tmp_path, fault, timeout_s, bound):
    """A SIGKILLed peer is seen at once (its sockets close), whatever the timeout (600 s here); a peer that
    is alive but never answers fails the collective after dist_timeout_s (3 s here), not torch's 30 min."""
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    base = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port(), WORLD_SIZE=2)
    procs = [subprocess.Popen([sys.executable, str(script), fault, str(timeout_s)], env=_env(RANK=r, **base),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        out, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 3, (out, err[-2000:])
    assert out.startswith("lost_contact=True after "), out
    seconds = float(out.split(" after ")[1].split(" s:")[0])
    assert seconds < bound and (fault == "kill" or seconds >= timeout_s - 0.5), out


def test_lost_contact_tells_a_peer_failure_from_other_errors():
    gloo = "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:1"
    assert lost_contact(RuntimeError(gloo))
    assert lost_contact(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv"))
    assert not lost_contact(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"))
    assert not lost_contact(ValueError(gloo))


def test_the_command_line_says_what_happened_and_how_to_continue(capsys):
    """`clfast train` turns a lost peer into one message and exit status 1 (other errors propagate)."""
    from types import SimpleNamespace

    from clfast.cli import _run_trainer

    def trainer(exc, world=2):
        def fit():
            raise exc
        return SimpleNamespace(fit=fit, world=world, rank=1, run_dir="/runs/x", procs=SimpleNamespace(timeout_s=600.0))

    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:1\nmore")
    assert _run_trainer(trainer(gloo)) == 1
    err = capsys.readouterr().err
    assert err.startswith("clfast: error: rank 1 of 2 lost contact with another process (it died, or did not answer "
                          "within dist_timeout_s=600 s): [gloo/transport/tcp/pair.cc:561] Connection closed by peer")
    assert "--resume /runs/x" in err and "more" not in err
    for exc, world in ((gloo, 1), (RuntimeError("shapes cannot be multiplied"), 2)):
        with pytest.raises(RuntimeError):
            _run_trainer(trainer(exc, world))


# --- through torchrun: SIGKILL a rank after a step checkpoint, then --resume -------------------------------

ARGS = ["--method", "dualprompt", "--dataset", "digits", "--quiet", "num_tasks=2", "epochs=1", "batch_size=16",
        "eval_batch_size=128", "limit_eval_batches=1", "threads=1", "augment=true", "method_args.e_length=4"]


def _torchrun(*args, log_dir=None, **kw):
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *logs,
           "-m", "clfast", "train", *args]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _workers(agent_pid: int) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun started (Linux /proc)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            with open(f"/proc/{pid}/environ") as f:
                env = dict(kv.split("=", 1) for kv in f.read().split("\0") if "=" in kv)
            out[int(env["RANK"])] = int(pid)
        except (OSError, KeyError, ValueError, IndexError):
            pass
    return out


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _state(run):
    return torch.load(os.path.join(run, "checkpoints", "task002.pt"), weights_only=True)["method_state"]


@pytest.fixture(scope="module")
def ddp_full(tmp_path_factory):
    """The uninterrupted 2-rank run."""
    run = tmp_path_factory.mktemp("ddp") / "full"
    full = _torchrun(*ARGS, "--out", str(run))
    out = full.communicate(timeout=600)[0]
    assert full.returncode == 0, out[-3000:]
    return run


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc")
@pytest.mark.parametrize("killed", [1, 0])
def test_torchrun_rank_killed_after_a_step_checkpoint_then_resumed(ddp_full, tmp_path, killed):
    """A rank is SIGKILLed once a step checkpoint exists (step >= 6 of 88): the other stops with the
    lost-contact message within 60 s, torchrun fails, and `--resume` under torchrun continues from the step
    checkpoint to the uninterrupted 2-rank run's accuracy matrix and trained tensors, bitwise."""
    survivor = 1 - killed
    run, logs = tmp_path / "killed", tmp_path / "logs"
    agent = _torchrun(*ARGS, "--out", str(run), "checkpoint_every_steps=2", log_dir=logs)
    step_ckpt = run / "checkpoints" / "step.pt"
    deadline = time.time() + 400
    try:
        while time.time() < deadline and agent.poll() is None:
            if step_ckpt.is_file():
                try:
                    if torch.load(step_ckpt, weights_only=True)["global_step"] >= 6:
                        break
                except Exception:  # replaced while reading: try again
                    pass
            time.sleep(0.05)
        assert agent.poll() is None, f"the run ended before a rank could be killed: {agent.stdout.read()[-3000:]}"
        ranks = _workers(agent.pid)
        assert sorted(ranks) == [0, 1], ranks
        killed_at = time.time()
        os.kill(ranks[killed], signal.SIGKILL)
        while not _gone(ranks[survivor]) and time.time() < killed_at + 60:
            time.sleep(0.02)
        survivor_s = time.time() - killed_at
        launcher = agent.communicate(timeout=120)[0]
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert survivor_s < 60, f"rank {survivor} still running {survivor_s:.0f} s after rank {killed} died"
    assert agent.returncode != 0, launcher[-3000:]
    assert "exitcode  : -9" in launcher and "(SIGKILL)" in launcher, launcher[-3000:]
    (err,) = glob.glob(str(logs / "*" / "attempt_0" / str(survivor) / "stderr.log"))
    msg = open(err).read()
    assert f"clfast: error: rank {survivor} of 2 lost contact with another process" in msg, msg[-3000:]
    assert f"--resume {run}" in msg, msg[-3000:]
    # what --resume will continue from: a step checkpoint inside task 1 (44 steps), written by both ranks' states
    latest = find_latest_checkpoint(run)
    state = torch.load(latest, weights_only=True)
    assert os.path.basename(latest) == "step.pt" and 6 <= state["global_step"] < 44 and len(state["rng"]) == 2
    print(f"rank {survivor} gone {survivor_s:.2f} s after rank {killed} was killed; resuming from step "
          f"{state['global_step']}")

    resumed = _torchrun(*ARGS, "--resume", str(run))
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out[-3000:]

    a, b = (torch.tensor(read_acc_csv(d / "acc_matrix.csv")) for d in (run, ddp_full))
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    sa, sb = _state(run), _state(ddp_full)
    assert sa.keys() == sb.keys()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []
