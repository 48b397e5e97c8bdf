"""Scenario: class orders, label remapping, task splits of every kind, subsets, collation, record."""

import json
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from clfast.data import Scenario, create_dataset
from clfast.data.scenario import TaskDataset


@pytest.fixture(scope="module")
def shapes():
    return (create_dataset("synth-shapes", "train", n_per_class=2),
            create_dataset("synth-shapes", "test", n_per_class=1))


@pytest.fixture(scope="module")
def vqa():
    return (create_dataset("synth-vqa", "train", n_per_task=8),
            create_dataset("synth-vqa", "test", n_per_task=4))


def _write_jpeg(path, seed):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def domainnet_root(tmp_path_factory):
    """A fake DomainNet: 3 domains × 4 classes × (2 train + 1 test) images."""
    root = tmp_path_factory.mktemp("data")
    base = root / "domainnet"
    k = 0
    for d in ("clipart", "real", "sketch"):
        lists = {"train": [], "test": []}
        for c, name in enumerate(("apple", "bee", "cat", "dog")):
            for i in range(3):
                k += 1
                rel = f"{d}/{name}/{d}_{c}_{i}.jpg"
                _write_jpeg(str(base / rel), k)
                lists["train" if i < 2 else "test"].append(f"{rel} {c}")
        for s, lines in lists.items():
            (base / f"{d}_{s}.txt").write_text("\n".join(lines) + "\n")
    return str(root)


# --------------------------------------------------------------------------------------------------
# Class order and label remapping


def test_class_order_seeded(shapes):
    a = Scenario(*shapes, 10)
    b = Scenario(*shapes, 10, class_order_seed=1993)
    c = Scenario(*shapes, 10, class_order_seed=0)
    assert a.class_order == b.class_order and a.class_order != c.class_order
    assert sorted(a.class_order) == list(range(100)) and a.class_order_seed == 1993
    # The order of np.random.seed(1993); np.random.permutation(100) (LAMDA-PILOT and derived codes).
    assert a.class_order == np.random.RandomState(1993).permutation(100).tolist()
    assert a.class_order[:5] == [68, 56, 78, 8, 23]
    natural = Scenario(*shapes, 10, shuffle_classes=False)
    assert natural.class_order == list(range(100)) and natural.class_order_seed is None
    explicit = Scenario(*shapes, 10, class_order=list(range(99, -1, -1)))
    assert explicit.task_classes(0) == list(range(99, 89, -1))


def test_labels_remapped_to_contiguous_ranges(shapes):
    sc = Scenario(*shapes, 5)
    train, _ = shapes
    assert sc.num_classes == 100 and len(sc) == 5
    assert sc.task_ranges == ((0, 20), (20, 40), (40, 60), (60, 80), (80, 100))
    assert [sc.seen_classes(t) for t in range(5)] == [20, 40, 60, 80, 100]
    assert sc.class_names == [train.classes[c] for c in sc.class_order]
    seen = []
    for t in range(5):
        start, stop = sc.class_range(t)
        ts = sc.train_set(t)
        assert len(ts) == 40 and set(ts.targets) == set(range(start, stop))
        assert set(ts.task_ids) == {t}
        orig = [train.targets[j] for j in ts.indices]
        assert set(orig) == set(sc.task_classes(t))
        # remapped label = position of the original class in the class order
        assert all(sc.class_order[y] == o for y, o in zip(ts.targets, orig))
        assert sc.remap(orig).tolist() == ts.targets
        seen += list(ts.indices)
    assert sorted(seen) == list(range(len(train)))


