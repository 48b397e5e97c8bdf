"""bench_train's figures as report.py renders them (the per-method table: s/step, images/s, peak memory, speed-up
vs peer, × the floors of the same backbone and batch) and the peak-memory probe of benchmarks/harness.py."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from benchmarks import harness, report


def bench(group: str, impl: str, median: float, **info) -> dict:
    return {"group": group, "stats": {"median": median},
            "extra_info": {"op": "train_step", "impl": impl, "images": 16, "floors": "vit B16", **info}}


def named(table: str) -> dict[tuple[str, str], dict[str, str]]:
    """(case, impl) -> {column header: cell}; a repeated header (``per round``) is named after the column before."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    head = [h if h != "per round" else f"{head[i - 1]} per round" for i, h in enumerate(head)]
    out = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(head), line
        out[(cells[0], cells[1])] = dict(zip(head, cells))
    return out


def rows_of(table: str) -> dict[tuple[str, str], list[str]]:
    """(case, impl) -> the cells from ``median s/step`` on, in a table without ``peer_amp`` columns."""
    return {k: [c for h, c in row.items() if h not in ("case", "impl", "amp")] for k, row in named(table).items()}


def test_train_step_table_ratios_against_peer_and_the_floor():
    data = {"benchmarks": [
        bench("train_step l2p vit B16", "peer", 8.0, method="l2p", peak_mem_mb=900.0, peak_mem_kind="cpu_rss_sampled"),
        bench("train_step l2p vit B16", "reference", 4.0, method="l2p", peak_mem_mb=500.0,
              peak_mem_kind="cpu_rss_sampled"),
        bench("train_step l2p vit B16", "clfast", 2.0, method="l2p", peak_mem_mb=300.0, peak_mem_kind="cpu_rss_sampled"),
        bench("train_step floors vit B16", "floor", 1.6, method="floors"),
        bench("train_step floors vit B16", "floor_head", 0.5, method="floors"),
        {"group": "prefix_attention B1", "stats": {"median": 1e-3}, "extra_info": {"op": "prefix_attention",
                                                                                   "impl": "cpu"}},
    ]}
    tabs = report.tables(data)
    assert set(tabs) == {"train_step", "prefix_attention"}
    rows = rows_of(tabs["train_step"])
    assert rows[("l2p vit B16", "peer")] == ["8.000", "2.00", "900", "1.00×", "–", "5.00×", "–"]
    assert rows[("l2p vit B16", "clfast")] == ["2.000", "8.00", "300", "4.00×", "–", "1.25×", "–"]
    assert rows[("floors vit B16", "floor")][5:] == ["1.00×", "–"]
    assert rows[("floors vit B16", "floor_head")][5:] == ["0.31×", "–"]
    # methods first in the order peer, reference, clfast; the floors group last
    order = [k for k in rows]
    assert order.index(("l2p vit B16", "peer")) < order.index(("l2p vit B16", "reference")) \
        < order.index(("l2p vit B16", "clfast")) < order.index(("floors vit B16", "floor"))
    assert "resident set size" in tabs["train_step"]


def test_busy_neighbour_table_sets_each_load_side_by_side():
    def busy(impl, load, median):
        return {"group": "busy_neighbour mahalanobis B128 fp32 fwd+bwd", "stats": {"median": median},
                "extra_info": {"op": "busy_neighbour", "case_op": "mahalanobis", "impl": impl, "load": load}}
    data = {"benchmarks": [busy("cpu", "quiet", 0.003), busy("cpu", "busy", 0.006), busy("torch", "busy", 0.010),
                           busy("torch", "quiet", 0.004), busy("cpu", "rank", 0.0045)]}
    tabs = report.tables(data)
    assert set(tabs) == {"busy_neighbour"}
    rows = {tuple(c.strip() for c in line.strip("|").split("|"))[:2]: [c.strip() for c in line.strip("|").split("|")][2:]
            for line in tabs["busy_neighbour"].splitlines()[2:]}
    assert rows[("mahalanobis B128 fp32 fwd+bwd", "cpu")] == ["3.00", "6.00", "2.00×", "4.50", "1.50×"]
    assert rows[("mahalanobis B128 fp32 fwd+bwd", "torch")] == ["4.00", "10.00", "2.50×", "–", "–"]


def test_old_files_with_a_floor_in_the_group_still_render():
    data = {"benchmarks": [bench("train_step convprompt F5", "cpu", 7.0, floors=None),
                           bench("train_step convprompt F5", "floor", 3.5, floors=None)]}
    rows = rows_of(report.tables(data)["train_step"])
    assert rows[("convprompt F5", "cpu")][5] == "2.00×" and rows[("convprompt F5", "cpu")][2] == "–"


