"""Faults a user meets through `clfast train`: settings that do not fit together (refused before anything is
built or written), damaged data (an error naming the file, or skipped and counted with skip_bad_samples)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clfast.backbones import vit
from clfast.cli import main
from clfast.data import Scenario
from clfast.engine.config import load_config
from clfast.engine.preflight import check_run
from tests.data.test_readers import IMAGENET_R_WNIDS, make_class_folders

TINY = ["epochs=1", "batch_size=8", "limit_train_batches=2", "limit_eval_batches=1", "threads=1"]


def _refused(argv, expect, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", *argv, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    assert expect in err, (argv, err)
    assert not out.exists(), f"{argv} left {sorted(os.listdir(out))} behind"
    return err


CROSS_FIELD = [
    # more tasks than classes (digits has 10)
    (["--method", "linear", "--dataset", "digits", "num_tasks=11"],
     "num_tasks=11 is more than the 10 classes of dataset 'digits'"),
    # a pool too small for the number of tasks / the top-k
    (["--method", "l2p", "--dataset", "digits", "method_args.pool_size=4", "method_args.top_k=5"],
     "top_k must be in [1, pool_size=4], got 5"),
    (["--method", "dualprompt", "--dataset", "digits", "num_tasks=5", "method_args.pool_size=3"],
     "method_args.pool_size=3 is smaller than num_tasks=5"),
    (["--method", "coda_prompt", "--dataset", "digits", "num_tasks=5", "method_args.pool_size=8"],
     "method_args.pool_size=8 must be a multiple of num_tasks=5"),
    # prompt layers beyond the backbone's depth (vit_tiny_synth has 6 blocks; ViT-B/16 has 12)
    (["--method", "dualprompt", "--dataset", "digits", "method_args.e_layers=[2,6]"],
     "method_args.e_layers=[2, 6]: block(s) [6] beyond the backbone's 6 blocks"),
    (["--method", "coda_prompt", "--dataset", "digits", "method_args.layers=[0,7]"],
     "method_args.layers=[0, 7]: block(s) [7] beyond the backbone's 6 blocks"),
    (["--method", "convprompt", "--dataset", "digits", "method_args.layers=[0,1,2,3,4,5,6]"],
     "method_args.layers=[0, 1, 2, 3, 4, 5, 6]: block(s) [6] beyond the backbone's 6 blocks"),
    (["--method", "dualprompt", "--dataset", "digits", "backbone=vit_base_patch16_224", "method_args.g_layers=[12]"],
     "method_args.g_layers=[12]: block(s) [12] beyond the backbone's 12 blocks"),
]


@pytest.mark.parametrize("argv, expect", CROSS_FIELD, ids=[f"{a[1]}:{a[-1].split('=')[0]}" for a, _ in CROSS_FIELD])
def test_settings_that_do_not_fit_together_are_refused_before_anything_is_built(argv, expect, tmp_path, capsys,
                                                                                monkeypatch):
    """Refused before the data is read or the backbone built: both are made to fail here, and the error is
    still the settings' one."""
    def built(*a, **k):
        raise AssertionError("the backbone was built before the settings were checked")

    def read(*a, **k):
        raise AssertionError("the data was read before the settings were checked")

    monkeypatch.setattr(vit, "create_vit", built)
    monkeypatch.setattr(Scenario, "from_name", read)
    monkeypatch.chdir(tmp_path)
    _refused(argv, expect, tmp_path, capsys)
    assert not (tmp_path / "runs").exists()


def test_batch_against_the_number_of_processes():
    cfg = load_config("linear", "digits", "fast", ["batch_size=1"])
    with pytest.raises(ValueError, match=r"batch_size=1 is smaller than the number of processes \(2\)"):
        check_run(cfg, 2)
    cfg = load_config("linear", "digits", "fast", ["batch_size=9"])
    with pytest.raises(ValueError, match=r"batch_size=9 must be divisible by the number of processes \(2\).*"
                                         r"batch_size=8 or 10"):
        check_run(cfg, 2)
    check_run(cfg, 3)
    check_run(cfg, 1)


def test_the_method_is_checked_against_the_tasks_the_run_will_have():
    """digits defaults to 5 tasks; a scenario given to the trainer, or a joint run (one task), counts instead."""
    from types import SimpleNamespace

    cfg = load_config("dualprompt", "digits", "fast", ["method_args.pool_size=2"])
    with pytest.raises(ValueError, match="pool_size=2 is smaller than num_tasks=5"):
        check_run(cfg, 1)
    check_run(cfg, 1, scenario=SimpleNamespace(num_tasks=2))
    check_run(load_config("joint", "digits", "fast", ["method_args.base=dualprompt", "method_args.pool_size=2"]), 1)


