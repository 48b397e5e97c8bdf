"""VQA data on disk (CLOVE-scene, CLOVE-function, VQAv2 on tiny fake folders), answer weights and credit
(clumo.md §3, §5, §8 items 8–10), and the no-crop VQA transform (§7)."""

import json
import os

import numpy as np
import pytest
import torch

from clfast.data import Scenario, build_transforms, create_dataset, dataset_info, describe_datasets
from clfast.data import vqa as V
from clfast.data.vqa_readers import CLOVE_FUNCTION_TASKS, CLOVE_SCENE_TASKS, clove_files



def write_image(path, seed, size):
    """A small random RGB JPEG of (H, W) = size."""
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, quality=95)

# an answer list deliberately not sorted: class ids must follow its order
ANSWERS = ["yes", "no", "red", "two", "cat", "dog", "left", "stop"]


def _record(source, image_id, question, qid, answers):
    return {"image_source": source, "image_id": image_id, "question": question, "question_id": qid,
            "answers": answers}


def make_clove(root):
    """All 12 CLVQA annotation files; task k of each benchmark has k + 1 (train) / k + 2 (test) records, over
    3 VG and 2 TextVQA images; returns {relative file: records}."""
    root = str(root)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "answer_list.json"), "w") as f:
        json.dump(ANSWERS, f)
    for k in range(3):
        write_image(os.path.join(root, "vg", "image", f"{100 + k}.jpg"), k, size=(12, 16))
    for k in range(2):
        write_image(os.path.join(root, "textvqa", f"tv{k}.jpg"), 10 + k, size=(9, 9))
    written = {}
    for benchmark in ("scene", "function"):
        for split, extra in (("train", 1), ("test", 2)):
            for task, rel in enumerate(clove_files(benchmark, split)):
                recs = []
                for j in range(task + extra):
                    src = "textvqa" if j % 3 == 2 else "vg"
                    image = f"tv{j % 2}" if src == "textvqa" else str(100 + j % 3)
                    first = ANSWERS[(task + j) % len(ANSWERS)]
                    recs.append(_record(src, image, f"Is the {benchmark}-{task}/{j} thing RED?", 1000 * task + j,
                                        [first] * 3 + ["no"] * 7))
                os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
                with open(os.path.join(root, rel), "w") as f:
                    json.dump(recs, f)
                written[rel] = recs
    return written


@pytest.fixture
def clove(tmp_path):
    return tmp_path, make_clove(tmp_path)


# --------------------------------------------------------------------------------------------------
# CLOVE


@pytest.mark.parametrize("bench", ["scene", "function"])
def test_clove_parses_all_files_in_task_order(clove, bench):
    benchmark = bench
    root, written = clove
    names = CLOVE_SCENE_TASKS if benchmark == "scene" else CLOVE_FUNCTION_TASKS
    for split in ("train", "test"):
        ds = create_dataset(f"clove-{benchmark}", split, str(root))
        files = clove_files(benchmark, split)
        assert len(files) == 6 and all(("_val.json" if split == "test" else "_train.json") in f for f in files)
        assert ds.task_names == list(names) and ds.classes == ANSWERS
        recs = [r for f in files for r in written[f]]
        assert len(ds) == len(recs)
        assert ds.task_ids == [t for t, f in enumerate(files) for _ in written[f]]
        assert ds.question_ids == [r["question_id"] for r in recs]
        # class ids follow answer_list.json's order (label = the first answer's position in it)
        assert ds.targets == [ANSWERS.index(r["answers"][0]) for r in recs]
    if benchmark == "scene":
        assert files[0].endswith("scene_a#ShopAndDining_val.json") and files[5].endswith("scene_f#Outdoors_val.json")
    else:
        assert files[0].endswith("functional_attribute_val.json") and files[5].endswith("functional_scenetext_val.json")
    assert dataset_info(f"clove-{benchmark}").kind == "vqa" and dataset_info(f"clove-{benchmark}").default_tasks == 6