def test_paired_rounds_give_the_seconds_and_the_speed_up_with_its_range():
    """The paired rounds, not each configuration's own case, make the table: medians per configuration, and the
    median of the rounds' ratios (which is not the ratio of the medians) with their range."""
    paired = {"peer": [10.0, 12.0, 14.0], "reference": [9.0, 9.0, 9.0], "clfast": [5.0, 10.0, 7.0]}
    data = {"benchmarks": [
        bench("train_step gpls vit B16", "peer", 99.0, method="gpls", peak_mem_mb=900.0),
        bench("train_step gpls vit B16", "reference", 99.0, method="gpls"),
        bench("train_step gpls vit B16", "clfast", 1.0, method="gpls"),
        bench("train_step gpls vit B16", "paired", 30.0, method="gpls", paired_s=paired),
        bench("train_step floors vit B16", "floor", 7.0, method="floors"),
    ]}
    rows = rows_of(report.tables(data)["train_step"])
    assert ("gpls vit B16", "paired") not in rows
    assert rows[("gpls vit B16", "peer")][:6] == ["12.000", "1.33", "900", "1.00×", "–", "1.71×"]
    # rounds' ratios 2.00, 1.20, 2.00: median 2.00 (the medians' ratio would be 12 / 7 = 1.71)
    assert rows[("gpls vit B16", "clfast")][:6] == ["7.000", "2.29", "–", "2.00×", "1.20–2.00", "1.00×"]
    assert rows[("gpls vit B16", "reference")][3:5] == ["1.33×", "1.11–1.56"]
    assert report.paired_speedups({"peer": [1.0], "clfast": [1.0, 2.0]}, "clfast") is None    # a round missing


def test_the_floor_in_the_paired_rounds_gets_a_row_and_the_ratios_of_the_same_rounds():
    """A method's own floor run in its paired rounds: a ``floor`` row (its median, images/s, peak memory), and
    ``× floor`` is the median of each round's ratio to it (not the ratio of medians, not the floors group)."""
    paired = {"peer": [10.0, 12.0, 14.0], "reference": [9.0, 9.0, 9.0], "clfast": [5.0, 10.0, 7.0],
              "floor": [4.0, 5.0, 7.0]}
    data = {"benchmarks": [
        bench("train_step gpls vit B16", "peer", 99.0, method="gpls"),
        bench("train_step gpls vit B16", "reference", 99.0, method="gpls"),
        bench("train_step gpls vit B16", "clfast", 1.0, method="gpls"),
        bench("train_step gpls vit B16", "paired", 30.0, method="gpls", paired_s=paired, pays="query+floor",
              floor_peak_mem_mb=123.4, floor_peak_mem_kind="cpu_rss_sampled"),
        bench("train_step linear vit B16", "clfast", 2.0, method="linear"),
        bench("train_step linear vit B16", "paired", 2.0, method="linear", pays="floor_head",
              paired_s={"clfast": [2.0, 3.0], "floor": [1.0, 1.0]}),
        bench("train_step floors vit B16", "floor", 99.0, method="floors"),
    ]}
    table = report.tables(data)["train_step"]
    rows = rows_of(table)
    # clfast / floor per round: 1.25, 2.00, 1.00 -> median 1.25 (the medians' ratio would be 7 / 5 = 1.40)
    assert rows[("gpls vit B16", "clfast")][5:] == ["1.25×", "1.00–2.00"]
    assert rows[("gpls vit B16", "peer")][5:] == ["2.40×", "2.00–2.50"]
    assert rows[("gpls vit B16", "floor")] == ["5.000", "3.20", "123", "–", "–", "1.00×", "–"]
    assert rows[("linear vit B16", "clfast")][5:] == ["2.50×", "2.00–3.00"]
    assert "gpls: query + floor" in table and "linear: floor_head" in table
    assert "vs peer_amp" not in table and "peer_amp" not in table      # no autocast peer in this run: no columns


def test_the_autocast_peer_gets_its_own_columns_at_equal_precision():
    """Where the run has ``peer_amp`` (the peer under the engine's autocast), every row also gets the speed-up over
    it, the median of the rounds' ratios with their range, and each row names its precision."""
    paired = {"peer": [20.0, 24.0, 28.0], "peer_amp": [10.0, 12.0, 14.0], "reference": [9.0, 9.0, 9.0],
              "clfast": [5.0, 10.0, 7.0], "floor": [4.0, 5.0, 7.0]}
    amp = {"peer": "fp32", "peer_amp": "bfloat16", "reference": "bfloat16", "clfast": "bfloat16"}
    data = {"benchmarks": [
        *(bench("train_step gpls vit B16", c, 99.0, method="gpls", amp=a) for c, a in amp.items()),
        bench("train_step gpls vit B16", "paired", 30.0, method="gpls", paired_s=paired, pays="query+floor",
              amp="bfloat16"),
        bench("train_step floors vit B16", "floor", 3.0, method="floors", amp="bfloat16"),
    ]}
    table = report.tables(data)["train_step"]
    rows = named(table)
    clfast = rows[("gpls vit B16", "clfast")]
    assert clfast["amp"] == "bf16" and rows[("gpls vit B16", "peer")]["amp"] == "fp32"
    # vs peer per round 4.00, 2.40, 4.00; vs peer_amp 2.00, 1.20, 2.00; floor / clfast 1.25, 2.00, 1.00
    assert (clfast["speed-up vs peer"], clfast["speed-up vs peer per round"]) == ("4.00×", "2.40–4.00")
    assert (clfast["vs peer_amp"], clfast["vs peer_amp per round"]) == ("2.00×", "1.20–2.00")
    assert rows[("gpls vit B16", "peer_amp")]["vs peer_amp"] == "1.00×"
    assert rows[("gpls vit B16", "peer_amp")]["speed-up vs peer"] == "2.00×"
    assert rows[("gpls vit B16", "floor")]["amp"] == "bf16" and rows[("gpls vit B16", "floor")]["vs peer_amp"] == "–"
    assert rows[("floors vit B16", "floor")]["vs peer_amp"] == "–"
    order = [impl for case, impl in rows if case == "gpls vit B16"]
    assert order == ["peer", "peer_amp", "reference", "clfast", "floor"]
    assert "at equal precision" in table