def test_more_tasks_than_the_classes_of_a_folder_dataset(tmp_path, capsys, monkeypatch):
    """The classes of a dataset on disk are known once its folders are listed: still before the backbone."""
    make_class_folders(str(tmp_path / "data" / "imagenet-r"), IMAGENET_R_WNIDS, per_class=3)

    def built(*a, **k):
        raise AssertionError("the backbone was built before the settings were checked")

    monkeypatch.setattr(vit, "create_vit", built)
    _refused(["--method", "linear", "--dataset", "imagenet_r", "--preset", "fast", "--data-root",
              str(tmp_path / "data"), "num_tasks=5"],
             "num_tasks=5 is more than the 4 classes of dataset 'imagenet_r'", tmp_path, capsys)


# --- damaged data through a run ---------------------------------------------------------------------------

@pytest.fixture
def damaged(tmp_path):
    """An ImageNet-R folder of 4 classes × 6 images, one of them truncated (before its split manifest is
    written, so only decoding it fails)."""
    root = tmp_path / "data"
    make_class_folders(str(root / "imagenet-r"), IMAGENET_R_WNIDS, per_class=6)
    bad = root / "imagenet-r" / IMAGENET_R_WNIDS[2] / "img_001.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return root, bad


def _train_on(root, out, *extra):
    return main(["train", "--method", "linear", "--dataset", "imagenet_r", "--preset", "fast", "--data-root",
                 str(root), "--out", str(out), "--quiet", "num_tasks=2", *TINY, "limit_train_batches=null",
                 "limit_eval_batches=null", *extra])


@pytest.mark.parametrize("workers", [0, 1])
def test_a_damaged_image_stops_the_run_naming_the_file(damaged, tmp_path, capsys, workers):
    root, bad = damaged
    rc = _train_on(root, tmp_path / "run", f"num_workers={workers}")
    err = capsys.readouterr().err
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"clfast: error: cannot read image {bad}:") and "skip_bad_samples=true" in last, err


def test_skip_bad_samples_runs_and_reports_what_it_left_out(damaged, tmp_path, capsys):
    root, bad = damaged
    out = tmp_path / "run"
    assert _train_on(root, out, "skip_bad_samples=true", "num_workers=1") == 0, capsys.readouterr().err
    rec = json.loads((out / "record.json").read_text())["scenario"]
    skipped = rec["skipped_samples"]
    assert skipped["train"]["count"] + skipped["test"]["count"] == 1
    assert str(bad) in (skipped["train"]["items"] + skipped["test"]["items"])[0]["error"]
    split = "train" if skipped["train"]["count"] else "test"
    assert sum(rec["task_sizes"][split]) == {"train": 19, "test": 4}[split]   # 24 images, 80/20, one left out
    log = (out / "train.log").read_text()
    assert f"skip_bad_samples: left out 1 unreadable {split} image(s), e.g. cannot read image {bad}" in log


def test_changed_and_missing_data_are_refused_naming_the_files(tmp_path, capsys):
    root = tmp_path / "data"
    make_class_folders(str(root / "imagenet-r"), IMAGENET_R_WNIDS, per_class=3)
    from clfast.data import create_dataset

    files = create_dataset("imagenet_r", "train", root=str(root)).files   # writes the split manifest
    rel = lambda f: os.path.relpath(f, str(root / "imagenet-r"))   # noqa: E731
    # other bytes of the same size: refused with verify_data=true (the cheap check cannot see it)
    data = bytearray(open(files[0], "rb").read())
    data[-3] ^= 0xFF
    open(files[0], "wb").write(bytes(data))
    argv = ["--method", "linear", "--dataset", "imagenet_r", "--preset", "fast", "--data-root", str(root), "num_tasks=2"]
    _refused([*argv, "verify_data=true"], f"differ from their recorded sha256: {rel(files[0])}", tmp_path, capsys)
    # another size: refused on every run
    open(files[1], "ab").write(b"\0")
    _refused(argv, f"changed size since the manifest was written: {rel(files[1])}", tmp_path, capsys)
    os.remove(files[2])
    _refused(argv, f"missing under {root / 'imagenet-r'}: {rel(files[2])}", tmp_path, capsys)
    _refused([*argv[:-3], "--data-root", str(tmp_path / "nowhere"), "num_tasks=2"],
             "dataset 'imagenet_r': not found under root=", tmp_path, capsys)


def test_eval_names_an_image_damaged_after_the_run(tmp_path, capsys):
    """Same size, broken header: the manifest's cheap check passes, decoding fails, and `clfast eval` names it."""
    from clfast.data import create_dataset

    root, out = tmp_path / "data", tmp_path / "run"
    make_class_folders(str(root / "imagenet-r"), IMAGENET_R_WNIDS, per_class=6)
    assert _train_on(root, out) == 0, capsys.readouterr().err
    victim = create_dataset("imagenet_r", "test", root=str(root)).files[0]
    data = bytearray(open(victim, "rb").read())
    data[:4] = b"XXXX"
    open(victim, "wb").write(bytes(data))
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err.strip().startswith(f"clfast: error: cannot read image {victim}:")
