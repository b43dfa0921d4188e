"""Ratios between two results files, and the compare command."""

import math

import pytest

from loadtest.__main__ import main
from loadtest.compare import compare, format_rows, ratio
from loadtest.results import write_results


def _summary(throughput, p99, failed):
    return {"throughput_rps": throughput, "requests": 1000, "failed": failed,
            "latency_ms": {"p50": 5.0, "p90": 8.0, "p99": p99, "p99.9": None, "max": 40.0},
            "ok_latency_ms": {"p50": 5.0, "p99": p99}}


def test_ratio_cases():
    assert ratio(100, 150) == 1.5
    assert ratio(0, 5) == math.inf
    assert math.isnan(ratio(0, 0))
    assert math.isnan(ratio(math.nan, 1))


def test_compare_by_hand():
    rows = {row.metric: row for row in compare({"summary": _summary(100, 20, 0)}, {"summary": _summary(150, 30, 4)})}
    assert rows["throughput_rps"].ratio == 1.5           # 150 / 100
    assert rows["latency_ms.p99"].ratio == 1.5           # 30 / 20
    assert rows["latency_ms.p50"].ratio == 1.0
    assert rows["failed"].ratio == math.inf               # 4 / 0
    assert math.isnan(rows["latency_ms.p99.9"].ratio)    # null in both (no requests)
    assert "throughput_rps" in format_rows(list(rows.values()))


def test_compare_rejects_a_document_without_summary():
    with pytest.raises(ValueError, match="b must be a results document"):
        compare({"summary": _summary(1, 1, 0)}, {"config": {}})


def test_compare_command_prints_ratios(tmp_path, capsys):
    a = write_results(tmp_path / "a.json", {"summary": _summary(100, 20, 0)})
    b = write_results(tmp_path / "b.json", {"summary": _summary(50, 40, 0)})
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "throughput_rps" in out and "0.500" in out and "2.000" in out
