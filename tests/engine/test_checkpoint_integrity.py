"""Checkpoints carry a content hash: a truncated, bit-flipped or half-written file is refused by name,
old checkpoints without a hash still load (with a note), ``--resume`` falls back to the newest intact
checkpoint and says so, the intact file a step checkpoint replaces is kept, and ``clfast eval`` on a
damaged checkpoint is a clear error."""

from __future__ import annotations

import io
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

from clfast import cli
from clfast.engine import Interrupted, Trainer
from clfast.engine import io as rio
from clfast.engine.io import (CheckpointError, CheckpointWarning, DamagedCheckpointError, content_digest,
                              load_checkpoint, load_latest_checkpoint, rng_state, save_checkpoint)
from tests.engine.crashkit import flip_tensor_bit, toy_cfg, toy_full, truncate  # noqa: F401 (a fixture)
from tests.engine.test_resume import differing, final_state, matrix


def _state(seed=0):
    """A checkpoint-like dict, the same in every process (the RNG states included)."""
    g = torch.Generator().manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    return {"format": 3, "method": "l2p", "config_hash": "abc", "position": [1, 0, 0, 0],
            "method_state": {"prompt": torch.randn(4, 8, generator=g), "keys": torch.randn(6, 8, generator=g),
                             "mask": torch.rand(5, generator=g) > 0.5, "half": torch.randn(3, 3, generator=g).bfloat16(),
                             "count": torch.tensor(7)},
            "optimizers": {"task/0": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 8, generator=g)}},
                                      "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": [0]}]}},
            "rng": rng_state(), "train_time": 1.5, "stage_best": None, "name": "ünïcode"}


# --- the hash ---------------------------------------------------------------------------------------------

def test_every_bit_flip_is_refused_or_harmless(tmp_path):
    """250 single-bit flips at random places of a checkpoint file: each is refused, or (zip metadata that
    torch.load does not read) leaves the content bitwise as saved. Without the hash check, many of the same
    flips load silently with a value changed, so this test sees the check's absence."""
    path = tmp_path / "c.pt"
    state = _state()
    save_checkpoint(path, state, update_latest=False)
    want = content_digest(state)
    data = path.read_bytes()
    rnd = random.Random(0)
    refused = silent = unchecked_silent = 0
    for _ in range(250):
        d = bytearray(data)
        d[rnd.randrange(len(d))] ^= 1 << rnd.randrange(8)
        path.write_bytes(bytes(d))
        try:
            raw = torch.load(path, weights_only=True)
            raw.pop(rio.HASH_KEY, None)
            unchecked_silent += content_digest(raw) != want
        except Exception:
            pass
        try:
            got = load_checkpoint(path)
        except DamagedCheckpointError as e:
            assert str(path) in str(e) and "damaged" in str(e)
            refused += 1
            continue
        silent += content_digest(got) != want
    assert silent == 0
    print(f"250 flips: {refused} refused, {250 - refused} harmless; without the check {unchecked_silent} load "
          f"with a value changed")
    assert unchecked_silent > 100 and refused > 150, (unchecked_silent, refused)


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.5, 0.9, 0.999])
def test_truncated_and_half_written_files_are_refused_by_name(tmp_path, fraction):
    path = tmp_path / "task001.pt"
    save_checkpoint(path, _state(), update_latest=False)
    truncate(path, fraction)
    with pytest.raises(DamagedCheckpointError, match=r"task001\.pt.*(damaged|empty)") as e:
        load_checkpoint(path)
    assert ("empty (0 bytes" in str(e.value)) == (fraction == 0.0)


def test_a_flipped_tensor_value_is_named(tmp_path):
    path = tmp_path / "task001.pt"
    save_checkpoint(path, _state(), update_latest=False)
    flip_tensor_bit(path, "keys")
    assert torch.load(path, weights_only=True)["method_state"]["keys"].shape == (6, 8)   # loads silently
    with pytest.raises(DamagedCheckpointError, match=r"task001\.pt' is damaged: its content does not match the sha256"):
        load_checkpoint(path)


