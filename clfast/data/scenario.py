"""Continual-learning scenarios: a train and a test dataset cut into a sequence of tasks.

Kinds:

- ``"class-incremental"``: the classes, in a seeded order, are cut into tasks (equal-sized, or
  ``first_task_classes`` then equal splits of the rest); the task id is unknown at test time.
- ``"task-incremental"``: the same split; the task id is known at test time.
- ``"domain-incremental"``: every task has all classes; task ``t`` is one domain (the datasets give
  each item a domain in ``domains`` and name them in ``domain_names``).
- ``"vqa"``: a VQA dataset's own task grouping (``task_ids``, named by ``task_names``; for
  ``synth-vqa`` the 6 question families, or 6 scene kinds with ``task_split="scene"``; for CLOVE the 6
  annotation files); labels are answer ids over the shared answer vocabulary.

Labels are remapped so that the class at position ``i`` of the class order has label ``i``: task
``t`` of a class-incremental scenario owns the contiguous range ``class_range(t)``. The class order
is ``np.random.RandomState(class_order_seed).permutation(num_classes)`` — the same order as
``np.random.seed(1993); np.random.permutation(C)`` in LAMDA-PILOT and the codebases derived from it,
so class orders match published ones for the same dataset label ids.

Task subsets select items by the datasets' ``targets`` (and ``domains`` / ``task_ids``) without
decoding any image. Their items are dicts of tensors that the default ``DataLoader`` collate stacks::

    image  (3, H, W) float          label  () int64 (remapped)
    task   () int64                 index  () int64 (position in the underlying dataset)
    VQA adds:  question  (L,) int64 tokens when a tokenizer is given (else the str),
               answer_scores  (A,) float32 soft targets (one-hot unless the dataset has
               ``answer_scores(i)``),
               answer_credit  (A,) float32 what each predicted answer earns at evaluation, when the
               dataset has ``answer_credit(i)`` (CLOVE: exact match against the first answer, or
               the VQA accuracy; without it the engine credits ``answer_scores``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .registry import create_dataset, dataset_info, list_datasets

__all__ = ["Scenario", "JointScenario", "TaskDataset", "SCENARIO_KINDS", "DEFAULT_CLASS_ORDER_SEED"]

SCENARIO_KINDS = ("class-incremental", "task-incremental", "domain-incremental", "vqa")
DEFAULT_CLASS_ORDER_SEED = 1993


def _is_vqa(dataset) -> bool:
    name = getattr(dataset, "name", None)
    if isinstance(name, str) and name in list_datasets():
        return dataset_info(name).kind == "vqa"
    return hasattr(dataset, "task_ids")


def _positive_int(name: str, value) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_dataset(arg: str, ds) -> None:
    for attr in ("targets", "classes"):
        if not hasattr(ds, attr):
            raise ValueError(f"{arg} must be a dataset with a {attr!r} attribute (every clfast dataset "
                             f"has targets and classes), got {type(ds).__name__}")
    if len(ds.targets) != len(ds):
        raise ValueError(f"{arg}.targets must have one label per item: {len(ds.targets)} labels for "
                         f"{len(ds)} items")
    labels = np.asarray(ds.targets, dtype=np.int64)
    bad = np.nonzero((labels < 0) | (labels >= len(ds.classes)))[0]
    if len(bad):
        files = getattr(ds, "files", None)
        where = [f"item {i}{f' ({files[i]})' if files is not None else ''} has label {labels[i]}" for i in bad[:5]]
        raise ValueError(f"{arg} dataset {getattr(ds, 'name', type(ds).__name__)!r}: {len(bad)} label(s) outside "
                         f"its {len(ds.classes)} classes [0, {len(ds.classes)}): {', '.join(where)}")


class TaskDataset(Dataset):
    """Items of one or more tasks of a :class:`Scenario`, as dicts of tensors.

    Attributes:
        dataset: the underlying dataset.
        indices: ``(n,)`` int64 positions in ``dataset``.
        targets: remapped labels, ``task_ids``: task of each item (lists of int).
        classes: class names in remapped-label order.
    """

    def __init__(self, dataset, indices: np.ndarray, labels: np.ndarray, tasks: np.ndarray,
                 classes: Sequence[str], *, vqa: bool = False, num_answers: int = 0,
                 tokens: Optional[torch.Tensor] = None):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.targets = [int(y) for y in labels]
        self.task_ids = [int(t) for t in tasks]
        self.classes = list(classes)
        self.name = getattr(dataset, "name", type(dataset).__name__)
        self.vqa = vqa
        self.num_answers = int(num_answers)
        self.tokens = tokens                     # (len(dataset), L) int64 or None
        self._scores = getattr(dataset, "answer_scores", None) if vqa else None
        self._credit = getattr(dataset, "answer_credit", None) if vqa else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        j = int(self.indices[i])
        item = self.dataset[j]
        out = {"image": item["image"] if self.vqa else item[0],
               "label": torch.tensor(self.targets[i], dtype=torch.int64),
               "task": torch.tensor(self.task_ids[i], dtype=torch.int64),
               "index": torch.tensor(j, dtype=torch.int64)}
        if self.vqa:
            out["question"] = self.tokens[j] if self.tokens is not None else item["question"]
            if callable(self._scores):
                out["answer_scores"] = torch.as_tensor(self._scores(j), dtype=torch.float32)
            else:
                scores = torch.zeros(self.num_answers, dtype=torch.float32)
                scores[self.targets[i]] = 1.0
                out["answer_scores"] = scores
            if callable(self._credit):
                out["answer_credit"] = torch.as_tensor(self._credit(j), dtype=torch.float32)
        return out

    def __repr__(self) -> str:
        tasks = sorted(set(self.task_ids))
        return f"TaskDataset({self.name!r}, tasks={tasks}, n={len(self)})"


class Scenario:
    """Task splits of a train and a test dataset.

    Args:
        train, test: datasets with ``targets`` and ``classes`` (any registered clfast dataset);
            ``test.classes`` must equal ``train.classes``.
        num_tasks: number of tasks; for ``"domain-incremental"`` and ``"vqa"``, None takes the
            number of domains / task groups.
        kind: one of ``SCENARIO_KINDS``; None means ``"vqa"`` for VQA datasets and
            ``"class-incremental"`` otherwise.
        class_order: explicit order of the original class ids (a permutation of
            ``range(num_classes)``); overrides the seed.
        class_order_seed: seed of the class permutation (default 1993).
        shuffle_classes: False keeps the natural order ``0..C-1``.
        first_task_classes: classes of task 0; the rest is split equally over the other tasks.
        domains: domain-incremental only: the domains (names from ``train.domain_names`` or their
            indices) in task order; default all, in the dataset's order.
        tokenizer: VQA only: ``tokenizer(list[str]) -> (N, L) int64`` (open_clip's interface); the
            questions are tokenized once and items carry ``question`` as ``(L,)`` int64.

    Raises:
        ValueError: naming the argument and the expected value (e.g. classes not divisible by tasks).
    """

    joint = False   # see JointScenario

    def __init__(self, train, test, num_tasks: Optional[int], *, kind: Optional[str] = None,
                 class_order: Optional[Sequence[int]] = None,
                 class_order_seed: Optional[int] = DEFAULT_CLASS_ORDER_SEED,
                 shuffle_classes: bool = True, first_task_classes: Optional[int] = None,
                 domains: Optional[Sequence[Union[str, int]]] = None,
                 tokenizer: Optional[Callable] = None):
        _check_dataset("train", train)
        _check_dataset("test", test)
        if list(train.classes) != list(test.classes):
            raise ValueError(f"test.classes must equal train.classes (same classes, same order); got "
                             f"{len(test.classes)} vs {len(train.classes)} classes")
        vqa = _is_vqa(train)
        if kind is None:
            kind = "vqa" if vqa else "class-incremental"
        if kind not in SCENARIO_KINDS:
            raise ValueError(f"kind must be one of {SCENARIO_KINDS}, got {kind!r}")
        if vqa != (kind == "vqa"):
            raise ValueError(f"kind={kind!r} does not fit dataset {getattr(train, 'name', '?')!r}: use "
                             f"kind='vqa' for VQA datasets and only for them")
        if domains is not None and kind != "domain-incremental":
            raise ValueError(f"domains is only used by kind='domain-incremental', got kind={kind!r}")
        if first_task_classes is not None and kind not in ("class-incremental", "task-incremental"):
            raise ValueError(f"first_task_classes is only used by class- and task-incremental "
                             f"scenarios, got kind={kind!r}")
        self.train_dataset, self.test_dataset = train, test
        self.kind = kind
        self.num_classes = len(train.classes)
        self.set_tokenizer(tokenizer)
        self.shuffle_classes = bool(shuffle_classes)
        self.first_task_classes = first_task_classes
        self.domains: Optional[list[str]] = None
        self.skipped: Optional[dict[str, list[tuple[int, str]]]] = None   # see skip_unreadable()

        if kind in ("class-incremental", "task-incremental"):
            self._setup_class_split(num_tasks, class_order, class_order_seed, first_task_classes)
        else:
            order = self._check_order(class_order) if class_order is not None and kind != "vqa" else None
            if class_order is not None and kind == "vqa":
                raise ValueError("class_order must be None for kind='vqa' (labels are answer ids)")
            self.class_order = order if order is not None else list(range(self.num_classes))
            self.class_order_seed = None
            if kind == "domain-incremental":
                self._setup_domains(num_tasks, domains)
            else:
                self._setup_vqa(num_tasks)
        self.class_names = [str(train.classes[c]) for c in self.class_order]
        self._label_map = np.empty(self.num_classes, dtype=np.int64)
        self._label_map[np.asarray(self.class_order, dtype=np.int64)] = np.arange(self.num_classes)

    # ---------------------------------------------------------------------------------------------
    # Set-up per kind

    def _check_order(self, class_order) -> list[int]:
        order = [int(c) for c in class_order]
        if sorted(order) != list(range(self.num_classes)):
            raise ValueError(f"class_order must be a permutation of range({self.num_classes}), got "
                             f"{len(order)} ids {order[:10]}{' …' if len(order) > 10 else ''}")
        return order

    def _setup_class_split(self, num_tasks, class_order, seed, first_task_classes) -> None:
        C = self.num_classes
        T = _positive_int("num_tasks", num_tasks)
        if T > C:
            raise ValueError(f"num_tasks={T} is more than the {C} classes of dataset "
                             f"{getattr(self.train_dataset, 'name', '?')!r}: a class-incremental task needs at "
                             f"least one class of its own (num_tasks must be at most {C})")
        blocks = getattr(self.train_dataset, "class_blocks", None)   # a dataset sequence: parts stay apart
        if blocks is not None and class_order is None:
            self._setup_blocks([int(b) for b in blocks], T, seed, first_task_classes)
            return
        if class_order is not None:
            self.class_order, self.class_order_seed = self._check_order(class_order), None
        else:
            self.class_order, self.class_order_seed = self._seeded_order(C, seed), self._order_seed(seed)
        if first_task_classes is None:
            if C % T:
                raise ValueError(f"num_tasks={T} must divide the {C} classes into equal tasks "
                                 f"({C} % {T} = {C % T}); choose a divisor of {C} or set "
                                 f"first_task_classes")
            sizes = [C // T] * T
        else:
            F = _positive_int("first_task_classes", first_task_classes)
            if T == 1:
                if F != C:
                    raise ValueError(f"first_task_classes must be {C} (all classes) with num_tasks=1, "
                                     f"got {F}")
                sizes = [F]
            else:
                rest = C - F
                if rest < T - 1:
                    raise ValueError(f"first_task_classes={F} must leave at least one of the {C} classes "
                                     f"to each of the other {T - 1} tasks (at most {C - T + 1})")
                if rest % (T - 1):
                    raise ValueError(f"first_task_classes={F} must leave the other {T - 1} tasks an equal "
                                     f"share of the remaining classes: ({C} - {F}) % {T - 1} = "
                                     f"{rest % (T - 1)}, need 0")
                sizes = [F] + [rest // (T - 1)] * (T - 1)
        self._set_task_sizes(sizes)

    def _order_seed(self, seed) -> Optional[int]:
        """The class-order seed the run used (None without shuffling); ValueError if not an int."""
        if not self.shuffle_classes:
            return None
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise ValueError(f"class_order_seed must be an int, got {seed!r}")
        return int(seed)

    def _seeded_order(self, n: int, seed) -> list[int]:
        """``0..n-1`` permuted with ``np.random.RandomState(seed)`` (LAMDA-PILOT's order), or in order."""
        s = self._order_seed(seed)
        return [int(c) for c in (np.random.RandomState(s).permutation(n) if s is not None else range(n))]

    def _setup_blocks(self, blocks: list[int], T: int, seed, first_task_classes) -> None:
        """A dataset sequence: each part's classes permuted on their own, ``T / len(blocks)`` tasks each."""
        if first_task_classes is not None:
            raise ValueError("first_task_classes cannot be used with a dataset sequence (each part is cut "
                             "into its own tasks)")
        if T % len(blocks):
            raise ValueError(f"num_tasks={T} must be a multiple of the {len(blocks)} datasets of the sequence "
                             f"(tasks per dataset)")
        per = T // len(blocks)
        bad = [b for b in blocks if b % per]
        if bad:
            raise ValueError(f"num_tasks={T} gives {per} tasks per dataset, which must divide each dataset's "
                             f"classes {blocks}")
        order, start = [], 0
        for b in blocks:
            order += [start + c for c in self._seeded_order(b, seed)]
            start += b
        self.class_order, self.class_order_seed = order, self._order_seed(seed)
        self._set_task_sizes([b // per for b in blocks for _ in range(per)])
        parts = list(getattr(self.train_dataset, "parts", [f"part {i}" for i in range(len(blocks))]))
        self.task_names = [p if per == 1 else f"{p} {k + 1}/{per}" for p in parts for k in range(per)]

    def _set_task_sizes(self, sizes: list[int]) -> None:
        C, T = self.num_classes, len(sizes)
        self.num_tasks = T
        bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self._ranges = [(int(bounds[t]), int(bounds[t + 1])) for t in range(T)]
        self.task_names = [f"task {t}" for t in range(T)]
        task_of_label = np.repeat(np.arange(T), sizes)
        task_of_class = np.empty(C, dtype=np.int64)
        task_of_class[np.asarray(self.class_order)] = task_of_label
        self._item_tasks = {s: task_of_class[np.asarray(ds.targets, dtype=np.int64)]
                            for s, ds in (("train", self.train_dataset), ("test", self.test_dataset))}

    def _setup_domains(self, num_tasks, domains) -> None:
        for arg, ds in (("train", self.train_dataset), ("test", self.test_dataset)):
            lacking = [a for a in ("domains", "domain_names") if not hasattr(ds, a)]
            if lacking:
                raise ValueError(f"kind='domain-incremental' needs datasets with a per-item 'domains' "
                                 f"array and 'domain_names'; {arg} ({getattr(ds, 'name', '?')!r}) lacks "
                                 f"{' and '.join(repr(a) for a in lacking)}")
        names = list(self.train_dataset.domain_names)
        if list(self.test_dataset.domain_names) != names:
            raise ValueError(f"test.domain_names must equal train.domain_names {names}, got "
                             f"{list(self.test_dataset.domain_names)}")
        if domains is None:
            chosen = list(range(len(names)))
        else:
            chosen = []
            for d in ([domains] if isinstance(domains, str) else domains):
                if isinstance(d, str) and d in names:
                    chosen.append(names.index(d))
                elif isinstance(d, (int, np.integer)) and not isinstance(d, bool) and 0 <= d < len(names):
                    chosen.append(int(d))
                else:
                    raise ValueError(f"domains must name domains of the dataset {names} (or their "
                                     f"indices), got {d!r}")
            if len(set(chosen)) != len(chosen) or not chosen:
                raise ValueError(f"domains must be distinct and non-empty, got {domains!r}")
        T = len(chosen) if num_tasks is None else _positive_int("num_tasks", num_tasks)
        if T != len(chosen):
            raise ValueError(f"num_tasks must equal the number of domains ({len(chosen)}: "
                             f"{[names[c] for c in chosen]}) for kind='domain-incremental', got {T}")
        self.num_tasks = T
        self.domains = [names[c] for c in chosen]
        self.task_names = list(self.domains)
        self._ranges = [(0, self.num_classes)] * T
        task_of_domain = np.full(len(names), -1, dtype=np.int64)
        task_of_domain[np.asarray(chosen)] = np.arange(T)
        self._item_tasks = {s: task_of_domain[np.asarray(ds.domains, dtype=np.int64)]
                            for s, ds in (("train", self.train_dataset), ("test", self.test_dataset))}

    def _setup_vqa(self, num_tasks) -> None:
        for arg, ds in (("train", self.train_dataset), ("test", self.test_dataset)):
            if not hasattr(ds, "task_ids"):
                raise ValueError(f"kind='vqa' needs datasets with per-item 'task_ids'; {arg} lacks it")
        names = getattr(self.train_dataset, "task_names", None)
        n_groups = len(names) if names is not None else int(max(self.train_dataset.task_ids, default=-1)) + 1
        T = n_groups if num_tasks is None else _positive_int("num_tasks", num_tasks)
        if T != n_groups:
            raise ValueError(f"num_tasks must equal the dataset's number of task groups ({n_groups}"
                             f"{': ' + ', '.join(names) if names else ''}) for kind='vqa', got {T}")
        self.num_tasks = T
        self.task_names = list(names) if names is not None else [f"task {t}" for t in range(T)]
        self._ranges = [(0, self.num_classes)] * T
        self._item_tasks = {s: np.asarray(ds.task_ids, dtype=np.int64)
                            for s, ds in (("train", self.train_dataset), ("test", self.test_dataset))}

    # ---------------------------------------------------------------------------------------------
    # Queries

    def _check_task(self, t) -> int:
        if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or not 0 <= t < self.num_tasks:
            raise ValueError(f"task must be an int in [0, {self.num_tasks}), got {t!r}")
        return int(t)

    def task_classes(self, t: int) -> list[int]:
        """Original class ids of task ``t`` (all classes for domain-incremental and VQA)."""
        start, stop = self.class_range(t)
        return list(self.class_order[start:stop])

    def class_range(self, t: int) -> tuple[int, int]:
        """``(start, stop)`` of task ``t``'s remapped labels."""
        return self._ranges[self._check_task(t)]

    def seen_classes(self, t: int) -> int:
        """Number of remapped labels seen after task ``t``: labels ``[0, seen_classes(t))``."""
        return max(stop for _, stop in self._ranges[: self._check_task(t) + 1])

    @property
    def task_ranges(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._ranges)

    def remap(self, labels) -> np.ndarray:
        """Original class ids → remapped labels."""
        return self._label_map[np.asarray(labels, dtype=np.int64)]

    def __len__(self) -> int:
        return self.num_tasks

    def skip_unreadable(self, workers: int = 4) -> dict[str, list[tuple[int, str]]]:
        """Leave out of every task the items whose image cannot be read (a file that does not decode).

        Reads every item of both splits once (:func:`clfast.data.readers.find_unreadable`); the items
        that raise :class:`~clfast.data.readers.ImageReadError` belong to no task from then on. Which
        items those are depends only on the files, so every rank and every resume of a run agree.

        Returns:
            ``{"train": [(index, message), ...], "test": [...]}`` (also kept as :attr:`skipped`, and in
            :meth:`record`), index = position in the split's dataset.

        Raises:
            ValueError: a task would be left with no training or no test items.
        """
        from .readers import find_unreadable

        found = {}
        for split, ds in (("train", self.train_dataset), ("test", self.test_dataset)):
            found[split] = find_unreadable(ds, workers)
            if found[split]:
                tasks = np.array(self._item_tasks[split], dtype=np.int64, copy=True)
                tasks[np.asarray([i for i, _ in found[split]], dtype=np.int64)] = -1
                before = self.task_sizes(split)
                self._item_tasks[split] = tasks
                emptied = [t for t, (a, b) in enumerate(zip(before, self.task_sizes(split))) if a and not b]
                if emptied:
                    raise ValueError(f"skip_bad_samples: every {split} image of task(s) {emptied} is unreadable "
                                     f"(e.g. {found[split][0][1]}); nothing would be left to "
                                     f"{'train' if split == 'train' else 'test'} on")
        self.skipped = found
        return found

    # ---------------------------------------------------------------------------------------------
    # Subsets

    def _subset(self, split: str, tasks: Sequence[int]) -> TaskDataset:
        ds = self.train_dataset if split == "train" else self.test_dataset
        item_tasks = self._item_tasks[split]
        idx = np.nonzero(np.isin(item_tasks, np.asarray(tasks, dtype=np.int64)))[0]
        labels = self._label_map[np.asarray(ds.targets, dtype=np.int64)[idx]]
        vqa = self.kind == "vqa"
        return TaskDataset(ds, idx, labels, item_tasks[idx], self.class_names, vqa=vqa,
                           num_answers=self.num_classes, tokens=self._question_tokens(split) if vqa else None)

    def set_tokenizer(self, tokenizer: Optional[Callable]) -> None:
        """Use ``tokenizer(list[str]) -> (N, L) int64`` for VQA questions from now on (None: strings).

        Each split is tokenized once, when its first task set is built; sets built before keep theirs.
        """
        if tokenizer is not None and not callable(tokenizer):
            raise TypeError(f"tokenizer must be callable or None, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self._tokens: dict[str, torch.Tensor] = {}

    def _question_tokens(self, split: str) -> Optional[torch.Tensor]:
        """All questions of a split tokenized once, ``(N, L)`` int64; None without a tokenizer."""
        if self.tokenizer is None:
            return None
        if split not in self._tokens:
            ds = self.train_dataset if split == "train" else self.test_dataset
            questions = list(ds.questions) if hasattr(ds, "questions") else \
                [ds[i]["question"] for i in range(len(ds))]
            tokens = self.tokenizer(questions)
            if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] != len(questions):
                raise ValueError(f"tokenizer must return an int64 tensor (N, L) for N={len(questions)} "
                                 f"questions, got {getattr(tokens, 'shape', type(tokens).__name__)}")
            self._tokens[split] = tokens.to(torch.int64).contiguous()
        return self._tokens[split]

    def train_set(self, t: int) -> TaskDataset:
        """Training items of task ``t``."""
        return self._subset("train", [self._check_task(t)])

    def test_set(self, t: int) -> TaskDataset:
        """Test items of task ``t``."""
        return self._subset("test", [self._check_task(t)])

    def test_set_upto(self, t: int) -> TaskDataset:
        """Test items of tasks ``0..t`` (each item keeps its own task id)."""
        return self._subset("test", list(range(self._check_task(t) + 1)))

    # evaluation: what is evaluated after each training task (a JointScenario answers differently)
    def eval_tasks(self, t: int) -> list[int]:
        """The tasks whose test splits (:meth:`test_set`) are evaluated after training task ``t``: 0..t."""
        return list(range(self._check_task(t) + 1))

    def eval_class_range(self, i: int) -> tuple[int, int]:
        """The classes of evaluated task ``i`` (a task-incremental evaluation masks to them)."""
        return self.class_range(i)

    def joint_view(self) -> "JointScenario":
        """Every task as one training task, each task's test split evaluated after it (:class:`JointScenario`)."""
        return JointScenario(self)

    def task_sizes(self, split: str) -> list[int]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        tasks = self._item_tasks[split]
        return [int(n) for n in np.bincount(tasks[tasks >= 0], minlength=self.num_tasks)]

    # ---------------------------------------------------------------------------------------------
    # Construction by name, record

    @classmethod
    def from_name(cls, dataset_name: str, root: Optional[str] = None, num_tasks: Optional[int] = None,
                  transform_train: Optional[Callable] = None, transform_test: Optional[Callable] = None,
                  dataset_kwargs: Optional[dict] = None, *, verify_data: bool = False,
                  skip_bad_samples: bool = False, workers: int = 4, **kw) -> "Scenario":
        """Build both splits with :func:`create_dataset` and cut them into tasks.

        Args:
            dataset_name: a registered dataset, e.g. ``"synth-shapes"``, ``"cifar100"``.
            root: data folder for readers of data on disk.
            num_tasks: default: the registry's ``default_tasks`` (class-/task-incremental), the
                number of domains (domain-incremental) or of task groups (VQA).
            transform_train, transform_test: per-split image transforms.
            dataset_kwargs: passed to both splits' builder (e.g. ``{"n_per_class": 10}``).
            verify_data: re-hash every file against the sha256s the dataset recorded (its split
                manifest; ``create_dataset(verify=True)``).
            skip_bad_samples: leave out the items whose image does not decode (:meth:`skip_unreadable`,
                with ``workers`` threads) instead of failing when one is read.
            **kw: the keyword arguments of :class:`Scenario`.
        """
        info = dataset_info(dataset_name)
        dkw = dict(dataset_kwargs or {})
        if verify_data:
            dkw["verify"] = True
        train = create_dataset(dataset_name, "train", root, transform_train, **dkw)
        test = create_dataset(dataset_name, "test", root, transform_test, **dkw)
        kind = kw.get("kind") or ("vqa" if info.kind == "vqa" else "class-incremental")
        if num_tasks is None and kind in ("class-incremental", "task-incremental"):
            num_tasks = info.default_tasks
        scenario = cls(train, test, num_tasks, **kw)
        if skip_bad_samples:
            scenario.skip_unreadable(workers)
        return scenario

    def record(self) -> dict:
        """What a run must log to be reproduced: JSON-serialisable."""
        rec = {
            "datasets": {"train": getattr(self.train_dataset, "name", type(self.train_dataset).__name__),
                         "test": getattr(self.test_dataset, "name", type(self.test_dataset).__name__)},
            "kind": self.kind,
            "num_tasks": self.num_tasks,
            "num_classes": self.num_classes,
            "class_order": [int(c) for c in self.class_order],
            "class_order_seed": self.class_order_seed,
            "shuffle_classes": self.shuffle_classes,
            "first_task_classes": None if self.first_task_classes is None else int(self.first_task_classes),
            "class_ranges": [list(r) for r in self._ranges],
            "task_names": list(self.task_names),
            "domains": self.domains,
            "class_names": list(self.class_names),
            "task_sizes": {"train": self.task_sizes("train"), "test": self.task_sizes("test")},
        }
        manifests = {s: ds.manifest_info() for s, ds in (("train", self.train_dataset),
                                                         ("test", self.test_dataset))
                     if callable(getattr(ds, "manifest_info", None))}
        if manifests:
            rec["manifests"] = manifests
        if self.skipped is not None:   # the run left unreadable images out (skip_bad_samples)
            rec["skipped_samples"] = {s: {"count": len(found), "items": [{"index": int(i), "error": msg}
                                                                          for i, msg in found[:100]]}
                                      for s, found in self.skipped.items()}
        return rec

    def __repr__(self) -> str:
        return (f"Scenario({self.kind}, dataset={getattr(self.train_dataset, 'name', '?')!r}, "
                f"tasks={self.num_tasks}, classes={self.num_classes})")


class JointScenario:
    """A scenario's tasks as one training task: joint training, the upper bound of continual learning.

    Training task 0 holds every task's training items and every class (``class_range(0) = (0, C)``),
    so a method built for it sees ``num_tasks = 1``. After it, each task of the underlying scenario is
    evaluated on its own test split (:meth:`eval_tasks` gives them all; :meth:`test_set` ``(i)`` is task
    ``i``'s), which fills one column of the accuracy matrix. Items carry ``task`` 0 in both splits: the
    model knows a single task; the engine keeps track of which task a test split belongs to, and a
    task-incremental evaluation masks to that task's classes (:meth:`eval_class_range`). The class
    order, and so each task's classes, are the underlying scenario's.

    Args:
        scenario: the continual scenario (its class order and task split are kept for evaluation).
    """

    joint = True

    def __init__(self, scenario: Scenario):
        if not isinstance(scenario, Scenario):
            raise ValueError(f"scenario must be a Scenario, got {type(scenario).__name__}")
        self.scenario = scenario
        self.kind = scenario.kind
        self.num_classes = scenario.num_classes
        self.class_order = scenario.class_order
        self.class_names = scenario.class_names
        self.num_tasks = 1
        self.task_names = ["joint"]
        self._range = (0, scenario.num_classes)

    def _check_task(self, t) -> int:
        if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or t != 0:
            raise ValueError(f"task must be 0 (a joint scenario has one training task), got {t!r}")
        return 0

    @property
    def train_dataset(self):
        return self.scenario.train_dataset

    @property
    def test_dataset(self):
        return self.scenario.test_dataset

    def class_range(self, t: int) -> tuple[int, int]:
        self._check_task(t)
        return self._range

    def seen_classes(self, t: int) -> int:
        return self.class_range(t)[1]

    @property
    def task_ranges(self) -> tuple[tuple[int, int], ...]:
        return (self._range,)

    def __len__(self) -> int:
        return 1

    def set_tokenizer(self, tokenizer: Optional[Callable]) -> None:
        self.scenario.set_tokenizer(tokenizer)

    def _as_task0(self, ds: TaskDataset) -> TaskDataset:
        return TaskDataset(ds.dataset, ds.indices, np.asarray(ds.targets), np.zeros(len(ds), dtype=np.int64),
                           ds.classes, vqa=ds.vqa, num_answers=ds.num_answers, tokens=ds.tokens)

    def train_set(self, t: int) -> TaskDataset:
        """Every task's training items, as task 0."""
        self._check_task(t)
        return self._as_task0(self.scenario._subset("train", list(range(self.scenario.num_tasks))))

    def eval_tasks(self, t: int) -> list[int]:
        """Every task of the underlying scenario: all were trained in the one training task."""
        self._check_task(t)
        return list(range(self.scenario.num_tasks))

    def eval_class_range(self, i: int) -> tuple[int, int]:
        return self.scenario.class_range(i)

    def test_set(self, i: int) -> TaskDataset:
        """Test items of the underlying scenario's task ``i`` (as task 0)."""
        return self._as_task0(self.scenario.test_set(i))

    def joint_view(self) -> "JointScenario":
        return self

    def task_sizes(self, split: str) -> list[int]:
        return [sum(self.scenario.task_sizes(split))]

    def record(self) -> dict:
        """The underlying scenario's record (its tasks are the evaluated ones), marked ``joint``."""
        return {**self.scenario.record(), "joint": True, "training_tasks": 1}

    def __repr__(self) -> str:
        return f"JointScenario({self.scenario!r})"
