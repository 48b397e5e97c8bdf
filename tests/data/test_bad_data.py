"""Damaged data on disk: every fault is an error naming the file (also from a DataLoader worker), or, with
``skip_bad_samples``, unreadable images are left out and counted. Folder datasets are made in tmp_path."""

import csv
import os
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from clfast.data import Scenario, create_dataset
from clfast.data.readers import ImageFiles, ImageReadError, find_unreadable, load_image

from test_readers import IMAGENET_R_WNIDS, make_cifar100, make_class_folders, write_image


def truncate(path, keep=0.5):
    """Cut a JPEG short: Pillow opens it (the header is intact) and fails while decoding."""
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


@pytest.fixture
def folders(tmp_path):
    """An ImageNet-R layout, 4 classes × 5 images, with the first image of class 1 truncated before the
    split manifest is written (so the manifest's size and hash describe the damaged file)."""
    base = tmp_path / "imagenet-r"
    make_class_folders(str(base), IMAGENET_R_WNIDS, per_class=5)
    bad = base / IMAGENET_R_WNIDS[1] / "img_000.jpg"
    truncate(bad)
    return tmp_path, str(bad)


@pytest.mark.parametrize("damage", ["truncated", "not an image", "a folder", "missing", "unreadable"])
def test_an_image_that_cannot_be_read_is_named(tmp_path, damage):
    path = str(tmp_path / "a.jpg")
    write_image(path, 0, size=(32, 32))
    if damage == "truncated":
        truncate(path)
    elif damage == "not an image":
        open(path, "wb").write(b"plain text, not a JPEG")
    elif damage in ("a folder", "missing"):
        os.remove(path)
        if damage == "a folder":
            os.mkdir(path)
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads files whatever their mode")
        os.chmod(path, 0)
    with pytest.raises(ImageReadError, match=f"cannot read image {path}"):
        load_image(path)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_damaged_image_in_a_loader_names_the_file(folders, workers):
    """In a worker process too: the error reaches the main process with its type and the path."""
    root, bad = folders
    ds = create_dataset("imagenet_r", "train", root=str(root))
    assert bad in ds.files
    loader = DataLoader(ds, batch_size=4, num_workers=workers)
    with pytest.raises(ImageReadError) as e:
        for _ in loader:
            pass
    assert f"cannot read image {bad}" in str(e.value)
    if workers:
        assert "DataLoader worker" in str(e.value)   # raised in the worker, re-raised here


def test_missing_files_and_labels_outside_the_classes_are_named(tmp_path):
    make_class_folders(str(tmp_path), ["a", "b"], per_class=2)
    files = [str(tmp_path / c / f"img_{i:03d}.jpg") for c in "ab" for i in range(2)]
    ImageFiles("toy", "train", files, [0, 0, 1, 1], ["a", "b"])
    with pytest.raises(ValueError, match=r"label outside the 2 classes.*b/img_001.jpg \(label 2\)"):
        ImageFiles("toy", "train", files, [0, 0, 1, 2], ["a", "b"])
    os.remove(files[1])
    with pytest.raises(FileNotFoundError, match=r"1 listed image file\(s\) are missing: .*a/img_001.jpg"):
        ImageFiles("toy", "train", files, [0, 0, 1, 1], ["a", "b"])


def test_cifar_labels_outside_the_classes_name_the_pickle(tmp_path):
    make_cifar100(str(tmp_path), n_classes=5)
    path = tmp_path / "cifar-100-python" / "train"
    d = pickle.load(open(path, "rb"))
    d["fine_labels"][7] = 5
    pickle.dump(d, open(path, "wb"), protocol=2)
    with pytest.raises(ValueError, match=r"cifar-100-python/train: 1 fine_labels outside the 5 classes.*item 7 has label 5"):
        create_dataset("cifar100", "train", root=str(tmp_path))


def test_a_scenario_refuses_labels_outside_the_classes():
    class Toy(torch.utils.data.Dataset):
        def __init__(self, targets):
            self.targets, self.classes, self.name = targets, ["x", "y"], "toy"

        def __len__(self):
            return len(self.targets)

    ok = Toy([0, 1, 0, 1])
    Scenario(ok, ok, 2)
    for label in (-1, 2):   # -1 would otherwise index the label map from its end, silently
        with pytest.raises(ValueError, match=rf"train dataset 'toy': 1 label\(s\) outside its 2 classes.*item 2 has label {label}"):
            Scenario(Toy([0, 1, label, 1]), ok, 2)


def _manifest_rows(path):
    lines = open(path).read().splitlines()
    return lines[0], list(csv.reader(lines[1:]))


