"""benchmarks/plots.py: the tables it reads and the plots it draws from BENCHMARKS.md."""

from __future__ import annotations

import pytest

from benchmarks import plots

TOY = """
### some op
| case | impl | median ms | speed-up vs peer |
|---|---|---:|---:|
| B128 M10 D768 k5 fp32 fwd | cpu | 0.25 | 2.00× |

<!-- bench:retrieve:begin -->
### retrieve
| case | impl | median ms |
|---|---|---:|
| B128 M10 D768 k5 fp32 fwd | cpu | 0.30 |
| B128 M1000 D768 k5 fp32 fwd | cpu | 1.50 |
| B128 M10 D768 k5 fp32 fwd | peer | 0.20 |
| B128 M1000 D768 k5 fp32 fwd+bwd | cpu | 9.00 |
<!-- bench:retrieve:end -->
"""


def test_tables_are_read_by_marker_and_heading():
    tables = plots.read_tables(TOY)
    assert set(tables) == {"some op", "retrieve"}
    assert tables["retrieve"][1] == {"case": "B128 M1000 D768 k5 fp32 fwd", "impl": "cpu", "median ms": "1.50"}
    got = plots.series(tables["retrieve"], plots.RETRIEVE, "M", lambda m, r: r["impl"])
    assert got == {"cpu": [(10.0, 0.30), (1000.0, 1.50)], "peer": [(10.0, 0.20)]}   # fwd+bwd left out


def test_a_table_without_the_plotted_cases_is_an_error_naming_it():
    tables = plots.read_tables(TOY)
    with pytest.raises(ValueError, match="table 'some op' has no case matching"):
        plots.series(tables["some op"], plots.PROMPT_CONV, "F", lambda m, r: r["impl"], table="some op")


def test_the_plots_of_the_committed_tables_are_drawn(tmp_path):
    assert plots.main(["--out", str(tmp_path)]) == 0
    for name in ("retrieve_pool_size.png", "prompt_conv_prompts.png", "train_step_methods.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


TRAIN_TOY = """
### train_step: GPLS (bench_train.py, under load)
| case | impl | median s/step | images/s |
|---|---|---:|---:|
| gpls vit_base_patch16_224 B16 | clfast | 9.000 | 1.78 |
| gpls vit_base_patch16_224 B16 | floor | 4.000 | 4.00 |

<!-- bench:train_step:begin -->
### train_step
| case | impl | amp | median s/step | images/s |
|---|---|---|---:|---:|
| gpls vit_base_patch16_224 B16 | peer | fp32 | 8.000 | 2.00 |
| gpls vit_base_patch16_224 B16 | clfast | bf16 | 2.000 | 8.00 |
<!-- bench:train_step:end -->
"""


def test_the_training_plot_reads_the_one_run_between_the_markers_with_each_precision():
    """Where the train_step block exists, the bars are its run only (another table of the same case, from another
    run or machine, must not overwrite or add bars), each configuration labelled with its precision."""
    rates, amps = plots.train_rates(plots.read_tables(TRAIN_TOY))
    assert rates == {"gpls vit_base_patch16_224 B16": {"peer": 2.0, "clfast": 8.0}}
    assert amps == {"peer": "fp32", "clfast": "bf16"}
    without_block = TRAIN_TOY.split("<!-- bench:train_step:begin -->")[0]
    rates, amps = plots.train_rates(plots.read_tables(without_block))
    assert rates == {"gpls vit_base_patch16_224 B16": {"clfast": 1.78, "floor": 4.0}} and amps == {}
