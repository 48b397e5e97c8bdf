import math

import numpy as np
import pytest

from clfast.engine.metrics import (AccuracyMatrix, accuracy_curve, average_incremental_accuracy,
                                   backward_transfer, final_accuracy, forgetting, per_task_accuracy,
                                   read_acc_csv, sample_weighted_accuracy, summarize, write_acc_csv)

nan = float("nan")
EXAMPLE = [[90, 80, 70], [nan, 85, 75], [nan, nan, 95]]


def test_example_matrix():
    assert final_accuracy(EXAMPLE) == pytest.approx(80.0)
    assert forgetting(EXAMPLE) == pytest.approx(15.0)  # mean(90-70, 85-75)
    assert backward_transfer(EXAMPLE) == pytest.approx(-15.0)  # mean(70-90, 75-85)
    np.testing.assert_allclose(accuracy_curve(EXAMPLE), [90.0, 82.5, 80.0])
    assert average_incremental_accuracy(EXAMPLE) == pytest.approx((90 + 82.5 + 80) / 3)


def test_forgetting_uses_max_over_earlier_columns_not_the_diagonal():
    # task 0 improves after task 1 (60 -> 80) then drops to 50: forgetting counts from the peak (80),
    # BWT from the diagonal (60).
    acc = np.array([[60, 80, 50], [nan, 70, 70], [nan, nan, 90]], dtype=float)
    assert forgetting(acc) == pytest.approx(((80 - 50) + (70 - 70)) / 2)
    assert backward_transfer(acc) == pytest.approx(((50 - 60) + (70 - 70)) / 2)
    # the last column never enters the max: a task that only improves has negative forgetting
    up = [[50, 60], [nan, 80]]
    assert forgetting(up) == pytest.approx(-10.0)
    assert backward_transfer(up) == pytest.approx(10.0)


def test_single_task():
    acc = [[73.5]]
    assert final_accuracy(acc) == 73.5
    assert forgetting(acc) == 0.0
    assert backward_transfer(acc) == 0.0
    assert average_incremental_accuracy(acc) == 73.5


def test_values_below_diagonal_are_ignored():
    filled = np.array(EXAMPLE, dtype=float)
    filled[np.tril_indices(3, -1)] = 0.0
    assert forgetting(filled) == forgetting(EXAMPLE)
    assert average_incremental_accuracy(filled) == average_incremental_accuracy(EXAMPLE)


def test_sample_weighted_differs_from_final_accuracy_with_unequal_task_sizes():
    correct, total = [90, 100], [100, 1000]  # 90 % and 10 %
    np.testing.assert_allclose(per_task_accuracy(correct, total), [90.0, 10.0])
    assert sample_weighted_accuracy(correct, total) == pytest.approx(100 * 190 / 1100)
    acc = [[95.0, 90.0], [nan, 10.0]]
    s = summarize(acc, correct, total)
    assert set(s) == {"A_N", "F_N", "BWT", "A_avg", "sample_weighted_accuracy"}
    assert all(type(v) is float for v in s.values())
    assert s["A_N"] == pytest.approx(50.0)
    assert s["sample_weighted_accuracy"] == pytest.approx(17.2727, abs=1e-3)
    assert s["F_N"] == pytest.approx(5.0) and s["BWT"] == pytest.approx(-5.0)
    # equal sizes: the two coincide
    assert sample_weighted_accuracy([90, 10], [100, 100]) == pytest.approx(final_accuracy(acc))