def test_clove_image_paths_and_items(clove):
    from PIL import Image
    root, written = clove
    ds = create_dataset("clove-scene", "train", str(root))
    recs = [r for f in clove_files("scene", "train") for r in written[f]]
    for i, r in enumerate(recs):
        folder = ("vg", "image") if r["image_source"] == "vg" else ("textvqa",)
        assert ds.files[i] == os.path.join(str(root), *folder, f"{r['image_id']}.jpg")
    i = next(k for k, r in enumerate(recs) if r["image_source"] == "textvqa")
    item = ds[i]
    assert set(item) == {"image", "question", "answer", "label", "task"}
    want = torch.from_numpy(np.array(Image.open(ds.files[i]).convert("RGB"))).permute(2, 0, 1).float() / 255
    assert item["image"].shape == (3, 9, 9) and torch.equal(item["image"], want)
    assert item["answer"] == recs[i]["answers"][0] and item["label"] == ANSWERS.index(item["answer"])
    assert item["question"] == recs[i]["question"].lower().replace("?", "").replace("-", " ").replace("/", " ")
    tf = create_dataset("clove-scene", "test", str(root), transform=build_transforms(8, train=False, crop="none"))
    assert tf[0]["image"].shape == (3, 8, 8)


def test_answer_weights_accumulate_and_drop_out_of_vocabulary():
    vocab = {a: i for i, a in enumerate(ANSWERS)}
    answers = ["cat", "cat", "dog", "zebra", "cat", "no", "zebra", "no", "no", "no"]
    w, dropped = V.answer_weights("vg", answers, vocab)
    assert dropped == 2
    assert w == pytest.approx({vocab["cat"]: 0.3, vocab["dog"]: 0.1, vocab["no"]: 0.4})
    w_tv, _ = V.answer_weights("textvqa", answers, vocab)
    assert w_tv == pytest.approx(w)
    w_vqa, dropped = V.answer_weights("vqa", ["cat", "cat", "dog", "zebra"], vocab)
    assert dropped == 1 and w_vqa == pytest.approx({vocab["cat"]: 0.5, vocab["dog"]: 0.25})
    with pytest.raises(ValueError, match="image_source"):
        V.answer_weights("coco", answers, vocab)
    with pytest.raises(ValueError, match="answers"):
        V.answer_weights("vg", "cat", vocab)


def test_clove_soft_targets_and_dropped_counts(tmp_path):
    make_clove(tmp_path)
    rel = clove_files("scene", "train")[0]
    recs = [_record("vg", "100", "what?", 1, ["dog", "cat", "cat", "zebra", "zebra", "zebra", "no", "no", "no", "no"]),
            _record("vg", "101", "what?", 2, ["zebra"] * 10),              # nothing in the vocabulary
            _record("textvqa", "tv0", "what?", 3, ["stop"] * 10)]
    with open(tmp_path / rel, "w") as f:
        json.dump(recs, f)
    ds = create_dataset("clove-scene", "train", str(tmp_path))
    assert ds.stats["answers_dropped"] == 13 and ds.stats["records_without_answer"] == 1
    assert "answers_dropped=13" in repr(ds)
    assert ds.question_ids[:2] == [1, 3]                       # a training record with no target is left out
    want = np.zeros(len(ANSWERS), dtype=np.float32)
    want[[ANSWERS.index("dog"), ANSWERS.index("cat"), ANSWERS.index("no")]] = [0.1, 0.2, 0.4]
    np.testing.assert_allclose(ds.answer_scores(0), want, atol=1e-7)
    np.testing.assert_allclose(ds.answer_scores(1), np.eye(len(ANSWERS), dtype=np.float32)[ANSWERS.index("stop")],
                               atol=1e-6)
    assert ds.targets[0] == ANSWERS.index("dog")               # the first answer, not the heaviest


def _score(batch, logits):
    from clfast.methods.base import Method
    return Method.score(None, batch, logits, None)            # the engine's default credit


