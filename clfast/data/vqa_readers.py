"""Readers of the VQA benchmarks on local disk: CLOVE-scene, CLOVE-function (the CLVQA release) and
VQAv2 (the VLM's warm-up). Files are read in place, nothing is moved or copied.

Spec: ``/work/shared/methods/clumo.md`` §3–§5. Every dataset is a :class:`~clfast.data.vqa.VQARecords`:
items ``{image, question, answer, label, task}``, ``answer_scores(i)`` the soft training target and
``answer_credit(i)`` the evaluation credit (exact match against the first answer, or with
``vqa_score=True`` the VQA accuracy ``min(1, #matches / 3)``).

- ``clove-scene`` / ``clove-function``: 6 tasks, one per annotation file, in the spec's order a–f;
  the ``val`` files are the test split; answers follow ``answer_list.json``.
- ``vqav2``: one task; train = ``train2014``, test = ``val2014``; the vocabulary is a given answer
  list or the ``top_k`` most frequent ``multiple_choice_answer`` of train (ties by answer).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Optional

from .readers import check_root as _check_root, check_split as _check_split, missing_data_error as _missing_error
from .registry import register_dataset
from .vqa import (TEST_QUESTION_WORDS, TRAIN_QUESTION_WORDS, VQARecords, answer_weights, check_images,
                  first_answer_credit, normalize_question, vqa_scores)

__all__ = ["CLOVE_SCENE_TASKS", "CLOVE_FUNCTION_TASKS", "clove_files", "read_clove", "read_vqav2"]

CLOVE_SCENE_TASKS = ("ShopAndDining", "Workplace", "HomeOrHotel", "Transportation", "SportAndLeisure", "Outdoors")
CLOVE_FUNCTION_TASKS = ("attribute", "knowledge", "logical", "object", "relation", "scenetext")
CLOVE_SOURCE = ("the CLVQA release of CLOVE (Lei et al., \"Symbolic Replay: Scene Graph as Prompt for Continual "
                "Learning on VQA Task\", AAAI 2023): https://github.com/showlab/CLVQA (annotation JSONs and "
                "answer_list.json; Visual Genome images from https://homes.cs.washington.edu/~ranjay/visualgenome/, "
                "TextVQA images from https://textvqa.org/dataset); the folder <root> is CluMo's data path")
CLOVE_LAYOUT = """\
<root>/                    (CluMo's CLOVE folder; read in place)
    answer_list.json       the answer vocabulary (a JSON list; class id = position)
    json/scene/scene_a#ShopAndDining_{train,val}.json ... scene_f#Outdoors_{train,val}.json
    json/function/functional_{attribute,knowledge,logical,object,relation,scenetext}_{train,val}.json
        each a JSON list of records {image_source: vg|textvqa, image_id, question, question_id, answers: [...]}
    vg/image/<image_id>.jpg       Visual Genome images
    textvqa/<image_id>.jpg        TextVQA images"""

VQAV2_SOURCE = ("https://visualqa.org/download.html (v2 questions and annotations, train2014 and val2014) and "
                "https://cocodataset.org/#download (2014 train and val images)")
VQAV2_LAYOUT = """\
<root>/vqav2/
    v2_OpenEnded_mscoco_train2014_questions.json   v2_mscoco_train2014_annotations.json
    v2_OpenEnded_mscoco_val2014_questions.json     v2_mscoco_val2014_annotations.json
    train2014/COCO_train2014_<image_id as 12 digits>.jpg   (or under image_root=)
    val2014/COCO_val2014_<image_id as 12 digits>.jpg"""


# --------------------------------------------------------------------------------------------------
# CLOVE


def clove_files(benchmark: str, split: str) -> list[str]:
    """The 6 annotation files of ``benchmark`` ("scene" | "function") for ``split``, relative to the root,
    in task order a–f (the ``val`` files for ``split="test"``)."""
    part = "train" if _check_split(split) == "train" else "val"
    if benchmark == "scene":
        return [f"json/scene/scene_{letter}#{name}_{part}.json" for letter, name in zip("abcdef", CLOVE_SCENE_TASKS)]
    if benchmark == "function":
        return [f"json/function/functional_{name}_{part}.json" for name in CLOVE_FUNCTION_TASKS]
    raise ValueError(f"benchmark must be 'scene' or 'function', got {benchmark!r}")


def _clove_missing(root: str, benchmark: str, splits=("train", "test")) -> list[str]:
    want = ["answer_list.json"] + [f for s in splits for f in clove_files(benchmark, s)] + ["vg/image/", "textvqa/"]
    return [w for w in want if not os.path.exists(os.path.join(root, w))]


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _answer_list(path: str) -> list[str]:
    answers = _load_json(path)
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{path}: expected a non-empty JSON list of answer strings")
    if len(set(answers)) != len(answers):
        dup = [a for a, n in Counter(answers).items() if n > 1]
        raise ValueError(f"{path}: answers must be distinct; repeated: {dup[:5]}")
    return answers


_CLOVE_FIELDS = ("image_source", "image_id", "question", "question_id", "answers")


def read_clove(benchmark: str, split: str, root, transform=None, *, vqa_score: bool = False,
               max_words: Optional[int] = None) -> VQARecords:
    """CLOVE-scene or CLOVE-function from the CLVQA files under ``root`` (§4).

    Args:
        benchmark: ``"scene"`` or ``"function"``.
        split: ``"train"`` or ``"test"`` (the ``val`` files).
        root: the CLOVE folder (:data:`CLOVE_LAYOUT`).
        transform: applied to each decoded image.
        vqa_score: evaluation credit ``min(1, #matches / 3)`` instead of exact match against the first answer.
        max_words: question truncation; default 30 words in training, 50 at test.

    Training records none of whose answers is in the vocabulary carry no target and are left out
    (counted in ``stats["records_without_answer"]``); test records are all kept (such a record counts
    as wrong, as in the official evaluation). ``stats["answers_dropped"]`` counts the listed answers
    outside the vocabulary.

    Raises:
        FileNotFoundError: a file of the layout is missing (the message shows the layout and where to get
            the data), or an image a record names.
        ValueError: a malformed file (naming it and the record).
    """
    name = f"clove-{benchmark}"
    root = _check_root(root)
    split = _check_split(split)
    if not isinstance(vqa_score, bool):
        raise ValueError(f"vqa_score must be a bool, got {vqa_score!r}")
    words = max_words if max_words is not None else (TRAIN_QUESTION_WORDS if split == "train" else TEST_QUESTION_WORDS)
    missing = _clove_missing(root, benchmark, (split,))
    if missing:
        raise _missing_error(name, root, missing, CLOVE_LAYOUT, CLOVE_SOURCE)
    answer_list = _answer_list(os.path.join(root, "answer_list.json"))
    vocab = {a: i for i, a in enumerate(answer_list)}
    folders = {"vg": os.path.join(root, "vg", "image"), "textvqa": os.path.join(root, "textvqa")}
    cols = {k: [] for k in ("files", "questions", "answers", "targets", "credit", "task_ids", "question_ids")}
    dropped = without = 0
    for task, rel in enumerate(clove_files(benchmark, split)):
        path = os.path.join(root, rel)
        records = _load_json(path)
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        for k, rec in enumerate(records):
            lacking = [f for f in _CLOVE_FIELDS if not isinstance(rec, dict) or f not in rec]
            if lacking:
                raise ValueError(f"{path}, record {k}: missing field(s) {lacking} (expected {list(_CLOVE_FIELDS)})")
            source = rec["image_source"]
            if source not in folders:
                raise ValueError(f"{path}, record {k}: image_source must be 'vg' or 'textvqa' (the CLOVE image "
                                 f"folders), got {source!r}")
            try:
                target, n_drop = answer_weights(source, rec["answers"], vocab)
                normalize_question(rec["question"], words)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}, record {k}: {e}") from None
            dropped += n_drop
            if not target and split == "train":
                without += 1
                continue
            without += not target
            cols["files"].append(os.path.join(folders[source], f"{rec['image_id']}.jpg"))
            cols["questions"].append(normalize_question(rec["question"], words))
            cols["answers"].append(list(rec["answers"]))
            cols["targets"].append(target)
            cols["credit"].append(vqa_scores(rec["answers"], vocab) if vqa_score
                                  else first_answer_credit(rec["answers"], vocab))
            cols["task_ids"].append(task)
            cols["question_ids"].append(rec["question_id"])
    check_images(name, split, cols["files"])
    names = CLOVE_SCENE_TASKS if benchmark == "scene" else CLOVE_FUNCTION_TASKS
    ds = VQARecords(name, split, answer_list, cols["files"], cols["questions"], cols["answers"], cols["targets"],
                    cols["credit"], cols["task_ids"], names, cols["question_ids"], transform,
                    stats={"answers_dropped": dropped, "records_without_answer": without})
    ds.vqa_score = vqa_score
    return ds


@register_dataset("clove-scene", kind="vqa", num_classes=0, default_tasks=6,
                  description="CLOVE-scene (CLVQA): 6 scene tasks, VG + TextVQA images, answers from answer_list.json",
                  needs_root=True, layout=CLOVE_LAYOUT, probe=lambda root: _clove_missing(root, "scene"))
def clove_scene(split: str = "train", root=None, transform=None, *, vqa_score: bool = False,
                max_words: Optional[int] = None) -> VQARecords:
    """CLOVE-scene: ShopAndDining, Workplace, HomeOrHotel, Transportation, SportAndLeisure, Outdoors."""
    return read_clove("scene", split, root, transform, vqa_score=vqa_score, max_words=max_words)


@register_dataset("clove-function", kind="vqa", num_classes=0, default_tasks=6,
                  description="CLOVE-function (CLVQA): 6 function tasks, VG + TextVQA images, answers from "
                              "answer_list.json",
                  needs_root=True, layout=CLOVE_LAYOUT, probe=lambda root: _clove_missing(root, "function"))
def clove_function(split: str = "train", root=None, transform=None, *, vqa_score: bool = False,
                   max_words: Optional[int] = None) -> VQARecords:
    """CLOVE-function: attribute, knowledge, logical, object, relation, scenetext."""
    return read_clove("function", split, root, transform, vqa_score=vqa_score, max_words=max_words)


# --------------------------------------------------------------------------------------------------
# VQAv2


def _vqav2_files(split: str) -> tuple[str, str]:
    part = "train2014" if split == "train" else "val2014"
    return f"v2_OpenEnded_mscoco_{part}_questions.json", f"v2_mscoco_{part}_annotations.json"


def _vqav2_missing(root: str, splits=("train", "test")) -> list[str]:
    want = [f"vqav2/{f}" for s in splits for f in _vqav2_files(s)]
    return [w for w in want if not os.path.exists(os.path.join(root, w))]


def _norm_answer(a) -> str:
    if not isinstance(a, str):
        raise ValueError(f"answers must be strings, got {a!r}")
    return a.strip().lower()


def _vqav2_annotations(path: str) -> list[dict]:
    data = _load_json(path)
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise ValueError(f"{path}: expected {{\"annotations\": [...]}}")
    return anns


def vqav2_top_answers(root: str, top_k: int) -> list[str]:
    """The ``top_k`` most frequent ``multiple_choice_answer`` of the train annotations (lower-cased,
    stripped), most frequent first, ties broken by the answer string: deterministic."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    path = os.path.join(root, "vqav2", _vqav2_files("train")[1])
    counts = Counter(_norm_answer(a.get("multiple_choice_answer", "")) for a in _vqav2_annotations(path))
    counts.pop("", None)
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]]