def test_sample_weighted_curve_over_seen_tasks_with_unequal_sizes():
    """After each task, credit over every test sample of the seen tasks (CluMo's "total avg accuracy"),
    against a float64 reference written out cell by cell; it differs from A_j when sizes differ."""
    from clfast.engine.metrics import sample_weighted_curve
    m = AccuracyMatrix()
    cells = {(0, 0): (18, 20), (0, 1): (12, 20), (1, 1): (150, 300), (0, 2): (10, 20), (1, 2): (120, 300),
             (2, 2): (4.5, 5)}                        # soft credit (VQA accuracy) may be fractional
    for (i, j), (c, n) in cells.items():
        m.update(i, j, c, n)
    curve = m.sample_weighted_curve()
    ref = [100 * 18 / 20, 100 * (12 + 150) / (20 + 300), 100 * (10 + 120 + 4.5) / (20 + 300 + 5)]
    np.testing.assert_allclose(curve, ref, rtol=0, atol=1e-12)
    assert curve[-1] == pytest.approx(m.summary()["sample_weighted_accuracy"])
    a_j = accuracy_curve(m.matrix())
    assert a_j[1] == pytest.approx((60 + 50) / 2) and abs(curve[1] - a_j[1]) > 4   # 50.6 vs 55.0
    assert m.test_sizes() == [20, 300, 5]
    np.testing.assert_allclose(sample_weighted_curve(*m.counts()), ref)
    joint = AccuracyMatrix(joint=True)
    joint.update(0, 0, 1, 4)
    joint.update(1, 0, 6, 6)
    np.testing.assert_allclose(joint.sample_weighted_curve(), [70.0])
    with pytest.raises(ValueError, match="same shape"):
        sample_weighted_curve(np.ones((2, 2)), np.ones((2, 1)))
    with pytest.raises(ValueError, match="total must be > 0"):
        sample_weighted_curve([[1, 1], [0, 1]], [[2, 2], [0, 0]])
    with pytest.raises(ValueError, match="empty"):
        AccuracyMatrix().sample_weighted_curve()


def test_accuracy_matrix_counts_per_sample_not_per_batch():
    m = AccuracyMatrix()
    # task 0 after task 0 evaluated in two batches of different size: 10/10 and 0/30
    m.update(0, 0, 10, 10)
    m.update(0, 0, 0, 30)
    assert m.matrix()[0, 0] == pytest.approx(25.0)  # not mean(100, 0) = 50
    m.update(0, 1, 30, 40)
    m.update(1, 1, 45, 50)
    a = m.matrix()
    assert a.shape == (2, 2) and math.isnan(a[1, 0])
    np.testing.assert_allclose(a[0], [25.0, 75.0])
    c, t = m.counts()
    assert c.tolist() == [[10, 30], [0, 45]] and t.tolist() == [[40, 40], [0, 50]]
    s = m.summary()
    assert s["A_N"] == pytest.approx((75 + 90) / 2)
    assert s["sample_weighted_accuracy"] == pytest.approx(100 * 75 / 90)
    # state round trip
    m2 = AccuracyMatrix.from_state_dict(m.state_dict())
    np.testing.assert_array_equal(m2.matrix(), a)


def test_soft_scores_are_kept_exactly():
    # VQA accuracy credits min(1, votes/3) per answer: 0.3 + 0.6 + 1.0 of 3 questions is 63.33 %, not 2/3
    m = AccuracyMatrix()
    m.update(0, 0, 0.3 + 0.6, 2)
    m.update(0, 0, 1.0, 1)
    assert m.matrix()[0, 0] == pytest.approx(100 * 1.9 / 3)
    assert AccuracyMatrix.from_state_dict(m.state_dict()).matrix()[0, 0] == pytest.approx(100 * 1.9 / 3)
    assert sample_weighted_accuracy([1.9, 0.5], [3, 1]) == pytest.approx(100 * 2.4 / 4)
    with pytest.raises(ValueError, match="correct must be <= total"):
        m.update(0, 0, 1.5, 1)


def test_csv_round_trip_and_format(tmp_path):
    m = AccuracyMatrix()
    for j in range(3):
        for i in range(j + 1):
            m.update(i, j, 7 * (i + 1) + j, 9 * (i + 1) + j)
    path = tmp_path / "acc_matrix.csv"
    m.to_csv(path)
    lines = path.read_text().splitlines()
    assert lines[0] == "task,after_1,after_2,after_3"
    assert lines[2].startswith("2,,") and lines[3].startswith("3,,,")
    back = AccuracyMatrix.from_csv(path)
    np.testing.assert_array_equal(back, m.matrix())  # exact, NaN in the same places
    write_acc_csv(EXAMPLE, tmp_path / "e.csv")
    np.testing.assert_array_equal(read_acc_csv(tmp_path / "e.csv"), np.array(EXAMPLE, dtype=float))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acc_matrix.csv", "e.csv"]


@pytest.mark.parametrize("bad, match", [
    ([[1.0, 2.0, 3.0], [nan, 4.0, 5.0]], "square"),
    ([1.0, 2.0], "square"),
    ([], "square"),
    ([[90.0, nan], [nan, 80.0]], r"acc\[0\]\[1\]"),
    ([[90.0, 101.0], [nan, 80.0]], r"\[0, 100\]"),
    ([[90.0, nan], [80.0, 85.0]], "transposed"),
])
def test_matrix_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        final_accuracy(bad)


