"""Sequences of classification datasets: ``"digits+synth-shapes"`` is one dataset whose label space is the
concatenation of its parts' (the 5-datasets style of benchmark, where every task is another dataset).

``create_dataset("a+b", split, ...)`` builds each part with the same ``split``, ``root`` and ``transform``
(keyword arguments go to every part, except ``{"<part>": {...}}``, which goes to that part only) and
returns a :class:`DatasetSequence`. A class-incremental :class:`Scenario`
over it keeps the parts apart: each part's classes are permuted with the class-order seed on their own
and cut into ``num_tasks / len(parts)`` tasks (default one task per part), in the order the name lists
them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from torch.utils.data import Dataset

__all__ = ["DatasetSequence", "SEPARATOR"]

SEPARATOR = "+"


class DatasetSequence(Dataset):
    """Classification datasets one after the other, with disjoint labels.

    Item ``i`` of part ``p`` keeps its image and gets label ``offset[p] + label``. Attributes follow the
    registry's interface (``targets``, ``classes`` as ``"<part>:<class>"``, ``name``), plus ``parts``
    (the part names), ``class_blocks`` (classes per part) and ``domains``/``domain_names`` (the part of
    each item).
    """

    def __init__(self, datasets: Sequence[Dataset], names: Sequence[str]):
        if len(datasets) < 2 or len(datasets) != len(names):
            raise ValueError(f"a dataset sequence needs two or more parts with one name each, got {len(datasets)} "
                             f"datasets and {len(names)} names")
        if len(set(names)) != len(names):
            raise ValueError(f"a dataset sequence cannot repeat a part: {list(names)}")
        self.datasets, self.parts = list(datasets), list(names)
        self.name = SEPARATOR.join(names)
        self.class_blocks = [len(d.classes) for d in datasets]
        offsets = np.concatenate([[0], np.cumsum(self.class_blocks)[:-1]]).astype(np.int64)
        self._offsets = [int(o) for o in offsets]
        self._starts = np.concatenate([[0], np.cumsum([len(d) for d in datasets])]).astype(np.int64)
        self.targets = [int(y) + off for d, off in zip(datasets, self._offsets) for y in d.targets]
        self.classes = [f"{n}:{c}" for d, n in zip(datasets, names) for c in d.classes]
        self.domains = np.repeat(np.arange(len(datasets)), [len(d) for d in datasets])
        self.domain_names = list(names)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        p = int(np.searchsorted(self._starts, i, side="right")) - 1
        image, label = self.datasets[p][int(i - self._starts[p])]
        return image, int(label) + self._offsets[p]

    def __repr__(self) -> str:
        return f"DatasetSequence({self.name!r}, classes={self.class_blocks}, n={len(self)})"