@pytest.mark.skipif(torch.cuda.is_available() or not os.path.exists("/proc/self/statm"),
                    reason="tests peak_memory's CPU path: needs no CUDA device (with one it reads the CUDA allocator "
                           "instead) and Linux's /proc/self/statm (elsewhere it reports 'unavailable')")
def test_peak_memory_sees_a_64_mb_buffer_held_for_a_moment():
    def holds():
        x = torch.ones(16 * 2**20)          # 64 MB, every page touched
        time.sleep(0.05)
        return float(x[-1])

    got = harness.peak_memory(holds)
    assert got["peak_mem_kind"] == "cpu_rss_sampled"
    assert 56 <= got["peak_mem_mb"] <= 160, got
    idle = harness.peak_memory(lambda: time.sleep(0.02))
    assert idle["peak_mem_mb"] < 16, idle


def test_header_names_the_kernel_forms_that_ran():
    """Every table's header says which forms clfast's CPU kernels ran (chosen at run time), beside the CPU flags."""
    from clfast import _ext

    text = report.header({"datetime": "2026-12-07T00:00:00"})
    forms = _ext.cpu_kernels()["simd"]
    assert f"kernels: {forms}, bf16 GEMMs " in text, text


def test_paired_rounds_alternate_the_order():
    order = []
    run = harness.PairedRounds({c: (lambda c=c: order.append(c)) for c in ("peer", "reference", "clfast")})
    for _ in range(3):
        run()
    assert order == ["peer", "reference", "clfast", "clfast", "reference", "peer", "peer", "reference", "clfast"]
    assert {k: len(v) for k, v in run.seconds.items()} == {"peer": 3, "reference": 3, "clfast": 3}


def _results(tmp_path, dirty=False):
    data = {"commit_info": {"id": "0123456789abcdef", "dirty": dirty}, "datetime": "2026-12-07T00:00:00",
            "benchmarks": [bench("train_step l2p vit B16", "peer", 8.0, method="l2p"),
                           bench("train_step l2p vit B16", "clfast", 2.0, method="l2p")]}
    path = tmp_path / ("dirty.json" if dirty else "results.json")
    path.write_text(json.dumps(data))
    return path


def test_write_puts_the_fp32_run_between_its_own_markers_and_keeps_the_default_table(tmp_path, capsys):
    """`clfast bench train --amp none --write` names ``--train-block train_step_fp32``: its table goes between those
    markers, amp=auto's ``train_step`` table and the text around both stay as they were; a second write replaces
    the block in place. Results measured in a dirty tree are refused without --allow-dirty, a marker name that
    the plots could not read is refused by name."""
    out = tmp_path / "BENCHMARKS.md"
    kept = "<!-- bench:train_step:begin -->\n### train_step\n\nthe bf16 run\n<!-- bench:train_step:end -->\n"
    out.write_text(f"# clfast benchmarks\n\nprose before\n\n{kept}\nprose after\n")
    results = _results(tmp_path)
    assert report.main([str(results), "--write", "--out", str(out), "--train-block", "train_step_fp32"]) == 0
    text = out.read_text()
    assert kept in text and "prose before" in text and "prose after" in text
    block = text.split("<!-- bench:train_step_fp32:begin -->\n", 1)[1].split("<!-- bench:train_step_fp32:end -->")[0]
    assert block.startswith("### train_step_fp32\n") and "Commit: 0123456." in block
    assert rows_of(block)[("l2p vit B16", "clfast")][:2] == ["2.000", "8.00"]
    assert report.main([str(results), "--write", "--out", str(out), "--train-block", "train_step_fp32"]) == 0
    assert out.read_text() == text     # rewritten in place, not appended again
    assert report.main([str(_results(tmp_path, dirty=True)), "--write", "--out", str(out)]) == 2
    assert "uncommitted changes" in capsys.readouterr().err and out.read_text() == text
    with pytest.raises(SystemExit):
        report.main([str(results), "--write", "--out", str(out), "--train-block", "train step"])
    assert "--train-block" in capsys.readouterr().err
