"""Figures of a run: the accuracy-matrix heatmap and the accuracy curve.

Figures are drawn on a :class:`matplotlib.figure.Figure` with the Agg canvas, never through
``pyplot``, so no global backend or figure state is touched and nothing needs a display. Files are
written atomically (temporary file in the same directory, then ``os.replace``); the format follows the
file extension (``.png`` by default). matplotlib is an optional dependency; :func:`matplotlib_available`
tells whether it is installed.
"""

from __future__ import annotations

import importlib.util
import io
import os
from typing import Any, Mapping, Optional

import numpy as np

from .io import atomic_write_bytes
from .metrics import check_matrix, accuracy_curve

__all__ = ["plot_acc_matrix", "plot_accuracy_curve", "matplotlib_available"]

_FORMATS = ("png", "pdf", "svg")


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (plots need it)."""
    return importlib.util.find_spec("matplotlib") is not None


def _new_figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("clfast plots need matplotlib; install it with `pip install matplotlib`") from e
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> None:
    ext = os.path.splitext(os.fspath(path))[1].lower().lstrip(".") or "png"
    if ext not in _FORMATS:
        raise ValueError(f"path must end in one of {', '.join('.' + f for f in _FORMATS)}; got {os.fspath(path)!r}")
    buf = io.BytesIO()
    fig.savefig(buf, format=ext, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_acc_matrix(acc: Any, path: str | os.PathLike, title: Optional[str] = None) -> None:
    """Heatmap of an accuracy matrix with each value printed in its cell.

    Rows are the task evaluated, columns the task just trained (both numbered from 1); cells below the
    diagonal are left blank. A joint run's single column is one column of N cells. The colour scale is
    fixed to 0–100 %.

    Args:
        acc: (N, N) accuracy matrix in percent, or a joint run's (N, 1) (see :mod:`clfast.engine.metrics`).
        path: output file (``.png``, ``.pdf`` or ``.svg``).
        title: figure title; default ``"Accuracy matrix (%)"``.
    """
    a = check_matrix(acc)
    n, m = a.shape
    side = min(max(3.0, 0.55 * n + 1.5), 16.0)
    fig = _new_figure((side if m > 1 else 2.5) + 1.0, side)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(a), cmap="viridis", vmin=0.0, vmax=100.0, aspect="equal")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="accuracy (%)")
    if n <= 30:
        size = max(5.0, min(10.0, 90.0 / n))
        for i in range(n):
            for j in range(i if m > 1 else 0, m):   # a joint run's single column: every cell
                ax.text(j, i, f"{a[i, j]:.1f}", ha="center", va="center", fontsize=size,
                        color="black" if a[i, j] >= 60.0 else "white")
    step = max(1, n // 20)
    cols, rows = np.arange(m)[::step], np.arange(n)[::step]
    ax.set_xticks(cols, [str(t + 1) for t in cols] if m > 1 else ["all (joint)"])
    ax.set_yticks(rows, [str(t + 1) for t in rows])
    ax.set_xlabel("after training task")
    ax.set_ylabel("task evaluated")
    ax.set_title(title if title is not None else "Accuracy matrix (%)")
    _save(fig, path)


def plot_accuracy_curve(acc: Any, path: str | os.PathLike, label: Optional[str] = None) -> None:
    """Mean accuracy over the tasks seen so far (``A_j``) against the number of tasks trained.

    Args:
        acc: one (N, N) accuracy matrix, or a mapping ``label -> matrix`` to overlay several runs
            (their task counts may differ).
        path: output file (``.png``, ``.pdf`` or ``.svg``).
        label: legend entry when ``acc`` is a single matrix (no legend if None).
    """
    if isinstance(acc, Mapping):
        if not acc:
            raise ValueError("acc must be a matrix or a non-empty mapping label -> matrix; got an empty mapping")
        if label is not None:
            raise ValueError("label must be None when acc is a mapping (the mapping's keys are the labels)")
        runs = {str(k): accuracy_curve(v) for k, v in acc.items()}
        legend = True
    else:
        runs = {label or "": accuracy_curve(acc)}
        legend = label is not None
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    n_max = 1
    for name, curve in runs.items():
        x = np.arange(1, curve.size + 1)
        ax.plot(x, curve, marker="o", markersize=4, label=name or None)
        n_max = max(n_max, curve.size)
    step = max(1, n_max // 20)
    ax.set_xticks(np.arange(1, n_max + 1)[::step])
    ax.set_xlim(0.5, n_max + 0.5)
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("mean accuracy over seen tasks (%)")
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend()
    _save(fig, path)