def test_old_checkpoints_without_a_hash_load_with_a_note(tmp_path):
    old = _state()
    old["format"] = 2
    torch.save(old, tmp_path / "old.pt")
    with pytest.warns(CheckpointWarning, match="written before checkpoints carried a content hash"):
        back = load_checkpoint(tmp_path / "old.pt", expected={"method": "l2p"})
    assert content_digest(back) == content_digest(old)
    # a format that carries hashes, without one: the hash entry was lost, i.e. the file was altered
    torch.save(_state(), tmp_path / "new.pt")
    with pytest.raises(DamagedCheckpointError, match="format 3 checkpoints carry a content hash"):
        load_checkpoint(tmp_path / "new.pt")


def test_content_digest_sees_structure_and_exact_bits():
    base = {"a": [1, 2.0], "t": torch.zeros(2)}
    d = content_digest(base)
    assert content_digest({"a": [1, 2.0], "t": torch.zeros(2)}) == d
    for other in ({"a": (1, 2.0), "t": torch.zeros(2)},            # a tuple is not a list
                  {"a": [1, 2], "t": torch.zeros(2)},              # an int is not a float
                  {"t": torch.zeros(2), "a": [1, 2.0]},            # order counts (pickle keeps it)
                  {"a": [1, 2.0], "t": torch.zeros(2, dtype=torch.float64)},
                  {"a": [1, 2.0], "t": torch.zeros(1, 2)},
                  {"a": [1, 2.0], "t": -torch.zeros(2)}):          # -0.0: other bits
        assert content_digest(other) != d
    assert content_digest({"x": torch.arange(6.0).reshape(2, 3).t()}) == content_digest(
        {"x": torch.arange(6.0).reshape(2, 3).t().contiguous()})   # by value, not by stride
    with pytest.raises(TypeError, match=r"state\['opt'\]\['fn'\]: a checkpoint may hold .* got object"):
        content_digest({"opt": {"fn": object()}})


def test_save_checkpoint_refuses_a_state_that_already_has_the_hash_entry(tmp_path):
    with pytest.raises(ValueError, match="content_sha256"):
        save_checkpoint(tmp_path / "x.pt", {rio.HASH_KEY: "0"})


# --- the fallback -------------------------------------------------------------------------------------------

def _three_checkpoints(d):
    for i in (1, 2, 3):
        save_checkpoint(d / f"task00{i}.pt", _state(i))
        os.utime(d / f"task00{i}.pt", (i, i))   # distinct modification times, oldest first
    return [d / f"task00{i}.pt" for i in (1, 2, 3)]


def test_latest_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    t1, t2, t3 = _three_checkpoints(tmp_path)
    path, state, skipped = load_latest_checkpoint(tmp_path)
    assert path == str(t3) and skipped == []
    flip_tensor_bit(t3)
    truncate(t2)
    path, state, skipped = load_latest_checkpoint(tmp_path, expected={"method": "l2p"})
    assert path == str(t1) and content_digest(state) == content_digest(_state(1))
    assert [p for p, _ in skipped] == [str(t3), str(t2)]
    assert "does not match the sha256" in skipped[0][1] and "it is truncated" in skipped[1][1]
    with pytest.warns(CheckpointWarning, match=r"skipped .*task003\.pt.*loaded .*task001\.pt"):
        load_checkpoint(tmp_path)
    os.remove(t3)   # latest.json names a file that is gone: said, and the next one is used
    path, state, skipped = load_latest_checkpoint(tmp_path)
    assert path == str(t1) and skipped[0] == (str(t3), "latest.json names it but it does not exist")
    truncate(t1, 0.0)
    with pytest.raises(DamagedCheckpointError, match=r"every checkpoint .* is damaged") as e:
        load_latest_checkpoint(tmp_path)
    assert all(str(p) in str(e.value) for p in (t1, t2)) and f"{t3}: latest.json names it but" in str(e.value)


