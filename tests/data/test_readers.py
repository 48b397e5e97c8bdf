"""Readers of data on disk (on tiny fake copies of each layout), split manifests, transforms,
describe_datasets."""

import hashlib
import os
import pickle

import numpy as np
import pytest
import torch

from clfast.data import build_transforms, create_dataset, describe_datasets, list_datasets

# --------------------------------------------------------------------------------------------------
# Fake layouts


def write_image(path, seed, size=(10, 12), fmt=None):
    """A small random RGB image (H, W) = size; JPEG unless the name says otherwise."""
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt, quality=95)
    return arr


def make_cifar100(root, n_classes=5, n_train=20, n_test=10):
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        d = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             "fine_labels": [i % n_classes for i in range(n)], "coarse_labels": [0] * n}
        with open(os.path.join(folder, split), "wb") as f:
            pickle.dump(d, f, protocol=2)
        out[split] = d
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(n_classes)],
                     "coarse_label_names": ["all"]}, f, protocol=2)
    return out


def make_class_folders(base, classes, per_class, seed=0, size=(10, 12)):
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(os.path.join(base, name, f"img_{i:03d}.jpg"), seed + 100 * c + i, size)


def make_cub(root, n_classes=3, per_class=3):
    base = os.path.join(root, "CUB_200_2011")
    classes = [f"{c + 1:03d}.Bird_number_{c}" for c in range(n_classes)]
    images, labels, split = [], [], []
    k = 0
    for c, cname in enumerate(classes):
        for i in range(per_class):
            k += 1
            rel = f"{cname}/Bird_{c}_{i}.jpg"
            write_image(os.path.join(base, "images", rel), k)
            images.append(f"{k} {rel}")
            labels.append(f"{k} {c + 1}")
            split.append(f"{k} {1 if i < per_class - 1 else 0}")
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split),
                        ("classes.txt", [f"{c + 1} {n}" for c, n in enumerate(classes)])):
        with open(os.path.join(base, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return classes


def make_domainnet(root, domains=("clipart", "real", "sketch"), classes=("apple", "tea_cup", "zebra"),
                   train_per_class=2, test_per_class=1):
    base = os.path.join(root, "domainnet")
    k = 0
    for d in domains:
        lines = {"train": [], "test": []}
        for c, name in enumerate(classes):
            for i in range(train_per_class + test_per_class):
                k += 1
                rel = f"{d}/{name}/{d}_{c:03d}_{i:06d}.jpg"
                write_image(os.path.join(base, rel), k, size=(8, 8))
                lines["train" if i < train_per_class else "test"].append(f"{rel} {c}")
        for s, ls in lines.items():
            with open(os.path.join(base, f"{d}_{s}.txt"), "w") as f:
                f.write("\n".join(ls) + "\n")


IMAGENET_R_WNIDS = ("n01443537", "n01484850", "n01494475", "n01498041")


@pytest.fixture
def imagenet_r_root(tmp_path):
    make_class_folders(str(tmp_path / "imagenet-r"), IMAGENET_R_WNIDS, per_class=5)
    with open(tmp_path / "imagenet-r" / "README.txt", "w") as f:
        f.write("Some text\n" + "".join(f"{w} name {i}\n" for i, w in enumerate(IMAGENET_R_WNIDS)))
    return str(tmp_path)


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# --------------------------------------------------------------------------------------------------
# CIFAR-100


def test_cifar100_reads_pickles(tmp_path):
    src = make_cifar100(str(tmp_path))
    tr = create_dataset("cifar100", "train", root=str(tmp_path))
    te = create_dataset("cifar100", "test", root=str(tmp_path), transform=lambda x: x * 2)
    assert (tr.name, len(tr), len(te)) == ("cifar100", 20, 10)
    assert tr.classes == [f"class{i}" for i in range(5)]
    assert tr.targets == src["train"]["fine_labels"]
    img, y = tr[3]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and y == 3
    want = torch.from_numpy(src["train"]["data"][3].reshape(3, 32, 32)).float() / 255
    assert torch.equal(img, want)
    want = torch.from_numpy(src["test"]["data"][1].reshape(3, 32, 32)).float() / 255
    assert torch.equal(te[1][0], want * 2)
    assert tr.data.shape == (20, 32, 32, 3) and tr.data.dtype == np.uint8


def test_cifar100_missing_shows_layout_and_source(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        create_dataset("cifar100", "train", root=str(tmp_path))
    msg = str(e.value)
    assert "cifar-100-python/train" in msg and "Expected layout" in msg and "fine_label_names" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in msg
    with pytest.raises(ValueError, match="root=<folder>"):
        create_dataset("cifar100", "train")


def test_cifar100_refuses_pickles_with_code(tmp_path):
    make_cifar100(str(tmp_path))

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    with open(tmp_path / "cifar-100-python" / "train", "wb") as f:
        pickle.dump({"data": Evil()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="posix.getcwd|getcwd"):
        create_dataset("cifar100", "train", root=str(tmp_path))


# --------------------------------------------------------------------------------------------------
# ImageNet-R and the split manifest


def test_imagenet_r_split_from_manifest(imagenet_r_root):
    tr = create_dataset("imagenet_r", "train", root=imagenet_r_root)
    te = create_dataset("imagenet_r", "test", root=imagenet_r_root)
    manifest = os.path.join(imagenet_r_root, "imagenet-r", "clfast_split_seed1993.csv")
    assert os.path.isfile(manifest)
    assert (len(tr), len(te)) == (16, 4)                       # 5 per class -> 4 train, 1 test
    assert np.bincount(tr.targets).tolist() == [4, 4, 4, 4]
    assert np.bincount(te.targets).tolist() == [1, 1, 1, 1]
    assert not set(tr.files) & set(te.files)
    assert tr.classes == [f"name {i}" for i in range(4)]      # from README.txt
    assert tr.class_dirs == list(IMAGENET_R_WNIDS)
    for f, y in zip(tr.files + te.files, tr.targets + te.targets):
        assert os.path.basename(os.path.dirname(f)) == IMAGENET_R_WNIDS[y]
    img, y = tr[0]
    assert img.shape == (3, 10, 12) and 0 <= img.min() and img.max() <= 1     # native size
    info = tr.manifest_info()
    assert info == te.manifest_info()
    assert info["sha256"] == _sha(manifest) and info["seed"] == 1993
    assert (info["n_train"], info["n_test"]) == (16, 4)
    with open(manifest) as f:
        lines = f.read().splitlines()
    assert lines[1] == "path,label,split,sha256,size" and len(lines) == 22
    rel, label, split, sha, size = lines[2].split(",")
    assert sha == _sha(os.path.join(imagenet_r_root, "imagenet-r", rel))
    assert int(size) == os.path.getsize(os.path.join(imagenet_r_root, "imagenet-r", rel))


def test_manifest_generated_once_then_reused(imagenet_r_root):
    create_dataset("imagenet_r", "train", root=imagenet_r_root)
    path = os.path.join(imagenet_r_root, "imagenet-r", "clfast_split_seed1993.csv")
    st, data = os.stat(path), open(path, "rb").read()
    # A new image appears: the existing split is kept, not regenerated.
    write_image(os.path.join(imagenet_r_root, "imagenet-r", IMAGENET_R_WNIDS[0], "new.jpg"), 999)
    ds = create_dataset("imagenet_r", "train", root=imagenet_r_root)
    st2 = os.stat(path)
    assert (st2.st_ino, st2.st_mtime_ns, st2.st_size) == (st.st_ino, st.st_mtime_ns, st.st_size)
    assert open(path, "rb").read() == data
    assert not any(f.endswith("new.jpg") for f in ds.files)
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".tmp")]


def test_manifest_seed_and_path(imagenet_r_root, tmp_path):
    a = create_dataset("imagenet_r", "train", root=imagenet_r_root)
    b = create_dataset("imagenet_r", "train", root=imagenet_r_root, seed=7)
    assert b.manifest_info()["path"].endswith("clfast_split_seed7.csv")
    assert a.files != b.files and len(a) == len(b)
    run = str(tmp_path / "run" / "split.csv")
    c = create_dataset("imagenet_r", "test", root=imagenet_r_root, seed=7, manifest_path=run)
    assert os.path.isfile(run) and c.manifest_info()["path"] == os.path.abspath(run)
    assert c.manifest_info()["sha256"] == b.manifest_info()["sha256"]      # same bytes
    # An existing manifest made with another seed is refused when a seed is requested ...
    with pytest.raises(ValueError, match="seed=7.*seed=3"):
        create_dataset("imagenet_r", "test", root=imagenet_r_root, seed=3, manifest_path=run)
    # ... and accepted as it is when none is.
    assert create_dataset("imagenet_r", "test", root=imagenet_r_root, manifest_path=run).files == c.files


def test_manifest_validation(imagenet_r_root):
    tr = create_dataset("imagenet_r", "train", root=imagenet_r_root)
    create_dataset("imagenet_r", "train", root=imagenet_r_root, verify=True)
    # A changed file fails verify=True.
    write_image(tr.files[0], 12345)
    with pytest.raises(ValueError, match="differ from their recorded sha256"):
        create_dataset("imagenet_r", "train", root=imagenet_r_root, verify=True)
    # A missing file is named.
    os.remove(tr.files[1])
    rel = os.path.relpath(tr.files[1], os.path.join(imagenet_r_root, "imagenet-r")).replace(os.sep, "/")
    with pytest.raises(FileNotFoundError, match=rel):
        create_dataset("imagenet_r", "test", root=imagenet_r_root)


def test_manifest_malformed(imagenet_r_root, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\nx.jpg,0\n")
    with pytest.raises(ValueError, match="header must be path,label,split,sha256"):
        create_dataset("imagenet_r", "train", root=imagenet_r_root, manifest_path=str(bad))
    bad.write_text("path,label,split,sha256\nn01443537/img_000.jpg,0,val," + "0" * 64 + "\n")
    with pytest.raises(ValueError, match="row 2"):
        create_dataset("imagenet_r", "train", root=imagenet_r_root, manifest_path=str(bad))


def test_imagenet_r_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        create_dataset("imagenet_r", "train", root=str(tmp_path))
    assert "imagenet-r/" in str(e.value) and "n01443537/*.jpg" in str(e.value)
    assert "imagenet-r.tar" in str(e.value)
    assert not os.listdir(tmp_path)                   # nothing written


# --------------------------------------------------------------------------------------------------
# EuroSAT, CUB-200, DomainNet


def test_eurosat_manifest_split(tmp_path):
    names = ["AnnualCrop", "Forest", "River"]
    make_class_folders(str(tmp_path / "EuroSAT_RGB"), names, per_class=10, size=(16, 16))
    tr = create_dataset("eurosat", "train", root=str(tmp_path))
    te = create_dataset("eurosat", "test", root=str(tmp_path))
    assert tr.classes == names and (len(tr), len(te)) == (24, 6)
    assert os.path.isfile(tmp_path / "EuroSAT_RGB" / "clfast_split_seed1993.csv")
    assert tr[0][0].shape == (3, 16, 16)
    with pytest.raises(FileNotFoundError, match="EuroSAT_RGB"):
        create_dataset("eurosat", "train", root=str(tmp_path / "nothing"))


def test_cub200_official_split(tmp_path):
    classes = make_cub(str(tmp_path))
    tr = create_dataset("cub200", "train", root=str(tmp_path))
    te = create_dataset("cub200", "test", root=str(tmp_path))
    assert (len(tr), len(te)) == (6, 3)
    assert tr.targets == [0, 0, 1, 1, 2, 2] and te.targets == [0, 1, 2]
    assert tr.classes == ["Bird number 0", "Bird number 1", "Bird number 2"]
    assert tr.class_dirs == classes
    assert all(os.path.basename(f).startswith(f"Bird_{y}_") for f, y in zip(tr.files, tr.targets))
    assert tr[1][0].shape == (3, 10, 12)
    os.remove(tmp_path / "CUB_200_2011" / "train_test_split.txt")
    with pytest.raises(FileNotFoundError, match="train_test_split.txt") as e:
        create_dataset("cub200", "train", root=str(tmp_path))
    assert "image_class_labels.txt" in str(e.value) and "data.caltech.edu" in str(e.value)


def test_domainnet_lists_and_domains(tmp_path):
    make_domainnet(str(tmp_path))
    ds = create_dataset("domainnet", "train", root=str(tmp_path), domains=["clipart", "real", "sketch"])
    te = create_dataset("domainnet", "test", root=str(tmp_path), domains=["real", "sketch"])
    assert ds.classes == ["apple", "tea cup", "zebra"] and ds.class_dirs == ["apple", "tea_cup", "zebra"]
    assert len(ds) == 18 and len(te) == 6
    assert ds.domain_names == ["clipart", "real", "sketch"] and te.domain_names == ["real", "sketch"]
    assert ds.domains.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    for f, d in zip(ds.files, ds.domains):
        assert f"/domainnet/{ds.domain_names[d]}/" in f
    assert ds[0][0].shape == (3, 8, 8)
    single = create_dataset("domainnet", "test", root=str(tmp_path), domains="real")
    assert single.domain_names == ["real"] and len(single) == 3
    with pytest.raises(ValueError, match="domains must be distinct names from"):
        create_dataset("domainnet", "train", root=str(tmp_path), domains=["photos"])
    with pytest.raises(FileNotFoundError, match="domainnet/infograph_train.txt"):
        create_dataset("domainnet", "train", root=str(tmp_path))        # default: all six


# --------------------------------------------------------------------------------------------------
# describe_datasets


def test_describe_datasets(tmp_path):
    make_cifar100(str(tmp_path))
    rows = {r["name"]: r for r in describe_datasets()}
    assert set(rows) == set(list_datasets())
    assert {"cifar100", "imagenet_r", "cub200", "domainnet", "eurosat"} <= set(rows)
    for name in ("cifar100", "imagenet_r", "cub200", "domainnet", "eurosat"):
        r = rows[name]
        assert r["needs_root"] and not r["ships"] and r["found"] is None and "\n" in r["layout"]
    assert rows["synth-shapes"]["ships"] and rows["synth-shapes"]["found"] is True
    assert (rows["imagenet_r"]["num_classes"], rows["imagenet_r"]["default_tasks"]) == (200, 10)
    assert (rows["domainnet"]["num_classes"], rows["domainnet"]["default_tasks"]) == (345, 15)
    found = {r["name"]: r for r in describe_datasets(str(tmp_path))}
    assert found["cifar100"]["found"] is True and found["cifar100"]["missing"] == []
    assert found["cub200"]["found"] is False and "CUB_200_2011/images.txt" in found["cub200"]["missing"]
    assert not os.path.exists(tmp_path / "imagenet-r")


# --------------------------------------------------------------------------------------------------
# Transforms


def test_transforms():
    x = torch.rand(3, 40, 50)
    train = build_transforms(32, train=True)
    assert not train.deterministic
    y = train(x)
    assert y.shape == (3, 32, 32) and y.min() >= 0 and y.max() <= 1
    ev = build_transforms(224, train=False)
    assert ev.deterministic and ev.resize_size == 256
    z = ev(torch.rand(3, 300, 400))
    assert z.shape == (3, 224, 224) and z.min() >= 0 and z.max() <= 1
    assert torch.equal(ev(z), z)                                   # already the input size: identity
    no_aug = build_transforms(32, train=True, augment=False)
    assert no_aug.deterministic
    s = torch.rand(3, 32, 32)
    assert no_aug(s) is s
    assert torch.equal(no_aug(x), no_aug(x))
    for bad, match in (({"input_size": 0}, "input_size"), ({"crop_pct": 1.5}, "crop_pct"),
                       ({"interpolation": "lanczos"}, "interpolation")):
        kw = {"input_size": 32, "train": False, **bad}
        with pytest.raises(ValueError, match=match):
            build_transforms(**kw)
    # Picklable (DataLoader workers) and usable as a dataset transform.
    assert pickle.loads(pickle.dumps(ev))(z).shape == (3, 224, 224)
