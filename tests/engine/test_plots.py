import os

import pytest

from clfast.engine.plots import plot_acc_matrix, plot_accuracy_curve  # matplotlib is a dependency: no skip

nan = float("nan")
PNG = b"\x89PNG\r\n\x1a\n"
A = [[90, 80, 70], [nan, 85, 75], [nan, nan, 95]]
B = [[70, 60], [nan, 80]]


def test_plots_write_png_and_nothing_else(tmp_path):
    plot_acc_matrix(A, tmp_path / "acc_matrix.png", title="demo")
    plot_accuracy_curve(A, tmp_path / "accuracy_curve.png", label="run")
    plot_accuracy_curve({"a": A, "b": B}, tmp_path / "overlay.png")
    assert sorted(os.listdir(tmp_path)) == ["acc_matrix.png", "accuracy_curve.png", "overlay.png"]
    for name in os.listdir(tmp_path):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG and len(data) > 1000


def test_plots_do_not_touch_pyplot(tmp_path):
    import sys

    had_pyplot = "matplotlib.pyplot" in sys.modules
    plot_acc_matrix([[50.0]], tmp_path / "one.png")
    if not had_pyplot:
        assert "matplotlib.pyplot" not in sys.modules


def test_plot_errors(tmp_path):
    with pytest.raises(ValueError, match="square"):
        plot_acc_matrix([[1, 2]], tmp_path / "x.png")
    with pytest.raises(ValueError, match="path must end in"):
        plot_acc_matrix(A, tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="label must be None"):
        plot_accuracy_curve({"a": A}, tmp_path / "x.png", label="z")
    assert os.listdir(tmp_path) == []


def test_a_joint_runs_column_plots(tmp_path):
    from clfast.engine.record import format_summary

    column = [[90.0], [70.0], [60.0]]
    plot_acc_matrix(column, tmp_path / "acc_matrix.png")
    plot_accuracy_curve(column, tmp_path / "accuracy_curve.png", label="joint")
    assert all((tmp_path / n).read_bytes()[:8] == PNG for n in ("acc_matrix.png", "accuracy_curve.png"))
    text = format_summary(column, {"A_N": 73.3, "F_N": 0.0, "BWT": 0.0, "sample_weighted_accuracy": 71.4})
    assert "joint" in text and "task  3   60.0" in text and "·" not in text
