import json
import os
import random

import numpy as np
import pytest
import torch

from clfast.engine.io import (CheckpointError, JsonlLogger, atomic_write_bytes, atomic_write_json,
                              atomic_write_text, config_hash, find_latest_checkpoint, load_checkpoint,
                              read_jsonl, rng_state, save_checkpoint, set_rng_state)


def test_atomic_write_json_keeps_old_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "record.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]})
    old = path.read_text()
    assert old == '{\n  "b": 1,\n  "a": [\n    1,\n    2\n  ]\n}\n'  # indent 2, insertion order
    # json.dump streams: the first keys are written to the temp file before the object fails
    with pytest.raises(TypeError, match="not JSON serialisable"):
        atomic_write_json(path, {"big": "x" * 100_000, "bad": object()})
    assert path.read_text() == old
    assert os.listdir(tmp_path) == ["record.json"]


def test_atomic_write_bytes_and_text(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(path, b"one")
    os.chmod(path, 0o640)
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.stat(path).st_mode & 0o777 == 0o640  # permissions of the replaced file kept
    atomic_write_text(tmp_path / "t.txt", "a\nb\n")
    assert (tmp_path / "t.txt").read_bytes() == b"a\nb\n"
    with pytest.raises(TypeError, match="data must be bytes"):
        atomic_write_bytes(path, "str")
    assert sorted(os.listdir(tmp_path)) == ["sub", "t.txt"] and os.listdir(tmp_path / "sub") == ["f.bin"]


def test_atomic_write_json_converts_numpy_and_torch(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"a": np.int64(3), "b": np.arange(2), "c": torch.tensor(1.5)})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 3, "b": [0, 1], "c": 1.5}


def test_jsonl_logger_appends_and_repairs_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with JsonlLogger(path) as log:
        log.log(step=1, loss=0.5)
        assert read_jsonl(path) == [{"step": 1, "loss": 0.5}]  # flushed per line
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')  # a crash mid-line
    assert read_jsonl(path) == [{"step": 1, "loss": 0.5}]  # a torn last line is skipped
    with JsonlLogger(path) as log:  # resume: appends after the torn line
        log.log(step=3, acc=np.float32(0.25))
    assert path.read_text().count("\n") == 2  # the torn fragment was dropped
    assert read_jsonl(path) == [{"step": 1, "loss": 0.5}, {"step": 3, "acc": 0.25}]
    off = JsonlLogger(tmp_path / "rank1.jsonl", enabled=False)
    off.log(step=1)
    assert not (tmp_path / "rank1.jsonl").exists()


def _state():
    return {"method": "l2p", "config_hash": "abc", "task": 2, "weights": {"w": torch.randn(3, 4)},
            "opt": {"lr": 0.1, "betas": (0.9, 0.99), "none": None}, "class_order": [3, 1, 2],
            "rng": rng_state()}


def test_checkpoint_round_trip_and_latest_pointer(tmp_path):
    ckdir = tmp_path / "checkpoints"
    s1 = _state()
    save_checkpoint(ckdir / "task_1.pt", s1)
    s2 = _state()
    save_checkpoint(ckdir / "task_2.pt", s2)
    assert json.loads((ckdir / "latest.json").read_text()) == {"checkpoint": "task_2.pt"}
    assert find_latest_checkpoint(ckdir) == str(ckdir / "task_2.pt")
    assert sorted(os.listdir(ckdir)) == ["latest.json", "task_1.pt", "task_2.pt"]
    back = load_checkpoint(ckdir, expected={"method": "l2p", "config_hash": "abc"})  # a directory: newest
    assert torch.equal(back["weights"]["w"], s2["weights"]["w"])
    assert back["opt"] == {"lr": 0.1, "betas": (0.9, 0.99), "none": None} and back["class_order"] == [3, 1, 2]
    # the pointer is missing: fall back to the newest file
    os.remove(ckdir / "latest.json")
    os.utime(ckdir / "task_1.pt", (1, 1))
    assert find_latest_checkpoint(ckdir) == str(ckdir / "task_2.pt")
    assert find_latest_checkpoint(tmp_path) == str(ckdir / "task_2.pt")  # run dir: looks in checkpoints/
    assert find_latest_checkpoint(tmp_path / "nowhere") is None


def test_checkpoint_expected_mismatch_and_bad_files(tmp_path):
    path = tmp_path / "task_1.pt"
    save_checkpoint(path, _state())
    with pytest.raises(ValueError, match=r"method='l2p'.*this run has method='coda_prompt'"):
        load_checkpoint(path, expected={"method": "coda_prompt"})
    with pytest.raises(CheckpointError, match=r"no 'seed' entry; this run expects seed=1"):
        load_checkpoint(path, expected={"seed": 1})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "empty_dir")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="could not be loaded"):
        load_checkpoint(corrupt)


class _Custom:
    pass


def test_checkpoint_with_arbitrary_objects_is_refused_by_weights_only(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"obj": _Custom()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(path)


def _draws():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
            torch.rand(3).tolist(), torch.randint(0, 1000, (2,)).tolist())


def test_rng_round_trip_through_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.randn()  # and in NumPy's
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    first = _draws()
    _draws()  # move every generator on
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draws() == first


def test_set_rng_state_validates():
    with pytest.raises(ValueError, match="rng_state"):
        set_rng_state({"python": None})


def test_config_hash_is_canonical():
    a = config_hash({"lr": 0.1, "model": {"depth": 12, "tags": ("x", "y")}})
    b = config_hash({"model": {"tags": ["x", "y"], "depth": np.int64(12)}, "lr": 0.1})
    assert a == b and len(a) == 16 and int(a, 16) >= 0
    assert config_hash({"lr": 0.2, "model": {"depth": 12, "tags": ["x", "y"]}}) != a
    with pytest.raises(TypeError, match="cfg must be a dict"):
        config_hash([1, 2])