def read_vqav2(split: str, root, transform=None, *, answer_list: Optional[str] = None, top_k: int = 3129,
               image_root: Optional[str] = None, max_words: Optional[int] = None) -> VQARecords:
    """VQAv2 for the VLM warm-up: one task; soft targets and credit ``min(1, count / 3)`` (VQA accuracy,
    over the 10 human answers, lower-cased and stripped; the official evaluation's further answer
    normalisation and its average over leave-one-out subsets are not applied).

    Args:
        split: ``"train"`` (train2014) or ``"test"`` (val2014).
        root: the folder holding ``vqav2/`` (:data:`VQAV2_LAYOUT`).
        answer_list: a JSON list of answers to use as the vocabulary (e.g. CLOVE's ``answer_list.json``,
            so that the warmed head transfers); default the ``top_k`` most frequent train answers.
        image_root: the folder holding ``train2014/`` and ``val2014/``; default ``<root>/vqav2``.
        max_words: question truncation; default 30 in training, 50 at test.

    Training questions with no answer in the vocabulary are left out (``stats["records_without_answer"]``).
    """
    root = _check_root(root)
    split = _check_split(split)
    missing = _vqav2_missing(root, ("train", split) if answer_list is None else (split,))
    if missing:
        raise _missing_error("vqav2", root, missing, VQAV2_LAYOUT, VQAV2_SOURCE)
    if answer_list is not None:
        if not os.path.isfile(answer_list):
            raise FileNotFoundError(f"vqav2: answer_list={answer_list!r} is not a file (expected a JSON list of answers)")
        answers_vocab = _answer_list(answer_list)
    else:
        answers_vocab = vqav2_top_answers(root, top_k)
    vocab = {a: i for i, a in enumerate(answers_vocab)}
    words = max_words if max_words is not None else (TRAIN_QUESTION_WORDS if split == "train" else TEST_QUESTION_WORDS)
    q_file, a_file = (os.path.join(root, "vqav2", f) for f in _vqav2_files(split))
    qdata = _load_json(q_file)
    questions = qdata.get("questions") if isinstance(qdata, dict) else None
    if not isinstance(questions, list):
        raise ValueError(f"{q_file}: expected {{\"questions\": [...]}}")
    by_qid = {}
    for k, a in enumerate(_vqav2_annotations(a_file)):
        if not isinstance(a, dict) or "question_id" not in a or not isinstance(a.get("answers"), list):
            raise ValueError(f"{a_file}, annotation {k}: expected question_id and an answers list")
        by_qid[a["question_id"]] = [_norm_answer(x.get("answer") if isinstance(x, dict) else x) for x in a["answers"]]
    part = "train2014" if split == "train" else "val2014"
    folder = os.path.join(image_root if image_root is not None else os.path.join(root, "vqav2"), part)
    cols = {k: [] for k in ("files", "questions", "answers", "targets", "task_ids", "question_ids")}
    dropped = without = 0
    for k, q in enumerate(questions):
        if not isinstance(q, dict) or not {"image_id", "question", "question_id"} <= set(q):
            raise ValueError(f"{q_file}, question {k}: expected image_id, question and question_id")
        if q["question_id"] not in by_qid:
            raise ValueError(f"{q_file}, question {k}: question_id {q['question_id']} has no annotation in {a_file}")
        answers = by_qid[q["question_id"]]
        target = vqa_scores(answers, vocab)
        dropped += sum(a not in vocab for a in answers)
        if not target and split == "train":
            without += 1
            continue
        without += not target
        cols["files"].append(os.path.join(folder, f"COCO_{part}_{int(q['image_id']):012d}.jpg"))
        cols["questions"].append(normalize_question(q["question"], words))
        cols["answers"].append(answers)
        cols["targets"].append(target)
        cols["task_ids"].append(0)
        cols["question_ids"].append(q["question_id"])
    check_images("vqav2", split, cols["files"])
    return VQARecords("vqav2", split, answers_vocab, cols["files"], cols["questions"], cols["answers"],
                      cols["targets"], cols["targets"], cols["task_ids"], ["vqav2"], cols["question_ids"], transform,
                      stats={"answers_dropped": dropped, "records_without_answer": without})


@register_dataset("vqav2", kind="vqa", num_classes=3129, default_tasks=1,
                  description="VQAv2 (COCO 2014) for the VLM warm-up, one task; top-3129 answers or a given list",
                  needs_root=True, layout=VQAV2_LAYOUT, probe=_vqav2_missing)
def vqav2(split: str = "train", root=None, transform=None, *, answer_list: Optional[str] = None,
          top_k: int = 3129, image_root: Optional[str] = None, max_words: Optional[int] = None) -> VQARecords:
    """VQAv2; see :func:`read_vqav2`."""
    return read_vqav2(split, root, transform, answer_list=answer_list, top_k=top_k, image_root=image_root,
                      max_words=max_words)