def test_items_and_collation(shapes):
    sc = Scenario(*shapes, 10)
    ts = sc.test_set(3)
    item = ts[0]
    assert set(item) == {"image", "label", "task", "index"}
    assert item["image"].shape == (3, 32, 32) and item["label"].dtype == torch.int64
    j = int(item["index"])
    img, y = shapes[1][j]
    assert torch.equal(item["image"], img) and int(item["label"]) == int(sc.remap([y])[0])
    batch = next(iter(DataLoader(ts, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32)
    for k in ("label", "task", "index"):
        assert batch[k].shape == (4,) and batch[k].dtype == torch.int64
    assert (batch["task"] == 3).all()
    lo, hi = sc.class_range(3)
    assert ((batch["label"] >= lo) & (batch["label"] < hi)).all()


def test_test_set_upto(shapes):
    sc = Scenario(*shapes, 4)
    upto = sc.test_set_upto(2)
    assert len(upto) == sum(len(sc.test_set(t)) for t in range(3)) == 75
    assert set(upto.task_ids) == {0, 1, 2} and max(upto.targets) < sc.seen_classes(2)
    for y, t in zip(upto.targets, upto.task_ids):
        lo, hi = sc.class_range(t)
        assert lo <= y < hi
    assert isinstance(upto, TaskDataset)


def test_first_task_classes(shapes):
    sc = Scenario(*shapes, 6, first_task_classes=50)
    assert sc.task_ranges == ((0, 50), (50, 60), (60, 70), (70, 80), (80, 90), (90, 100))
    assert len(sc.task_classes(0)) == 50 and len(sc.train_set(0)) == 100
    assert sc.task_sizes("train") == [100] + [20] * 5
    with pytest.raises(ValueError, match=r"first_task_classes=40 .*\(100 - 40\) % 7 = 4"):
        Scenario(*shapes, 8, first_task_classes=40)


def test_validation_errors(shapes):
    with pytest.raises(ValueError, match=r"num_tasks=7 must divide the 100 classes.*100 % 7 = 2"):
        Scenario(*shapes, 7)
    with pytest.raises(ValueError, match="num_tasks must be a positive int"):
        Scenario(*shapes, 0)
    with pytest.raises(ValueError, match="kind must be one of"):
        Scenario(*shapes, 10, kind="online")
    with pytest.raises(ValueError, match=r"class_order must be a permutation of range\(100\)"):
        Scenario(*shapes, 10, class_order=[0, 1, 2])
    with pytest.raises(ValueError, match="domains is only used by kind='domain-incremental'"):
        Scenario(*shapes, 10, domains=["real"])
    with pytest.raises(ValueError, match=r"task must be an int in \[0, 10\)"):
        Scenario(*shapes, 10).train_set(10)
    with pytest.raises(ValueError, match="test.classes must equal train.classes"):
        Scenario(shapes[0], create_dataset("digits", "test"), 10)
    with pytest.raises(ValueError, match="kind='vqa'"):
        Scenario(*shapes, 10, kind="vqa")


def test_task_incremental(shapes):
    ci = Scenario(*shapes, 10)
    ti = Scenario(*shapes, 10, kind="task-incremental")
    assert ti.kind == "task-incremental" and ti.task_ranges == ci.task_ranges
    assert ti.class_order == ci.class_order
    assert ti.train_set(4).indices.tolist() == ci.train_set(4).indices.tolist()
    assert ti.record()["kind"] == "task-incremental"


def test_from_name_defaults():
    sc = Scenario.from_name("digits", class_order_seed=5)
    assert sc.num_tasks == 5 and sc.num_classes == 10 and sc.class_order_seed == 5
    assert sum(sc.task_sizes("train")) == len(sc.train_dataset) == 1442
    sc2 = Scenario.from_name("synth-shapes", num_tasks=20, dataset_kwargs={"n_per_class": 1},
                             transform_train=lambda x: x[:, :16, :16])
    assert sc2.num_tasks == 20 and sc2.train_set(0)[0]["image"].shape == (3, 16, 16)
    assert sc2.test_set(0)[0]["image"].shape == (3, 32, 32)


# --------------------------------------------------------------------------------------------------
# Domain-incremental (fake DomainNet) and VQA


def test_domain_incremental(domainnet_root):
    dkw = {"domains": ["clipart", "real", "sketch"]}
    sc = Scenario.from_name("domainnet", root=domainnet_root, kind="domain-incremental",
                            dataset_kwargs=dkw)
    assert sc.num_tasks == 3 and sc.task_names == ["clipart", "real", "sketch"]
    assert sc.task_ranges == ((0, 4),) * 3 and sc.seen_classes(0) == 4
    assert sc.class_order == [0, 1, 2, 3] and sc.task_classes(1) == [0, 1, 2, 3]
    for t, d in enumerate(sc.domains):
        ts = sc.train_set(t)
        assert len(ts) == 8 and set(ts.targets) == {0, 1, 2, 3}
        assert all(f"/{d}/" in sc.train_dataset.files[j] for j in ts.indices)
    assert len(sc.test_set_upto(1)) == 8 and set(sc.test_set_upto(1).task_ids) == {0, 1}
    batch = next(iter(DataLoader(sc.test_set(2), batch_size=4)))
    assert batch["image"].shape == (4, 3, 8, 8) and (batch["task"] == 2).all()
    # A subset of the domains, in another order.
    sub = Scenario.from_name("domainnet", root=domainnet_root, kind="domain-incremental",
                             dataset_kwargs=dkw, domains=["sketch", "clipart"])
    assert sub.num_tasks == 2 and sub.task_sizes("test") == [4, 4]
    assert all("/sketch/" in sub.test_dataset.files[j] for j in sub.test_set(0).indices)
    with pytest.raises(ValueError, match="num_tasks must equal the number of domains"):
        Scenario.from_name("domainnet", root=domainnet_root, num_tasks=2, kind="domain-incremental",
                           dataset_kwargs=dkw)
    with pytest.raises(ValueError, match="domains must name domains of the dataset"):
        Scenario(sc.train_dataset, sc.test_dataset, None, kind="domain-incremental", domains=["quickdraw"])
    # Class-incremental over the same data also works (the registry default for DomainNet).
    ci = Scenario.from_name("domainnet", root=domainnet_root, num_tasks=2, dataset_kwargs=dkw)
    assert ci.task_ranges == ((0, 2), (2, 4)) and len(ci.train_set(0)) == 12


def test_domain_incremental_needs_domains(shapes):
    with pytest.raises(ValueError, match="'domains'.*lacks 'domains' and 'domain_names'"):
        Scenario(*shapes, None, kind="domain-incremental")


class _Tokenizer:
    """A stand-in for open_clip's tokenizer interface: list[str] -> (N, L) int64."""

    def __init__(self, length=12):
        self.length, self.vocab = length, {}

    def __call__(self, texts):
        out = torch.zeros(len(texts), self.length, dtype=torch.long)
        for r, t in enumerate(texts):
            ids = [self.vocab.setdefault(w, len(self.vocab) + 1) for w in t.split()][: self.length]
            out[r, : len(ids)] = torch.tensor(ids)
        return out


def test_vqa_scenario(vqa):
    train, test = vqa
    sc = Scenario(train, test, None, tokenizer=_Tokenizer())
    assert sc.kind == "vqa" and sc.num_tasks == 6 and sc.task_names == list(train.task_names)
    assert sc.num_classes == len(train.classes) and sc.class_names == list(train.classes)
    assert sc.task_ranges == ((0, sc.num_classes),) * 6
    assert sc.task_sizes("train") == [8] * 6 and sc.task_sizes("test") == [4] * 6
    ts = sc.train_set(2)
    assert all(train.task_ids[j] == 2 for j in ts.indices)
    item = ts[0]
    j = int(item["index"])
    assert set(item) == {"image", "label", "task", "index", "question", "answer_scores"}
    assert int(item["label"]) == train.targets[j] and train.classes[int(item["label"])] == train.answers[j]
    assert item["question"].dtype == torch.int64 and item["question"].shape == (12,)
    assert item["answer_scores"].shape == (sc.num_classes,) and item["answer_scores"].sum() == 1
    assert item["answer_scores"][item["label"]] == 1
    batch = next(iter(DataLoader(sc.test_set_upto(5), batch_size=5, shuffle=True)))
    assert batch["image"].shape == (5, 3, 64, 64) and batch["question"].shape == (5, 12)
    assert batch["answer_scores"].shape == (5, sc.num_classes) and batch["task"].dtype == torch.int64
    assert len(sc.test_set_upto(5)) == len(test)
    # Without a tokenizer the question stays a str (the default collate makes a list of str).
    raw = Scenario.from_name("synth-vqa", dataset_kwargs={"n_per_task": 2})
    assert raw.kind == "vqa" and isinstance(raw.test_set(0)[0]["question"], str)
    with pytest.raises(ValueError, match="num_tasks must equal the dataset's number of task groups"):
        Scenario(train, test, 3)
    with pytest.raises(ValueError, match="kind='vqa'"):
        Scenario(train, test, 6, kind="class-incremental")
    json.dumps(sc.record())


# --------------------------------------------------------------------------------------------------
# Record


def test_record_json(shapes):
    sc = Scenario(*shapes, 5, first_task_classes=np.int64(20))
    rec = json.loads(json.dumps(sc.record()))
    assert rec["datasets"] == {"train": "synth-shapes", "test": "synth-shapes"}
    assert rec["kind"] == "class-incremental" and rec["num_tasks"] == 5
    assert rec["class_order"] == sc.class_order and rec["class_order_seed"] == 1993
    assert rec["task_sizes"] == {"train": [40] * 5, "test": [20] * 5}
    assert rec["first_task_classes"] == 20 and "manifests" not in rec


def test_record_includes_manifest(tmp_path):
    from PIL import Image
    for c in ("n00000001", "n00000002"):
        for i in range(5):
            p = tmp_path / "imagenet-r" / c / f"{i}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((6, 6, 3), 10 * i, np.uint8)).save(p)
    sc = Scenario.from_name("imagenet_r", root=str(tmp_path), num_tasks=2, shuffle_classes=False)
    rec = json.loads(json.dumps(sc.record()))
    info = rec["manifests"]["train"]
    assert info == rec["manifests"]["test"] and info["seed"] == 1993
    assert (info["n_train"], info["n_test"]) == (8, 2) and len(info["sha256"]) == 64
    assert rec["task_sizes"] == {"train": [4, 4], "test": [1, 1]}


def test_dataset_sequence_keeps_parts_apart():
    from clfast.data.registry import dataset_info
    from clfast.data.sequence import DatasetSequence

    kw = {"synth-shapes": {"n_per_class": 3}}          # a part's own arguments
    sc = Scenario.from_name("digits+synth-shapes", dataset_kwargs=kw, num_tasks=4)
    train = sc.train_dataset
    assert isinstance(train, DatasetSequence) and train.class_blocks == [10, 100]
    digits, shapes = create_dataset("digits", "train"), create_dataset("synth-shapes", "train", n_per_class=3)
    assert len(train) == len(digits) + len(shapes) == len(train.targets)
    img, y = train[len(digits) + 5]                      # an item of the second part: label offset by 10
    ref_img, ref_y = shapes[5]
    assert y == ref_y + 10 and torch.equal(img, ref_img)
    assert train.classes[10 + ref_y] == f"synth-shapes:{shapes.classes[ref_y]}"
    # each part permuted on its own with the class-order seed, two tasks per part
    perm = lambda n: list(np.random.RandomState(1993).permutation(n))   # noqa: E731
    assert sc.class_order == perm(10) + [10 + int(c) for c in perm(100)]
    assert sc.task_ranges == ((0, 5), (5, 10), (10, 60), (60, 110))
    assert sc.task_names == ["digits 1/2", "digits 2/2", "synth-shapes 1/2", "synth-shapes 2/2"]
    part_of_task = [{int(i >= len(digits)) for i in sc.train_set(t).indices} for t in range(4)]
    assert part_of_task == [{0}, {0}, {1}, {1}]
    assert dataset_info("digits+synth-shapes").default_tasks == 2
    with pytest.raises(ValueError, match="multiple of the 2 datasets"):
        Scenario.from_name("digits+synth-shapes", dataset_kwargs=kw, num_tasks=3)
    with pytest.raises(ValueError, match="classification datasets only"):
        dataset_info("digits+synth-vqa")
    with pytest.raises(ValueError, match="did you mean 'synth-shapes'"):
        dataset_info("digits+synth-shapez")
    with pytest.raises(ValueError, match="cannot repeat"):
        DatasetSequence([digits, digits], ["digits", "digits"])


def test_joint_view_is_one_task_evaluated_per_task(shapes):
    from clfast.data import JointScenario

    sc = Scenario(*shapes, num_tasks=5)
    j = sc.joint_view()
    assert isinstance(j, JointScenario) and j.joint and not sc.joint and j.joint_view() is j
    assert j.num_tasks == 1 and j.class_range(0) == (0, 100) and j.task_ranges == ((0, 100),)
    train = j.train_set(0)
    assert len(train) == len(shapes[0]) and set(train.targets) == set(range(100)) and set(train.task_ids) == {0}
    assert j.eval_tasks(0) == [0, 1, 2, 3, 4] and sc.eval_tasks(2) == [0, 1, 2]
    for i in j.eval_tasks(0):   # each task's own test split, as task 0, its classes for a task-IL mask
        test = j.test_set(i)
        assert test.targets == sc.test_set(i).targets and set(test.task_ids) == {0}
        assert j.eval_class_range(i) == sc.class_range(i) == sc.eval_class_range(i)
    assert j.task_sizes("train") == [len(shapes[0])]
    rec = j.record()
    assert rec["joint"] and rec["num_tasks"] == 5 and rec["class_order"] == sc.record()["class_order"]
    with pytest.raises(ValueError, match="task must be 0"):
        j.train_set(1)
    with pytest.raises(ValueError, match="scenario must be a Scenario"):
        JointScenario(j)