def test_first_answer_exact_match_and_vqa_score_through_the_scenario(tmp_path):
    make_clove(tmp_path)
    rel = clove_files("function", "test")[2]
    recs = [_record("vg", "100", "q", 1, ["dog", "cat", "cat", "cat", "cat", "no", "no", "no", "no", "no"]),
            _record("vg", "101", "q", 2, ["zebra", "cat", "cat", "cat", "dog", "dog", "no", "no", "no", "no"]),
            _record("vg", "102", "q", 3, ["cat", "dog", "dog", "no", "no", "no", "no", "no", "no", "no"])]
    with open(tmp_path / rel, "w") as f:
        json.dump(recs, f)
    preds = ["cat", "cat", "dog"]       # the most frequent answer of record 0 is not its first answer
    want = {False: [0.0, 0.0, 0.0], True: [1.0, 1.0, 2 / 3]}
    for vqa_score in (False, True):
        test = create_dataset("clove-function", "test", str(tmp_path), vqa_score=vqa_score)
        assert test.stats["records_without_answer"] == 0        # record 1 keeps in-vocabulary answers
        train = create_dataset("clove-function", "train", str(tmp_path), vqa_score=vqa_score)
        sc = Scenario(train, test, None)
        assert sc.kind == "vqa" and sc.num_tasks == 6
        part = sc.test_set(2)
        assert len(part) == 3
        batch = torch.utils.data.default_collate([part[i] for i in range(3)])
        assert batch["answer_credit"].shape == (3, len(ANSWERS))
        logits = torch.nn.functional.one_hot(torch.tensor([ANSWERS.index(p) for p in preds]), len(ANSWERS)).float()
        got = _score(batch, logits)
        ref = [(V.vqa_accuracy if vqa_score else V.exact_match)(p, r["answers"]) for p, r in zip(preds, recs)]
        assert got.tolist() == pytest.approx(want[vqa_score]) and ref == pytest.approx(want[vqa_score])
        # predicting the first answer is always right under exact match (record 1's is out of the vocabulary)
        first = torch.nn.functional.one_hot(torch.tensor([ANSWERS.index("dog"), 0, ANSWERS.index("cat")]),
                                            len(ANSWERS)).float()
        if not vqa_score:
            assert _score(batch, first).tolist() == [1.0, 0.0, 1.0]
        # the training target is still §3's weights, not the credit
        np.testing.assert_allclose(batch["answer_scores"][0][ANSWERS.index("cat")], 0.4, atol=1e-6)


def test_vqa_score_and_exact_match_on_hand_made_lists():
    assert V.exact_match("cat", ["cat", "dog"]) == 1.0 and V.exact_match("dog", ["cat", "dog", "dog"]) == 0.0
    assert V.exact_match("cat", []) == 0.0
    assert V.vqa_accuracy("dog", ["cat", "dog"]) == pytest.approx(1 / 3)
    assert V.vqa_accuracy("dog", ["dog", "x", "dog"]) == pytest.approx(2 / 3)
    assert V.vqa_accuracy("dog", ["dog"] * 3) == 1.0 and V.vqa_accuracy("dog", ["dog"] * 9) == 1.0
    assert V.vqa_accuracy("emu", ["dog"] * 9) == 0.0
    vocab = {"cat": 0, "dog": 1}
    assert V.vqa_scores(["dog", "cat", "dog", "emu", "dog", "dog"], vocab) == pytest.approx({0: 1 / 3, 1: 1.0})
    assert V.first_answer_credit(["emu", "cat"], vocab) == {} and V.first_answer_credit(["cat", "dog"], vocab) == {0: 1.0}