def test_a_manifest_whose_files_changed(tmp_path):
    root = tmp_path
    make_class_folders(str(root / "imagenet-r"), IMAGENET_R_WNIDS, per_class=5)
    ds = create_dataset("imagenet_r", "train", root=str(root))
    rel = os.path.relpath(ds.files[2], str(root / "imagenet-r"))
    # the same size, other bytes: only the full hash sees it (verify=True; the run setting verify_data)
    data = bytearray(open(ds.files[2], "rb").read())
    data[-3] ^= 0xFF
    open(ds.files[2], "wb").write(bytes(data))
    create_dataset("imagenet_r", "train", root=str(root))
    with pytest.raises(ValueError, match=rf"1 file\(s\) under .* differ from their recorded sha256: {rel}"):
        create_dataset("imagenet_r", "train", root=str(root), verify=True)
    # another size: seen on every read, from one stat per file
    open(ds.files[3], "ab").write(b"\0" * 10)
    rel3 = os.path.relpath(ds.files[3], str(root / "imagenet-r"))
    size = os.path.getsize(ds.files[3])
    with pytest.raises(ValueError, match=rf"1 file\(s\) .* changed size since the manifest was written: "
                                         rf"{rel3} \({size - 10} -> {size} bytes\)"):
        create_dataset("imagenet_r", "test", root=str(root))


def test_a_manifest_without_sizes_is_still_read(tmp_path):
    """Manifests written before the size column (v1) keep working: same split, existence checked."""
    make_class_folders(str(tmp_path / "imagenet-r"), IMAGENET_R_WNIDS, per_class=5)
    new = create_dataset("imagenet_r", "train", root=str(tmp_path))
    path = new.manifest.path
    tag, rows = _manifest_rows(path)
    v1 = tmp_path / "v1.csv"
    with open(v1, "w", newline="") as f:
        f.write(tag.replace("v2:", "v1:") + "\n")
        csv.writer(f, lineterminator="\n").writerows(r[:4] for r in rows)
    old = create_dataset("imagenet_r", "train", root=str(tmp_path), manifest_path=str(v1), verify=True)
    assert old.files == new.files and old.targets == new.targets and old.manifest.seed == 1993
    open(new.files[0], "ab").write(b"\0")   # no sizes recorded: only verify sees this
    create_dataset("imagenet_r", "train", root=str(tmp_path), manifest_path=str(v1))
    with pytest.raises(ValueError, match="differ from their recorded sha256"):
        create_dataset("imagenet_r", "train", root=str(tmp_path), manifest_path=str(v1), verify=True)


def test_skip_bad_samples_leaves_unreadable_images_out_and_counts_them(folders):
    root, bad = folders
    sc = Scenario.from_name("imagenet_r", root=str(root), num_tasks=2, skip_bad_samples=True, workers=2)
    train = sc.train_dataset
    i = train.files.index(bad)
    assert [j for j, _ in sc.skipped["train"]] == [i] and sc.skipped["test"] == []
    assert bad in sc.skipped["train"][0][1]
    every = [int(j) for t in range(2) for j in sc.train_set(t).indices]
    assert i not in every and len(every) == len(train) - 1
    assert sum(sc.task_sizes("train")) == len(train) - 1
    rec = sc.record()["skipped_samples"]
    assert rec["train"]["count"] == 1 and rec["test"]["count"] == 0 and bad in rec["train"]["items"][0]["error"]
    for t in range(2):    # what is left reads
        for item in sc.train_set(t):
            assert item["image"].shape[0] == 3
    # without the option, the scenario keeps the item and reading it fails, naming the file
    plain = Scenario.from_name("imagenet_r", root=str(root), num_tasks=2)
    assert plain.skipped is None and "skipped_samples" not in plain.record()
    task = next(t for t in range(2) if i in plain.train_set(t).indices)
    pos = int(np.nonzero(plain.train_set(task).indices == i)[0][0])
    with pytest.raises(ImageReadError, match=bad):
        plain.train_set(task)[pos]


def test_skip_bad_samples_refuses_to_empty_a_task(tmp_path):
    make_class_folders(str(tmp_path / "imagenet-r"), IMAGENET_R_WNIDS[:2], per_class=2)
    for f in (tmp_path / "imagenet-r" / IMAGENET_R_WNIDS[1]).iterdir():
        truncate(f)
    with pytest.raises(ValueError, match=r"every train image of task\(s\) \[\d\] is unreadable"):
        Scenario.from_name("imagenet_r", root=str(tmp_path), num_tasks=2, skip_bad_samples=True,
                           shuffle_classes=False)


def test_find_unreadable_threads_agree_with_one(folders):
    root, bad = folders
    ds = create_dataset("imagenet_r", "train", root=str(root))
    big = torch.utils.data.ConcatDataset([ds] * 5)   # over the threaded path's 64-item threshold
    one, many = find_unreadable(big, workers=1), find_unreadable(big, workers=3)
    assert one == many and len(one) == 5 and all(bad in msg for _, msg in one)
