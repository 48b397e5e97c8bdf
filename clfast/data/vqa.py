"""VQA answers and credit: question normalisation, soft answer targets, the two scoring rules, and
:class:`VQARecords`, the dataset over VQA records whose images are files (CLOVE, VQAv2).

Spec: ``/work/shared/methods/clumo.md`` §3 (answer weights), §4 (questions) and §5 (correctness).

- **Targets** (what a loss trains towards, ``answer_scores(i)``, (A,) float32):
  :func:`answer_weights` — vg and textvqa records give each listed answer 0.1 (duplicates
  accumulate); vqa records give an answer its frequency divided by the number of answers; VQAv2 (the
  warm-up) uses the VQA accuracy ``min(1, count / 3)`` (:func:`vqa_scores`). Answers outside the
  vocabulary are dropped and counted.
- **Credit** (what evaluation counts, ``answer_credit(i)``, (A,) float32; the engine scores a
  prediction ``a`` with ``credit[a]``): by default exact match against the record's **first** answer
  (:func:`first_answer_credit`: one-hot at its id, all zero when it is out of the vocabulary, so the
  record counts as wrong as in the official evaluation); with ``vqa_score`` the VQA accuracy
  ``min(1, #matches / 3)`` of every answer (:func:`vqa_scores`).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
from torch.utils.data import Dataset

__all__ = ["normalize_question", "answer_weights", "vqa_scores", "first_answer_credit", "vqa_accuracy",
           "exact_match", "VQARecords", "TRAIN_QUESTION_WORDS", "TEST_QUESTION_WORDS", "IMAGE_SOURCES"]

TRAIN_QUESTION_WORDS = 30     # questions are truncated to this many words in training ...
TEST_QUESTION_WORDS = 50      # ... and to this many at test (the CLOVE dataset's defaults)
IMAGE_SOURCES = ("vg", "textvqa", "vqa")

_PUNCTUATION = re.compile(r"[,.'!?\"()*#:;~]")


def normalize_question(question: str, max_words: int) -> str:
    """Lower-case, strip the punctuation ``, . ' ! ? " ( ) * # : ; ~``, read ``-`` and ``/`` as spaces,
    drop trailing spaces, then keep the first ``max_words`` space-separated words (§4)."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1:
        raise ValueError(f"max_words must be a positive int, got {max_words!r}")
    q = _PUNCTUATION.sub("", question.lower()).replace("-", " ").replace("/", " ").rstrip(" ")
    words = q.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else q


def _check_answers(answers) -> list[str]:
    if isinstance(answers, str) or not isinstance(answers, Sequence) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"answers must be a list of str, got {answers!r:.200}")
    return list(answers)


def answer_weights(source: str, answers: Sequence[str], vocab: Mapping[str, int]) -> tuple[dict[int, float], int]:
    """The soft target of one record (§3): ``({answer id: weight}, number of answers dropped)``.

    Args:
        source: the record's ``image_source``: ``"vg"`` or ``"textvqa"`` (each listed answer 0.1,
            duplicates accumulate) or ``"vqa"`` (frequency / number of answers).
        answers: the record's answers, in order.
        vocab: answer → id (the order of ``answer_list.json``); answers not in it are dropped.
    """
    answers = _check_answers(answers)
    if source in ("vg", "textvqa"):
        per = {a: 0.1 * n for a, n in Counter(answers).items()}
    elif source == "vqa":
        per = {a: n / len(answers) for a, n in Counter(answers).items()} if answers else {}
    else:
        raise ValueError(f"image_source must be one of {IMAGE_SOURCES}, got {source!r}")
    dropped = sum(1 for a in answers if a not in vocab)
    return {vocab[a]: w for a, w in per.items() if a in vocab}, dropped


def vqa_scores(answers: Sequence[str], vocab: Mapping[str, int]) -> dict[int, float]:
    """``{answer id: min(1, count / 3)}`` over the answers in the vocabulary (VQA accuracy)."""
    return {vocab[a]: min(1.0, n / 3.0) for a, n in Counter(_check_answers(answers)).items() if a in vocab}