def test_another_runs_checkpoint_is_refused_not_skipped(tmp_path):
    _, _, t3 = _three_checkpoints(tmp_path)
    with pytest.raises(CheckpointError, match=r"task003\.pt' was written with method='l2p'") as e:
        load_latest_checkpoint(tmp_path, expected={"method": "dualprompt"})
    assert not isinstance(e.value, DamagedCheckpointError)


def test_keep_previous_keeps_the_intact_file_it_replaces(tmp_path):
    step, prev = tmp_path / "step.pt", tmp_path / "step.prev.pt"
    for i in (1, 2, 3):
        save_checkpoint(step, _state(i), keep_previous=True)
    assert content_digest(load_checkpoint(step)) == content_digest(_state(3))
    assert content_digest(load_checkpoint(prev)) == content_digest(_state(2))
    assert os.stat(step).st_ino != os.stat(prev).st_ino   # a file of its own: damage to one is not to both
    # a damaged step.pt is not kept: step.prev.pt stays the intact one before it
    flip_tensor_bit(step)
    save_checkpoint(step, _state(4), keep_previous=True)
    assert content_digest(load_checkpoint(prev)) == content_digest(_state(2))
    assert content_digest(load_checkpoint(step)) == content_digest(_state(4))
    assert sorted(os.listdir(tmp_path)) == ["latest.json", "step.prev.pt", "step.pt"]
    assert json.loads((tmp_path / "latest.json").read_text()) == {"checkpoint": "step.pt"}


# --- through the trainer and the command line --------------------------------------------------------------

def test_resume_falls_back_past_damaged_checkpoints_and_says_so(toy_full, tmp_path):
    """Interrupted at step 6 with step checkpoints: interrupt.pt (step 6) and step.pt (step 5) damaged, the
    resume skips both, names them, continues from task001.pt and ends as the uninterrupted run."""
    run = tmp_path / "cut"
    with pytest.raises(Interrupted):
        Trainer(toy_cfg(["stop_after_steps=6", "checkpoint_every_steps=1"]), out=str(run)).fit()
    ck = run / "checkpoints"
    assert sorted(os.listdir(ck)) == ["interrupt.pt", "latest.json", "step.prev.pt", "step.pt", "task001.pt"]
    assert load_checkpoint(ck / "step.prev.pt")["global_step"] == 4
    flip_tensor_bit(ck / "interrupt.pt")
    truncate(ck / "step.pt")
    Trainer.resume(str(run)).fit()
    log = (run / "train.log").read_text()
    assert f"--resume: skipping {ck / 'interrupt.pt'}: checkpoint" in log and "does not match the sha256" in log
    assert f"--resume: skipping {ck / 'step.pt'}: checkpoint" in log
    assert f"--resume: resuming from {ck / 'task001.pt'} instead" in log
    assert differing(final_state(run), final_state(toy_full)) == []
    torch.testing.assert_close(matrix(run), matrix(toy_full), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("damage", [flip_tensor_bit, truncate])
def test_clfast_eval_on_a_damaged_checkpoint_is_a_clear_error(toy_full, tmp_path, damage, capsys):
    run = tmp_path / "run"
    shutil.copytree(toy_full, run)
    damage(run / "checkpoints" / "task002.pt")
    assert cli.main(["eval", "--run", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"clfast: error: checkpoint '{run / 'checkpoints' / 'task002.pt'}' is damaged"), err
    assert not (run / "eval.json").exists()


def test_clfast_eval_of_an_intact_run_still_works(toy_full, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(toy_full, run)
    assert cli.main(["eval", "--run", str(run), "--quiet"]) == 0
    assert json.loads((run / "eval.json").read_text())["checkpoint"] == "task002.pt"
    capsys.readouterr()


def test_a_checkpoint_round_trips_through_a_buffer_with_the_same_digest():
    """The digest is of the content, so it survives torch.save/torch.load of every type a checkpoint holds."""
    state = _state()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    assert content_digest(torch.load(buf, weights_only=True)) == content_digest(state)