def test_questions_are_normalised_and_truncated(tmp_path):
    assert V.normalize_question("What's the Man's T-shirt/hat colour?!  ", 30) == "whats the mans t shirt hat colour"
    long = " ".join(f"w{k}" for k in range(60))
    assert V.normalize_question(long, 30) == " ".join(f"w{k}" for k in range(30))
    make_clove(tmp_path)
    for split, n in (("train", 30), ("test", 50)):
        rel = clove_files("scene", split)[0]
        with open(tmp_path / rel, "w") as f:
            json.dump([_record("vg", "100", long + "?", 1, ["yes"] * 10)], f)
        ds = create_dataset("clove-scene", split, str(tmp_path))
        assert ds.questions[0] == " ".join(f"w{k}" for k in range(n))
    assert create_dataset("clove-scene", "test", str(tmp_path), max_words=5).questions[0] == "w0 w1 w2 w3 w4"
    with pytest.raises(ValueError, match="max_words"):
        V.normalize_question("a", 0)


def test_clove_missing_data_names_the_layout_and_source(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        create_dataset("clove-scene", "train", str(tmp_path))
    msg = str(e.value)
    assert "answer_list.json" in msg and "scene_a#ShopAndDining_train.json" in msg and "CLVQA" in msg
    assert "vg/image/<image_id>.jpg" in msg
    make_clove(tmp_path)
    os.remove(tmp_path / clove_files("function", "test")[3])
    create_dataset("clove-function", "train", str(tmp_path))                 # the train files are all there
    with pytest.raises(FileNotFoundError, match="functional_object_val.json"):
        create_dataset("clove-function", "test", str(tmp_path))
    os.remove(tmp_path / "vg" / "image" / "101.jpg")
    with pytest.raises(FileNotFoundError, match="101.jpg"):
        create_dataset("clove-scene", "train", str(tmp_path))
    found = {r["name"]: r for r in describe_datasets(str(tmp_path))}
    assert found["clove-scene"]["found"] is True
    assert found["clove-function"]["missing"] == [clove_files("function", "test")[3]]
    assert found["vqav2"]["found"] is False


def test_clove_malformed_records_name_the_file(tmp_path):
    make_clove(tmp_path)
    rel = clove_files("scene", "train")[1]
    for rec, match in ((_record("vqa", "1", "q", 1, ["yes"]), "image_source"),
                       ({"image_source": "vg", "image_id": "100", "question": "q"}, "question_id"),
                       (_record("vg", "100", "q", 1, "yes"), "answers")):
        with open(tmp_path / rel, "w") as f:
            json.dump([rec], f)
        with pytest.raises(ValueError, match=match) as e:
            create_dataset("clove-scene", "train", str(tmp_path))
        assert "Workplace_train.json" in str(e.value)
    with pytest.raises(ValueError, match="vqa_score"):
        create_dataset("clove-scene", "train", str(tmp_path), vqa_score="yes")


# --------------------------------------------------------------------------------------------------
# VQAv2


def make_vqav2(root):
    base = os.path.join(str(root), "vqav2")
    os.makedirs(base)
    data = {}
    for part, ids in (("train2014", [9, 25, 30]), ("val2014", [42])):
        qs, anns = [], []
        for k, image_id in enumerate(ids * 2):
            qid = image_id * 10 + k
            write_image(os.path.join(base, part, f"COCO_{part}_{image_id:012d}.jpg"), image_id, size=(8, 10))
            answers = (["Yes"] * 4 + ["no"] * 6) if k % 2 == 0 else (["2"] * 2 + ["two"] * 5 + ["3"] * 3)
            qs.append({"image_id": image_id, "question": f"Is this picture {k}?", "question_id": qid})
            anns.append({"image_id": image_id, "question_id": qid, "multiple_choice_answer": answers[-1],
                         "answers": [{"answer": a, "answer_id": j + 1, "answer_confidence": "yes"}
                                     for j, a in enumerate(answers)]})
        with open(os.path.join(base, f"v2_OpenEnded_mscoco_{part}_questions.json"), "w") as f:
            json.dump({"questions": qs}, f)
        with open(os.path.join(base, f"v2_mscoco_{part}_annotations.json"), "w") as f:
            json.dump({"annotations": anns}, f)
        data[part] = (qs, anns)
    return data


def test_vqav2_reader(tmp_path):
    data = make_vqav2(tmp_path)
    train = create_dataset("vqav2", "train", str(tmp_path))
    # multiple_choice_answer counts in train: "no" ×3, "3" ×3: a tie, broken by the string
    assert train.classes == ["3", "no"]
    assert dataset_info("vqav2").default_tasks == 1 and train.task_names == ["vqav2"] and set(train.task_ids) == {0}
    qs, _ = data["train2014"]
    assert train.files[0].endswith(os.path.join("vqav2", "train2014", "COCO_train2014_000000000009.jpg"))
    assert train.question_ids == [q["question_id"] for q in qs]
    # VQA accuracy min(1, count / 3): "no" 6 times -> 1; "3" 3 times -> 1; "2" twice would be 2/3 (not in vocab)
    np.testing.assert_allclose(train.answer_scores(0), [0.0, 1.0])
    np.testing.assert_allclose(train.answer_credit(1), [1.0, 0.0])
    assert train[0]["image"].shape == (3, 8, 10)
    top1 = create_dataset("vqav2", "train", str(tmp_path), top_k=1)
    assert top1.classes == ["3"] and len(top1) == 3 and top1.stats["records_without_answer"] == 3
    vocab = tmp_path / "answers.json"
    vocab.write_text(json.dumps(["two", "yes", "2", "no"]))
    test = create_dataset("vqav2", "test", str(tmp_path), answer_list=str(vocab))
    assert test.classes == ["two", "yes", "2", "no"] and len(test) == 2
    np.testing.assert_allclose(test.answer_scores(0), [0.0, 1.0, 0.0, 1.0])       # "Yes" is lower-cased
    np.testing.assert_allclose(test.answer_scores(1), [1.0, 0.0, 2 / 3, 0.0])
    assert test.questions[0] == "is this picture 0"
    with pytest.raises(FileNotFoundError, match="visualqa.org"):
        create_dataset("vqav2", "train", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="top_k"):
        create_dataset("vqav2", "train", str(tmp_path), top_k=0)


# --------------------------------------------------------------------------------------------------
# The VQA transform: no crop, no flip


def test_no_crop_transform_keeps_the_whole_image():
    img = torch.zeros(3, 40, 60)
    img[0, :, :6] = 1.0                       # a red bar at the left edge: a crop could cut it, a flip moves it
    for train in (True, False):
        tf = build_transforms(20, train=train, crop="none", hflip=0.0)
        assert tf.deterministic
        out = tf(img)
        assert out.shape == (3, 20, 20)
        ref = torch.nn.functional.interpolate(img[None], size=(20, 20), mode="bicubic", antialias=True,
                                              align_corners=False)[0].clamp(0, 1)
        torch.testing.assert_close(out, ref, atol=2e-3, rtol=0)
        assert out[0, :, :2].min() > 0.9 and out[0, :, 3:].max() < 0.1      # still at the left, uncut
        same = torch.rand(3, 20, 20)
        assert tf(same) is same                                            # already the size: identity
    # the default train transform crops and flips (the bar moves or shrinks for some seed)
    default = build_transforms(20, train=True)
    outs = []
    for seed in range(8):
        torch.manual_seed(seed)
        outs.append(default(img))
    assert any(not torch.allclose(o, outs[0]) for o in outs)
    # a flip or colour jitter can still be asked for; it makes the pipeline random
    flip = build_transforms(20, train=True, crop="none", hflip=1.0)
    assert not flip.deterministic and flip(img)[0, :, -2:].min() > 0.9
    with pytest.raises(ValueError, match="crop"):
        build_transforms(20, train=True, crop="centre")


def test_run_data_takes_crop_none_from_the_method():
    from types import SimpleNamespace
    from clfast.engine.data_views import RunData
    cfg = SimpleNamespace(augment=True, val_fraction=0.0)
    data = RunData(cfg, None, {"input_size": (3, 20, 20), "interpolation": "bicubic", "crop_pct": 0.875},
                   {"crop": "none", "hflip": 0.0}, "VQAMethod")
    img = torch.rand(3, 30, 50)
    assert data.train_tf.deterministic and data.eval_tf.deterministic
    torch.testing.assert_close(data.train_tf(img), data.eval_tf(img))
    full = torch.nn.functional.interpolate(img[None], size=(20, 20), mode="bicubic", antialias=True)[0].clamp(0, 1)
    torch.testing.assert_close(data.eval_tf(img), full, atol=2e-3, rtol=0)
    default = RunData(cfg, None, {"input_size": (3, 20, 20), "interpolation": "bicubic", "crop_pct": 0.875}, {}, "M")
    assert not default.train_tf.deterministic and default.eval_tf.resize_size == 22
    with pytest.raises(ValueError, match="unknown keys"):
        RunData(cfg, None, {"input_size": (3, 20, 20)}, {"cropping": "none"}, "M")


# --------------------------------------------------------------------------------------------------
# Through the engine: first-answer credit, sample-weighted accuracy and test sizes in the run's files


def test_engine_credits_first_answer_and_reports_sample_weighted_accuracy(tmp_path, monkeypatch):
    import clfast.methods.base as base
    from clfast.engine import Trainer, load_config
    from clfast.engine.metrics import read_acc_csv
    from clfast.methods import FrozenQueryMethod, MethodConfig, StepOutput

    written = make_clove(tmp_path / "clove")

    class FirstAnswer(FrozenQueryMethod):
        """Predicts the label (the first answer's id) on even test indices and answer "no" on odd ones."""
        Config = MethodConfig
        supports = ("vqa",)

        def training_step(self, batch, ctx):
            logits = self.classify(self.query(batch, ctx))
            return StepOutput(-(batch["answer_scores"] * logits.log_softmax(1)).sum(1).mean(), {})

        def transform_args(self):
            return {"crop": "none", "hflip": 0.0}

        def predict(self, batch, ctx):
            no = torch.full_like(batch["label"], ANSWERS.index("no"))
            answer = torch.where(batch["index"] % 2 == 0, batch["label"], no)
            return torch.nn.functional.one_hot(answer, self.num_classes).float()

    monkeypatch.setitem(base._METHODS, "first_answer", FirstAnswer)
    preset = tmp_path / "preset.yaml"
    preset.write_text("backbone: vit_tiny_synth\nepochs: 1\nbatch_size: 4\naugment: true\n"
                      "optimizer: {name: adam, lr: 0.001}\n")
    cfg = load_config("first_answer", "clove-scene", str(preset),
                      [f"data_root={tmp_path / 'clove'}", "quiet=true", "threads=1"])
    trainer = Trainer(cfg, out=str(tmp_path / "run"))
    assert trainer.data.train_tf.deterministic                # crop none, no flip: nothing random left
    summary = trainer.fit()
    # the credit of each test record: exact match of the prediction against its first answer
    credit, sizes = [], []
    for rel in clove_files("scene", "test"):
        recs = written[rel]
        start = sum(sizes)
        sizes.append(len(recs))
        credit.append(sum(float((r["answers"][0] if (start + k) % 2 == 0 else "no") == r["answers"][0])
                          for k, r in enumerate(recs)))
    acc = read_acc_csv(tmp_path / "run" / "acc_matrix.csv")
    np.testing.assert_allclose(acc[:, -1], [100 * c / n for c, n in zip(credit, sizes)], atol=1e-4)
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["scenario"]["task_sizes"]["test"] == sizes == [2, 3, 4, 5, 6, 7]
    assert summary["sample_weighted_accuracy"] == pytest.approx(100 * sum(credit) / sum(sizes))
    assert abs(summary["sample_weighted_accuracy"] - summary["A_N"]) > 0.1    # unequal sizes: they differ
    events = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    evals = [e for e in events if e.get("event") == "eval"]
    assert [e["sizes"] for e in evals] == [sizes[:j + 1] for j in range(6)]
    for j, e in enumerate(evals):
        want = 100 * sum(acc[i, j] * sizes[i] / 100 for i in range(j + 1)) / sum(sizes[:j + 1])
        assert e["sample_weighted"] == pytest.approx(want, abs=1e-3)
