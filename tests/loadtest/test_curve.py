"""``python -m loadtest curve``: saved runs grouped by variant and rate, medians, the plot and its table."""

from __future__ import annotations

import json

import pytest

from loadtest.__main__ import main
from loadtest.curve import THREAD_PARTS, format_points, parse_run_arguments, points, thread_parts
from loadtest.output import save_run
from loadtest.results import THROTTLED, Outcome, summarize


def _run(tmp_path, name: str, rate: float, ok_ms: float, refused: int, cpu_ms: float | None = None,
         throttled: int = 0, threads: dict | None = None):
    """A saved open-loop run: 10 answers taking ``ok_ms``, ``refused`` refusals of 2 ms and ``throttled``
    requests the client kept (0.1 ms), over 1 s."""
    outcomes = [Outcome(i / 10, ok_ms / 1000, "OK") for i in range(10)]
    outcomes += [Outcome(0.5, 0.002, "RESOURCE_EXHAUSTED") for _ in range(refused)]
    outcomes += [Outcome(0.6, 0.0001, THROTTLED) for _ in range(throttled)]
    document = {"config": {"rate": rate}, "summary": summarize(outcomes, 1.0)}
    if cpu_ms is not None:
        document["service_cpu"] = {"services_cpu_ms_per_ok": cpu_ms}
    if threads is not None:
        document.setdefault("service_cpu", {})["threads_cpu_ms_per_ok"] = threads
    save_run(tmp_path / name, document, outcomes, name)
    return tmp_path / name


def test_points_are_medians_per_variant_and_rate(tmp_path):
    dirs = {"a1": _run(tmp_path, "a1", 100, 5, 0, 6.0), "a2": _run(tmp_path, "a2", 100, 9, 0, 5.0),
            "a3": _run(tmp_path, "a3", 100, 7, 0, 4.0), "b": _run(tmp_path, "b", 300, 50, 5, throttled=5)}
    runs = [("before", json.loads((dirs[n] / "results.json").read_text())) for n in ("a1", "a2", "a3", "b")]
    curve = points(runs)
    assert [(p.label, p.offered_rps, p.runs) for p in curve] == [("before", 100.0, 3), ("before", 300.0, 1)]
    low, high = curve
    assert low.p99_ms == pytest.approx(7.0) and low.goodput_rps == pytest.approx(10.0)
    assert low.services_cpu_ms_per_ok == pytest.approx(5.0)
    assert low.refused_share == 0 and low.refused_p99_ms is None       # no refusal: no refusal latency
    assert high.refused_share == pytest.approx(0.25) and high.refused_p99_ms == pytest.approx(2.0)
    assert low.throttled_share == 0 and high.throttled_share == pytest.approx(0.25)   # 5 of 20, apart from refusals
    assert high.services_cpu_ms_per_ok is None                         # an older run without CPU figures
    assert "| before | 300 | 1 | 10.0 | 50.0 / 50.0 | 25 % | 2.0 | 25 % | - |" in format_points(curve)


def test_curve_command_writes_the_plot_and_its_table(tmp_path, capsys):
    old, new = _run(tmp_path, "old", 200, 20, 5), _run(tmp_path, "new", 200, 10, 0)
    out = tmp_path / "img" / "curve.png"
    assert main(["curve", "--run", f"old={old}", "--run", f"new={new}", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads(out.with_suffix(".json").read_text())
    assert {row["label"]: row["p99_ms"] for row in table} == {"new": pytest.approx(10.0), "old": pytest.approx(20.0)}
    assert "| old | 200 |" in capsys.readouterr().out


@pytest.mark.parametrize("pair, message", [("nolabel", "LABEL=DIR"), ("x=", "LABEL=DIR"),
                                           ("x=/nonexistent/run", "no results.json")])
def test_a_bad_run_argument_is_named(pair, message):
    with pytest.raises(ValueError, match=message):
        parse_run_arguments([pair])


def test_the_command_exits_2_on_a_bad_run(tmp_path, capsys):
    assert main(["curve", "--run", "x=" + str(tmp_path), "--out", str(tmp_path / "c.png")]) == 2
    assert "no results.json" in capsys.readouterr().err


def _png_width(path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")      # the IHDR chunk's width


def test_cpu_by_thread_is_folded_into_loop_compute_and_grpc_and_takes_medians(tmp_path, capsys):
    def threads(loop: float) -> dict:
        return {"ranking": {"main": loop, "dcn": 0.8, "event_engine": 0.2, "other": 0.1, "lifeguard": 0.0},
                "retrieval": {"main": 0.9, "tower": 0.4, "event_engine": 0.1}}
    assert thread_parts(threads(1.5)) == pytest.approx({"ranking loop": 1.5, "ranking compute": 0.8,
                                                         "ranking grpc": 0.3, "retrieval loop": 0.9,
                                                         "retrieval compute": 0.4, "retrieval grpc": 0.1})
    assert thread_parts({"ranking": {"main": None}}) is None          # a run without answers
    dirs = [_run(tmp_path, f"t{i}", 300, 10, 0, 4.0, threads=threads(loop)) for i, loop in enumerate((1.0, 2.0, 1.4))]
    plain = _run(tmp_path, "plain", 300, 10, 0, 4.0)                # an older run: no thread figures
    curve = points([("x", json.loads((d / "results.json").read_text())) for d in [*dirs, plain]])
    assert curve[0].threads_cpu_ms_per_ok["ranking loop"] == pytest.approx(1.4)     # the median of three
    assert list(curve[0].threads_cpu_ms_per_ok) == list(THREAD_PARTS)
    out = tmp_path / "with.png"
    assert main(["curve", "--run", f"x={dirs[0]}", "--run", f"x={plain}", "--out", str(out)]) == 0
    without = tmp_path / "without.png"
    assert main(["curve", "--run", f"x={plain}", "--out", str(without)]) == 0
    assert _png_width(out) > _png_width(without)                     # the fourth panel is drawn only with them
    table = json.loads(out.with_suffix(".json").read_text())
    assert table[0]["threads_cpu_ms_per_ok"]["retrieval compute"] == pytest.approx(0.4)
    assert json.loads(without.with_suffix(".json").read_text())[0]["threads_cpu_ms_per_ok"] is None
