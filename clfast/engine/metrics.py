"""Continual-learning metrics as pure functions on an accuracy matrix.

``acc[i][j]`` is the accuracy, in percent, on task ``i``'s test split after training task ``j``.
Tasks are numbered from 0 in code (from 1 in the documentation and in ``acc_matrix.csv``). An entry is
defined for ``i <= j`` (on and above the diagonal); entries below it (``i > j``) are ignored and are
NaN in every matrix this module produces. With ``N`` tasks and ``N - 1`` the last column:

* **Final accuracy** ``A_N = mean_i acc[i][N-1]``, the mean of the last column.
* **Forgetting** ``F_N = mean_{i<N-1} (max_{i<=j<N-1} acc[i][j] - acc[i][N-1])``.
* **Backward transfer** ``BWT = mean_{i<N-1} (acc[i][N-1] - acc[i][i])``.
* **Average incremental accuracy** ``A_avg = mean_j A_j`` with ``A_j = mean_{i<=j} acc[i][j]``.
* **Sample-weighted accuracy**: correct predictions over all test samples of all tasks after the last
  task. It equals ``A_N`` only when every task has the same number of test samples. After each task
  ``j`` it is ``sum_{i<=j} correct[i][j] / sum_{i<=j} total[i][j]`` (:func:`sample_weighted_curve`): the
  "total avg accuracy" CluMo's code prints (clumo.md §5).

``F_N`` and ``BWT`` average over no task when there is a single one; both are then defined as 0.0.

A joint-training run (the upper bound: every task's data trained as one task, then each task's test
split evaluated) has a single column, an ``(N, 1)`` matrix with every entry defined: its ``A_N`` and
sample-weighted accuracy are those of that column, ``A_avg = A_N``, and ``F_N = BWT = 0`` (nothing was
trained after anything else). Every function here takes both shapes.

Accuracies are counted per sample (:class:`AccuracyMatrix` sums correct/total counts), never as an
average of per-batch accuracies.
"""

from __future__ import annotations

import csv
import io
import math
import operator
import os
from typing import Any, Sequence

import numpy as np

__all__ = [
    "final_accuracy", "forgetting", "backward_transfer", "accuracy_curve", "average_incremental_accuracy",
    "per_task_accuracy", "sample_weighted_accuracy", "sample_weighted_curve", "summarize", "AccuracyMatrix", "write_acc_csv",
    "read_acc_csv", "check_matrix",
]


# ----------------------------------------------------------------------------------------------------
# validation


def check_matrix(acc: Any, name: str = "acc") -> np.ndarray:
    """Return ``acc`` as a float64 array, square ``(N, N)`` or a joint run's single column ``(N, 1)``.

    Every defined entry (``i <= j``; all of a single column) must be a finite percent; entries below the
    diagonal of a square matrix are set to NaN.
    """
    try:
        a = np.array(acc, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a square matrix of accuracies in percent; "
                         f"it could not be read as a float array ({e})") from None
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] not in (a.shape[0], 1):
        raise ValueError(f"{name} must be a non-empty square (N, N) matrix with acc[i][j] = accuracy on task i "
                         f"after task j, or a joint run's single column (N, 1); got shape {a.shape}")
    rows, cols = _defined(a.shape)
    vals = a[rows, cols]
    bad = ~np.isfinite(vals)
    if bad.any():
        k = int(np.argmax(bad))
        hint = ""
        if a.shape[0] > 1 and a.shape[1] > 1 and np.isnan(a[0, 1]) and np.isfinite(a[1, 0]):
            hint = " (is it transposed? rows are the task evaluated, columns the task just trained)"
        raise ValueError(f"{name}[{rows[k]}][{cols[k]}] must be a finite accuracy (defined for i <= j), "
                         f"got {vals[k]}{hint}")
    out = (vals < 0) | (vals > 100)
    if out.any():
        k = int(np.argmax(out))
        raise ValueError(f"{name}[{rows[k]}][{cols[k]}] must be a percentage in [0, 100], got {vals[k]}")
    if a.shape[1] > 1:
        a[np.tril_indices(a.shape[0], -1)] = np.nan
    return a