@pytest.mark.parametrize("correct, total, match", [
    ([1, 2], [3], "same length"),
    ([1, -1], [3, 3], "correct must hold non-negative"),
    ([1, 1], [3, 0], "total must be > 0"),
    ([4, 1], [3, 3], r"correct\[0\]=4 exceeds total\[0\]=3"),
    ([1, 1], [3.5, 3], "total must hold whole sample counts"),
    ([float("nan"), 1], [3, 3], "correct must hold finite counts"),
    ([[1, 2]], [[3, 3]], "1-D"),
])
def test_count_validation(correct, total, match):
    with pytest.raises(ValueError, match=match):
        sample_weighted_accuracy(correct, total)


def test_summarize_rejects_counts_that_do_not_match_the_last_column():
    with pytest.raises(ValueError, match="do not match the last column"):
        summarize(EXAMPLE, [75, 70, 95], [100, 100, 100])  # first two swapped
    with pytest.raises(ValueError, match="one entry per task"):
        summarize(EXAMPLE, [70, 75], [100, 100])


def test_accuracy_matrix_validation(tmp_path):
    m = AccuracyMatrix()
    with pytest.raises(ValueError, match="task_evaluated must be <= after_task"):
        m.update(2, 1, 1, 1)
    with pytest.raises(ValueError, match="correct must be <= total"):
        m.update(0, 0, 5, 4)
    with pytest.raises(ValueError, match="total must be a non-negative int"):
        m.update(0, 0, 1, -3)
    with pytest.raises(ValueError, match="correct must be a non-negative number"):
        m.update(0, 0, "3", 4)
    with pytest.raises(ValueError, match="correct must be a non-negative finite number"):
        m.update(0, 0, -0.5, 4)
    with pytest.raises(ValueError, match="empty"):
        m.summary()
    m.update(0, 0, 1, 1)
    m.update(0, 1, 1, 2)  # column 1 known, cell (1, 1) not yet evaluated
    with pytest.raises(ValueError, match=r"acc\[1\]\[1\] must be a finite accuracy"):
        m.to_csv(tmp_path / "x.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("task,after_1,after_3\n1,90,80\n2,,85\n")
    with pytest.raises(ValueError, match="header"):
        read_acc_csv(bad)


def test_a_joint_runs_single_column(tmp_path):
    """Joint training (every task's data as one task): an (N, 1) matrix, every cell defined."""
    m = AccuracyMatrix(joint=True)
    m.update(0, 0, 9, 10)
    m.update(2, 0, 6, 10)
    m.update(1, 0, 35, 50)
    a = m.matrix()
    assert a.shape == (3, 1) and a[:, 0].tolist() == [90.0, 70.0, 60.0]
    s = m.summary()
    assert s["A_N"] == pytest.approx(220 / 3) and s["A_avg"] == pytest.approx(s["A_N"])
    assert s["F_N"] == 0.0 and s["BWT"] == 0.0
    assert s["sample_weighted_accuracy"] == pytest.approx(100 * 50 / 70)   # not the mean of the column
    np.testing.assert_allclose(accuracy_curve(a), [220 / 3])
    with pytest.raises(ValueError, match="after_task must be 0"):
        m.update(0, 1, 1, 1)
    m.to_csv(tmp_path / "j.csv")
    assert (tmp_path / "j.csv").read_text().splitlines()[:2] == ["task,after_1", "1,90.0"]
    np.testing.assert_array_equal(read_acc_csv(tmp_path / "j.csv"), a)
    back = AccuracyMatrix.from_state_dict(m.state_dict())
    assert back.joint and back.summary() == s
    with pytest.raises(ValueError, match="square"):
        AccuracyMatrix().load_state_dict(m.state_dict())
    with pytest.raises(ValueError, match="joint"):
        AccuracyMatrix(joint=True).load_state_dict(AccuracyMatrix.from_state_dict(
            {"correct": [[1, 1], [0, 1]], "total": [[2, 2], [0, 2]]}).state_dict())
    empty = AccuracyMatrix(joint=True)
    empty.load_state_dict(AccuracyMatrix(joint=True).state_dict())   # a checkpoint before any evaluation
    assert empty.num_tasks == 0
    with pytest.raises(ValueError, match=r"acc\[1\]\[0\] must be a finite"):
        final_accuracy([[90.0], [nan]])                              # a column has no undefined cell
    with pytest.raises(ValueError, match="square"):
        final_accuracy([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])       # (3, 2): neither square nor a column
