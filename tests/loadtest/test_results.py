"""Percentiles, summaries, windows and the results file, with hand-computed numbers."""

import json
import math

import pytest

from loadtest.results import (SCHEMA, Outcome, elapsed_s, format_summary, from_json, latency_stats, percentile,
                              read_results, summarize, to_json, window, write_results)


def test_nearest_rank_percentiles_by_hand():
    values = [10, 20, 30, 40, 50]
    # ranks ceil(q * 5 / 100): p50 -> 3rd, p90 -> 5th (4.5 up), p20 -> 1st, p21 -> 2nd (1.05 up).
    assert percentile(values, 50) == 30
    assert percentile(values, 90) == 50
    assert percentile(values, 20) == 10
    assert percentile(values, 21) == 20
    hundred = list(range(1, 101))
    # p99 of 1..100 is rank 99 exactly (no float noise rounding it up to 100); p99.9 is rank ceil(99.9) = 100.
    assert percentile(hundred, 99) == 99
    assert percentile(hundred, 99.9) == 100
    thousand = list(range(1, 1001))
    assert percentile(thousand, 99.9) == 999   # 99.9 * 1000 / 100 is 999.0000000000001 in floats
    assert math.isnan(percentile([], 50))


@pytest.mark.parametrize("q", [0, -1, 100.5])
def test_percentile_rejects_q_outside_0_100(q):
    with pytest.raises(ValueError, match="q must be"):
        percentile([1.0], q)


def test_latency_stats_are_in_milliseconds():
    stats = latency_stats([0.001 * x for x in (4, 1, 3, 2)])   # 1..4 ms, unsorted
    assert stats["p50"] == pytest.approx(2) and stats["p90"] == pytest.approx(4)
    assert stats["max"] == pytest.approx(4) and stats["mean"] == pytest.approx(2.5)
    assert math.isnan(latency_stats([])["p99"])


OUTCOMES = [
    Outcome(0.0, 0.010, "OK", (), (("retrieval", 1), ("ranking", 1))),
    Outcome(0.5, 0.020, "OK", ("DEGRADED_PATH_COLD_START_USER",), (("retrieval", 1), ("ranking", 2))),
    Outcome(1.0, 0.200, "DEADLINE_EXCEEDED"),
    Outcome(1.5, 0.001, "UNAVAILABLE"),
]


def test_summarize_by_hand():
    summary = summarize(OUTCOMES, duration_s=2.0)
    assert (summary["requests"], summary["ok"], summary["failed"]) == (4, 2, 2)
    assert summary["throughput_rps"] == 1.0 and summary["offered_rps"] == 2.0
    # all latencies sorted: 1, 10, 20, 200 ms -> p50 = rank 2 = 10 ms; OK only: 10, 20 -> p50 = 10, max 20.
    assert summary["latency_ms"]["p50"] == pytest.approx(10) and summary["latency_ms"]["max"] == pytest.approx(200)
    assert summary["ok_latency_ms"]["max"] == pytest.approx(20)
    assert summary["codes"] == {"DEADLINE_EXCEEDED": 1, "OK": 2, "UNAVAILABLE": 1}
    assert summary["degraded"] == {"DEGRADED_PATH_COLD_START_USER": 1}
    assert summary["versions"] == {"ranking": {"1": 1, "2": 1}, "retrieval": {"1": 2}}
    assert summary["mixed_versions"] == 1            # the second answer: retrieval v1, ranking v2


def test_an_answer_without_retrieval_is_not_mixed():
    fallback = Outcome(0.0, 0.01, "OK", (), (("retrieval", 0), ("ranking", 3)))
    rank_only = Outcome(0.1, 0.01, "OK", (), (("ranking", 3),))
    assert summarize([fallback, rank_only], 1.0)["mixed_versions"] == 0


def test_summarize_rejects_a_non_positive_duration():
    with pytest.raises(ValueError, match="duration_s"):
        summarize(OUTCOMES, 0.0)


def test_window_and_elapsed():
    assert [o.intended_s for o in window(OUTCOMES, 0.5, 1.5)] == [0.5, 1.0]
    # the last reply: 1.0 + 0.2 = 1.2 s < 1.5 + 0.001; the floor wins when it is later.
    assert elapsed_s(OUTCOMES, 0.0) == pytest.approx(1.501)
    assert elapsed_s(OUTCOMES, 2.0) == 2.0


def test_outcomes_round_trip_through_json():
    assert from_json(json.loads(json.dumps(to_json(OUTCOMES)))) == OUTCOMES


def test_results_file_round_trip_writes_nan_as_null(tmp_path):
    path = write_results(tmp_path / "r" / "results.json", {"summary": summarize([], 1.0)})
    text = path.read_text()
    assert "NaN" not in text
    document = read_results(path)
    assert document["schema"] == SCHEMA and document["summary"]["latency_ms"]["p99"] is None


def test_read_results_rejects_another_schema(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(ValueError, match="schema"):
        read_results(path)


def test_format_summary_names_the_figures():
    text = format_summary(summarize(OUTCOMES, 2.0), "run: ")
    assert "requests=4 ok=2 failed=2" in text and "p50=10.0" in text
    assert "DEADLINE_EXCEEDED=1" in text and "ranking v1=1, v2=1" in text and "mixed-version answers=1" in text


def test_refusals_get_their_own_latency_figures():
    outcomes = [*OUTCOMES, Outcome(1.8, 0.002, "RESOURCE_EXHAUSTED"), Outcome(1.9, 0.004, "RESOURCE_EXHAUSTED")]
    summary = summarize(outcomes, 2.0)
    # refusals alone: 2, 4 ms -> p50 = rank 1 = 2 ms, p99 = rank 2 = 4 ms
    assert summary["refused_latency_ms"]["p50"] == pytest.approx(2)
    assert summary["refused_latency_ms"]["p99"] == pytest.approx(4)
    assert "refused in ms: p50=2.0 p99=4.0" in format_summary(summary)
    assert "refused in ms" not in format_summary(summarize(OUTCOMES, 2.0))
