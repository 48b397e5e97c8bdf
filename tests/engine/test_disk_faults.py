"""Full disks and unwritable run directories.

An unwritable run directory is refused before anything is built, naming the directory. A checkpoint write
that fails mid-run with ENOSPC (in the payload, when the data reaches the disk, or in the pointer file) is
reported at that write, naming the file and the errno; the last good checkpoint stays intact and is what
``latest.json`` names, no partial file is left, and once space is back the run resumes to the uninterrupted
run's numbers (checked for the payload failure). Free space is compared with the checkpoints' size before training.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections import namedtuple

import pytest
import torch

from clfast import cli
from clfast.engine import Trainer
from clfast.engine import io as rio
from clfast.engine.io import CheckpointWriteError, RunDirectoryError, load_checkpoint
from tests.engine.crashkit import partial_files, toy_cfg, toy_full  # noqa: F401 (a fixture)
from tests.engine.test_resume import differing, final_state, matrix


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --- the run directory ------------------------------------------------------------------------------------

def test_a_run_dir_that_cannot_be_created_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    built = []
    monkeypatch.setattr(Trainer, "_build", lambda *a, **k: built.append(1))
    out = blocker / "run"
    with pytest.raises(RunDirectoryError) as e:
        Trainer(toy_cfg(), out=str(out))
    assert str(e.value) == f"run directory {out} cannot be created or written to: Not a directory (ENOTDIR, errno 20)"
    assert e.value.errno == errno.ENOTDIR and built == []


def test_a_run_dir_without_write_permission_is_refused_and_not_left_behind(tmp_path, monkeypatch):
    real = tempfile.mkstemp

    def denied(*a, **kw):
        if kw.get("prefix", "").startswith(".clfast-write-test"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), kw.get("dir"))
        return real(*a, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    out = tmp_path / "new"
    with pytest.raises(RunDirectoryError, match=re.escape(f"run directory {out} cannot be created or written to: "
                                                          f"Permission denied (EACCES, errno 13)")):
        Trainer(toy_cfg(), out=str(out))
    assert not out.exists()   # the directory it had created is removed again


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_a_read_only_run_dir_is_refused(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(RunDirectoryError, match=r"ro cannot be created or written to: Permission denied"):
            Trainer(toy_cfg(), out=str(out))
    finally:
        out.chmod(0o755)


def test_the_command_line_reports_an_unwritable_out(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "run"
    assert cli.main(["train", "--method", "linear", "--dataset", "digits", "--quiet", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"clfast: error: run directory {out} cannot be created or written to: "
                                       f"Not a directory (ENOTDIR, errno 20)\n")


# --- ENOSPC mid-run -----------------------------------------------------------------------------------------

def _fail_third_payload(monkeypatch):
    """torch.save of the third checkpoint writes 5000 bytes, then the disk is full."""
    real, calls = torch.save, []

    def save(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            f.write(b"PK\x03\x04" + bytes(4996))
            raise _enospc()
        return real(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", save)


def _fail_task001_fsync(monkeypatch):
    """The data of task001.pt does not fit when it is flushed to the disk (fsync: delayed allocation, NFS)."""
    real = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".task001.pt."):
            raise _enospc()
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


def _fail_task001_pointer(monkeypatch):
    """task001.pt is written, then latest.json cannot be."""
    real = rio.atomic_write_json

    def write(path, obj):
        if os.path.basename(path) == "latest.json" and obj == {"checkpoint": "task001.pt"}:
            raise _enospc()
        return real(path, obj)
    monkeypatch.setattr(rio, "atomic_write_json", write)


# (fault, the file named as failing, the step of the checkpoint latest.json names then, task001.pt there)
FAULTS = {
    "payload": (_fail_third_payload, "checkpoint {ck}/step.pt", 2, False),
    "fsync": (_fail_task001_fsync, "checkpoint {ck}/task001.pt", 4, False),
    "pointer": (_fail_task001_pointer, "{ck}/latest.json", 4, True),
}


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="the fsync fault finds the file through /proc")
@pytest.mark.parametrize("fault", list(FAULTS))
def test_enospc_at_a_checkpoint_is_reported_there_and_the_last_good_one_resumes(toy_full, tmp_path, monkeypatch,
                                                                               fault):
    install, failing, good_step, task001_there = FAULTS[fault]
    run = tmp_path / "run"
    ck = run / "checkpoints"
    install(monkeypatch)
    with pytest.raises(CheckpointWriteError) as e:
        Trainer(toy_cfg(["checkpoint_every_steps=1"]), out=str(run)).fit()
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC
    assert msg.startswith(f"writing {failing.format(ck=ck)} failed: No space left on device (ENOSPC, errno 28);"), msg
    assert "latest.json still names step.pt" in msg and msg.endswith(f"continue with --resume {run}")
    assert {"payload": "the previous step.pt is unchanged", "fsync": "no task001.pt was created",
            "pointer": "the checkpoint {ck}/task001.pt is complete".format(ck=ck)}[fault] in msg
    assert msg in (run / "train.log").read_text()                 # logged where the run's log is kept
    assert partial_files(run) == []
    assert json.loads((ck / "latest.json").read_text()) == {"checkpoint": "step.pt"}
    assert load_checkpoint(ck / "step.pt")["global_step"] == good_step   # intact (hash checked) and loadable
    assert (ck / "task001.pt").exists() == task001_there
    if task001_there:
        assert load_checkpoint(ck / "task001.pt")["global_step"] == 4   # the new file is complete
    if fault == "payload":   # (once is enough: the others leave the same kind of last good checkpoint)
        monkeypatch.undo()   # space is back
        Trainer.resume(str(run)).fit()
        assert differing(final_state(run), final_state(toy_full)) == []
        torch.testing.assert_close(matrix(run), matrix(toy_full), rtol=0, atol=0, equal_nan=True)


def test_the_command_line_reports_enospc_at_the_failing_write(tmp_path, monkeypatch, capsys):
    def save(obj, f, *a, **kw):
        raise _enospc()
    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    rc = cli.main(["train", "--method", "linear", "--dataset", "digits", "--quiet", "--out", str(run), "num_tasks=2",
                   "epochs=1", "batch_size=16", "limit_train_batches=2", "limit_eval_batches=1", "threads=1"])
    err = capsys.readouterr().err
    assert rc == 1
    assert (f"clfast: error: writing checkpoint {run / 'checkpoints' / 'task001.pt'} failed: No space left on device "
            f"(ENOSPC, errno 28); no task001.pt was created (there is no latest.json)") in err
    assert os.listdir(run / "checkpoints") == []


# --- free space -----------------------------------------------------------------------------------------------

def test_the_checkpoint_size_estimate_bounds_the_real_size(toy_full):
    t = Trainer.resume(str(toy_full))
    real = os.path.getsize(toy_full / "checkpoints" / "task001.pt")
    assert real <= t._checkpoint_bytes_estimate() <= 4 * real


def test_too_little_free_space_is_a_warning_before_training(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 20, (10 << 20) - 50_000, 50_000))
    Trainer(toy_cfg(["checkpoint_every_steps=1"]), out=str(tmp_path / "run"))
    log = (tmp_path / "run" / "train.log").read_text()
    assert re.search(r"checkpoints has 0\.0 MiB free, but this run's checkpoints may need up to [0-9.]+ MiB "
                     r"\(4 files of about [0-9.]+ MiB\): a checkpoint write will fail with ENOSPC", log), log
    monkeypatch.undo()
    Trainer(toy_cfg(), out=str(tmp_path / "roomy"))
    assert "MiB free" not in (tmp_path / "roomy" / "train.log").read_text()