def first_answer_credit(answers: Sequence[str], vocab: Mapping[str, int]) -> dict[int, float]:
    """``{id of answers[0]: 1.0}``, or ``{}`` when the list is empty or its first answer is not in the
    vocabulary (no prediction can match it) — §5's exact match against the first answer."""
    answers = _check_answers(answers)
    return {vocab[answers[0]]: 1.0} if answers and answers[0] in vocab else {}


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when ``prediction`` equals the first answer, else 0.0 (§5, the official correctness)."""
    answers = _check_answers(answers)
    return float(bool(answers) and prediction == answers[0])


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """``min(1, #answers equal to prediction / 3)`` (the ``vqa_score: true`` option of §5)."""
    return min(1.0, sum(a == prediction for a in _check_answers(answers)) / 3.0)


class VQARecords(Dataset):
    """VQA records whose images are files; items are dicts ``image`` (3, H, W) float in [0, 1] (or
    transformed), ``question`` (normalised str), ``answer`` (the first answer, str), ``label`` and
    ``task`` (ints).

    Args:
        name, split: the registered name and ``"train"`` / ``"test"``.
        answer_list: the answer vocabulary; ``classes`` = it, label = position.
        files: image path of every record.
        questions: normalised question of every record.
        answers: answer list of every record (the first is the one exact match counts).
        targets: ``[{answer id: weight}]`` per record, the soft training targets.
        credit: ``[{answer id: credit}]`` per record, what a predicted answer earns at evaluation.
        task_ids, task_names: the task of every record and the task names.
        question_ids: the records' question ids (kept for the record and for tests).
        transform: applied to each decoded image.
        stats: counts for the repr and the log (e.g. ``answers_dropped``).

    ``targets`` (the attribute) holds an int label per record: the first answer's id when it is in the
    vocabulary, else the id of the largest target weight, else 0 (a test record none of whose answers
    is in the vocabulary; its credit is all zero, so it counts as wrong whatever is predicted).
    """

    def __init__(self, name: str, split: str, answer_list: Sequence[str], files: Sequence[str],
                 questions: Sequence[str], answers: Sequence[Sequence[str]], targets: Sequence[dict],
                 credit: Sequence[dict], task_ids: Sequence[int], task_names: Sequence[str],
                 question_ids: Sequence, transform: Optional[Callable] = None, stats: Optional[dict] = None):
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
        n = len(files)
        lengths = {len(x) for x in (questions, answers, targets, credit, task_ids, question_ids)}
        if lengths != {n}:
            raise ValueError(f"every per-record list must have {n} entries, got lengths {sorted(lengths)}")
        self.name, self.split = name, split
        self.classes = list(answer_list)
        self.files = list(files)
        self.questions = list(questions)
        self.answer_lists = [list(a) for a in answers]
        self.question_ids = list(question_ids)
        self.task_ids = [int(t) for t in task_ids]
        self.task_names = list(task_names)
        self.transform = transform
        self.stats = dict(stats or {})
        vocab = {a: i for i, a in enumerate(self.classes)}
        self._targets = [self._sparse(t) for t in targets]
        self._credit = [self._sparse(c) for c in credit]
        labels = []
        for ans, (ids, vals) in zip(self.answer_lists, self._targets):
            if ans and ans[0] in vocab:
                labels.append(vocab[ans[0]])
            else:
                labels.append(int(ids[np.argmax(vals)]) if len(ids) else 0)
        self.targets = labels

    @staticmethod
    def _sparse(d: dict) -> tuple[np.ndarray, np.ndarray]:
        ids = np.fromiter(d.keys(), dtype=np.int64, count=len(d))
        return ids, np.fromiter(d.values(), dtype=np.float32, count=len(d))

    def _dense(self, sparse: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        out = np.zeros(len(self.classes), dtype=np.float32)
        out[sparse[0]] = sparse[1]
        return out

    def answer_scores(self, index: int) -> np.ndarray:
        """The soft training target of record ``index``, (A,) float32 (§3)."""
        return self._dense(self._targets[index])

    def answer_credit(self, index: int) -> np.ndarray:
        """What each predicted answer earns on record ``index`` at evaluation, (A,) float32 (§5)."""
        return self._dense(self._credit[index])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        from .readers import load_image

        img = load_image(self.files[index])
        if self.transform is not None:
            img = self.transform(img)
        ans = self.answer_lists[index]
        return {"image": img, "question": self.questions[index], "answer": ans[0] if ans else "",
                "label": self.targets[index], "task": self.task_ids[index]}

    def __repr__(self) -> str:
        stats = "".join(f", {k}={v}" for k, v in self.stats.items())
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, tasks={len(self.task_names)}, "
                f"answers={len(self.classes)}, n={len(self)}{stats})")


def check_images(name: str, split: str, files: Sequence[str]) -> None:
    """FileNotFoundError naming up to 5 of the listed image files that do not exist (one stat per image)."""
    missing = [f for f in dict.fromkeys(files) if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"dataset {name!r} ({split}): {len(missing)} listed image file(s) are missing: "
                                f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