def _defined(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the defined cells: on and above the diagonal, or every cell of a single column."""
    n, m = shape
    if m == 1:
        return np.arange(n), np.zeros(n, dtype=np.int64)
    return np.triu_indices(n)


def _seen_rows(a: np.ndarray, j: int) -> np.ndarray:
    """Column ``j``'s defined entries: tasks ``0..j``, or every task in a single column."""
    return a[:, j] if a.shape[1] == 1 else a[: j + 1, j]


def _check_counts(correct: Any, total: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return per-task ``correct`` (float64) and ``total`` (int64) 1-D arrays after checking them.

    ``total`` holds whole sample counts; ``correct`` is the summed per-sample credit, a whole count for
    classification and a fraction for soft-scored tasks (VQA accuracy ``min(1, votes / 3)``).
    """
    arrays = []
    for name, x in (("correct", correct), ("total", total)):
        try:
            v = np.asarray(x)
            if v.dtype == object or v.dtype.kind not in "iuf":
                raise TypeError(f"dtype {v.dtype}")
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} must be a 1-D sequence of per-task sample counts; got {x!r} ({e})") from None
        if v.ndim != 1 or v.size == 0:
            raise ValueError(f"{name} must be a non-empty 1-D sequence of per-task counts; got shape {v.shape}")
        if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
            raise ValueError(f"{name} must hold finite counts; got {v.tolist()}")
        if name == "total" and v.dtype.kind == "f" and np.any(v != np.round(v)):
            raise ValueError(f"total must hold whole sample counts; got {v.tolist()}")
        if np.any(v < 0):
            raise ValueError(f"{name} must hold non-negative counts; got {v.tolist()}")
        arrays.append(v.astype(np.float64 if name == "correct" else np.int64))
    c, t = arrays
    if c.shape != t.shape:
        raise ValueError(f"correct and total must have the same length (one entry per task); "
                         f"got {c.shape[0]} and {t.shape[0]}")
    if np.any(t == 0):
        raise ValueError(f"total must be > 0 for every task (a task with no test samples has no accuracy); "
                         f"got total={t.tolist()}")
    if np.any(c > t):
        k = int(np.argmax(c > t))
        raise ValueError(f"correct[{k}]={c[k]:g} exceeds total[{k}]={t[k]}; correct must be <= total")
    return c, t


# ----------------------------------------------------------------------------------------------------
# metrics on an accuracy matrix


def final_accuracy(acc: Any) -> float:
    """Final average accuracy ``A_N``: the mean of the last column.

    Args:
        acc: (N, N) accuracy matrix in percent, ``acc[i][j]`` for ``i <= j``.

    Returns:
        ``A_N`` in percent.
    """
    a = check_matrix(acc)
    return float(a[:, -1].mean())


def forgetting(acc: Any) -> float:
    """Average forgetting ``F_N = mean_{i<N-1} (max_{i<=j<N-1} acc[i][j] - acc[i][N-1])``.

    The maximum runs over the columns before the last one, so ``F_N`` can be negative when a task's
    accuracy only went up. With a single task there is nothing to forget and the result is 0.0.

    Args:
        acc: (N, N) accuracy matrix in percent.

    Returns:
        ``F_N`` in percentage points.
    """
    a = check_matrix(acc)
    n = a.shape[0]
    if a.shape[1] == 1:   # one task, or a joint run: nothing was trained after anything else
        return 0.0
    drops = [np.max(a[i, i:n - 1]) - a[i, n - 1] for i in range(n - 1)]
    return float(np.mean(drops))


def backward_transfer(acc: Any) -> float:
    """Backward transfer ``BWT = mean_{i<N-1} (acc[i][N-1] - acc[i][i])``; 0.0 for a single task.

    Negative values mean forgetting; positive values mean later tasks helped earlier ones.

    Args:
        acc: (N, N) accuracy matrix in percent.

    Returns:
        ``BWT`` in percentage points.
    """
    a = check_matrix(acc)
    n = a.shape[0]
    if a.shape[1] == 1:
        return 0.0
    return float(np.mean([a[i, n - 1] - a[i, i] for i in range(n - 1)]))


def accuracy_curve(acc: Any) -> np.ndarray:
    """``A_j``: the mean accuracy over the tasks seen so far after each task ``j``.

    Args:
        acc: (N, N) accuracy matrix in percent.

    Returns:
        (N,) float array, ``A_j = mean_{i<=j} acc[i][j]``; its last entry is ``A_N``. A joint run's
        single column gives one entry.
    """
    a = check_matrix(acc)
    return np.array([_seen_rows(a, j).mean() for j in range(a.shape[1])], dtype=np.float64)


def average_incremental_accuracy(acc: Any) -> float:
    """Average incremental accuracy ``A_avg = mean_j A_j`` (see :func:`accuracy_curve`).

    Args:
        acc: (N, N) accuracy matrix in percent.

    Returns:
        ``A_avg`` in percent.
    """
    return float(accuracy_curve(acc).mean())


# ----------------------------------------------------------------------------------------------------
# metrics on per-task counts


def per_task_accuracy(correct: Any, total: Any) -> np.ndarray:
    """Per-task accuracy from per-sample counts.

    Args:
        correct: (N,) number of correctly classified test samples of each task (or their summed
            soft scores, e.g. VQA accuracy).
        total: (N,) number of test samples of each task (each > 0).

    Returns:
        (N,) float array of accuracies in percent.
    """
    c, t = _check_counts(correct, total)
    return 100.0 * c / t


def sample_weighted_accuracy(correct: Any, total: Any) -> float:
    """Accuracy over all test samples of all tasks together: ``100 * sum(correct) / sum(total)``.

    Args:
        correct: (N,) correct counts per task after the last task.
        total: (N,) test-set size per task (each > 0).

    Returns:
        Sample-weighted accuracy in percent.
    """
    c, t = _check_counts(correct, total)
    return float(100.0 * c.sum() / t.sum())


def sample_weighted_curve(correct: Any, total: Any) -> np.ndarray:
    """The sample-weighted accuracy over the tasks seen after each task.

    Args:
        correct: (N, N) summed credit, ``correct[i][j]`` on task ``i`` after task ``j`` (or a joint run's
            (N, 1)); entries below the diagonal are ignored.
        total: the matching sample counts; every defined cell must be > 0.

    Returns:
        (N,) float64 (one entry for a joint run) in percent: entry ``j`` is
        ``100 · sum_{i<=j} correct[i][j] / sum_{i<=j} total[i][j]``; its last entry is the run's
        sample-weighted accuracy.
    """
    c, t = np.asarray(correct), np.asarray(total)
    if c.shape != t.shape or c.ndim != 2 or c.shape[0] == 0 or c.shape[1] not in (c.shape[0], 1):
        raise ValueError(f"correct and total must be (N, N) (or a joint run's (N, 1)) count matrices of the same "
                         f"shape; got {c.shape} and {t.shape}")
    out = []
    for j in range(c.shape[1]):
        rows = slice(None) if c.shape[1] == 1 else slice(0, j + 1)
        cj, tj = _check_counts(c[rows, j], t[rows, j])
        out.append(100.0 * cj.sum() / tj.sum())
    return np.asarray(out, dtype=np.float64)


def summarize(acc: Any, correct_last: Any, total_last: Any) -> dict[str, float]:
    """All headline metrics of a finished run.

    Args:
        acc: (N, N) accuracy matrix in percent.
        correct_last: (N,) correct counts per task after the last task.
        total_last: (N,) test-set sizes per task. ``100 * correct_last / total_last`` must match the
            last column of ``acc`` (to 1e-4 percentage points), which catches counts in the wrong order.

    Returns:
        ``{"A_N", "F_N", "BWT", "A_avg", "sample_weighted_accuracy"}``, all floats in percent.
    """
    a = check_matrix(acc)
    per_task = per_task_accuracy(correct_last, total_last)
    if per_task.shape[0] != a.shape[0]:
        raise ValueError(f"correct_last and total_last must have one entry per task (N={a.shape[0]}); "
                         f"got {per_task.shape[0]}")
    if not np.allclose(per_task, a[:, -1], rtol=0.0, atol=1e-4):
        raise ValueError(f"correct_last/total_last give per-task accuracies {per_task.tolist()}, which do not "
                         f"match the last column of acc {a[:, -1].tolist()}")
    return {
        "A_N": final_accuracy(a),
        "F_N": forgetting(a),
        "BWT": backward_transfer(a),
        "A_avg": average_incremental_accuracy(a),
        "sample_weighted_accuracy": sample_weighted_accuracy(correct_last, total_last),
    }


# ----------------------------------------------------------------------------------------------------
# CSV


def _csv_text(a: np.ndarray) -> str:
    n, m = a.shape
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task"] + [f"after_{j + 1}" for j in range(m)])
    for i in range(n):
        w.writerow([i + 1] + ["" if (m > 1 and j < i) or math.isnan(a[i, j]) else repr(float(a[i, j]))
                              for j in range(m)])
    return buf.getvalue()


def write_acc_csv(acc: Any, path: str | os.PathLike) -> None:
    """Write an accuracy matrix as CSV, atomically.

    Rows are the task evaluated, columns the task just trained, both numbered from 1; the header is
    ``task,after_1,...,after_N`` (``task,after_1`` for a joint run's single column); values are
    percentages written exactly (``repr`` of the float); cells below the diagonal (task not yet trained)
    are empty.

    Args:
        acc: (N, N) accuracy matrix in percent, or a joint run's (N, 1).
        path: destination file.
    """
    from .io import atomic_write_text

    atomic_write_text(path, _csv_text(check_matrix(acc)))


def read_acc_csv(path: str | os.PathLike) -> np.ndarray:
    """Read a matrix written by :func:`write_acc_csv`.

    Args:
        path: CSV file.

    Returns:
        (N, N) float64 array in percent, NaN below the diagonal; (N, 1) for a joint run.
    """
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r]
    if not rows:
        raise ValueError(f"path {os.fspath(path)!r} is empty; expected an accuracy-matrix CSV")
    n = len(rows) - 1
    m = 1 if n > 1 and len(rows[0]) == 2 else n       # a joint run's single column, else square
    header = ["task"] + [f"after_{j + 1}" for j in range(m)]
    if rows[0] != header:
        square = ",".join(["task"] + [f"after_{j + 1}" for j in range(n)])
        raise ValueError(f"path {os.fspath(path)!r}: header must be {square} (or task,after_1 for a joint run) "
                         f"for {n} task rows; got {','.join(rows[0])}")
    a = np.full((n, m), np.nan)
    for i, row in enumerate(rows[1:]):
        if len(row) != m + 1 or row[0].strip() != str(i + 1):
            raise ValueError(f"path {os.fspath(path)!r}: row {i + 2} must be task {i + 1} followed by {m} cells; "
                             f"got {row}")
        for j, cell in enumerate(row[1:]):
            if cell.strip():
                try:
                    a[i, j] = float(cell)
                except ValueError:
                    raise ValueError(f"path {os.fspath(path)!r}: cell (task {i + 1}, after_{j + 1}) is not a "
                                     f"number: {cell!r}") from None
    return check_matrix(a, name=f"matrix in {os.fspath(path)!r}")


# ----------------------------------------------------------------------------------------------------
# accumulator


def _score(value: Any, name: str) -> float:
    """A non-negative finite number of (possibly fractional) correct answers."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a non-negative number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a non-negative finite number, got {v}")
    return v


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a non-negative int, got a bool ({value})")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a non-negative int, got {value!r} ({type(value).__name__})") from None
    if v < 0:
        raise ValueError(f"{name} must be a non-negative int, got {v}")
    return v


class AccuracyMatrix:
    """Accumulates per-sample correct/total counts into an accuracy matrix.

    Counts for the same cell add up, so a cell may be filled batch by batch or from several processes.
    The matrix covers the tasks trained so far: ``N = 1 + largest after_task`` updated. With
    ``joint=True`` it is a joint-training run's single column: ``after_task`` is always 0 (the one
    training task, which held every task's data) and ``task_evaluated`` any task, so ``N`` is 1 + the
    largest ``task_evaluated``.

    Example::

        m = AccuracyMatrix()
        m.update(task_evaluated=0, after_task=0, correct=90, total=100)
        m.matrix()          # array([[90.]])
    """

    def __init__(self, joint: bool = False) -> None:
        self.joint = bool(joint)
        self._correct = np.zeros((0, 0 if not joint else 1), dtype=np.float64)  # summed credit: whole, or soft
        self._total = np.zeros(self._correct.shape, dtype=np.int64)

    @property
    def num_tasks(self) -> int:
        """Number of tasks so far (rows; as many columns, or one in a joint run)."""
        return self._total.shape[0]

    def _grow(self, n: int) -> None:
        if n <= self.num_tasks:
            return
        shape = (n, 1) if self.joint else (n, n)
        c = np.zeros(shape, dtype=np.float64)
        t = np.zeros(shape, dtype=np.int64)
        k, m = self._total.shape
        c[:k, :m] = self._correct
        t[:k, :m] = self._total
        self._correct, self._total = c, t

    def update(self, task_evaluated: int, after_task: int, correct: float, total: int) -> None:
        """Add counts for one cell.

        Args:
            task_evaluated: task ``i`` whose test samples were evaluated (from 0).
            after_task: task ``j`` just trained (from 0); ``task_evaluated <= after_task`` (a joint run:
                ``after_task == 0``, any ``task_evaluated``).
            correct: number of correct predictions (``0 <= correct <= total``), or their summed soft
                scores (VQA accuracy).
            total: number of samples evaluated (0 adds nothing, e.g. an empty shard).
        """
        i = _count(task_evaluated, "task_evaluated")
        j = _count(after_task, "after_task")
        c = _score(correct, "correct")
        t = _count(total, "total")
        if self.joint and j != 0:
            raise ValueError(f"after_task must be 0 in a joint run's matrix (one training task), got {j}")
        if i > j and not self.joint:
            raise ValueError(f"task_evaluated must be <= after_task (only seen tasks are evaluated); "
                             f"got task_evaluated={i}, after_task={j}")
        if c > t:
            raise ValueError(f"correct must be <= total; got correct={c:g}, total={t}")
        self._grow(max(i, j) + 1)
        self._correct[i, j] += c
        self._total[i, j] += t

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the (N, N) (joint: (N, 1)) ``correct`` (float64) and ``total`` (int64) counts (zero where nothing was counted)."""
        return self._correct.copy(), self._total.copy()

    def matrix(self) -> np.ndarray:
        """(N, N) float64 accuracies in percent (joint: (N, 1)); NaN below the diagonal and in cells with
        no samples."""
        with np.errstate(invalid="ignore", divide="ignore"):
            a = np.where(self._total > 0, 100.0 * self._correct / np.maximum(self._total, 1), np.nan)
        if not self.joint:
            a[np.tril_indices(self.num_tasks, -1)] = np.nan
        return a

    def summary(self) -> dict[str, float]:
        """:func:`summarize` of this matrix and its last column's counts."""
        if self.num_tasks == 0:
            raise ValueError("AccuracyMatrix is empty; call update() before summary()")
        return summarize(self.matrix(), self._correct[:, -1], self._total[:, -1])

    def sample_weighted_curve(self) -> np.ndarray:
        """:func:`sample_weighted_curve` of the counts: (N,) percent, one entry per column so far."""
        if self.num_tasks == 0:
            raise ValueError("AccuracyMatrix is empty; call update() before sample_weighted_curve()")
        return sample_weighted_curve(self._correct, self._total)

    def test_sizes(self) -> list[int]:
        """The number of test samples of each task as last evaluated (the last column's counts)."""
        return [int(t) for t in self._total[:, -1]] if self.num_tasks else []

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write :meth:`matrix` with :func:`write_acc_csv` (percentages only; counts are not stored)."""
        if self.num_tasks == 0:
            raise ValueError("AccuracyMatrix is empty; nothing to write")
        write_acc_csv(self.matrix(), path)

    @staticmethod
    def from_csv(path: str | os.PathLike) -> np.ndarray:
        """Read a CSV written by :meth:`to_csv`.

        The CSV holds percentages, not counts, so this returns the (N, N) or (N, 1) float matrix
        (:func:`read_acc_csv`), not an ``AccuracyMatrix``; use :meth:`state_dict` to keep counts.
        """
        return read_acc_csv(path)

    def state_dict(self) -> dict[str, list]:
        """Counts as nested lists of numbers (loadable with ``torch.load(weights_only=True)``)."""
        return {"correct": self._correct.tolist(), "total": self._total.tolist()}

    def load_state_dict(self, state: dict[str, Sequence[Sequence[int]]]) -> None:
        """Restore counts saved by :meth:`state_dict` (of a matrix of the same kind: joint or not)."""
        if not isinstance(state, dict) or set(state) != {"correct", "total"}:
            raise ValueError(f"state must be a dict with keys 'correct' and 'total'; got {state!r:.200}")
        c = np.asarray(state["correct"], dtype=np.float64)
        t = np.asarray(state["total"], dtype=np.int64)
        if t.size == 0:
            c, t = c.reshape(0, self._total.shape[1]), t.reshape(0, self._total.shape[1])
        want = "an (N, 1) column (a joint run)" if self.joint else "square matrices"
        if (c.shape != t.shape or t.ndim != 2
                or (t.shape[1] != 1 if self.joint else t.shape[0] != t.shape[1])):
            raise ValueError(f"state['correct'] and state['total'] must be {want} of the same size; "
                             f"got shapes {c.shape} and {t.shape}")
        if np.any(c < 0) or np.any(c > t) or (not self.joint and np.any(np.tril(t, -1) != 0)):
            raise ValueError("state holds invalid counts (negative, correct > total, or counts below the diagonal)")
        self._correct, self._total = c, t

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "AccuracyMatrix":
        """A new matrix from :meth:`state_dict` output (an (N, 1) state with N > 1 is a joint run's)."""
        t = np.asarray(state.get("total", []) if isinstance(state, dict) else [])
        m = cls(joint=t.ndim == 2 and t.shape[1] == 1 and t.shape[0] > 1)
        m.load_state_dict(state)
        return m

    def __repr__(self) -> str:
        return f"AccuracyMatrix(num_tasks={self.num_tasks}{', joint' if self.joint else ''})"
